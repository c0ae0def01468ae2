//! Runs libcontainer's process-creating calls in a short-lived child forked
//! from the agent, never in the agent itself.
//!
//! libcontainer is written for youki, a single-threaded process that exits
//! after one command. Called in the multi-threaded, long-lived agent it
//! would change the whole agent: it `chdir`s (console and notify sockets),
//! writes the container's `oom_score_adj` into `/proc/self`, marks the
//! process non-dumpable, and `clone3`s with a raw syscall, which skips
//! glibc's fork handlers, so a child could inherit a malloc lock held by
//! another thread. The helper is forked with glibc's `fork` (which takes
//! those locks around the fork) from a thread with a large stack, so
//! libcontainer runs single-threaded, and every process-wide change dies
//! with the helper. The helper also unblocks the signals the agent blocks
//! (SIGCHLD) and un-ignores every ignored signal (the agent ignores
//! SIGPIPE), so the container's processes start with a clean signal state.
//!
//! Processes libcontainer creates "as siblings" (`CLONE_PARENT`) become
//! children of the agent, not of the helper: the agent's reaper collects
//! their exit statuses. The caller holds [`super::FORK_LOCK`] for reading
//! while the helper runs, so the reaper cannot collect the helper or a fresh
//! container process before the caller has waited for the one and
//! registered the other.
//!
//! The helper answers with one line of JSON on a pipe. The line, not EOF,
//! ends the answer: a container's init inherits the pipe and holds it open
//! until it execs.

use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, pipe2, ForkResult, Pid};
use serde::{Deserialize, Serialize};

use super::error::{Failure, FailureKind};
use super::ContainerError;

/// How long a helper may take: creating a container runs its prestart and
/// createRuntime hooks, which may be slow, but never this slow.
const HELPER_TIMEOUT: Duration = Duration::from_secs(120);

/// libcontainer runs deep call chains in the helper and in the processes it
/// clones from it (which start on a copy of the helper's stack).
const HELPER_STACK: usize = 8 << 20;

#[derive(Serialize, Deserialize)]
enum Reply {
    Ok(i32),
    Err(Failure),
}

/// Runs `work` in a forked helper and returns what it returned (a pid, or 0).
/// `what` and `id` name the operation in errors. The caller must hold
/// `FORK_LOCK` for reading.
pub(super) fn run<F>(what: &str, id: &str, work: F) -> Result<i32, ContainerError>
where
    F: FnOnce() -> Result<i32, Failure> + Send,
{
    let reply = std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("container-helper".into())
            .stack_size(HELPER_STACK)
            .spawn_scoped(scope, move || fork_and_run(work))
            .map_err(|e| ContainerError::io("starting the helper thread", e))?;
        thread
            .join()
            .unwrap_or_else(|_| Err(ContainerError::Libcontainer("the helper thread panicked".into())))
    });
    match reply {
        Ok(Reply::Ok(value)) => Ok(value),
        Ok(Reply::Err(failure)) => {
            if matches!(failure.kind, FailureKind::Other) {
                Err(ContainerError::Libcontainer(format!(
                    "{what} {id}: {}",
                    failure.message
                )))
            } else {
                Err(failure.into_error(id))
            }
        }
        Err(ContainerError::Libcontainer(msg)) => Err(ContainerError::Libcontainer(format!("{what} {id}: {msg}"))),
        Err(e) => Err(e),
    }
}

fn fork_and_run<F>(work: F) -> Result<Reply, ContainerError>
where
    F: FnOnce() -> Result<i32, Failure>,
{
    let (read_end, write_end) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| ContainerError::io("creating the helper's pipe", e.into()))?;
    // SAFETY: the child only runs `work` (libcontainer) and `child_main`,
    // which allocate but take no lock another thread of the agent could
    // hold across the fork: glibc's fork handlers cover malloc, and nothing
    // here logs or touches the agent's shared state.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read_end);
            child_main(write_end, work)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write_end);
            // The parent's copies of whatever `work` owns (the process's
            // ends of its stdio pipes) are closed here.
            drop(work);
            let answer = read_reply(&read_end, child);
            if answer.is_err() {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            }
            while let Err(nix::errno::Errno::EINTR) = waitpid(child, None) {}
            let line = answer?;
            serde_json::from_slice(&line)
                .map_err(|e| ContainerError::Libcontainer(format!("unreadable answer from the helper: {e}")))
        }
        Err(e) => Err(ContainerError::io("forking the helper", e.into())),
    }
}

