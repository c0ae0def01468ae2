//! A container's cgroup v2 directory: its statistics read from the
//! interface files, the pids in it, signalling all of them, resource
//! updates through libcgroups, and the OOM watcher.
//!
//! The OOM watcher is one thread for the whole agent. It watches each
//! container's `memory.events` with inotify (the kernel reports a change of
//! that file as IN_MODIFY) and, when the `oom_kill` counter grew, sends
//! `Event::Oom` for the container at once. It sleeps in `poll` until then;
//! an eventfd ends it when the manager is dropped.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use libcgroups::common::{CgroupManager, ControllerOpt};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use oci_spec::runtime::LinuxResources;

use super::spec::CGROUP_ROOT;
use super::{lock, ContainerError, Event, Stats};

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    read(dir, file)?.trim().parse().ok()
}

/// A `max`-or-number limit file; `max` (no limit) is `u64::MAX`.
fn read_limit(dir: &Path, file: &str) -> u64 {
    match read(dir, file) {
        Some(t) if t.trim() == "max" => u64::MAX,
        Some(t) => t.trim().parse().unwrap_or(u64::MAX),
        None => u64::MAX,
    }
}

/// `key value` lines (cpu.stat, memory.events) as a map.
fn read_keyed(dir: &Path, file: &str) -> HashMap<String, u64> {
    read(dir, file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// The statistics of the cgroup at `dir`; files of controllers that are not
/// enabled there read as 0 (limits as `u64::MAX`).
pub(super) fn stats(dir: &Path) -> Stats {
    let cpu = read_keyed(dir, "cpu.stat");
    let cpu_get = |k: &str| cpu.get(k).copied().unwrap_or(0);
    let events = read_keyed(dir, "memory.events");
    let (mut io_read, mut io_write) = (0u64, 0u64);
    for line in read(dir, "io.stat").unwrap_or_default().lines() {
        for field in line.split_whitespace().skip(1) {
            if let Some((k, v)) = field.split_once('=') {
                let v: u64 = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => io_read = io_read.saturating_add(v),
                    "wbytes" => io_write = io_write.saturating_add(v),
                    _ => {}
                }
            }
        }
    }
    Stats {
        cpu_usage_usec: cpu_get("usage_usec"),
        cpu_user_usec: cpu_get("user_usec"),
        cpu_system_usec: cpu_get("system_usec"),
        cpu_nr_periods: cpu_get("nr_periods"),
        cpu_nr_throttled: cpu_get("nr_throttled"),
        cpu_throttled_usec: cpu_get("throttled_usec"),
        memory_usage: read_u64(dir, "memory.current").unwrap_or(0),
        memory_limit: read_limit(dir, "memory.max"),
        memory_max_usage: read_u64(dir, "memory.peak").unwrap_or(0),
        oom_kills: events.get("oom_kill").copied().unwrap_or(0),
        pids_current: read_u64(dir, "pids.current").unwrap_or(0),
        pids_limit: read_limit(dir, "pids.max"),
        io_read_bytes: io_read,
        io_write_bytes: io_write,
    }
}

/// Every pid in the cgroup and the cgroups below it.
pub(super) fn pids(dir: &Path) -> Result<Vec<i32>, ContainerError> {
    let pids = libcgroups::common::get_all_pids(dir)
        .map_err(|e| ContainerError::Libcontainer(format!("listing the pids of {}: {e}", dir.display())))?;
    let mut pids: Vec<i32> = pids.into_iter().map(|p| p.as_raw()).collect();
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// Sends `signal` to every process in the cgroup. SIGKILL goes through
/// `cgroup.kill` when the kernel has it (atomic: no process escapes by
/// forking meanwhile).
pub(super) fn signal_all(dir: &Path, signal: i32) -> Result<(), ContainerError> {
    if signal == libc::SIGKILL && dir.join("cgroup.kill").exists() {
        return std::fs::write(dir.join("cgroup.kill"), "1")
            .map_err(|e| ContainerError::io(format!("writing {}/cgroup.kill", dir.display()), e));
    }
    for pid in pids(dir)? {
        // SAFETY: kill(2) with a pid and a signal number.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                return Err(ContainerError::io(format!("sending signal {signal} to {pid}"), err));
            }
        }
    }
    Ok(())
}

