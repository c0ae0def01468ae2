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
    let args = normalize(std::env::args().collect());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(&e, &args)),
    };
    let format = match cli.log_format.as_str() {
        "json" => log::Format::Json,
        "text" => log::Format::Text,
        other => {
            eprintln!("invalid log-format: {other}");
            std::process::exit(1);
        }
    };
    log::init(cli.log.as_deref(), format, cli.debug);
    // runc's words around a failed create, run or exec, and exec's status.
    let (prefix, failed) = match &cli.command {
        Some(Command::Create(_)) => ("tegmen create failed: ", 1),
        Some(Command::Run { .. }) => ("tegmen run failed: ", 1),
        Some(Command::Exec { .. }) => ("exec failed: ", 255),
        _ => ("", 1),
    };
    let code = match run(cli, format) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{prefix}{e:#}");
            log::error(&msg);
            eprintln!("{msg}");
            failed
        }
    };
    std::process::exit(code);
}

/// A command line clap refused, reported as runc (urfave/cli and Go's
/// flag package) reports it; the exit status. Help and version requests
/// print and exit 0.
fn usage_error(e: &clap::Error, args: &[String]) -> i32 {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return 0;
    }
    let context = |k: ContextKind| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        Some(ContextValue::Strings(v)) => v.first().cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let command = tegmen_supervisor::runtime::cli::subcommand_of(args);
    let (headline, msg, code) = match e.kind() {
        ErrorKind::InvalidSubcommand => {
            let name = context(ContextKind::InvalidSubcommand);
            (String::new(), format!("No help topic for '{name}'"), 3)
        }
        ErrorKind::UnknownArgument if context(ContextKind::InvalidArg).starts_with('-') => {
            let arg = context(ContextKind::InvalidArg);
            let name = arg.trim_start_matches('-').split('=').next().unwrap_or_default();
            let msg = format!("flag provided but not defined: -{name}");
            (format!("Incorrect Usage: {msg}"), msg, 1)
        }
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let flag = context(ContextKind::InvalidArg);
            let flag = flag
                .trim_start_matches('-')
                .split([' ', '='])
                .next()
                .unwrap_or_default();
            let value = context(ContextKind::InvalidValue);
            let msg = format!("invalid value \"{value}\" for flag -{flag}: parse error");
            (format!("Incorrect Usage: {msg}"), msg, 1)
        }
        kind => {
            let too_many = kind == ErrorKind::UnknownArgument;
            let msg = match tegmen_supervisor::runtime::cli::argument_count(&command, too_many) {
                Some(count) => format!(
                    "{}: \"{command}\" requires {count} argument(s)",
                    args.first().map_or("tegmen", String::as_str)
                ),
                None => e.kind().to_string(),
            };
            ("Incorrect Usage.".to_string(), msg, 1)
        }
    };
    if !headline.is_empty() {
        eprintln!("{headline}");
    }
    // The log file, if the command line names one, gets the error too
    // (containerd reads the last error from it).
    let flag_value = |name: &str| {
        let eq = format!("--{name}=");
        args.iter()
            .position(|a| a == &format!("--{name}"))
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| args.iter().find_map(|a| a.strip_prefix(&eq).map(String::from)))
    };
    let format = match flag_value("log-format").as_deref() {
        Some("json") => log::Format::Json,
        _ => log::Format::Text,
    };
    log::init(flag_value("log").as_deref().map(std::path::Path::new), format, false);
    log::error(&msg);
    eprintln!("{msg}");
    code
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
