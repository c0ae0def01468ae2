//! The host cgroup of a VM, as runc makes the host cgroup of a container.
//!
//! A container's `linux.cgroupsPath` names a cgroup on the host. runc puts
//! the container's processes there; Tegmen puts there every host process of
//! the VM that runs it (QEMU or tegmen-vmm, the device backends, and for
//! `tegmen` the monitor), so the node's accounting and limits cover the
//! whole VM. The container's own limits are enforced again inside the guest,
//! by the agent, on the real container.
//!
//! - **Paths.** The cgroupfs form (`/a/b` from the hierarchy's root, `a/b`
//!   below this process's own cgroup, empty for `<own>/<id>`) and the
//!   systemd form `slice:prefix:name` (`kubepods-besteffort.slice:cri-containerd:ID`
//!   becomes `/kubepods.slice/kubepods-besteffort.slice/cri-containerd-ID.scope`).
//!   The systemd form is laid out through cgroupfs: no unit is registered
//!   with systemd over D-Bus.
//! - **Hierarchies.** Every mounted one, from `/proc/self/mountinfo`:
//!   cgroup v1 (each controller hierarchy and `name=systemd`), the v2 one of
//!   a hybrid host, or a pure v2 host (controllers enabled down the path in
//!   `cgroup.subtree_control`).
//! - **Limits for a VM** ([`Limits::for_vm`]): CPU shares / quota / cpuset
//!   as the spec gives them; memory as the spec's limit plus the VM's own
//!   overhead; pids never below what the VM's threads need.
//! - **Joining.** Processes are spawned into the cgroup (each opened
//!   `cgroup.procs` gets a `0` between fork and exec), so every page they
//!   touch is charged to it from the start.
//! - **Removal.** Only the leaf this made, after whatever is still in it has
//!   been killed; the record of it lives in the sandbox's `state.json`, so a
//!   `delete` after kill -9 removes it too.

use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Controllers of cgroup v1 hierarchies that processes are put into.
const V1_CONTROLLERS: [&str; 14] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];
/// The v2 controllers a VM's limits use.
const V2_CONTROLLERS: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];
/// How long removal waits for a killed cgroup to empty.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mountpoint: PathBuf,
    /// The cgroup this mount shows at its mountpoint (`/` without a cgroup
    /// namespace).
    pub root: PathBuf,
    /// v1: its controllers (`cpu`, `memory`, `name=systemd`, …); v2: none.
    pub controllers: Vec<String>,
    pub v2: bool,
    /// This process's cgroup in it, from `/proc/self/cgroup`.
    pub own: PathBuf,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    /// The directory of cgroup `path` (absolute within the hierarchy).
    fn dir_of(&self, path: &Path) -> Result<PathBuf> {
        let rel = path.strip_prefix(&self.root).map_err(|_| {
            Error::Cgroup(format!(
                "cgroup {} is outside {} (mounted from {})",
                path.display(),
                self.mountpoint.display(),
                self.root.display()
            ))
        })?;
        Ok(self.mountpoint.join(rel))
    }
}

/// The hierarchies of this host, as this process sees them.
pub fn hierarchies() -> Result<Vec<Hierarchy>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| Error::io("reading", "/proc/self/mountinfo", e))?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| Error::io("reading", "/proc/self/cgroup", e))?;
    Ok(parse_hierarchies(&mountinfo, &own))
}

