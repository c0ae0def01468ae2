//! The capabilities a process that serves a guest keeps (issue 12): the
//! vsock and net backends none once their sockets and tap are open, the fs
//! backend only what serving files as their owners takes.
//!
//! [`drop_capabilities`] runs while the process still has one thread, so
//! every thread it starts later inherits the reduced sets (capabilities
//! are per thread). The bounding set is emptied, so not even an exec
//! (which the seccomp lists forbid anyway) could bring any back. A backend
//! that serves as an unprivileged user keeps [`SWITCHING_USER`] until it
//! takes that user, which clears them ([`become_user`]).

/// What the fs backend keeps to serve files with the guest's ownership
/// and modes: change owners (`CAP_CHOWN`), reach every file of the share
/// whatever its mode and open it by handle (`CAP_DAC_OVERRIDE`,
/// `CAP_DAC_READ_SEARCH`), act on files it does not own (`CAP_FOWNER`),
/// keep set-group-ID bits on directories (`CAP_FSETID`), and take the
/// guest caller's uid and gid per request (`CAP_SETUID`, `CAP_SETGID`).
/// Gone: `CAP_SYS_ADMIN` (mounts, trusted.* xattrs), `CAP_MKNOD` (device
/// nodes are refused anyway), `CAP_SETFCAP` (no file capabilities planted
/// on host files), `CAP_LINUX_IMMUTABLE` and the rest.
pub const FILE_SERVING: &[u32] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
];

/// What a backend that serves as an unprivileged user (`--user`) keeps
/// until it takes that user: changing its ids, nothing else.
pub const SWITCHING_USER: &[u32] = &[CAP_SETGID, CAP_SETUID];

// Capability numbers (include/uapi/linux/capability.h).
pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_FSETID: u32 = 4;
pub const CAP_SETGID: u32 = 6;
pub const CAP_SETUID: u32 = 7;
pub const CAP_SETPCAP: u32 = 8;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// `keep` as a 64-bit mask.
pub fn mask_of(keep: &[u32]) -> u64 {
    keep.iter().filter(|&&c| c < 64).fold(0, |m, &c| m | (1u64 << c))
}

/// Leaves the calling thread (and every thread it starts afterwards) with
/// the capabilities in `keep` alone, in its effective and permitted sets;
/// inheritable and ambient sets empty; the bounding set empty (it only
/// bounds what an exec may gain). A process without `CAP_SETPCAP` cannot
/// shrink its bounding set: it shrinks the others and says so.
pub fn drop_capabilities(keep: &[u32]) -> Result<(), String> {
    let keep_mask = mask_of(keep);
    // Ambient capabilities would survive an exec: none.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    // The bounding set first: dropping from it takes CAP_SETPCAP, which
    // the capset below removes.
    let mut bounding_kept = true;
    for cap in 0..=last_cap() {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                bounding_kept = false;
                break;
            }
            // EINVAL: a capability this kernel does not have.
        }
    }
    if !bounding_kept {
        log::warn!("no CAP_SETPCAP: the bounding set stays as it was; the other sets are reduced");
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    for (i, d) in data.iter_mut().enumerate() {
        let part = (keep_mask >> (32 * i)) as u32;
        d.effective = part;
        d.permitted = part;
    }
    // Keep only what is both wanted and held: capset refuses to add.
    let mut held = [CapData::default(); 2];
    // SAFETY: header and the two-element data array are what capget(2)
    // with version 3 reads and writes.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, held.as_mut_ptr()) } != 0 {
        return Err(format!("capget: {}", std::io::Error::last_os_error()));
    }
    for (d, h) in data.iter_mut().zip(held) {
        d.effective &= h.permitted;
        d.permitted &= h.permitted;
    }
    header.version = LINUX_CAPABILITY_VERSION_3;
    // SAFETY: as above, for capset(2).
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) } != 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    log::info!(
        "capabilities: kept {}",
        if keep.is_empty() {
            "none".to_string()
        } else {
            format!("{keep:?}")
        }
    );
    Ok(())
}

/// What a serving process may take of the host, as rlimits: open files,
/// and private memory — heap and thread stacks (`RLIMIT_DATA`). Guest RAM
/// is not counted: it is a file mapped shared (the builtin monitor's
/// memfd, the regions a vhost-user front-end passes), which `RLIMIT_DATA`
/// leaves out, so one bound holds whatever the guest's size. A guest that
/// makes a backend allocate past it ends that backend (its allocation
/// fails), not the host's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open files (`RLIMIT_NOFILE`).
    pub files: u64,
    /// Bytes of private writable mappings (`RLIMIT_DATA`).
    pub data: u64,
}

