//! runc's command line: the global flags (`--root`, `--log`,
//! `--log-format`, `--debug`, `--systemd-cgroup`, …) and the commands with
//! runc's flags, plus the hidden `monitor` the runtime re-executes itself
//! as. Go's flag package also takes long flags with one dash (`-root`):
//! [`normalize`] rewrites those before parsing.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tegmen",
    about = "An OCI runtime that runs each container in its own microVM (runc-compatible)",
    disable_version_flag = true
)]
pub struct Cli {
    /// Where container state lives (default /run/tegmen, or `root` of the configuration).
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Also write log messages (and the last error) to this file.
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// text or json.
    #[arg(long = "log-format", global = true, default_value = "text")]
    pub log_format: String,
    #[arg(long, global = true)]
    pub debug: bool,
    /// `linux.cgroupsPath` is in systemd's `slice:prefix:name` form (laid
    /// out through cgroupfs).
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility (also `spec --rootless`).
    #[arg(long, global = true, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
    /// Tegmen's configuration file (default /etc/tegmen/config.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print the version.
    #[arg(short = 'v', long)]
    pub version: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The bundle directory (default: the current directory).
    #[arg(short = 'b', long, default_value = ".")]
    pub bundle: PathBuf,
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    #[arg(long = "console-socket")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// Descriptors 3..3+N stay open in the monitor.
    #[arg(long = "preserve-fds", default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container (boots its VM); `start` runs its process.
    Create(CreateArgs),
    /// Run the process of a created container.
    Start {
        id: String,
    },
    /// Print the state of a container as JSON.
    State {
        id: String,
    },
    /// Send a signal to the container's init (default SIGTERM).
    Kill {
        #[arg(short = 'a', long)]
        all: bool,
        id: String,
        signal: Option<String>,
    },
    /// Delete a container and its VM.
    Delete {
        #[arg(short = 'f', long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; attached, exit with its status.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        #[arg(short = 'd', long)]
        detach: bool,
        /// Accepted for runc compatibility.
        #[arg(long)]
        keep: bool,
    },
    /// Run a process in a running container.
    Exec {
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(short = 'u', long)]
        user: Option<String>,
        #[arg(short = 'g', long = "additional-gids")]
        additional_gids: Vec<u32>,
        #[arg(short = 'p', long)]
        process: Option<PathBuf>,
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(long = "pid-file")]
        pid_file: Option<PathBuf>,
        #[arg(long = "process-label", hide = true)]
        process_label: Option<String>,
        #[arg(long, hide = true)]
        apparmor: Option<String>,
        #[arg(long = "no-new-privs", hide = true)]
        no_new_privs: bool,
        #[arg(short = 'c', long = "cap", hide = true)]
        cap: Vec<String>,
        #[arg(long = "preserve-fds", default_value_t = 0)]
        preserve_fds: u32,
        #[arg(long, hide = true)]
        cgroup: Option<String>,
        #[arg(long = "ignore-paused", hide = true)]
        ignore_paused: bool,
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short = 'f', long, default_value = "table")]
        format: String,
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// The container's processes (guest PIDs).
    Ps {
        #[arg(short = 'f', long, default_value = "table")]
        format: String,
        id: String,
        /// Accepted for runc compatibility (ps options).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// Container events as JSON lines: stats every interval and OOM kills,
    /// until the container stops; `--stats` prints one stats event.
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Change the container's resource limits (`-r FILE`, `-` for stdin,
    /// or single flags); the VM keeps its size.
    Update {
        #[arg(short = 'r', long)]
        resources: Option<PathBuf>,
        #[arg(short = 'm', long)]
        memory: Option<String>,
        #[arg(long = "cpu-quota")]
        cpu_quota: Option<i64>,
        #[arg(long = "cpu-period")]
        cpu_period: Option<u64>,
        #[arg(long = "cpu-shares")]
        cpu_shares: Option<u64>,
        #[arg(long = "pids-limit")]
        pids_limit: Option<i64>,
        id: String,
    },
    /// Write a runc-like config.json.
    Spec {
        #[arg(short = 'b', long)]
        bundle: Option<PathBuf>,
    },
    /// What this runtime supports, as JSON.
    Features,
    /// The per-container host monitor (internal).
    #[command(hide = true)]
    Monitor {
        id: String,
        #[arg(long = "exec-id", default_value = "")]
        exec_id: String,
        #[arg(long)]
        terminal: bool,
        #[arg(long = "console-socket")]
        console_socket: Option<PathBuf>,
        #[arg(long = "ready-fd")]
        ready_fd: i32,
    },
}