/// Parses `/proc/self/mountinfo` and `/proc/self/cgroup`.
pub fn parse_hierarchies(mountinfo: &str, proc_cgroup: &str) -> Vec<Hierarchy> {
    let mut found: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() < dash + 4 {
            continue;
        }
        let fstype = fields[dash + 1];
        let v2 = match fstype {
            "cgroup" => false,
            "cgroup2" => true,
            _ => continue,
        };
        let mut controllers: Vec<String> = if v2 {
            Vec::new()
        } else {
            fields[dash + 3]
                .split(',')
                .filter(|o| V1_CONTROLLERS.contains(o) || o.starts_with("name="))
                .map(str::to_string)
                .collect()
        };
        controllers.sort();
        if !v2 && controllers.is_empty() {
            continue;
        }
        // A hierarchy mounted twice (bind mounts) is used once.
        if found.iter().any(|h| h.v2 == v2 && h.controllers == controllers) {
            continue;
        }
        let own = own_cgroup(proc_cgroup, v2, &controllers).unwrap_or_else(|| PathBuf::from("/"));
        found.push(Hierarchy {
            mountpoint: crate::sandbox::unescape_mount_path(fields[4]),
            root: crate::sandbox::unescape_mount_path(fields[3]),
            controllers,
            v2,
            own,
        });
    }
    found
}

fn own_cgroup(proc_cgroup: &str, v2: bool, controllers: &[String]) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let mut listed: Vec<String> = ctrls.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
        listed.sort();
        let matches = if v2 { ctrls.is_empty() } else { listed == controllers };
        matches.then(|| PathBuf::from(path))
    })
}

/// Where a container's cgroup is, before the hierarchies are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupPath {
    /// From the root of each hierarchy.
    Absolute(PathBuf),
    /// Below this process's own cgroup in each hierarchy.
    Relative(PathBuf),
}

/// Resolves `linux.cgroupsPath` as runc does: `systemd` for
/// `--systemd-cgroup` (the `slice:prefix:name` form), else cgroupfs.
pub fn resolve_path(cgroups_path: &str, systemd: bool, id: &str) -> Result<CgroupPath> {
    if systemd {
        let given = if cgroups_path.is_empty() {
            format!("system.slice:tegmen:{id}")
        } else {
            cgroups_path.to_string()
        };
        let parts: Vec<&str> = given.split(':').collect();
        if parts.len() != 3 {
            return Err(Error::Cgroup(format!(
                "expected cgroupsPath to be of format \"slice:prefix:name\" for systemd cgroups, got {cgroups_path:?} instead"
            )));
        }
        let slice = if parts[0].is_empty() { "system.slice" } else { parts[0] };
        let mut path = expand_slice(slice)?;
        let unit = if parts[2].ends_with(".slice") {
            parts[2].to_string()
        } else if parts[1].is_empty() {
            format!("{}.scope", parts[2])
        } else {
            format!("{}-{}.scope", parts[1], parts[2])
        };
        check_component(&unit, cgroups_path)?;
        path.push(unit);
        return Ok(CgroupPath::Absolute(path));
    }
    let inner = if cgroups_path.is_empty() { id } else { cgroups_path };
    let mut clean = PathBuf::new();
    for c in Path::new(inner).components() {
        match c {
            Component::RootDir => clean.push("/"),
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::Cgroup(format!(
                    "invalid cgroupsPath {cgroups_path:?}: \"..\" is not allowed"
                )))
            }
        }
    }
    if clean.as_os_str().is_empty() || clean == Path::new("/") {
        return Err(Error::Cgroup(format!(
            "invalid cgroupsPath {cgroups_path:?}: it names the root cgroup"
        )));
    }
    Ok(if inner.starts_with('/') {
        CgroupPath::Absolute(clean)
    } else {
        CgroupPath::Relative(clean)
    })
}

fn check_component(name: &str, given: &str) -> Result<()> {
    if name.contains('/') || name == "." || name == ".." || name.is_empty() {
        return Err(Error::Cgroup(format!(
            "invalid cgroupsPath {given:?}: bad unit name {name:?}"
        )));
    }
    Ok(())
}

/// systemd's slice naming: `a-b-c.slice` lives in `/a.slice/a-b.slice/a-b-c.slice`.
pub fn expand_slice(slice: &str) -> Result<PathBuf> {
    let bad = || Error::Cgroup(format!("invalid slice name {slice:?}"));
    let name = slice.strip_suffix(".slice").ok_or_else(bad)?;
    if slice.contains('/') {
        return Err(bad());
    }
    let mut path = PathBuf::from("/");
    if name == "-" {
        return Ok(path);
    }
    if name.is_empty() || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(bad());
    }
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// A host cgroup to make: where, and with which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRequest {
    pub path: CgroupPath,
    pub limits: Limits,
}

