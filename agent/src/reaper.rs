//! The reaper: as PID 1 the agent inherits every orphan of the guest, and
//! must collect their exit statuses or they stay zombies forever.
//!
//! SIGCHLD is blocked in every thread (the mask is set before any thread is
//! spawned and inherited); one thread waits for it with `sigwait` and reaps
//! every child that has exited. Each round of `waitpid(-1)` holds the
//! container layer's fork lock exclusively, so it never collects a child
//! that other code is about to wait for by pid (see
//! `container::FORK_LOCK`). Every reaped child is reported to the listener
//! (the container manager), which picks out its own processes.

use std::sync::OnceLock;

use anyhow::Result;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Told about every reaped child: (pid, raw wait status).
pub type ChildListener = Box<dyn Fn(i32, i32) + Send + Sync>;

static LISTENER: OnceLock<ChildListener> = OnceLock::new();

/// Sets the listener for reaped children; only the first call counts
/// (returns false for a later one).
pub fn set_child_listener(listener: ChildListener) -> bool {
    LISTENER.set(listener).is_ok()
}

pub fn block_sigchld() -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(())
}

pub fn spawn(as_init: bool) -> Result<()> {
    std::thread::Builder::new().name("reaper".into()).spawn(move || {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        loop {
            if set.wait().is_err() {
                continue;
            }
            reap_all(as_init);
        }
    })?;
    Ok(())
}

fn reap_all(log_orphans: bool) {
    let _fork = crate::container::fork_lock_exclusive();
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to an int for the status.
        // __WALL also collects children that report with a signal other
        // than SIGCHLD; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
        if pid <= 0 {
            // 0: children left, none exited; -1: no children (ECHILD).
            return;
        }
        if log_orphans {
            log::debug!("reaped pid {pid} (status {status:#x})");
        }
        if let Some(listener) = LISTENER.get() {
            listener(pid, status);
        }
    }
}
