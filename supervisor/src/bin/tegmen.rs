//! `tegmen`: a drop-in, runc-compatible OCI runtime that runs each
//! container in its own microVM. See `tegmen_supervisor::runtime`.

use std::path::PathBuf;

use clap::Parser;
use tegmen_supervisor::config::Config;
use tegmen_supervisor::runtime::cli::{normalize, Cli, Command};
use tegmen_supervisor::runtime::create::{self, CreateOptions};
use tegmen_supervisor::runtime::monitor::{self, MonitorArgs};
use tegmen_supervisor::runtime::{commands, events, log, Globals};

fn main() {
    let cli = Cli::parse_from(normalize(std::env::args().collect()));
    let format = match cli.log_format.as_str() {
        "json" => log::Format::Json,
        "text" => log::Format::Text,
        other => {
            eprintln!("invalid log-format: {other}");
            std::process::exit(1);
        }
    };
    log::init(cli.log.as_deref(), format, cli.debug);
    let code = match run(cli, format) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            log::error(&msg);
            eprintln!("{msg}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli, log_format: log::Format) -> anyhow::Result<i32> {
    if cli.version {
        println!("tegmen version {}\nspec: 1.0.2-dev", env!("CARGO_PKG_VERSION"));
        return Ok(0);
    }
    let Some(command) = cli.command else {
        use clap::CommandFactory;
        Cli::command().print_help()?;
        return Ok(0);
    };
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(root) = cli.root {
        config.root = absolute(root)?;
    }
    let globals = Globals {
        config,
        log: cli.log.map(absolute).transpose()?,
        log_format,
        debug: cli.debug,
        systemd_cgroup: cli.systemd_cgroup,
    };
    log::debug(&format!("{command:?}"));
    let create_options = |a: &tegmen_supervisor::runtime::cli::CreateArgs, detach: bool| CreateOptions {
        id: a.id.clone(),
        bundle: a.bundle.clone(),
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        preserve_fds: a.preserve_fds,
        detach,
    };
    match command {
        Command::Create(a) => {
            create::create(&globals, &create_options(&a, true))?;
        }
        Command::Run { create, detach, .. } => return Ok(commands::run(&globals, &create_options(&create, detach))?),
        Command::Start { id } => commands::start(&globals, &id)?,
        Command::State { id } => commands::state(&globals, &id)?,
        Command::Kill { all, id, signal } => {
            commands::kill(&globals, &id, signal.as_deref().unwrap_or("SIGTERM"), all)?
        }
        Command::Delete { force, id } => commands::delete(&globals, &id, force)?,
        Command::Exec {
            console_socket,
            cwd,
            env,
            tty,
            user,
            additional_gids,
            process,
            detach,
            pid_file,
            preserve_fds,
            id,
            command,
            ..
        } => {
            let opts = commands::ExecOptions {
                id,
                command,
                process,
                detach,
                pid_file,
                console_socket,
                tty,
                env,
                cwd,
                user,
                additional_gids,
                preserve_fds,
            };
            return Ok(commands::exec(&globals, &opts)?);
        }
        Command::List { format, quiet } => commands::list(&globals, &format, quiet)?,
        Command::Ps { format, id, .. } => commands::ps(&globals, &id, format == "json")?,
        Command::Events { stats, interval, id } => {
            let interval = events::parse_duration(&interval)?;
            events::events(&globals, &id, stats, interval)?
        }
        Command::Pause { id } => commands::pause(&globals, &id)?,
        Command::Resume { id } => commands::resume(&globals, &id)?,
        Command::Update {
            resources,
            memory,
            cpu_quota,
            cpu_period,
            cpu_shares,
            pids_limit,
            id,
        } => {
            let opts = commands::UpdateOptions {
                resources,
                memory,
                cpu_quota,
                cpu_period,
                cpu_shares,
                pids_limit,
            };
            commands::update(&globals, &id, &opts)?
        }
        Command::Spec { bundle, .. } => commands::spec(bundle.as_deref())?,
        Command::Features => println!("{}", serde_json::to_string_pretty(&commands::features())?),
        Command::Monitor {
            id,
            exec_id,
            terminal,
            console_socket,
            ready_fd,
        } => {
            let args = MonitorArgs {
                id,
                exec_id,
                terminal,
                console_socket,
            };
            return Ok(monitor::run(&globals, &args, ready_fd));
        }
    }
    Ok(0)
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir()?.join(p)
    })
}