impl CgroupRequest {
    /// Makes it in every hierarchy of this host.
    pub fn create(&self) -> Result<HostCgroup> {
        HostCgroup::create(&hierarchies()?, &self.path, &self.limits)
    }
}

/// Threads a VM's host processes may need at most, whatever a container's
/// `pids.limit` says: QEMU's main loop, RCU and worker threads, one per
/// vCPU, the backends' queue threads; with room.
pub fn vm_pids_floor(vcpus: u32) -> i64 {
    128 + 8 * i64::from(vcpus)
}

/// True for a cgroupsPath in systemd's `slice:prefix:name` form (what
/// containerd's CRI plugin gives with `SystemdCgroup`).
pub fn is_systemd_form(cgroups_path: &str) -> bool {
    !cgroups_path.starts_with('/') && cgroups_path.matches(':').count() == 2
}

/// The host cgroup of the VM (of `memory_mib` guest RAM and `vcpus`) that
/// runs the container of `spec`: at its `linux.cgroupsPath`, with its
/// limits bound for the VM as a whole; `overhead_mib` is what the VM's host
/// processes need beyond guest RAM.
pub fn vm_request(
    spec: &serde_json::Value,
    id: &str,
    systemd: bool,
    (memory_mib, vcpus): (u32, u32),
    overhead_mib: u32,
) -> Result<CgroupRequest> {
    let mut request = container_request(spec, id, systemd)?;
    let vm_bytes = (i64::from(memory_mib) + i64::from(overhead_mib)) << 20;
    request.limits = request.limits.for_vm(vm_bytes, vm_pids_floor(vcpus));
    Ok(request)
}

/// The limits `update` gives the VM's host cgroup: CPU and pids as for
/// [`Limits::for_vm`]; memory is left, since the VM keeps its size.
pub fn vm_update(resources: &serde_json::Value, vcpus: u32) -> Result<Limits> {
    let mut limits = Limits::from_spec(resources)?.for_vm(0, vm_pids_floor(vcpus));
    limits.memory = None;
    Ok(limits)
}

/// The host cgroup of the container of `spec`, with its limits as given.
pub fn container_request(spec: &serde_json::Value, id: &str, systemd: bool) -> Result<CgroupRequest> {
    let path = spec["linux"]["cgroupsPath"].as_str().unwrap_or("");
    Ok(CgroupRequest {
        path: resolve_path(path, systemd, id)?,
        limits: Limits::from_spec(&spec["linux"]["resources"])?,
    })
}

/// The limits a host cgroup gets, from the spec's `linux.resources`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    /// Bytes; -1 for unlimited.
    pub memory: Option<i64>,
    /// -1 for unlimited.
    pub pids: Option<i64>,
}

impl Limits {
    /// Reads `linux.resources` (absent or null: no limits). A value of the
    /// wrong type is an error naming it.
    pub fn from_spec(resources: &serde_json::Value) -> Result<Limits> {
        if resources.is_null() {
            return Ok(Limits::default());
        }
        let field = |section: &str, key: &str| -> &serde_json::Value { &resources[section][key] };
        let bad = |what: &str| Error::Cgroup(format!("linux.resources.{what}: not a number of the right range"));
        let unsigned = |section: &str, key: &str| -> Result<Option<u64>> {
            let v = field(section, key);
            if v.is_null() {
                return Ok(None);
            }
            v.as_u64().map(Some).ok_or_else(|| bad(&format!("{section}.{key}")))
        };
        let signed = |section: &str, key: &str| -> Result<Option<i64>> {
            let v = field(section, key);
            if v.is_null() {
                return Ok(None);
            }
            v.as_i64().map(Some).ok_or_else(|| bad(&format!("{section}.{key}")))
        };
        let text = |section: &str, key: &str| -> Result<Option<String>> {
            let v = field(section, key);
            match v {
                serde_json::Value::Null => Ok(None),
                serde_json::Value::String(s) if s.is_empty() => Ok(None),
                serde_json::Value::String(s) if s.chars().all(|c| c.is_ascii_digit() || ",-".contains(c)) => {
                    Ok(Some(s.clone()))
                }
                _ => Err(Error::Cgroup(format!(
                    "linux.resources.{section}.{key}: {v} is not a list of numbers and ranges"
                ))),
            }
        };
        Ok(Limits {
            cpu_shares: unsigned("cpu", "shares")?.filter(|s| *s > 0),
            cpu_quota: signed("cpu", "quota")?.filter(|q| *q != 0),
            cpu_period: unsigned("cpu", "period")?.filter(|p| *p > 0),
            cpus: text("cpu", "cpus")?,
            mems: text("cpu", "mems")?,
            memory: signed("memory", "limit")?.filter(|m| *m != 0),
            pids: signed("pids", "limit")?.filter(|p| *p != 0),
        })
    }

