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

/// utime + stime (clock ticks) of a `/proc/<pid>/stat` line.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let fields = crate::process::stat_fields(stat)?;
    // They start at field 3 (state); utime is field 14, stime 15.
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
    /// Its host processes as `/proc` had them (read once, for the sum and
    /// for whoever shows them one by one).
    #[serde(skip)]
    pub usage: Vec<ProcessUsage>,
}

pub fn summary(state: SandboxState) -> Summary {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let usage: Vec<ProcessUsage> = state.processes.iter().map(process_usage).collect();
    Summary {
        vm_alive: sandbox::vm_process_alive(&state),
        uptime_s: now.saturating_sub(state.created),
        host_rss_kib: usage.iter().map(|u| u.rss_kib).sum(),
        usage,
        state,
    }
}

/// A client of sandbox `id`'s agent that gets `timeout` to connect and for
/// each call.
fn agent_of(config: &Config, id: &str, timeout: Duration) -> Result<AgentClient> {
    let socket = Layout::new(config, id).vsock_socket();
    AgentClient::connect(&socket, tegmen_agent_api::AGENT_VSOCK_PORT, timeout, timeout)
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
    pub memory_available_bytes: u64,
    /// The 1, 5 and 15 minute load averages (empty if the guest has none).
    pub load_average: Vec<f64>,
    /// `source on target type fstype (options)`, as mount(8) prints them.
    pub mounts: Vec<String>,
}

/// One container of the sandbox, from the state and the agent.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerInfo {
    pub id: String,
    pub bundle: Option<String>,
    pub created: u64,
    /// As the agent has it: creating, created, running, paused, stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Its init's pid in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_pid: Option<i32>,
    pub exec_ids: Vec<String>,
    /// Its processes' pids in the guest.
    pub guest_pids: Vec<i32>,
    pub memory_usage_bytes: u64,
    /// The cgroup's limits in the guest; `None`: none set.
    pub memory_limit_bytes: Option<u64>,
    pub cpu_usage_usec: u64,
    pub pids_current: u64,
    pub pids_limit: Option<u64>,
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