/// Long flags of runc given with one dash (`-root X`, `-log-format=json`),
/// before the command word, become `--root X`.
/// The runtime command named in a (normalized) command line: the first
/// argument after the global flags that is not a flag or a flag's value.
pub fn subcommand_of(args: &[String]) -> String {
    let mut prev: Option<&String> = None;
    for a in args.iter().skip(1) {
        if !a.starts_with('-') && !prev.is_some_and(|p| takes_value(p)) {
            return a.clone();
        }
        prev = Some(a);
    }
    String::new()
}

/// How runc words the number of arguments `command` takes, for a command
/// line with too many (`too_many`) or too few.
pub fn argument_count(command: &str, too_many: bool) -> Option<&'static str> {
    Some(match command {
        "list" | "spec" | "features" => "exactly 0",
        "kill" if too_many => "a maximum of 2",
        "kill" | "exec" | "ps" => "a minimum of 1",
        "create" | "run" | "start" | "state" | "delete" | "pause" | "resume" | "events" | "update" => "exactly 1",
        _ => return None,
    })
}

pub fn normalize(args: Vec<String>) -> Vec<String> {
    const LONG: [&str; 8] = [
        "root",
        "log",
        "log-format",
        "debug",
        "systemd-cgroup",
        "rootless",
        "criu",
        "version",
    ];
    let mut out = Vec::with_capacity(args.len());
    let mut in_globals = true;
    for (i, a) in args.into_iter().enumerate() {
        if i > 0 && in_globals {
            if let Some(rest) = a.strip_prefix('-').filter(|r| !r.starts_with('-')) {
                let name = rest.split('=').next().unwrap_or_default();
                if LONG.contains(&name) {
                    out.push(format!("-{a}"));
                    continue;
                }
            } else if !a.starts_with('-') && !out.last().is_some_and(|p: &String| takes_value(p)) {
                in_globals = false;
            }
        }
        out.push(a);
    }
    out
}

fn takes_value(flag: &str) -> bool {
    ["--root", "--log", "--log-format", "--rootless", "--criu", "--config"].contains(&flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn single_dash_globals_are_rewritten_up_to_the_command() {
        assert_eq!(
            normalize(v("tegmen -root /r -log-format=json state -root x")),
            v("tegmen --root /r --log-format=json state -root x")
        );
        assert_eq!(
            normalize(v("tegmen --root /r kill c 9")),
            v("tegmen --root /r kill c 9")
        );
    }

    #[test]
    fn runc_command_lines_parse() {
        let c = Cli::try_parse_from(v(
            "tegmen --root /r --log /l --log-format json --systemd-cgroup create --bundle /b --pid-file /p --no-pivot c1",
        ))
        .unwrap();
        assert!(matches!(c.command, Some(Command::Create(ref a)) if a.id == "c1" && a.pid_file.is_some()));
        let c = Cli::try_parse_from(v("tegmen exec -d -e A=1 -u 1:2 c1 sh -c true")).unwrap();
        match c.command {
            Some(Command::Exec {
                id, command, detach, ..
            }) => {
                assert_eq!(id, "c1");
                assert_eq!(command, v("sh -c true"));
                assert!(detach);
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(v("tegmen kill --all c1 KILL")).unwrap();
        assert!(
            matches!(c.command, Some(Command::Kill { all: true, ref signal, .. }) if signal.as_deref() == Some("KILL"))
        );
    }
}