    /// The limits of a VM that runs a container with these limits: a
    /// memory limit becomes at least what the whole VM may use (`vm_bytes`:
    /// its guest RAM, sized from the limit, plus its host processes' own
    /// memory), pids never go below what the VM's threads need. CPU stays
    /// as given.
    pub fn for_vm(mut self, vm_bytes: i64, pids_floor: i64) -> Limits {
        if let Some(m) = self.memory.filter(|m| *m > 0) {
            self.memory = Some(m.max(vm_bytes));
        }
        if let Some(p) = self.pids.filter(|p| *p > 0) {
            self.pids = Some(p.max(pids_floor));
        }
        self
    }

    /// The files to write in one hierarchy, in order.
    fn writes(&self, h: &Hierarchy) -> Vec<(&'static str, String)> {
        let mut w = Vec::new();
        let v2 = h.v2;
        let on = |c: &str| v2 || h.has(c);
        if on("cpu") {
            if let Some(s) = self.cpu_shares {
                if v2 {
                    w.push(("cpu.weight", shares_to_weight(s).to_string()));
                } else {
                    w.push(("cpu.shares", s.to_string()));
                }
            }
            if self.cpu_quota.is_some() || self.cpu_period.is_some() {
                if v2 {
                    let quota = match self.cpu_quota {
                        Some(q) if q > 0 => q.to_string(),
                        _ => "max".to_string(),
                    };
                    w.push(("cpu.max", format!("{quota} {}", self.cpu_period.unwrap_or(100_000))));
                } else {
                    if let Some(p) = self.cpu_period {
                        w.push(("cpu.cfs_period_us", p.to_string()));
                    }
                    if let Some(q) = self.cpu_quota {
                        w.push(("cpu.cfs_quota_us", q.max(-1).to_string()));
                    }
                }
            }
        }
        if on("cpuset") {
            if let Some(c) = &self.cpus {
                w.push(("cpuset.cpus", c.clone()));
            }
            if let Some(m) = &self.mems {
                w.push(("cpuset.mems", m.clone()));
            }
        }
        if on("memory") {
            if let Some(m) = self.memory {
                let value = if m < 0 { unlimited(v2) } else { m.to_string() };
                w.push((if v2 { "memory.max" } else { "memory.limit_in_bytes" }, value));
            }
        }
        if on("pids") {
            if let Some(p) = self.pids {
                w.push(("pids.max", if p < 0 { "max".to_string() } else { p.to_string() }));
            }
        }
        w
    }
}

fn unlimited(v2: bool) -> String {
    if v2 { "max" } else { "-1" }.to_string()
}

/// runc's conversion of cgroup v1 shares (2..262144) to v2 weight (1..10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// A host cgroup this process made or joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroup {
    /// The cgroup's path, as in each hierarchy (its own cgroup's, for a
    /// relative one in v1, may differ per hierarchy; this is the first).
    pub path: PathBuf,
    /// Its directory in every hierarchy.
    pub dirs: Vec<PathBuf>,
    /// The directories of those that this made (and removes).
    pub created: Vec<PathBuf>,
    /// Levels above the leaf this made: removed only if making the cgroup
    /// fails (after a success they stay, as runc leaves them).
    #[serde(skip)]
    parents_made: Vec<PathBuf>,
}

