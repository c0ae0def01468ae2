//! The debug console's processes (`supervisor exec`): programs the
//! operator runs in the guest outside every container, as root in the
//! agent's own namespaces, when the guest was booted with the debug console
//! on. They are kept beside the containers under the id
//! [`DEBUG_CONTAINER`], which no container can have, so their stdio
//! streams, waits, signals, resizes and removal take the same paths as a
//! container exec's.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

pub use tegmen_agent_api::DEBUG_CONTAINER;

use super::{fork_lock_shared, lock, stdio, ContainerError, ContainerManager, Process, ProcessIo};

/// Debug processes the agent keeps at once (running, or exited and not yet
/// removed): a host that never removes them cannot grow the table forever.
pub const MAX_DEBUG_PROCESSES: usize = 64;
/// Arguments and environment of one debug process, counted together.
const MAX_ARGS: usize = 4096;

/// What to run.
pub struct DebugCommand<'a> {
    pub exec_id: &'a str,
    pub args: &'a [String],
    pub env: &'a [String],
    pub terminal: bool,
    /// The terminal's first size; (0, 0) leaves it.
    pub size: (u16, u16),
}

/// Serialises `exec_debug` from its checks to the record of the new
/// process (like a container's operation lock: taken before FORK_LOCK).
static SPAWN: Mutex<()> = Mutex::new(());

/// Sets FD_CLOEXEC: no program the agent starts inherits the descriptor.
fn set_cloexec(fd: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETFD on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment: the given one, with PATH, HOME and (with a terminal)
/// TERM added when absent.
fn environment(env: &[String], terminal: bool) -> Result<Vec<(String, String)>, ContainerError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in env {
        let Some((k, v)) = e.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(ContainerError::InvalidArgument(format!(
                "debug exec: environment entry {e:?} is not KEY=VALUE"
            )));
        };
        if e.contains('\0') {
            return Err(ContainerError::InvalidArgument(format!(
                "debug exec: environment entry {e:?} holds a NUL byte"
            )));
        }
        out.retain(|(old, _)| old != k);
        out.push((k.to_string(), v.to_string()));
    }
    let mut defaults = vec![DEFAULT_PATH, "HOME=/root"];
    if terminal {
        defaults.push("TERM=xterm");
    }
    for d in defaults {
        let (k, v) = d.split_once('=').expect("a default is KEY=VALUE");
        if !out.iter().any(|(old, _)| old == k) {
            out.push((k.to_string(), v.to_string()));
        }
    }
    Ok(out)
}

/// `program` as execvp would find it in `path`.
fn find_program(program: &str, path: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return runnable(&p).then_some(p);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| runnable(p))
}