/// Waits until no process is left in the cgroup (`populated 0` in
/// `cgroup.events`, which the kernel signals to `poll` as POLLPRI) or the
/// deadline passes.
pub(super) fn wait_empty(dir: &Path, deadline: Instant) {
    let Ok(mut file) = std::fs::File::open(dir.join("cgroup.events")) else {
        return;
    };
    loop {
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_err() || file.read_to_string(&mut text).is_err() {
            return;
        }
        if !text.lines().any(|l| l.trim() == "populated 1") {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let timeout = PollTimeout::try_from(left.as_millis().min(10_000) as i32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                return;
            }
        }
    }
}

/// Applies an OCI `linux.resources` object to the cgroup.
/// Moves `blockIO.weight` (cgroup v1's 10..1000) to `io.weight` (1..10000)
/// in `unified`, converted as runc converts it: libcgroups 0.7 computes the
/// conversion in 16 bits and writes a wrapped-around value. A weight given
/// in `unified` already wins.
pub(super) fn convert_io_weight(resources: &mut LinuxResources) {
    let Some(mut block_io) = resources.block_io().clone() else {
        return;
    };
    let Some(weight) = block_io.weight().filter(|w| *w > 0) else {
        return;
    };
    block_io.set_weight(None);
    resources.set_block_io(Some(block_io));
    let converted = 1 + (u64::from(weight).saturating_sub(10)) * 9999 / 990;
    let mut unified = resources.unified().clone().unwrap_or_default();
    unified
        .entry("io.weight".to_string())
        .or_insert_with(|| converted.to_string());
    resources.set_unified(Some(unified));
}

pub(super) fn update(cgroups_path: &Path, resources: &LinuxResources) -> Result<(), ContainerError> {
    let mut resources = resources.clone();
    convert_io_weight(&mut resources);
    let resources = &resources;
    let manager = libcgroups::v2::manager::Manager::new(PathBuf::from(CGROUP_ROOT), cgroups_path.to_path_buf())
        .map_err(|e| ContainerError::Libcontainer(format!("cgroup {}: {e}", cgroups_path.display())))?;
    let opt = ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    manager.apply(&opt).map_err(|e| {
        ContainerError::Libcontainer(format!(
            "updating cgroup {}: {}",
            cgroups_path.display(),
            super::error::chain(&e)
        ))
    })
}

/// What the OOM watcher knows of one watched `memory.events`.
struct Watch {
    id: String,
    file: PathBuf,
    oom_kills: u64,
}

struct Watches {
    by_wd: HashMap<i32, Watch>,
    by_id: HashMap<String, i32>,
}

pub(super) struct OomWatcher {
    inotify: Arc<OwnedFd>,
    stop: Arc<OwnedFd>,
    watches: Arc<Mutex<Watches>>,
    thread: Option<JoinHandle<()>>,
}