pub(crate) fn state_of(config: &Config, id: &str) -> Result<SandboxState> {
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
    let summary = summary(state_of(config, id)?);
    let host_processes = summary.usage.clone();
    let mut containers: Vec<ContainerInfo> = summary
        .state
        .containers
        .iter()
        .map(|c| ContainerInfo {
            id: c.id.clone(),
            bundle: c.bundle.as_ref().map(|b| b.display().to_string()),
            created: c.created,
            status: None,
            init_pid: None,
            exec_ids: Vec::new(),
            guest_pids: Vec::new(),
            memory_usage_bytes: 0,
            memory_limit_bytes: None,
            cpu_usage_usec: 0,
            pids_current: 0,
            pids_limit: None,
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
    let agent = agent_of(config, id, timeout)?;
    let d = agent.guest_details()?;
    for c in containers.iter_mut() {
        if let Ok(st) = agent.container_state(&c.id) {
            c.status = Some(st.status);
            c.init_pid = Some(st.pid);
            c.exec_ids = st.exec_ids;
        }
        match agent.list_processes(&c.id) {
            Ok(pids) => c.guest_pids = pids,
            Err(e) => c.error = Some(e.to_string()),
        }
        if let Ok(s) = agent.stats_container(&c.id) {
            c.memory_usage_bytes = s.memory_usage;
            let limit = |v: u64| (v != u64::MAX && v != 0).then_some(v);
            c.memory_limit_bytes = limit(s.memory_limit);
            c.cpu_usage_usec = s.cpu_usage_usec;
            c.pids_current = s.pids_current;
            c.pids_limit = limit(s.pids_limit);
        }
    }
    Ok(GuestInfo {
        kernel_release: d.kernel_release.clone(),
        memory_total_bytes: d.memory_total_bytes,
        cpus: d.cpus,
        agent_version: d.agent_version.clone(),
        memory_available_bytes: d.memory_available_bytes,
        load_average: d.load_average.iter().copied().take(3).collect(),
        mounts: d
            .mounts
            .iter()
            .map(|m| format!("{} on {} type {} ({})", m.source, m.target, m.fstype, m.options))
            .collect(),
    })
}

/// A label value as the Prometheus text format wants it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Most bytes read from one counters socket, and most counters taken.
const MAX_STATS_BYTES: u64 = 64 * 1024;
const MAX_COUNTERS: usize = 256;

/// The counters of a backend's line: names of `a-z 0-9 _`, whole numbers.
fn parse_counters(line: &str) -> Vec<(String, u64)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return Vec::new();
    };
    let Some(obj) = v.get("counters").and_then(|c| c.as_object()) else {
        return Vec::new();
    };
    obj.iter()
        .filter(|(k, _)| {
            !k.is_empty()
                && k.len() <= 64
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .take(MAX_COUNTERS)
        .collect()
}

/// (device, counter, value) of every device backend of the sandbox in
/// `dir` that serves counters (`<device>.stats` sockets), each asked with
/// `timeout`; a backend that does not answer is left out.
pub fn device_counters(dir: &std::path::Path, timeout: Duration) -> Vec<(String, String, u64)> {
    let suffix = crate::hypervisor::STATS_SUFFIX;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sockets: Vec<(String, std::path::PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(suffix)?.to_string();
            Some((name, e.path()))
        })
        .collect();
    sockets.sort();
    let mut out = Vec::new();
    for (device, path) in sockets {
        let Ok(conn) = tegmen_vmm::unix_path::connect(&path) else {
            continue;
        };
        // One bound for the whole reply, however slowly it trickles.
        let deadline = std::time::Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut conn = conn.take(MAX_STATS_BYTES);
        let mut buf = [0u8; 4096];
        let complete = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || conn.get_ref().set_read_timeout(Some(left)).is_err() {
                break false;
            }
            match conn.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if !complete {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        out.extend(
            parse_counters(text.trim_end())
                .into_iter()
                .map(|(k, v)| (device.clone(), k, v)),
        );
    }
    out
}

/// One metric family of the text exposition format.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

/// Prometheus' text exposition (format 0.0.4) of the sandboxes `ids` (all
/// when empty): host processes' RSS and CPU time, the VM's size, whether it
/// runs, boot-to-agent time, and from each agent (asked with `timeout`)
/// the guest's memory and each container's memory, CPU time, pids and OOM
/// kills. A sandbox whose agent does not answer gets only its host side.
pub fn metrics(config: &Config, ids: &[String], timeout: Duration) -> Result<String> {
    let all = list(config);
    let chosen: Vec<&Summary> = if ids.is_empty() {
        all.iter().collect()
    } else {
        let mut v = Vec::new();
        for id in ids {
            v.push(
                all.iter()
                    .find(|s| &s.state.id == id)
                    .ok_or_else(|| Error::SandboxNotFound(id.clone()))?,
            );
        }
        v
    };
    let fam = |name, help, kind| Family {
        name,
        help,
        kind,
        samples: Vec::new(),
    };
    let mut info = fam("tegmen_sandbox_info", "A sandbox: its face and hypervisor.", "gauge");
    let mut up = fam(
        "tegmen_sandbox_vm_up",
        "1 while the sandbox's VM process lives.",
        "gauge",
    );
    let mut uptime = fam(
        "tegmen_sandbox_uptime_seconds",
        "Seconds since the sandbox was created.",
        "gauge",
    );
    let mut boot = fam(
        "tegmen_sandbox_boot_to_agent_seconds",
        "From starting the VM to the agent's first answer.",
        "gauge",
    );
    let mut vm_mem = fam("tegmen_sandbox_vm_memory_bytes", "Guest RAM the VM was given.", "gauge");
    let mut vcpus = fam("tegmen_sandbox_vcpus", "vCPUs of the VM.", "gauge");
    let mut rss = fam(
        "tegmen_sandbox_host_rss_bytes",
        "Resident memory of the sandbox's host processes (QEMU or the monitor, device backends).",
        "gauge",
    );
    let mut proc_rss = fam(
        "tegmen_host_process_rss_bytes",
        "Resident memory of one host process.",
        "gauge",
    );
    let mut proc_cpu = fam(
        "tegmen_host_process_cpu_seconds_total",
        "User and system CPU time of one host process.",
        "counter",
    );
    let mut guest_mem = fam(
        "tegmen_guest_memory_total_bytes",
        "MemTotal of the guest kernel.",
        "gauge",
    );
    let mut guest_up = fam(
        "tegmen_guest_agent_up",
        "1 when the guest's agent answered this scrape.",
        "gauge",
    );
    let mut c_mem = fam(
        "tegmen_container_memory_usage_bytes",
        "A container's cgroup memory in the guest.",
        "gauge",
    );
    let mut c_cpu = fam(
        "tegmen_container_cpu_seconds_total",
        "A container's cgroup CPU time in the guest.",
        "counter",
    );
    let mut c_pids = fam(
        "tegmen_container_pids",
        "Processes of a container in the guest.",
        "gauge",
    );
    let mut c_oom = fam(
        "tegmen_container_oom_kills_total",
        "OOM kills in a container's cgroup.",
        "counter",
    );
    let mut dev = fam(
        "tegmen_device_events_total",
        "A device backend's counter: packets, bytes, requests, and what it refused from the guest.",
        "counter",
    );
    for s in chosen {
        let st = &s.state;
        let sb = format!("sandbox=\"{}\"", label(&st.id));
        info.samples.push((
            format!(
                "{sb},face=\"{}\",hypervisor=\"{}\"",
                label(st.face.as_str()),
                label(&st.hypervisor)
            ),
            1.0,
        ));
        up.samples.push((sb.clone(), if s.vm_alive { 1.0 } else { 0.0 }));
        uptime.samples.push((sb.clone(), s.uptime_s as f64));
        if let Some(ms) = st.boot_to_agent_ms {
            boot.samples.push((sb.clone(), ms as f64 / 1000.0));
        }
        vm_mem.samples.push((sb.clone(), (st.memory_mib as f64) * 1048576.0));
        vcpus.samples.push((sb.clone(), st.vcpus as f64));
        rss.samples.push((sb.clone(), (s.host_rss_kib * 1024) as f64));
        for p in s.usage.iter().filter(|p| p.alive) {
            let l = format!("{sb},process=\"{}\",pid=\"{}\"", label(&p.name), p.pid);
            proc_rss.samples.push((l.clone(), (p.rss_kib * 1024) as f64));
            proc_cpu.samples.push((l, p.cpu_ms as f64 / 1000.0));
        }
        for (device, counter, v) in device_counters(&Layout::new(config, &st.id).dir, timeout) {
            let l = format!("{sb},device=\"{}\",counter=\"{}\"", label(&device), label(&counter));
            dev.samples.push((l, v as f64));
        }
        if !s.vm_alive {
            guest_up.samples.push((sb.clone(), 0.0));
            continue;
        }
        let answered = agent_of(config, &st.id, timeout)
            .and_then(|agent| {
                let d = agent.guest_details()?;
                guest_mem.samples.push((sb.clone(), d.memory_total_bytes as f64));
                for c in &st.containers {
                    if let Ok(cs) = agent.stats_container(&c.id) {
                        let l = format!("{sb},container=\"{}\"", label(&c.id));
                        c_mem.samples.push((l.clone(), cs.memory_usage as f64));
                        c_cpu.samples.push((l.clone(), cs.cpu_usage_usec as f64 / 1e6));
                        c_pids.samples.push((l.clone(), cs.pids_current as f64));
                        c_oom.samples.push((l, cs.oom_kills as f64));
                    }
                }
                Ok(())
            })
            .is_ok();
        guest_up.samples.push((sb, if answered { 1.0 } else { 0.0 }));
    }
    let mut text = String::new();
    for f in [
        info, up, uptime, boot, vm_mem, vcpus, rss, proc_rss, proc_cpu, guest_up, guest_mem, c_mem, c_cpu, c_pids,
        c_oom, dev,
    ] {
        text.push_str(&format!("# HELP {} {}\n# TYPE {} {}\n", f.name, f.help, f.name, f.kind));
        for (labels, v) in f.samples {
            text.push_str(&format!("{}{{{labels}}} {v}\n", f.name));
        }
    }
    Ok(text)
}

/// Serves [`metrics`] of every sandbox over HTTP on `addr`, which must be a
/// loopback address (the numbers are the operator's, not the network's):
/// `GET /metrics`, one request at a time, each read with a bound.
pub fn serve_metrics(config: &Config, addr: std::net::SocketAddr, timeout: Duration) -> Result<()> {
    use std::io::BufRead;
    if !addr.ip().is_loopback() {
        return Err(Error::Config {
            path: "--listen".into(),
            msg: format!("{addr}: metrics are served on a loopback address only"),
        });
    }
    let listener = std::net::TcpListener::bind(addr).map_err(|e| Error::io("listening on", addr.to_string(), e))?;
    eprintln!(
        "supervisor: serving metrics on http://{}/metrics",
        listener.local_addr().map_or(addr, |a| a)
    );
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
        let mut reader = std::io::BufReader::new(std::io::Read::take(&conn, 8192));
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        // The rest of the head, up to the bound.
        let mut rest = String::new();
        while reader.read_line(&mut rest).is_ok_and(|n| n > 0) && rest != "\r\n" && rest != "\n" {
            rest.clear();
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, kind, body) = if method != "GET" {
            ("405 Method Not Allowed", "text/plain", "GET only\n".to_string())
        } else if target != "/metrics" {
            ("404 Not Found", "text/plain", "see /metrics\n".to_string())
        } else {
            match metrics(config, &[], timeout) {
                Ok(text) => ("200 OK", "text/plain; version=0.0.4", text),
                Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
            }
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
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
    let agent = agent_of(config, id, timeout)?;
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

/// One line of `supervisor events`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventLine {
    /// `exit` or `oom`.
    #[serde(rename = "type")]
    pub kind: String,
    pub sandbox: String,
    pub container: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub exec_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// RFC 3339, UTC: when it happened (an exit) or was seen (an OOM kill).
    pub time: String,
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    crate::runtime::log::rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

/// The `supervisor events` line of an agent event (`None` for an event
/// without a body).
pub fn event_line(sandbox: &str, e: &tegmen_agent_api::agent::Event) -> Option<EventLine> {
    use tegmen_agent_api::agent::event::Event as E;
    Some(match e.event.as_ref()? {
        E::Exit(x) => EventLine {
            kind: "exit".into(),
            sandbox: sandbox.to_string(),
            container: x.container_id.clone(),
            exec_id: x.exec_id.clone(),
            pid: Some(x.pid),
            exit_code: Some(x.exit_code),
            time: rfc3339(UNIX_EPOCH + Duration::from_nanos(x.exited_at_unix_nanos.max(0) as u64)),
        },
        E::Oom(o) => EventLine {
            kind: "oom".into(),
            sandbox: sandbox.to_string(),
            container: o.container_id.clone(),
            exec_id: String::new(),
            pid: None,
            exit_code: None,
            time: rfc3339(SystemTime::now()),
        },
        _ => return None,
    })
}

/// Writes the agent's events of sandbox `id` (exits, OOM kills) as JSON
/// lines as they happen, as a watcher of its own (the shim's and the
/// monitors' events are not taken), until the VM is gone.
pub fn events(config: &Config, id: &str, out: &mut dyn Write) -> Result<()> {
    state_of(config, id)?;
    watch_events(config, id, &mut |line| {
        if writeln!(out, "{line}").is_err() {
            return false;
        }
        let _ = out.flush();
        true
    })
}

/// How often `events` without an id looks for new sandboxes.
const EVENTS_SCAN: Duration = Duration::from_secs(1);

/// `events` of every sandbox: those running now and those that start
/// later, merged as they come, until the reader goes away.
pub fn events_all(config: &Config, out: &mut dyn Write) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let watched = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::<String>::new()));
    loop {
        for state in sandbox::list(config) {
            if state.status != sandbox::Status::Running || !sandbox::vm_process_alive(&state) {
                continue;
            }
            if !watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(state.id.clone())
            {
                continue;
            }
            let (config, tx, watched) = (config.clone(), tx.clone(), watched.clone());
            std::thread::spawn(move || {
                let id = state.id;
                if let Err(e) = watch_events(&config, &id, &mut |line| tx.send(line).is_ok()) {
                    let line = serde_json::json!({"type": "error", "sandbox": id, "error": e.to_string()});
                    let _ = tx.send(line.to_string());
                }
                watched.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            });
        }
        let deadline = std::time::Instant::now() + EVENTS_SCAN;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if writeln!(out, "{line}").is_err() {
                        return Ok(());
                    }
                    let _ = out.flush();
                }
                Err(_) => break,
            }
        }
    }
}