impl HostCgroup {
    /// Makes the cgroup in every hierarchy with `limits` applied. On error
    /// nothing made is left.
    pub fn create(hierarchies: &[Hierarchy], path: &CgroupPath, limits: &Limits) -> Result<HostCgroup> {
        if hierarchies.is_empty() {
            return Err(Error::Cgroup("no cgroup hierarchy is mounted".into()));
        }
        let mut cg = HostCgroup {
            path: PathBuf::new(),
            dirs: Vec::new(),
            created: Vec::new(),
            parents_made: Vec::new(),
        };
        match cg.make(hierarchies, path, limits) {
            Ok(()) => {
                cg.parents_made.clear();
                Ok(cg)
            }
            Err(e) => {
                let _ = cg.remove();
                for d in cg.parents_made.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
                Err(e)
            }
        }
    }

    fn make(&mut self, hierarchies: &[Hierarchy], path: &CgroupPath, limits: &Limits) -> Result<()> {
        let pure_v2 = hierarchies.iter().all(|h| h.v2);
        for h in hierarchies {
            let full = match path {
                CgroupPath::Absolute(p) => p.clone(),
                CgroupPath::Relative(p) => h.own.join(p),
            };
            if self.path.as_os_str().is_empty() {
                self.path = full.clone();
            }
            let dir = h.dir_of(&full)?;
            let base = h.dir_of(&h.root)?;
            // Each missing level is made; cpuset levels get their parent's
            // cpus and mems (v1 leaves them empty, and an empty cpuset takes
            // no process); v2 levels get the controllers enabled.
            let mut level = base.clone();
            let rel = dir
                .strip_prefix(&base)
                .expect("dir_of joins below the mountpoint")
                .to_path_buf();
            for part in rel.components() {
                let parent = level.clone();
                if h.v2 && pure_v2 {
                    enable_controllers(&parent);
                }
                level.push(part);
                match std::fs::create_dir(&level) {
                    Ok(()) => {
                        if level == dir {
                            self.created.push(dir.clone());
                        } else {
                            self.parents_made.push(level.clone());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io("creating cgroup", &level, e)),
                }
                if !h.v2 && h.has("cpuset") {
                    inherit_cpuset(&parent, &level)?;
                }
            }
            self.dirs.push(dir.clone());
            if h.v2 && !pure_v2 {
                // The v2 hierarchy of a hybrid host carries no controllers.
                continue;
            }
            for (file, value) in limits.writes(h) {
                write_file(&dir.join(file), &value)?;
            }
        }
        Ok(())
    }

    /// Opens `cgroup.procs` in every hierarchy, for [`join_self`] between
    /// fork and exec.
    pub fn procs_files(&self) -> Result<Vec<File>> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| Error::io("opening", p, e))
            })
            .collect()
    }

    /// Applies new limits (`update`) in every hierarchy it is in.
    pub fn update(&self, limits: &Limits) -> Result<()> {
        self.update_in(&hierarchies()?, limits)
    }

    fn update_in(&self, hierarchies: &[Hierarchy], limits: &Limits) -> Result<()> {
        let pure_v2 = hierarchies.iter().all(|h| h.v2);
        for dir in &self.dirs {
            let h = hierarchies
                .iter()
                .filter(|h| dir.starts_with(&h.mountpoint))
                .max_by_key(|h| h.mountpoint.as_os_str().len());
            let Some(h) = h else { continue };
            if h.v2 && !pure_v2 {
                continue;
            }
            for (file, value) in limits.writes(h) {
                write_file(&dir.join(file), &value)?;
            }
        }
        Ok(())
    }

    /// Moves process `pid` into the cgroup in every hierarchy.
    pub fn add(&self, pid: i32) -> Result<()> {
        for d in &self.dirs {
            write_file(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in the cgroup, in any hierarchy.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills what is still in the cgroups this made, then removes them.
    pub fn remove(&self) -> Result<()> {
        remove_dirs(&self.created)
    }
}

/// Removes cgroup directories: whatever is still in one is killed first
/// (only cgroups this made are passed here, so only the VM's processes).
pub fn remove_dirs(dirs: &[PathBuf]) -> Result<()> {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    let mut last = None;
    for d in dirs {
        loop {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a pid read from the cgroup we made.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    last = Some(Error::io("removing cgroup", d, e));
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    last = Some(Error::io("removing cgroup", d, e));
                    break;
                }
            }
        }
    }
    match last {
        Some(e) if dirs.iter().any(|d| d.exists()) => Err(e),
        _ => Ok(()),
    }
}