/// Reads the helper's one-line answer; fails when the helper exits without
/// one or takes longer than `HELPER_TIMEOUT`.
fn read_reply(read_end: &OwnedFd, child: Pid) -> Result<Vec<u8>, ContainerError> {
    // A pidfd turns readable when the helper exits, so a helper that dies
    // without answering is noticed although its children hold the pipe.
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
    let pidfd = if raw >= 0 {
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        Some(unsafe { OwnedFd::from_raw_fd(raw as i32) })
    } else {
        None
    };
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let mut line = Vec::new();
    let mut file = std::fs::File::from(
        read_end
            .try_clone()
            .map_err(|e| ContainerError::io("duplicating the helper's pipe", e))?,
    );
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ContainerError::Libcontainer(format!(
                "no answer from the helper within {}s",
                HELPER_TIMEOUT.as_secs()
            )));
        }
        let timeout = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(read_end.as_fd(), PollFlags::POLLIN)];
        if let Some(p) = &pidfd {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) | Ok(0) => continue,
            Err(e) => return Err(ContainerError::io("waiting for the helper", e.into())),
            Ok(_) => {}
        }
        let pipe_ready = fds[0].any().unwrap_or(false);
        let helper_gone = fds.get(1).and_then(|f| f.any()).unwrap_or(false);
        if pipe_ready {
            let mut buf = [0u8; 4096];
            let n = file
                .read(&mut buf)
                .map_err(|e| ContainerError::io("reading the helper's answer", e))?;
            if n == 0 {
                return Err(ContainerError::Libcontainer(
                    "the helper exited without an answer".into(),
                ));
            }
            line.extend_from_slice(&buf[..n]);
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                line.truncate(end);
                return Ok(line);
            }
        } else if helper_gone {
            return Err(ContainerError::Libcontainer(
                "the helper exited without an answer".into(),
            ));
        }
    }
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 layout).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Ignored signals stay ignored across exec: the agent ignores SIGPIPE
/// (Rust's runtime does), and whatever started the agent may have left
/// others ignored. A container must inherit none of that. The raw syscall
/// reaches the signals glibc keeps for itself (32, 33), which `signal(3)`
/// refuses; this single-threaded helper uses neither.
fn unignore_signals() {
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: rt_sigaction with no new action and a valid pointer for
        // the old one, whose size (8 bytes of mask) the kernel expects.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            )
        };
        if rc == 0 && old.handler == libc::SIG_IGN {
            let default = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            // SAFETY: sets the default disposition from a valid struct; no
            // handler (and so no restorer) is involved.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    &default as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
}

fn child_main<F>(write_end: OwnedFd, work: F) -> !
where
    F: FnOnce() -> Result<i32, Failure>,
{
    // The agent's panic hook reboots the guest when the agent is PID 1; a
    // panic here (or in a process libcontainer clones from here) must only
    // end this process.
    std::panic::set_hook(Box::new(|_| {}));
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    unignore_signals();
    let reply = match std::panic::catch_unwind(AssertUnwindSafe(work)) {
        Ok(Ok(value)) => Reply::Ok(value),
        Ok(Err(failure)) => Reply::Err(failure),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Reply::Err(Failure::other(format!("libcontainer panicked: {what}")))
        }
    };
    let mut line =
        serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"Err\":{\"kind\":\"Other\",\"message\":\"?\"}}".to_vec());
    line.push(b'\n');
    let mut written = 0;
    while written < line.len() {
        match nix::unistd::write(&write_end, &line[written..]) {
            Ok(n) => written += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    // SAFETY: _exit ends this forked process without running the agent's
    // atexit handlers or flushing buffers that belong to the parent.
    unsafe { libc::_exit(0) }
}