impl ContainerManager {
    /// Starts a debug process; returns its pid. `enabled` is whether the
    /// guest was booted with the debug console on.
    pub fn exec_debug(&self, enabled: bool, cmd: &DebugCommand) -> Result<i32, ContainerError> {
        if !enabled {
            return Err(ContainerError::wrong_state(
                DEBUG_CONTAINER,
                "the debug console is off in this sandbox: it must be created with \
                 `debug_console = true` under [guest] in the Tegmen configuration",
            ));
        }
        let exec_id = cmd.exec_id;
        // `-` stands for "no exec id" in stream headers.
        if exec_id.is_empty() || exec_id == "-" || exec_id.len() > 128 || !exec_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ContainerError::InvalidArgument(format!(
                "debug exec: invalid exec id {exec_id:?}"
            )));
        }
        let Some(program) = cmd.args.first() else {
            return Err(ContainerError::InvalidArgument(
                "debug exec: the command is empty".into(),
            ));
        };
        if cmd.args.len() + cmd.env.len() > MAX_ARGS || cmd.args.iter().any(|a| a.contains('\0')) {
            return Err(ContainerError::InvalidArgument(format!(
                "debug exec: at most {MAX_ARGS} arguments and environment entries, without NUL bytes"
            )));
        }
        let env = environment(cmd.env, cmd.terminal)?;
        let path = env.iter().find(|(k, _)| k == "PATH").map_or("", |(_, v)| v.as_str());
        let Some(exe) = find_program(program, path) else {
            return Err(ContainerError::NotFound(format!(
                "debug exec: \"{program}\": executable file not found in $PATH"
            )));
        };
        let _spawn = lock(&SPAWN);
        {
            let mut table = lock(&self.debug);
            if table.len() >= MAX_DEBUG_PROCESSES {
                // Room first from those that exited and were never removed
                // (their client went away).
                table.retain(|_, p| p.exit().is_none());
            }
            if table.contains_key(exec_id) {
                return Err(ContainerError::AlreadyExists(format!(
                    "debug exec {exec_id} already exists"
                )));
            }
            if table.len() >= MAX_DEBUG_PROCESSES {
                return Err(ContainerError::wrong_state(
                    DEBUG_CONTAINER,
                    format!("debug exec: {MAX_DEBUG_PROCESSES} debug processes are kept already; remove exited ones"),
                ));
            }
        }

        let mut command = Command::new(&exe);
        command
            .arg0(program)
            .args(&cmd.args[1..])
            .env_clear()
            .envs(env)
            .current_dir("/");
        let mut pio = ProcessIo {
            terminal: cmd.terminal,
            ..Default::default()
        };
        let err = |what: &str, e: std::io::Error| ContainerError::io(format!("debug exec: {what}"), e);
        if cmd.terminal {
            let pty = nix::pty::openpty(None, None).map_err(|e| err("openpty", e.into()))?;
            set_cloexec(&pty.master).map_err(|e| err("openpty", e))?;
            set_cloexec(&pty.slave).map_err(|e| err("openpty", e))?;
            if cmd.size.0 > 0 && cmd.size.1 > 0 {
                let _ = stdio::set_window_size(&pty.master, cmd.size.0, cmd.size.1);
            }
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| err("duplicating the pty slave", e));
            command
                .stdin(Stdio::from(dup(&pty.slave)?))
                .stdout(Stdio::from(dup(&pty.slave)?))
                .stderr(Stdio::from(pty.slave));
            // SAFETY: setsid and ioctl are async-signal-safe; the closure
            // allocates nothing.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            pio.tty_control = Some(
                pty.master
                    .try_clone()
                    .map_err(|e| err("duplicating the pty master", e))?,
            );
            pio.tty = Some(pty.master);
        } else {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }

        // Registered before the reaper may see its exit (see FORK_LOCK).
        let fork_guard = fork_lock_shared();
        let mut child = command.spawn().map_err(|e| err(&format!("starting {program}"), e))?;
        let pid = child.id() as i32;
        if !cmd.terminal {
            pio.stdin = child.stdin.take().map(OwnedFd::from);
            pio.stdout = child.stdout.take().map(OwnedFd::from);
            pio.stderr = child.stderr.take().map(OwnedFd::from);
        }
        // The reaper collects it: the Child handle is not waited on.
        drop(child);
        let proc = Arc::new(Process::new(pid, exec_id, pio));
        lock(&self.by_pid).insert(pid, (DEBUG_CONTAINER.to_string(), proc.clone()));
        drop(fork_guard);
        lock(&self.debug).insert(exec_id.to_string(), proc);
        log::info!("debug console: exec {exec_id} started {program} (pid {pid})");
        Ok(pid)
    }

    /// The debug process `exec_id`.
    pub(super) fn debug_process(&self, exec_id: Option<&str>) -> Result<Arc<Process>, ContainerError> {
        let Some(exec_id) = exec_id.filter(|e| !e.is_empty()) else {
            return Err(ContainerError::InvalidArgument(
                "the debug console has no init: name the debug exec".into(),
            ));
        };
        lock(&self.debug)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("debug exec {exec_id} does not exist")))
    }

    /// Forgets an exited debug process.
    pub(super) fn remove_debug(&self, exec_id: &str) -> Result<(), ContainerError> {
        let proc = self.debug_process(Some(exec_id))?;
        if proc.exit().is_none() {
            return Err(ContainerError::wrong_state(
                DEBUG_CONTAINER,
                format!("cannot remove debug exec {exec_id}: it is running"),
            ));
        }
        lock(&self.debug).remove(exec_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    // Paths, not imports: the container test binary (harness = false)
    // compiles this module without its #[test] functions.
    #[test]
    fn environment_gets_defaults_and_refuses_bad_entries() {
        let env = super::environment(&["A=1".into(), "PATH=/x".into(), "A=2".into()], true).unwrap();
        assert_eq!(
            env,
            vec![
                ("PATH".to_string(), "/x".to_string()),
                ("A".into(), "2".into()),
                ("HOME".into(), "/root".into()),
                ("TERM".into(), "xterm".into()),
            ]
        );
        assert!(super::environment(&["NOEQUALS".into()], false).is_err());
        assert!(super::environment(&["=v".into()], false).is_err());
        let plain = super::environment(&[], false).unwrap();
        assert!(!plain.iter().any(|(k, _)| k == "TERM"));
    }

    #[test]
    fn programs_are_found_as_execvp_finds_them() {
        assert_eq!(super::find_program("sh", "/nonexistent:/bin"), Some("/bin/sh".into()));
        assert_eq!(super::find_program("/bin/sh", ""), Some("/bin/sh".into()));
        assert_eq!(super::find_program("no-such-program-here", "/bin:/usr/bin"), None);
        // A directory is not a program.
        assert_eq!(super::find_program("/tmp", ""), None);
    }
}
