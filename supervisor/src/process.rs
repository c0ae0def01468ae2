//! Host processes a sandbox owns (QEMU, the vhost-user backends), recorded
//! by PID *and* start time so that a later run never signals a stranger
//! that got the same PID after ours died.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot).
    pub start_time: u64,
}

impl ProcessRecord {
    pub fn of(name: &str, pid: i32) -> Option<ProcessRecord> {
        Some(ProcessRecord {
            name: name.into(),
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// True while the very process we started is alive (not a zombie, not
    /// a reused PID).
    pub fn is_alive(&self) -> bool {
        process_state(self.pid).is_some_and(|(state, start)| start == self.start_time && state != 'Z' && state != 'X')
    }

    /// SIGKILL, only if it is still ours.
    pub fn kill(&self) {
        if self.is_alive() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }

    /// Waits until the process is gone (or a zombie) or `timeout` passes.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

pub fn start_time(pid: i32) -> Option<u64> {
    process_state(pid).map(|(_, t)| t)
}

fn process_state(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// The fields of a /proc/PID/stat line from field 3 (the state) on: the
/// command name before them may hold spaces and parentheses, so they are
/// counted after the last ')'.
pub(crate) fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace().collect())
}

/// (state, starttime) from a /proc/PID/stat line.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let fields = stat_fields(stat)?;
    // The fields start at field 3 (state); starttime is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// True if `pid` is alive (any process).
pub fn pid_alive(pid: i32) -> bool {
    process_state(pid).is_some_and(|(s, _)| s != 'Z' && s != 'X')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names_is_parsed() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_record_follows_its_process_and_not_its_pid() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let rec = ProcessRecord::of("sleep", child.id() as i32).unwrap();
        assert!(rec.is_alive());
        let stranger = ProcessRecord {
            start_time: rec.start_time + 1,
            ..rec.clone()
        };
        assert!(!stranger.is_alive(), "a different start time is a different process");
        rec.kill();
        child.wait().unwrap();
        assert!(!rec.is_alive());
        assert!(rec.wait_gone(Duration::from_millis(10)));
    }
}
