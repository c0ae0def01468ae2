//! What `supervisor list`, `inspect` and `console` show of a sandbox
//! beyond its `state.json`: whether its VM lives, its host processes'
//! memory and CPU time (from `/proc`), and what the agent says of the guest
//! and its containers, asked with a time bound so that a guest that does
//! not answer cannot hang the operator's command.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::agent_client::AgentClient;
use crate::config::Config;
use crate::process::ProcessRecord;
use crate::sandbox::{self, Layout, SandboxState};
use crate::{Error, Result};

/// One host process of a sandbox, as `/proc` has it now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProcessUsage {
    pub name: String,
    pub pid: i32,
    pub alive: bool,
    /// Resident set size (`VmRSS`), 0 once gone.
    pub rss_kib: u64,
    /// User + system CPU time.
    pub cpu_ms: u64,
}

/// `VmRSS` of `/proc/<pid>/status` text, in KiB.
fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// utime + stime (clock ticks) of a `/proc/<pid>/stat` line; the command
/// name may hold spaces and parentheses, so fields count after the last ')'.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the line, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn process_usage(rec: &ProcessRecord) -> ProcessUsage {
    let alive = rec.is_alive();
    let (rss_kib, cpu_ms) = if alive {
        let rss = std::fs::read_to_string(format!("/proc/{}/status", rec.pid))
            .ok()
            .and_then(|s| parse_rss_kib(&s))
            .unwrap_or(0);
        // SAFETY: sysconf reads a constant of the system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let ticks = std::fs::read_to_string(format!("/proc/{}/stat", rec.pid))
            .ok()
            .and_then(|s| parse_cpu_ticks(&s))
            .unwrap_or(0);
        (rss, ticks * 1000 / hz)
    } else {
        (0, 0)
    };
    ProcessUsage {
        name: rec.name.clone(),
        pid: rec.pid,
        alive,
        rss_kib,
        cpu_ms,
    }
}

/// A sandbox as `list` shows it: its state and what is known of it now.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub state: SandboxState,
    /// Its VM's process (QEMU or the builtin monitor) lives.
    pub vm_alive: bool,
    pub uptime_s: u64,
    /// RSS of all its live host processes.
    pub host_rss_kib: u64,
}

pub fn summary(state: SandboxState) -> Summary {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let host_rss_kib = state.processes.iter().map(|p| process_usage(p).rss_kib).sum();
    Summary {
        vm_alive: sandbox::vm_process_alive(&state),
        uptime_s: now.saturating_sub(state.created),
        host_rss_kib,
        state,
    }
}

/// Every sandbox below the configuration's root.
pub fn list(config: &Config) -> Vec<Summary> {
    sandbox::list(config).into_iter().map(summary).collect()
}

/// The guest as its agent describes it.
#[derive(Debug, Clone, Serialize)]
pub struct GuestInfo {
    pub kernel_release: String,
    pub memory_total_bytes: u64,
    pub cpus: u32,
    pub agent_version: String,
    /// `source on target type fstype (options)`, as mount(8) prints them.
    pub mounts: Vec<String>,
}

/// One container of the sandbox, from the state and the agent.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerInfo {
    pub id: String,
    pub bundle: Option<String>,
    pub created: u64,
    /// Its processes' pids in the guest.
    pub guest_pids: Vec<i32>,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub cpu_usage_usec: u64,
    pub pids_current: u64,
    /// What the agent said instead, if it did not answer for this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything `inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    #[serde(flatten)]
    pub summary: Summary,
    pub host_processes: Vec<ProcessUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestInfo>,
    /// Why there is no guest information: the VM is gone, or the agent did
    /// not answer within the bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_error: Option<String>,
    pub container_details: Vec<ContainerInfo>,
}

fn state_of(config: &Config, id: &str) -> Result<SandboxState> {
    sandbox::validate_id(id)?;
    let dir = Layout::new(config, id).dir;
    if !dir.exists() {
        return Err(Error::SandboxNotFound(id.to_string()));
    }
    sandbox::read_state(&dir)
}

/// Inspects sandbox `id`; the agent gets `timeout` to connect and for each
/// call. A VM that is gone or an agent that does not answer is reported in
/// `guest_error`, not as an error.
pub fn inspect(config: &Config, id: &str, timeout: Duration) -> Result<Inspection> {
    let state = state_of(config, id)?;
    let host_processes = state.processes.iter().map(process_usage).collect();
    let summary = summary(state);
    let mut containers: Vec<ContainerInfo> = summary
        .state
        .containers
        .iter()
        .map(|c| ContainerInfo {
            id: c.id.clone(),
            bundle: c.bundle.as_ref().map(|b| b.display().to_string()),
            created: c.created,
            guest_pids: Vec::new(),
            memory_usage_bytes: 0,
            memory_limit_bytes: 0,
            cpu_usage_usec: 0,
            pids_current: 0,
            error: None,
        })
        .collect();
    let (guest, guest_error) = if !summary.vm_alive {
        (None, Some("the VM is gone".to_string()))
    } else {
        match ask_guest(config, id, timeout, &mut containers) {
            Ok(g) => (Some(g), None),
            Err(e) => (
                None,
                Some(format!("the agent did not answer within {}s: {e}", timeout.as_secs())),
            ),
        }
    };
    Ok(Inspection {
        summary,
        host_processes,
        guest,
        guest_error,
        container_details: containers,
    })
}

