//! One guest process as `/proc` has it, for `supervisor ps`.

use tegmen_agent_api::agent::ProcessInfo;

/// Longest command line reported, in bytes.
const MAX_COMMAND: usize = 4096;

/// (ppid, state, utime + stime ticks, start time ticks) from a
/// `/proc/<pid>/stat` line; fields are counted after the last ')', since
/// the command name may hold spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(i32, String, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.to_string();
    let ppid = f.get(1)?.parse().ok()?;
    let cpu = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((ppid, state, cpu, start))
}

/// The real uid and the RSS (KiB) from `/proc/<pid>/status` text.
fn parse_status(status: &str) -> (u32, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    (field("Uid:").unwrap_or(0) as u32, field("VmRSS:").unwrap_or(0))
}

/// `cmdline`'s arguments joined by spaces, bounded; `[comm]` for a
/// process without one (a kernel thread, a zombie).
fn command(cmdline: &[u8], comm: &str) -> String {
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut text = if args.is_empty() {
        format!("[{}]", comm.trim())
    } else {
        args.join(" ")
    };
    if text.len() > MAX_COMMAND {
        let mut cut = MAX_COMMAND;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// Process `pid`, `None` once it is gone.
pub fn read(pid: i32) -> Option<ProcessInfo> {
    let dir = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let (ppid, state, cpu_ticks, start_ticks) = parse_stat(&stat)?;
    let (uid, rss_kib) = parse_status(&std::fs::read_to_string(format!("{dir}/status")).unwrap_or_default());
    let cmdline = std::fs::read(format!("{dir}/cmdline")).unwrap_or_default();
    let comm = std::fs::read_to_string(format!("{dir}/comm")).unwrap_or_default();
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let uptime_s = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split('.').next().and_then(|s| s.parse::<u64>().ok()))
        .unwrap_or(0);
    let mut p = ProcessInfo::new();
    p.pid = pid;
    p.ppid = ppid;
    p.uid = uid;
    p.state = state;
    p.cpu_ms = cpu_ticks * 1000 / hz;
    p.rss_kib = rss_kib;
    p.age_s = uptime_s.saturating_sub(start_ticks / hz);
    p.command = command(&cmdline, &comm);
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_status_and_command_lines() {
        let stat = "7 (sh (x)) S 1 7 7 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 4200 0 0";
        assert_eq!(parse_stat(stat), Some((1, "S".to_string(), 300, 4200)));
        assert_eq!(parse_stat("7 (sh) S"), None);
        assert_eq!(
            parse_status("Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nVmRSS:\t 812 kB\n"),
            (1000, 812)
        );
        assert_eq!(command(b"sleep\x00300\x00", "sleep\n"), "sleep 300");
        assert_eq!(command(b"", "kworker/0:1\n"), "[kworker/0:1]");
        assert_eq!(command(&vec![b'a'; 10_000], "a").len(), MAX_COMMAND);
    }

    #[test]
    fn this_process() {
        let p = read(std::process::id() as i32).unwrap();
        assert_eq!(p.pid, std::process::id() as i32);
        assert!(p.rss_kib > 0 && !p.command.is_empty(), "{p:?}");
        assert!(read(i32::MAX).is_none());
    }
}