/// Watches sandbox `id`'s agent and hands each event, as a JSON line, to
/// `emit` (which says whether to go on), until the VM is gone.
fn watch_events(config: &Config, id: &str, emit: &mut dyn FnMut(String) -> bool) -> Result<()> {
    let layout = Layout::new(config, id);
    let watcher = format!("supervisor-{}", std::process::id());
    let agent = AgentClient::connect(
        &layout.vsock_socket(),
        tegmen_agent_api::AGENT_VSOCK_PORT,
        Duration::from_secs(5),
        Duration::from_secs(10),
    )?;
    // The first call registers the watcher: events from here on.
    agent.watch_event(&watcher, Duration::ZERO)?;
    if !emit(serde_json::json!({"type": "watching", "sandbox": id}).to_string()) {
        return Ok(());
    }
    loop {
        match agent.watch_event(&watcher, Duration::from_secs(2)) {
            Ok(Some(e)) => {
                if let Some(line) = event_line(id, &e) {
                    if !emit(serde_json::to_string(&line).expect("an event serializes")) {
                        return Ok(());
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                // The connection goes with the VM's processes, which do not
                // all die at the same instant: give the VM a moment.
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                while std::time::Instant::now() < deadline {
                    if !sandbox::vm_alive(&layout.dir) {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Err(e);
            }
        }
        if !sandbox::vm_alive(&layout.dir) {
            return Ok(());
        }
    }
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
        let live = sandbox::vm_alive(&layout.dir);
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

/// How `supervisor exec` ends when the debug process did not run: the
/// supervisor's own failure (the debug console off, the agent away), a
/// program that could not be started, one that was not found — the codes
/// docker and podman give for the same failures.
pub const EXEC_FAILED: i32 = 125;
pub const EXEC_CANNOT_RUN: i32 = 126;
pub const EXEC_NOT_FOUND: i32 = 127;

/// The outcome of `supervisor exec`: the process's exit status, or why it
/// did not run (with the status to exit with).
pub enum DebugExit {
    Exited(i32),
    Failed { code: i32, message: String },
}

/// `supervisor exec ID -- ARGS`: runs `args` in sandbox `id`'s guest
/// outside every container through the agent's debug console, with this
/// process's stdio (a terminal in raw mode with `terminal`), until it
/// exits.
pub fn exec_debug(config: &Config, id: &str, args: &[String], env: &[String], terminal: bool) -> Result<DebugExit> {
    // Before any connection (whose threads would otherwise take them):
    // the signals go to the debug process once it runs.
    crate::runtime::monitor::block_forwarded_signals();
    let state = state_of(config, id)?;
    let failed = |code, message: String| Ok(DebugExit::Failed { code, message });
    if let Some(bad) = env
        .iter()
        .find(|e| !matches!(e.split_once('='), Some((k, _)) if !k.is_empty()))
    {
        return failed(EXEC_FAILED, format!("--env {bad:?}: not KEY=VALUE"));
    }
    if !sandbox::vm_process_alive(&state) {
        return failed(EXEC_FAILED, format!("sandbox {id}: the VM is gone"));
    }
    let agent = match agent_of(config, id, Duration::from_secs(5)) {
        Ok(a) => a,
        Err(e) => return failed(EXEC_FAILED, format!("sandbox {id}: {e}")),
    };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let exec_id = format!("supervisor-{}-{nanos}", std::process::id());
    let (rows, cols) = if terminal {
        crate::runtime::console::window_size(0).unwrap_or((0, 0))
    } else {
        (0, 0)
    };
    let req = tegmen_agent_api::agent::ExecDebugRequest {
        exec_id: exec_id.clone(),
        args: args.to_vec(),
        env: env.to_vec(),
        terminal,
        stdin: true,
        rows: rows.into(),
        cols: cols.into(),
        ..Default::default()
    };
    if let Err(e) = agent.exec_debug(&req) {
        let code = match &e {
            Error::AgentStatus { code, .. } if code == "NOT_FOUND" => EXEC_NOT_FOUND,
            Error::AgentStatus { code, .. } if code == "FAILED_PRECONDITION" || code == "ALREADY_EXISTS" => EXEC_FAILED,
            Error::AgentStatus { .. } => EXEC_CANNOT_RUN,
            _ => EXEC_FAILED,
        };
        let message = match e {
            Error::AgentStatus { message, .. } => message,
            other => other.to_string(),
        };
        return failed(code, format!("sandbox {id}: {message}"));
    }
    drop(agent);
    let target = crate::runtime::monitor::Target {
        sandbox: id.to_string(),
        container: tegmen_agent_api::DEBUG_CONTAINER.to_string(),
        exec_id,
    };
    match crate::runtime::monitor::attach(config, &target, terminal) {
        Ok(Some(code)) => Ok(DebugExit::Exited(code)),
        Ok(None) => failed(
            EXEC_FAILED,
            format!("sandbox {id}: the VM went away before the process exited"),
        ),
        Err(e) => {
            // It runs, but its stdio could not be carried: end it and let
            // the agent forget it.
            if let Ok(agent) = agent_of(config, id, Duration::from_secs(5)) {
                let dbg = tegmen_agent_api::DEBUG_CONTAINER;
                let _ = agent.signal_process(dbg, &target.exec_id, libc::SIGKILL as u32, true);
                let _ = agent.wait_process(dbg, &target.exec_id);
                let _ = agent.remove_process(dbg, &target.exec_id);
            }
            failed(EXEC_FAILED, format!("sandbox {id}: {e}"))
        }
    }
}

/// The confinement of each live host process of sandbox `id` (the monitor,
/// the device backends), read from `/proc` (`supervisor check ID`); a
/// process that cannot be read is skipped with its error.
pub fn confinement(
    config: &Config,
    id: &str,
) -> Result<Vec<std::result::Result<crate::confinement::Confinement, String>>> {
    let state = state_of(config, id)?;
    Ok(state
        .processes
        .iter()
        .filter(|p| p.is_alive())
        .map(|p| crate::confinement::read(&p.name, p.pid).map_err(|e| format!("{} (pid {}): {e}", p.name, p.pid)))
        .collect())
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
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::new(1_764_680_000, 5);
        assert_eq!(rfc3339(t), "2025-12-02T12:53:20.000000005Z");
    }

    #[test]
    fn backend_counters_are_bounded_and_checked() {
        let got = parse_counters(
            r#"{"device":"vsock","counters":{"tx_packets":3,"Bad-Name":1,"neg":-1,"f":1.5,"rx_bytes":10}}"#,
        );
        assert_eq!(got, [("rx_bytes".to_string(), 10), ("tx_packets".to_string(), 3)]);
        assert!(parse_counters("not json").is_empty());
        assert!(parse_counters(r#"{"counters":[1,2]}"#).is_empty());
        let many: serde_json::Map<String, serde_json::Value> = (0..1000).map(|i| (format!("c{i}"), 1.into())).collect();
        let line = serde_json::json!({"counters": many}).to_string();
        assert_eq!(parse_counters(&line).len(), MAX_COUNTERS);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn metrics_of_no_sandbox_and_of_an_unknown_one() {
        let config = Config {
            root: std::env::temp_dir().join(format!("tegmen-metrics-{}", std::process::id())),
            ..Config::default()
        };
        let text = metrics(&config, &[], Duration::from_secs(1)).unwrap();
        assert!(text.contains("# TYPE tegmen_sandbox_vm_up gauge\n"), "{text}");
        assert!(!text.contains("{"), "no samples without sandboxes: {text}");
        let e = metrics(&config, &["nope".into()], Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn this_process_has_memory_and_cpu() {
        let me = ProcessRecord::of("test", std::process::id() as i32).unwrap();
        let u = process_usage(&me);
        assert!(u.alive && u.rss_kib > 0, "{u:?}");
    }
}