impl OomWatcher {
    pub fn new(events: Sender<Event>) -> Result<OomWatcher, ContainerError> {
        // SAFETY: inotify_init1 and eventfd take flags and return new
        // descriptors (or -1), which are owned right away.
        let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if inotify < 0 {
            return Err(ContainerError::io("inotify_init1", std::io::Error::last_os_error()));
        }
        // SAFETY: as above; `inotify` is a new descriptor nothing else owns.
        let inotify = Arc::new(unsafe { OwnedFd::from_raw_fd(inotify) });
        // SAFETY: as above.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop < 0 {
            return Err(ContainerError::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: `stop` is a new descriptor nothing else owns.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(stop) });
        let watches = Arc::new(Mutex::new(Watches {
            by_wd: HashMap::new(),
            by_id: HashMap::new(),
        }));
        let thread = {
            let (inotify, stop, watches) = (inotify.clone(), stop.clone(), watches.clone());
            std::thread::Builder::new()
                .name("oom-watcher".into())
                .spawn(move || watch_loop(&inotify, &stop, &watches, &events))
                .map_err(|e| ContainerError::io("starting the OOM watcher", e))?
        };
        Ok(OomWatcher {
            inotify,
            stop,
            watches,
            thread: Some(thread),
        })
    }

    /// Starts watching the container's cgroup (a no-op without the memory
    /// controller there: no `memory.events`, no OOM kills to see).
    pub fn add(&self, id: &str, cgroup_dir: &Path) {
        let file = cgroup_dir.join("memory.events");
        let Ok(cpath) = CString::new(file.as_os_str().as_bytes()) else {
            return;
        };
        let mut w = lock(&self.watches);
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), cpath.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            return;
        }
        let oom_kills = read_keyed(cgroup_dir, "memory.events")
            .get("oom_kill")
            .copied()
            .unwrap_or(0);
        w.by_wd.insert(
            wd,
            Watch {
                id: id.to_string(),
                file,
                oom_kills,
            },
        );
        w.by_id.insert(id.to_string(), wd);
    }

    pub fn remove(&self, id: &str) {
        let mut w = lock(&self.watches);
        if let Some(wd) = w.by_id.remove(id) {
            w.by_wd.remove(&wd);
            // SAFETY: removes a watch from our inotify descriptor.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
        }
    }
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch_loop(inotify: &OwnedFd, stop: &OwnedFd, watches: &Mutex<Watches>, events: &Sender<Event>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let mut fds = [
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("OOM watcher: poll: {e}; OOM events stop");
                return;
            }
        }
        if fds[1].any().unwrap_or(false) {
            return;
        }
        // SAFETY: reads into a buffer we own, at most its length.
        let n = unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let mut offset = 0usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        while offset + header <= n as usize {
            // SAFETY: the kernel wrote whole inotify_event records; the
            // record at `offset` lies inside the `n` bytes read. It may be
            // unaligned, hence read_unaligned.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(offset).cast::<libc::inotify_event>()) };
            offset += header + ev.len as usize;
            let mut w = lock(watches);
            if ev.mask & libc::IN_IGNORED != 0 {
                if let Some(gone) = w.by_wd.remove(&ev.wd) {
                    w.by_id.remove(&gone.id);
                }
                continue;
            }
            let Some(watch) = w.by_wd.get_mut(&ev.wd) else {
                continue;
            };
            let dir = watch.file.parent().unwrap_or(Path::new("/"));
            let now = read_keyed(dir, "memory.events").get("oom_kill").copied().unwrap_or(0);
            if now > watch.oom_kills {
                watch.oom_kills = now;
                let _ = events.send(Event::Oom { id: watch.id.clone() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_weight(weight: Option<u16>, unified: Option<(&str, &str)>) -> LinuxResources {
        let mut r: LinuxResources = serde_json::from_value(serde_json::json!({})).unwrap();
        if let Some(w) = weight {
            r = serde_json::from_value(serde_json::json!({"blockIO": {"weight": w}})).unwrap();
        }
        if let Some((k, v)) = unified {
            r.set_unified(Some([(k.to_string(), v.to_string())].into_iter().collect()));
        }
        r
    }

    #[test]
    fn blkio_weight_becomes_io_weight_as_runc_converts_it() {
        for (w, want) in [(10, "1"), (500, "4950"), (1000, "10000")] {
            let mut r = with_weight(Some(w), None);
            convert_io_weight(&mut r);
            assert_eq!(r.block_io().as_ref().unwrap().weight(), None);
            assert_eq!(r.unified().as_ref().unwrap()["io.weight"], want, "weight {w}");
        }
        // An io.weight given in unified wins; no weight changes nothing.
        let mut r = with_weight(Some(500), Some(("io.weight", "77")));
        convert_io_weight(&mut r);
        assert_eq!(r.unified().as_ref().unwrap()["io.weight"], "77");
        let mut r = with_weight(None, None);
        convert_io_weight(&mut r);
        assert!(r.unified().is_none() && r.block_io().is_none());
    }
}
