//! The reaper: as PID 1 the agent inherits every orphan of the guest, and
//! must collect their exit statuses or they stay zombies forever.
//!
//! SIGCHLD is blocked in every thread (the mask is set before any thread is
//! spawned and inherited); one thread waits for it with `sigwait` and reaps
//! every child that has exited.

use anyhow::Result;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

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
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                if log_orphans {
                    log::debug!("reaped {status:?}");
                }
            }
        }
    }
}