fn ask_guest(config: &Config, id: &str, timeout: Duration, containers: &mut [ContainerInfo]) -> Result<GuestInfo> {
    let socket = Layout::new(config, id).vsock_socket();
    let agent = AgentClient::connect(&socket, tegmen_agent_api::AGENT_VSOCK_PORT, timeout, timeout)?;
    let d = agent.guest_details()?;
    for c in containers.iter_mut() {
        match agent.list_processes(&c.id) {
            Ok(pids) => c.guest_pids = pids,
            Err(e) => c.error = Some(e.to_string()),
        }
        if let Ok(s) = agent.stats_container(&c.id) {
            c.memory_usage_bytes = s.memory_usage;
            c.memory_limit_bytes = s.memory_limit;
            c.cpu_usage_usec = s.cpu_usage_usec;
            c.pids_current = s.pids_current;
        }
    }
    Ok(GuestInfo {
        kernel_release: d.kernel_release.clone(),
        memory_total_bytes: d.memory_total_bytes,
        cpus: d.cpus,
        agent_version: d.agent_version.clone(),
        mounts: d
            .mounts
            .iter()
            .map(|m| format!("{} on {} type {} ({})", m.source, m.target, m.fstype, m.options))
            .collect(),
    })
}

/// One process in the guest, of one container (`supervisor ps`).
#[derive(Debug, Clone, Serialize)]
pub struct GuestProcess {
    pub container: String,
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub state: String,
    pub cpu_ms: u64,
    pub rss_kib: u64,
    pub age_s: u64,
    pub command: String,
}

/// The guest's processes of every container of sandbox `id`, in the
/// order the containers were added; the agent gets `timeout`.
pub fn ps(config: &Config, id: &str, timeout: Duration) -> Result<Vec<GuestProcess>> {
    let state = state_of(config, id)?;
    if !sandbox::vm_process_alive(&state) {
        return Err(Error::Agent(format!("sandbox {id}: the VM is gone")));
    }
    let socket = Layout::new(config, id).vsock_socket();
    let agent = AgentClient::connect(&socket, tegmen_agent_api::AGENT_VSOCK_PORT, timeout, timeout)?;
    let mut out = Vec::new();
    for c in &state.containers {
        for p in agent.list_process_details(&c.id)? {
            out.push(GuestProcess {
                container: c.id.clone(),
                pid: p.pid,
                ppid: p.ppid,
                uid: p.uid,
                state: p.state,
                cpu_ms: p.cpu_ms,
                rss_kib: p.rss_kib,
                age_s: p.age_s,
                command: p.command,
            });
        }
    }
    Ok(out)
}

/// Copies sandbox `id`'s serial console log to `out`; with `follow`, goes
/// on copying what the guest writes until the sandbox is gone or its VM
/// has exited.
pub fn console(config: &Config, id: &str, follow: bool, out: &mut dyn Write) -> Result<()> {
    state_of(config, id)?;
    let layout = Layout::new(config, id);
    let path = layout.console_log();
    let mut file = std::fs::File::open(&path).map_err(|e| Error::io("opening", &path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut copy = |file: &mut std::fs::File, out: &mut dyn Write| -> Result<usize> {
        let mut total = 0;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io("reading", &path, e))?;
            if n == 0 {
                let _ = out.flush();
                return Ok(total);
            }
            total += n;
            if out.write_all(&buf[..n]).is_err() {
                // The reader went away (a pager quit): nothing more to do.
                return Ok(total);
            }
        }
    };
    copy(&mut file, out)?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let live = sandbox::read_state(&layout.dir).is_ok_and(|s| sandbox::vm_process_alive(&s));
        // A file replaced or cut short starts again from its beginning.
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        let at = file.stream_position().unwrap_or(0);
        if len < at {
            let _ = file.seek(SeekFrom::Start(0));
        }
        copy(&mut file, out)?;
        if !live {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_and_cpu_are_read_from_proc_text() {
        assert_eq!(
            parse_rss_kib("Name:\tqemu\nVmRSS:\t  150656 kB\nRssAnon: 1 kB\n"),
            Some(150656)
        );
        assert_eq!(parse_rss_kib("Name:\tzombie\n"), None);
        let stat = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("42 (short) S 1"), None);
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let me = ProcessRecord::of("test", std::process::id() as i32).unwrap();
        let u = process_usage(&me);
        assert!(u.alive && u.rss_kib > 0, "{u:?}");
    }
}
