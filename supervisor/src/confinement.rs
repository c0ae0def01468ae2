//! What confines a host process of a sandbox (the monitor and the device
//! backends), read from `/proc`: its uid and gid, `no_new_privs`, its
//! seccomp mode and number of filters, its capability sets, which of its
//! namespaces are its own rather than the reader's, and its resource
//! limits with the private memory it uses. `supervisor check ID` prints it
//! for every process a sandbox recorded.

use std::path::Path;

use serde::Serialize;

/// Capability names by number (`include/uapi/linux/capability.h`, up to
/// CAP_CHECKPOINT_RESTORE = 40).
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The namespaces compared, as named in `/proc/PID/ns`.
pub const NAMESPACES: [&str; 7] = ["mnt", "ipc", "uts", "net", "pid", "user", "cgroup"];

/// The confinement of one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Confinement {
    pub name: String,
    pub pid: i32,
    /// What `/proc/PID/status` says (its fields at the top level in JSON).
    #[serde(flatten)]
    pub status: StatusFields,
    /// The namespaces in which the process is not where the reader is.
    pub own_namespaces: Vec<String>,
    /// The namespaces it shares with the reader.
    pub shared_namespaces: Vec<String>,
    /// Each thread's seccomp filters (`tegmen-vmm`'s threads add a list
    /// of their kind on top of the process's).
    pub threads: Vec<ThreadFilters>,
    /// Its resource limits (`/proc/PID/limits`).
    pub limits: Limits,
}

/// The soft limits that bound what a process takes of the host (`None`:
/// unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub open_files: Option<u64>,
    /// Bytes of private memory (`RLIMIT_DATA`).
    pub data: Option<u64>,
    /// Bytes of a core dump.
    pub core: Option<u64>,
}

/// Parses `/proc/PID/limits`; an error names the line that is missing or
/// malformed.
pub fn parse_limits(text: &str) -> Result<Limits, String> {
    let soft = |name: &str| -> Result<Option<u64>, String> {
        let rest = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| format!("no {name:?} line"))?;
        match rest.split_whitespace().next() {
            Some("unlimited") => Ok(None),
            Some(n) => n
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}: {n:?} is not a number")),
            None => Err(format!("{name}: no value")),
        }
    };
    Ok(Limits {
        open_files: soft("Max open files")?,
        data: soft("Max data size")?,
        core: soft("Max core file size")?,
    })
}

/// `n` bytes for people: in MiB from 1 MiB on.
fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} B")
    }
}

/// One thread's seccomp filters and capabilities (capabilities are a
/// thread's own too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadFilters {
    pub tid: i32,
    /// Its name (`/proc/PID/task/TID/comm`).
    pub name: String,
    pub seccomp_filters: Option<u32>,
    pub cap_effective: u64,
}

/// The threads of the process at `dir` (`/proc/PID`), by thread id; a
/// thread that ends while it is read is left out.
fn read_threads(dir: &Path) -> Vec<ThreadFilters> {
    let Ok(tasks) = std::fs::read_dir(dir.join("task")) else {
        return Vec::new();
    };
    let mut threads: Vec<ThreadFilters> = tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let status = parse_status(&std::fs::read_to_string(t.path().join("status")).ok()?).ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?.trim().to_string();
            Some(ThreadFilters {
                tid,
                name,
                seccomp_filters: status.seccomp_filters,
                cap_effective: status.cap_effective,
            })
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    threads
}