/// Between fork and exec: moves the calling process into each opened
/// `cgroup.procs` (writing `0` means "the writer"). Async-signal-safe.
pub fn join_self(fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: write(2) of a static buffer to a descriptor the parent
        // keeps open until the child has exec'd.
        let n = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Control files exist in a real cgroup; the unit tests' fake trees are
/// plain directories, where they are made.
const CREATE_CONTROL_FILES: bool = cfg!(test);

fn write_file(path: &Path, value: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(CREATE_CONTROL_FILES)
        .truncate(CREATE_CONTROL_FILES)
        .open(path)
        .map_err(|e| Error::Cgroup(format!("failed to write {value:?} to {}: {e}", path.display())))?;
    f.write_all(value.as_bytes())
        .map_err(|e| Error::Cgroup(format!("failed to write {value:?} to {}: {e}", path.display())))
}

fn inherit_cpuset(parent: &Path, child: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mine = std::fs::read_to_string(child.join(file)).unwrap_or_default();
        if mine.trim().is_empty() {
            let theirs = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
            if !theirs.trim().is_empty() {
                write_file(&child.join(file), theirs.trim())?;
            }
        }
    }
    Ok(())
}

/// v2: enables the controllers a VM's limits use in `dir`'s children, as far
/// as `dir` has them (best effort: a populated level refuses, and then the
/// limit's own write names the missing file).
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let want: Vec<String> = V2_CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .filter(|c| !enabled.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if !want.is_empty() {
        let _ = write_file(&dir.join("cgroup.subtree_control"), &want.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
34 30 0:30 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
35 30 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
36 30 0:28 / /mnt/memory-again rw,relatime - cgroup cgroup rw,memory
37 25 0:5 / /proc rw - proc proc rw
";
    const HYBRID_CGROUP: &str = "\
5:name=systemd:/
4:memory:/process_api/abc
3:cpuset:/
1:cpu:/
0::/
";

    #[test]
    fn hybrid_hierarchies_are_found_once_each_with_our_own_cgroup() {
        let h = parse_hierarchies(HYBRID_MOUNTINFO, HYBRID_CGROUP);
        let names: Vec<String> = h
            .iter()
            .map(|h| if h.v2 { "v2".into() } else { h.controllers.join(",") })
            .collect();
        assert_eq!(names, ["cpu", "memory", "cpuset", "name=systemd", "v2"]);
        assert_eq!(h[1].own, PathBuf::from("/process_api/abc"));
        assert_eq!(h[1].mountpoint, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(h[4].own, PathBuf::from("/"));
    }

    #[test]
    fn cgroupfs_and_systemd_paths_resolve_as_runc_resolves_them() {
        assert_eq!(
            resolve_path("/default/c1", false, "c1").unwrap(),
            CgroupPath::Absolute("/default/c1".into())
        );
        assert_eq!(
            resolve_path("", false, "c1").unwrap(),
            CgroupPath::Relative("c1".into())
        );
        assert_eq!(
            resolve_path("a/./b", false, "c1").unwrap(),
            CgroupPath::Relative("a/b".into())
        );
        assert_eq!(
            resolve_path("kubepods-besteffort-pod12.slice:cri-containerd:abc", true, "abc").unwrap(),
            CgroupPath::Absolute(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
                    .into()
            )
        );
        assert_eq!(
            resolve_path("", true, "c1").unwrap(),
            CgroupPath::Absolute("/system.slice/tegmen-c1.scope".into())
        );
        assert_eq!(
            resolve_path("-.slice:libpod:c1", true, "c1").unwrap(),
            CgroupPath::Absolute("/libpod-c1.scope".into())
        );
        for bad in ["/a/../b", "/", "..", "."] {
            let e = resolve_path(bad, false, "c1").unwrap_err().to_string();
            assert!(e.contains("cgroupsPath"), "{bad}: {e}");
        }
        let e = resolve_path("/a/b", true, "c1").unwrap_err().to_string();
        assert!(e.contains("slice:prefix:name"), "{e}");
        for bad in ["a--b.slice:p:n", "-a.slice:p:n", "noslice:p:n", "a.slice:p:x/y"] {
            assert!(resolve_path(bad, true, "c1").is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn limits_are_read_from_the_spec_and_bound_the_vm() {
        let spec = serde_json::json!({
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
            "memory": {"limit": 67108864},
            "pids": {"limit": 10}
        });
        let l = Limits::from_spec(&spec).unwrap();
        assert_eq!(l.memory, Some(64 << 20));
        let vm = l.clone().for_vm(448 << 20, 128);
        assert_eq!(vm.memory, Some(448 << 20), "the whole VM's memory");
        let big = Limits {
            memory: Some(1 << 30),
            ..Limits::default()
        };
        assert_eq!(big.for_vm(448 << 20, 128).memory, Some(1 << 30));
        assert_eq!(vm.pids, Some(128), "never below the VM's own need");
        assert_eq!(vm.cpu_quota, Some(50000));
        let unlimited = Limits::from_spec(&serde_json::json!({"memory": {"limit": -1}, "pids": {"limit": -1}}))
            .unwrap()
            .for_vm(192 << 20, 128);
        assert_eq!((unlimited.memory, unlimited.pids), (Some(-1), Some(-1)));
        assert_eq!(Limits::from_spec(&serde_json::Value::Null).unwrap(), Limits::default());
        for bad in [
            serde_json::json!({"memory": {"limit": "lots"}}),
            serde_json::json!({"cpu": {"shares": -5}}),
            serde_json::json!({"cpu": {"cpus": "0;rm"}}),
        ] {
            let e = Limits::from_spec(&bad).unwrap_err().to_string();
            assert!(e.contains("linux.resources."), "{e}");
        }
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10000);
    }

    /// A fake hierarchy tree in a temp dir: mkdir there makes plain
    /// directories, and the control files are plain files made in advance.
    fn fake(root: &Path, v2: bool, controllers: &[&str]) -> Hierarchy {
        std::fs::create_dir_all(root).unwrap();
        Hierarchy {
            mountpoint: root.to_path_buf(),
            root: "/".into(),
            controllers: controllers.iter().map(|c| c.to_string()).collect(),
            v2,
            own: "/own".into(),
        }
    }

    #[test]
    fn v1_limits_land_in_each_controllers_files_and_cpusets_inherit() {
        let t = tempfile::tempdir().unwrap();
        let cpu = fake(&t.path().join("cpu"), false, &["cpu"]);
        let cpuset = fake(&t.path().join("cpuset"), false, &["cpuset"]);
        let memory = fake(&t.path().join("memory"), false, &["memory"]);
        std::fs::write(t.path().join("cpuset/cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(t.path().join("cpuset/cpuset.mems"), "0\n").unwrap();
        let limits = Limits {
            cpu_shares: Some(512),
            cpu_quota: Some(150_000),
            cpu_period: Some(100_000),
            memory: Some(300 << 20),
            ..Limits::default()
        };
        let path = CgroupPath::Absolute("/k8s/pod1".into());
        let cg = HostCgroup::create(&[cpu, cpuset, memory], &path, &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("cpu/k8s/pod1/cpu.shares"), "512");
        assert_eq!(read("cpu/k8s/pod1/cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu/k8s/pod1/cpu.cfs_quota_us"), "150000");
        assert_eq!(
            read("memory/k8s/pod1/memory.limit_in_bytes"),
            (300u64 << 20).to_string()
        );
        assert_eq!(read("cpuset/k8s/cpuset.cpus"), "0-3");
        assert_eq!(read("cpuset/k8s/pod1/cpuset.mems"), "0");
        assert!(!t.path().join("cpu/k8s/pod1/memory.limit_in_bytes").exists());
        assert_eq!(cg.path, PathBuf::from("/k8s/pod1"));
        assert_eq!(cg.created.len(), 3, "the leaves this made: {:?}", cg.created);
        let hierarchies = [
            fake(&t.path().join("cpu"), false, &["cpu"]),
            fake(&t.path().join("cpuset"), false, &["cpuset"]),
            fake(&t.path().join("memory"), false, &["memory"]),
        ];
        let newer = Limits {
            cpu_quota: Some(50_000),
            pids: Some(300),
            ..Limits::default()
        };
        cg.update_in(&hierarchies, &newer).unwrap();
        assert_eq!(read("cpu/k8s/pod1/cpu.cfs_quota_us"), "50000");
        assert_eq!(
            read("cpu/k8s/pod1/cpu.shares"),
            "512",
            "what the update leaves out stays"
        );
        assert!(
            !t.path().join("cpu/k8s/pod1/pids.max").exists(),
            "no pids hierarchy here"
        );
    }

    #[test]
    fn v2_limits_use_v2_files_and_enable_controllers_down_the_path() {
        let t = tempfile::tempdir().unwrap();
        let h = fake(t.path(), true, &[]);
        std::fs::write(t.path().join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        std::fs::write(t.path().join("cgroup.subtree_control"), "").unwrap();
        let limits = Limits {
            cpu_shares: Some(1024),
            cpu_quota: Some(-1),
            memory: Some(64 << 20),
            pids: Some(200),
            ..Limits::default()
        };
        HostCgroup::create(&[h], &CgroupPath::Relative("c1".into()), &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +cpuset +memory +pids");
        assert_eq!(read("own/c1/cpu.weight"), "39");
        assert_eq!(read("own/c1/cpu.max"), "max 100000");
        assert_eq!(read("own/c1/memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("own/c1/pids.max"), "200");
    }

    #[test]
    fn a_failure_in_one_hierarchy_leaves_no_level_made_in_another() {
        let t = tempfile::tempdir().unwrap();
        let good = fake(&t.path().join("cpu"), false, &["cpu"]);
        let mut bad = fake(&t.path().join("memory"), false, &["memory"]);
        bad.root = "/elsewhere".into();
        let e = HostCgroup::create(
            &[good, bad],
            &CgroupPath::Absolute("/n1/n2/leaf".into()),
            &Limits::default(),
        );
        assert!(e.is_err());
        assert_eq!(
            std::fs::read_dir(t.path().join("cpu")).unwrap().count(),
            0,
            "n1, n2 and the leaf are gone"
        );
        // After a success the levels stay, as runc leaves them.
        let good = fake(&t.path().join("cpu"), false, &["cpu"]);
        let cg = HostCgroup::create(&[good], &CgroupPath::Absolute("/n1/leaf".into()), &Limits::default()).unwrap();
        cg.remove().unwrap();
        assert!(t.path().join("cpu/n1").exists() && !t.path().join("cpu/n1/leaf").exists());
    }

    #[test]
    fn a_cgroup_outside_the_mounted_part_is_refused_and_nothing_is_left() {
        let t = tempfile::tempdir().unwrap();
        let mut h = fake(t.path(), false, &["memory"]);
        h.root = "/ns".into();
        let e = HostCgroup::create(&[h], &CgroupPath::Absolute("/other/c".into()), &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