const MIB: u64 = 1 << 20;

impl Limits {
    /// A vsock backend: a file per connection (at most
    /// [`crate::devices::vsock::defs::MAX_CONNECTIONS`]) and its own few;
    /// up to [`crate::devices::vsock::defs::CONN_BUF_ALLOC`] buffered for
    /// each connection (256 MiB for all) and room beside it.
    pub const VSOCK: Limits = Limits {
        files: 4096,
        data: 512 * MIB,
    };
    /// A net backend: its tap, sockets and eventfds; frame buffers.
    pub const NET: Limits = Limits {
        files: 256,
        data: 256 * MIB,
    };
    /// An fs backend: an `O_PATH` fd per inode the guest holds and one per
    /// open file; per worker thread a request's buffers (up to
    /// [`crate::devices::fs::chain::MAX_DIRECTION_BYTES`] each way) and a
    /// stack.
    pub const FS: Limits = Limits {
        files: 1 << 20,
        data: 1024 * MIB,
    };
    /// The builtin monitor: the devices it hosts together, its vCPUs.
    pub const VMM: Limits = Limits {
        files: Self::FS.files,
        data: Self::VSOCK.data + Self::NET.data + Self::FS.data,
    };
}

/// Bounds what the process may take: at most `limits.files` open files and
/// `limits.data` bytes of private memory (or the hard limits it has, if
/// lower), and no core dump (one would write the guest's memory, which the
/// backends map, to the host's disk).
pub fn limit_resources(limits: Limits) -> Result<(), String> {
    let lowered = |resource, value: u64| -> Result<libc::rlimit, String> {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(resource, &mut cur) } != 0 {
            return Err(format!("getrlimit({resource}): {}", std::io::Error::last_os_error()));
        }
        let n = value.min(cur.rlim_max);
        Ok(libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        })
    };
    let files = lowered(libc::RLIMIT_NOFILE, limits.files)?;
    let data = lowered(libc::RLIMIT_DATA, limits.data)?;
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    for (what, resource, limit) in [
        ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, &files),
        ("RLIMIT_DATA", libc::RLIMIT_DATA, &data),
        ("RLIMIT_CORE", libc::RLIMIT_CORE, &core),
    ] {
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(resource, limit) } != 0 {
            return Err(format!("setrlimit({what}): {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The namespaces a serving process leaves the host's for, beyond the
/// mount namespace its sandbox already gave it: its own network (no
/// interface but a down loopback: it reaches no network, and a tap or
/// socket it opened before stays where it was opened), System V IPC and
/// host name. Namespaces are per thread until a thread is started, so
/// this runs while the process has one thread.
pub const OWN_NAMESPACES: libc::c_int = libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

/// Moves the process into new namespaces of the [`OWN_NAMESPACES`] kinds
/// (this takes `CAP_SYS_ADMIN`, which [`drop_capabilities`] then drops).
pub fn unshare_namespaces() -> Result<(), String> {
    // SAFETY: unshare takes a flag word and touches no memory of ours.
    if unsafe { libc::unshare(OWN_NAMESPACES) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET|CLONE_NEWIPC|CLONE_NEWUTS): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A backend's confinement beyond its syscall list, in one go while it
/// has one thread: namespaces of its own, resource limits, then
/// capabilities.
pub fn confine(keep: &[u32], limits: Limits) -> Result<(), String> {
    unshare_namespaces()?;
    limit_resources(limits)?;
    drop_capabilities(keep)
}

/// Moves the process to `uid` and `gid`, with no supplementary groups,
/// for good (real, effective and saved ids alike). From uid 0 to another,
/// the kernel clears the capability sets too. glibc applies each change to
/// every thread of the process.
pub fn become_user(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: setgroups with a count of 0 reads no list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(format!("setgroups([]): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: setresgid/setresuid take integers only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(format!("setresgid({gid}): {}", std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(format!("setresuid({uid}): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `UID:GID` (numbers; not uid 0, which would keep what the process
/// holds), as `--user` takes it.
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected UID:GID"))?;
    let num = |x: &str| x.parse::<u32>().map_err(|_| format!("{s:?}: {x:?} is not a number"));
    match (num(u)?, num(g)?) {
        (0, _) => Err(format!("{s:?}: uid 0 is not an unprivileged user")),
        ids => Ok(ids),
    }
}

/// The last steps of a backend before the front-end may send it anything,
/// once its sockets are bound and its threads started: the unprivileged
/// user it serves as, if any, then its syscall allow-list.
#[derive(Clone, Copy, Debug)]
pub struct Lockdown {
    /// The allow-list's mode.
    pub seccomp: crate::seccomp::Mode,
    /// `(uid, gid)` to serve as.
    pub user: Option<(u32, u32)>,
}

impl Lockdown {
    /// What the process keeps from its [`confine`] until [`Self::apply`]:
    /// what taking the user takes, or nothing.
    pub fn kept_until_applied(&self) -> &'static [u32] {
        match self.user {
            Some(_) => SWITCHING_USER,
            None => &[],
        }
    }

    /// Takes the user, then installs `kind`'s allow-list.
    pub fn apply(self, kind: crate::seccomp::Kind) -> Result<(), String> {
        if let Some((uid, gid)) = self.user {
            become_user(uid, gid)?;
            log::info!("serving as uid {uid}, gid {gid}");
        }
        crate::seccomp::install(kind, self.seccomp).map_err(|e| e.to_string())
    }
}

/// Jails a process that serves sockets into the one directory that holds
/// them all ([`crate::devices::fs::sandbox::enter_socket_dir`]: no mount
/// of the host's below it) and rewrites each path as seen from there.
/// `paths` are the sockets as the caller named them, each with its flag
/// for the error; they must all be in the same directory. Single-
/// threaded, like the sandbox itself.
pub fn enter_socket_dir(paths: &mut [(&str, &mut std::path::PathBuf)]) -> Result<(), String> {
    use std::path::{Path, PathBuf};
    let mut dir = None::<(&str, PathBuf)>;
    let mut inside = Vec::with_capacity(paths.len());
    for (flag, p) in paths.iter() {
        let name = p
            .file_name()
            .ok_or_else(|| format!("{flag} {}: no file name", p.display()))?;
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let d = std::fs::canonicalize(parent).map_err(|e| format!("{flag} {}: {e}", p.display()))?;
        match &dir {
            None => dir = Some((flag, d)),
            Some((first, first_dir)) if *first_dir != d => {
                return Err(format!(
                    "the sandbox is the directory of the sockets, but {flag} {} is not in {first}'s directory {}",
                    p.display(),
                    first_dir.display()
                ))
            }
            Some(_) => {}
        }
        inside.push(Path::new("/").join(name));
    }
    if let Some((_, d)) = &dir {
        crate::devices::fs::sandbox::enter_socket_dir(d).map_err(|e| e.to_string())?;
        log::info!("sandboxed: {} is now /", d.display());
    }
    for ((_, p), jailed) in paths.iter_mut().zip(inside) {
        **p = jailed;
    }
    Ok(())
}

/// The confinement of a backend that serves sockets (vsock, net), in one
/// go while it has one thread: with `sandbox` chroot, the jail in its
/// sockets' directory ([`enter_socket_dir`], which rewrites `paths`),
/// then [`confine`], keeping what `lockdown` takes until it applies.
pub fn confine_socket_server(
    sandbox: crate::devices::fs::sandbox::SandboxMode,
    paths: &mut [(&str, &mut std::path::PathBuf)],
    lockdown: &Lockdown,
    limits: Limits,
) -> Result<(), String> {
    if sandbox == crate::devices::fs::sandbox::SandboxMode::Chroot {
        enter_socket_dir(paths)?;
    }
    confine(lockdown.kept_until_applied(), limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_mask(field: &str) -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    /// Runs `f` in a forked child (capabilities cannot come back) and
    /// returns its exit code.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child runs `f` and exits without returning.
        match unsafe { libc::fork() } {
            0 => {
                let code = f();
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(code) }
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                }
            }
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }

    #[test]
    fn dropping_all_leaves_no_capability_in_any_set() {
        if status_mask("CapEff") & (1 << CAP_SETPCAP) == 0 {
            eprintln!("skipped: needs CAP_SETPCAP (run as root)");
            return;
        }
        let code = in_child(|| {
            if drop_capabilities(&[]).is_err() {
                return 10;
            }
            let sets = ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"].map(status_mask);
            if sets != [0; 5] {
                return 11;
            }
            // A capability-checked call now fails: sethostname needs
            // CAP_SYS_ADMIN (in a UTS namespace of our own, to be safe,
            // it would not even get that far: unshare needs it too).
            // SAFETY: unshare with a flag constant.
            if unsafe { libc::unshare(libc::CLONE_NEWUTS) } == 0 {
                return 12;
            }
            0
        });
        assert_eq!(code, 0, "10: drop failed, 11: sets not empty, 12: still privileged");
    }

    #[test]
    fn limits_bound_files_and_private_memory_and_forbid_core_dumps() {
        let code = in_child(|| {
            if limit_resources(Limits {
                files: 64,
                data: 64 * MIB,
            })
            .is_err()
            {
                return 10;
            }
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct it is given.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
            if r.rlim_cur > 64 || r.rlim_max > 64 {
                return 11;
            }
            // SAFETY: as above.
            unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut r) };
            if (r.rlim_cur, r.rlim_max) != (0, 0) {
                return 12;
            }
            // The 65th file cannot be opened.
            let files: Vec<_> = (0..80).map_while(|_| std::fs::File::open("/dev/null").ok()).collect();
            if files.len() >= 64 {
                return 13;
            }
            // 128 MiB of private memory is past the bound; mapped shared,
            // as guest RAM is, it is not counted.
            let map = |flags| {
                // SAFETY: a fresh anonymous mapping, unmapped at once.
                unsafe {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        128 << 20,
                        libc::PROT_READ | libc::PROT_WRITE,
                        flags | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if p != libc::MAP_FAILED {
                        libc::munmap(p, 128 << 20);
                    }
                    p != libc::MAP_FAILED
                }
            };
            if map(libc::MAP_PRIVATE) {
                return 14;
            }
            if !map(libc::MAP_SHARED) {
                return 15;
            }
            0
        });
        assert_eq!(
            code, 0,
            "10: failed, 11: files, 12: core, 13: the file limit did not hold, \
             14: the memory limit did not hold, 15: shared memory was counted"
        );
    }

    #[test]
    fn the_fs_backend_keeps_exactly_the_file_serving_set() {
        if status_mask("CapEff") & (1 << CAP_SETPCAP) == 0 {
            eprintln!("skipped: needs CAP_SETPCAP (run as root)");
            return;
        }
        let code = in_child(|| {
            if drop_capabilities(FILE_SERVING).is_err() {
                return 10;
            }
            let want = mask_of(FILE_SERVING);
            if status_mask("CapEff") != want || status_mask("CapPrm") != want || status_mask("CapBnd") != 0 {
                return 11;
            }
            if status_mask("CapInh") != 0 || status_mask("CapAmb") != 0 {
                return 12;
            }
            // A thread started afterwards has the same sets.
            let t = std::thread::spawn(move || status_mask("CapEff") == want)
                .join()
                .unwrap();
            if !t {
                return 13;
            }
            0
        });
        assert_eq!(code, 0, "10: drop failed, 11/12: wrong sets, 13: a new thread differs");
    }

    const CAP_SYS_ADMIN: u32 = 21;

    fn ns(kind: &str) -> std::path::PathBuf {
        std::fs::read_link(format!("/proc/self/ns/{kind}")).unwrap()
    }

    #[test]
    fn confine_moves_the_process_to_namespaces_of_its_own() {
        if status_mask("CapEff") & (1 << CAP_SYS_ADMIN) == 0 {
            eprintln!("skipped: needs CAP_SYS_ADMIN (run as root)");
            return;
        }
        let before = ["net", "ipc", "uts", "mnt"].map(ns);
        let code = in_child(|| {
            if let Err(e) = confine(
                &[],
                Limits {
                    files: 64,
                    data: 64 * MIB,
                },
            ) {
                eprintln!("confine: {e}");
                return 10;
            }
            let after = ["net", "ipc", "uts", "mnt"].map(ns);
            if after[..3].iter().zip(&before[..3]).any(|(a, b)| a == b) {
                return 11;
            }
            // The mount namespace is the sandbox's business, not confine's.
            if after[3] != before[3] {
                return 12;
            }
            // A new network: a loopback and nothing else.
            let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
            let names: Vec<_> = dev
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(str::trim)
                .collect();
            if names != ["lo"] {
                eprintln!("interfaces: {names:?}");
                return 13;
            }
            0
        });
        assert_eq!(
            code, 0,
            "10: failed, 11: a namespace kept, 12: the mount namespace changed, 13: interfaces"
        );
    }

    #[test]
    fn sockets_in_two_directories_are_refused_before_anything_is_entered() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let before = ns("mnt");
        let (mut v, mut u) = (a.path().join("v.sock"), b.path().join("vsock"));
        let err = enter_socket_dir(&mut [("--socket", &mut v), ("--uds-path", &mut u)]).unwrap_err();
        assert!(
            err.contains("--uds-path")
                && err.contains(&b.path().join("vsock").display().to_string())
                && err.contains("--socket"),
            "{err}"
        );
        assert_eq!(ns("mnt"), before);
    }

    /// The jail of a socket-serving process: its directory is `/`, the
    /// paths come back as seen from there, and a mount below the directory
    /// (as a container's rootfs below the share) is not in it.
    #[test]
    fn the_socket_dir_jail_holds_the_sockets_and_no_mount_below_them() {
        if status_mask("CapEff") & (1 << CAP_SYS_ADMIN) == 0 {
            eprintln!("skipped: needs CAP_SYS_ADMIN (run as root)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let rootfs = run.join("shared/c1/rootfs");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::write(run.join("v.sock"), b"").unwrap();
        let host_files = dir.path().join("host");
        std::fs::create_dir(&host_files).unwrap();
        std::fs::write(host_files.join("marker"), b"x").unwrap();
        let code = in_child(|| {
            // The "host": a private copy of the mounts, with the container's
            // rootfs mounted below the sandbox directory.
            let c = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            let (src, dst) = (c(&host_files), c(&rootfs));
            // SAFETY: plain system calls on C strings that outlive them.
            let made = unsafe {
                libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                    && libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) == 0
            };
            if !made || !rootfs.join("marker").exists() {
                return 10;
            }
            let (mut v, mut st) = (run.join("v.sock"), run.join("s.sock"));
            if let Err(e) = enter_socket_dir(&mut [("--socket", &mut v), ("--stats-socket", &mut st)]) {
                eprintln!("{e}");
                return 11;
            }
            if (v.as_path(), st.as_path()) != (std::path::Path::new("/v.sock"), std::path::Path::new("/s.sock")) {
                return 12;
            }
            if !std::path::Path::new("/v.sock").exists() || !std::path::Path::new("/shared/c1/rootfs").is_dir() {
                return 13;
            }
            if std::path::Path::new("/shared/c1/rootfs/marker").exists() {
                return 14;
            }
            if std::path::Path::new("/proc/self").exists() || std::path::Path::new("/etc").exists() {
                return 15;
            }
            0
        });
        assert_eq!(
            code, 0,
            "10: set-up, 11: failed, 12: paths, 13: not the directory, 14: the mount below came along, 15: the host"
        );
        // The host's view is untouched.
        assert!(run.join("v.sock").exists() && !rootfs.join("marker").exists());
    }

    #[test]
    fn user_parses_and_is_taken_by_every_thread() {
        assert_eq!(parse_user("65534:65533"), Ok((65534, 65533)));
        assert!(parse_user("65534").unwrap_err().contains("UID:GID"));
        assert!(parse_user("nobody:1").unwrap_err().contains("nobody"));
        assert!(parse_user("0:0").unwrap_err().contains("uid 0"));
        if status_mask("CapEff") & (1 << CAP_SETUID) == 0 {
            eprintln!("skipped: needs CAP_SETUID (run as root)");
            return;
        }
        let code = in_child(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let other = std::thread::spawn(move || {
                // SAFETY: gettid takes nothing.
                let _ = tx.send(unsafe { libc::gettid() });
                std::thread::sleep(std::time::Duration::from_millis(300));
            });
            let other_tid = rx.recv().unwrap();
            // As a backend does: everything dropped but what the switch takes.
            if drop_capabilities(SWITCHING_USER).is_err() || become_user(65534, 65533).is_err() {
                return 10;
            }
            let field = |tid: i32, name: &str| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix(name)
                            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                    })
                    .unwrap_or_default()
            };
            // SAFETY: gettid takes nothing.
            let me = unsafe { libc::gettid() };
            if field(me, "Uid:") != "65534 65534 65534 65534" || field(me, "Gid:") != "65533 65533 65533 65533" {
                return 11;
            }
            if !field(me, "Groups:").is_empty() || status_mask("CapEff") != 0 || status_mask("CapPrm") != 0 {
                return 12;
            }
            // glibc moved the other thread as well.
            if field(other_tid, "Uid:") != "65534 65534 65534 65534" {
                return 13;
            }
            let _ = other.join();
            0
        });
        assert_eq!(
            code, 0,
            "10: failed, 11: ids, 12: groups or capabilities left, 13: the other thread kept its ids"
        );
    }
}