/// The threads grouped by their number of filters, for people:
/// `2: tegmen-vmm, vcpu0, vsock; 1: spawner` (most filters first; a name
/// shared by several threads once, with a count).
pub fn describe_threads(threads: &[ThreadFilters]) -> String {
    let mut groups: std::collections::BTreeMap<std::cmp::Reverse<u32>, Vec<(String, usize)>> = Default::default();
    for t in threads {
        let names = groups
            .entry(std::cmp::Reverse(t.seccomp_filters.unwrap_or(0)))
            .or_default();
        match names.iter_mut().find(|(n, _)| *n == t.name) {
            Some((_, count)) => *count += 1,
            None => names.push((t.name.clone(), 1)),
        }
    }
    groups
        .into_iter()
        .map(|(n, names)| {
            let names: Vec<String> = names
                .into_iter()
                .map(|(name, count)| if count > 1 { format!("{name} ×{count}") } else { name })
                .collect();
            format!("{}: {}", n.0, names.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fields of `/proc/PID/status` this module reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatusFields {
    /// Real and effective uid.
    pub uid: (u32, u32),
    /// Real and effective gid.
    pub gid: (u32, u32),
    pub no_new_privs: bool,
    /// `disabled`, `strict` or `filter`.
    pub seccomp: String,
    /// Filters installed (None where the kernel does not say).
    pub seccomp_filters: Option<u32>,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    /// Private memory mapped (`VmData`), in bytes; what `RLIMIT_DATA`
    /// bounds.
    pub data_bytes: Option<u64>,
}

/// Parses `/proc/PID/status`; an error names the field that is missing or
/// malformed.
pub fn parse_status(text: &str) -> Result<StatusFields, String> {
    let field = |name: &str| -> Result<&str, String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or_else(|| format!("no {name} line"))
    };
    let pair = |name: &str| -> Result<(u32, u32), String> {
        let v = field(name)?;
        let mut it = v.split_whitespace().map(str::parse::<u32>);
        match (it.next(), it.next()) {
            (Some(Ok(real)), Some(Ok(effective))) => Ok((real, effective)),
            _ => Err(format!("{name}: {v:?} is not a uid/gid list")),
        }
    };
    let mask = |name: &str| -> Result<u64, String> {
        let v = field(name)?;
        u64::from_str_radix(v, 16).map_err(|_| format!("{name}: {v:?} is not a hexadecimal mask"))
    };
    let seccomp = match field("Seccomp")? {
        "0" => "disabled",
        "1" => "strict",
        "2" => "filter",
        other => return Err(format!("Seccomp: unknown mode {other:?}")),
    };
    Ok(StatusFields {
        uid: pair("Uid")?,
        gid: pair("Gid")?,
        no_new_privs: field("NoNewPrivs")? == "1",
        seccomp: seccomp.into(),
        seccomp_filters: field("Seccomp_filters").ok().and_then(|v| v.parse().ok()),
        cap_effective: mask("CapEff")?,
        cap_permitted: mask("CapPrm")?,
        cap_bounding: mask("CapBnd")?,
        // CapAmb exists since Linux 4.3; absent means none.
        cap_ambient: field("CapAmb").map_or(Ok(0), |_| mask("CapAmb"))?,
        // `VmData:    1234 kB`; none for a kernel thread or a zombie.
        data_bytes: field("VmData")
            .ok()
            .and_then(|v| v.strip_suffix("kB")?.trim().parse::<u64>().ok())
            .map(|kib| kib << 10),
    })
}

/// The names of the capabilities in `mask` (`CAP_<n>` for numbers past
/// the table).
pub fn cap_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|bit| mask & (1u64 << bit) != 0)
        .map(|bit| {
            CAP_NAMES
                .get(bit as usize)
                .map_or_else(|| format!("CAP_{bit}"), |n| (*n).to_string())
        })
        .collect()
}

/// A capability set for people: `none`, `all (N)` when it holds every
/// capability the kernel knows (`known`, from the reader's bounding set
/// or the table), else the names.
pub fn describe_caps(mask: u64, known: u64) -> String {
    if mask == 0 {
        "none".into()
    } else if mask & known == known {
        format!("all ({})", known.count_ones())
    } else {
        cap_names(mask).join(",")
    }
}

/// Reads the confinement of `pid` under `proc_root` (`/proc`), its
/// namespaces compared with those of `reference` (the reader: `self`).
pub fn read_at(proc_root: &Path, name: &str, pid: i32, reference: &str) -> Result<Confinement, String> {
    let dir = proc_root.join(pid.to_string());
    let status = std::fs::read_to_string(dir.join("status")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let s = parse_status(&status).map_err(|e| format!("{}/status: {e}", dir.display()))?;
    let limits = std::fs::read_to_string(dir.join("limits")).map_err(|e| format!("{}/limits: {e}", dir.display()))?;
    let limits = parse_limits(&limits).map_err(|e| format!("{}/limits: {e}", dir.display()))?;
    let (mut own, mut shared) = (Vec::new(), Vec::new());
    for ns in NAMESPACES {
        let theirs = std::fs::read_link(dir.join("ns").join(ns));
        let ours = std::fs::read_link(proc_root.join(reference).join("ns").join(ns));
        match (theirs, ours) {
            (Ok(a), Ok(b)) if a == b => shared.push(ns.to_string()),
            (Ok(_), Ok(_)) => own.push(ns.to_string()),
            // A kernel without that namespace kind, or no access: neither.
            _ => {}
        }
    }
    Ok(Confinement {
        name: name.into(),
        pid,
        status: s,
        own_namespaces: own,
        shared_namespaces: shared,
        threads: read_threads(&dir),
        limits,
    })
}

/// [`read_at`] in `/proc`, compared with this process.
pub fn read(name: &str, pid: i32) -> Result<Confinement, String> {
    read_at(Path::new("/proc"), name, pid, "self")
}

impl Confinement {
    /// Lines for `supervisor check ID`; `known` as in [`describe_caps`].
    pub fn describe(&self, known: u64) -> String {
        let s = &self.status;
        let seccomp = match (s.seccomp.as_str(), s.seccomp_filters) {
            ("filter", Some(n)) => format!("filter ({n} installed)"),
            (mode, _) => mode.to_string(),
        };
        let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
        let limit = |l: Option<u64>, show: fn(u64) -> String| l.map_or("unlimited".to_string(), show);
        let l = &self.limits;
        let data = match s.data_bytes {
            Some(used) => format!("{} ({} in use)", limit(l.data, bytes), bytes(used)),
            None => limit(l.data, bytes),
        };
        format!(
            "{} (pid {}):\n  uid {} (effective {}), gid {} (effective {}), no_new_privs: {}\n  seccomp: {seccomp}\n  \
             capabilities: effective {}; permitted {}; bounding {}; ambient {}\n  \
             namespaces: own {}; shared with this host {}\n  \
             limits: open files {}; private memory {data}; core dumps {}\n  \
             seccomp filters by thread: {}",
            self.name,
            self.pid,
            s.uid.0,
            s.uid.1,
            s.gid.0,
            s.gid.1,
            if s.no_new_privs { "yes" } else { "no" },
            describe_caps(s.cap_effective, known),
            describe_caps(s.cap_permitted, known),
            describe_caps(s.cap_bounding, known),
            describe_caps(s.cap_ambient, known),
            list(&self.own_namespaces),
            list(&self.shared_namespaces),
            limit(l.open_files, |n| n.to_string()),
            limit(l.core, |n| if n == 0 { "none".into() } else { bytes(n) }),
            describe_threads(&self.threads),
        )
    }
}

/// Every capability this kernel knows: `/proc/sys/kernel/cap_last_cap`,
/// else the table.
pub fn known_caps() -> u64 {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&n| n < 64)
        .unwrap_or(CAP_NAMES.len() as u32 - 1);
    if last == 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\ttegmen-vmm\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t1000\t1000\t1000\n\
        Gid:\t100\t101\t101\t101\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\n\
        CapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
        NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t3\nSpeculation_Store_Bypass:\tthread vulnerable\n";

    #[test]
    fn a_confined_status_is_read() {
        let s = parse_status(STATUS).unwrap();
        assert_eq!(s.uid, (1000, 1000));
        assert_eq!(s.gid, (100, 101));
        assert!(s.no_new_privs);
        assert_eq!(s.seccomp, "filter");
        assert_eq!(s.seccomp_filters, Some(3));
        assert_eq!((s.cap_effective, s.cap_permitted, s.cap_ambient), (0, 0, 0));
        assert_eq!(s.cap_bounding, (1u64 << 41) - 1);
        assert_eq!(s.data_bytes, None);
        let s = parse_status(&format!("{STATUS}VmData:\t    2048 kB\n")).unwrap();
        assert_eq!(s.data_bytes, Some(2 << 20));
    }

    #[test]
    fn limits_are_read() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
            Max cpu time              unlimited            unlimited            seconds   \n\
            Max data size             536870912            536870912            bytes     \n\
            Max core file size        0                    0                    bytes     \n\
            Max open files            4096                 4096                 files     \n";
        let l = parse_limits(text).unwrap();
        assert_eq!(
            l,
            Limits {
                open_files: Some(4096),
                data: Some(512 << 20),
                core: Some(0)
            }
        );
        let unlimited = text.replace("536870912            536870912", "unlimited            unlimited");
        assert_eq!(parse_limits(&unlimited).unwrap().data, None);
        let bad = text.replace("4096                 4096", "many");
        assert_eq!(
            parse_limits(&bad).unwrap_err(),
            "Max open files: \"many\" is not a number"
        );
        let gone = text.replace("Max data size", "Max whatever");
        assert_eq!(parse_limits(&gone).unwrap_err(), "no \"Max data size\" line");
    }

    #[test]
    fn broken_status_names_the_field() {
        let no_seccomp = STATUS.replace("Seccomp:\t2\n", "");
        assert_eq!(parse_status(&no_seccomp).unwrap_err(), "no Seccomp line");
        let bad = STATUS.replace("CapEff:\t0000000000000000", "CapEff:\tzz");
        assert_eq!(
            parse_status(&bad).unwrap_err(),
            "CapEff: \"zz\" is not a hexadecimal mask"
        );
        let bad = STATUS.replace("Uid:\t1000\t1000\t1000\t1000", "Uid:\tx");
        assert!(parse_status(&bad).unwrap_err().starts_with("Uid:"));
        let bad = STATUS.replace("Seccomp:\t2", "Seccomp:\t9");
        assert_eq!(parse_status(&bad).unwrap_err(), "Seccomp: unknown mode \"9\"");
    }

    #[test]
    fn threads_are_grouped_by_their_filters() {
        let t = |tid, name: &str, n| ThreadFilters {
            tid,
            name: name.into(),
            seccomp_filters: Some(n),
            cap_effective: 0,
        };
        let threads = [
            t(10, "tegmen-vmm", 2),
            t(11, "stats", 1),
            t(12, "spawner", 1),
            t(13, "vcpu0", 2),
            t(14, "vcpu1", 2),
            t(15, "stats", 1),
            t(16, "vsock", 2),
        ];
        assert_eq!(
            describe_threads(&threads),
            "2: tegmen-vmm, vcpu0, vcpu1, vsock; 1: stats ×2, spawner"
        );
        assert_eq!(describe_threads(&[]), "");
    }

    #[test]
    fn capability_sets_are_named() {
        assert_eq!(cap_names(0b101), ["CAP_CHOWN", "CAP_DAC_READ_SEARCH"]);
        assert_eq!(cap_names(1 << 21 | 1 << 50), ["CAP_SYS_ADMIN", "CAP_50"]);
        let known = (1u64 << 41) - 1;
        assert_eq!(describe_caps(0, known), "none");
        assert_eq!(describe_caps(known, known), "all (41)");
        assert_eq!(describe_caps(1 << 12, known), "CAP_NET_ADMIN");
    }

    /// This test process: its own status parses, and it shares every
    /// namespace with itself.
    #[test]
    fn this_process_is_read_from_proc() {
        let me = read("test", std::process::id() as i32).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(me.status.uid.0, uid);
        assert!(me.own_namespaces.is_empty(), "{me:?}");
        assert!(me.shared_namespaces.contains(&"mnt".to_string()), "{me:?}");
        let text = me.describe(known_caps());
        assert!(text.starts_with(&format!("test (pid {}):", me.pid)), "{text}");
        assert!(text.contains("namespaces: own -;"), "{text}");
        assert!(text.contains("limits: open files "), "{text}");
        assert!(me.status.data_bytes.is_some_and(|n| n > 0), "{me:?}");
        // Its threads: this one among them, by name.
        let this = std::thread::current()
            .name()
            .unwrap()
            .chars()
            .take(15)
            .collect::<String>();
        assert!(me.threads.iter().any(|t| t.name == this), "{this}: {:?}", me.threads);
        assert!(
            me.threads.iter().all(|t| t.seccomp_filters.is_some()),
            "{:?}",
            me.threads
        );
        assert!(read("gone", i32::MAX).unwrap_err().contains(&i32::MAX.to_string()));
    }

    /// A process in a mount namespace of its own (a child that unshared
    /// it) is reported as such.
    #[test]
    fn an_own_mount_namespace_is_seen() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: unshare(CLONE_NEWNS) needs root");
            return;
        }
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "sleep", "30"])
            .spawn()
            .expect("unshare(1) from util-linux");
        let pid = child.id() as i32;
        // unshare execs sleep once the namespace is made.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let c = loop {
            let c = read("sleep", pid).unwrap();
            if !c.own_namespaces.is_empty() || std::time::Instant::now() > deadline {
                break c;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(c.own_namespaces, ["mnt"], "{c:?}");
    }
}
