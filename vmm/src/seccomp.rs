//! Syscall allow-lists of Tegmen's host processes that serve a guest.
//!
//! Each process that reads guest-controlled data installs the list of its
//! kind once its set-up is done (sockets bound, the share's sandbox entered,
//! the tap opened) and before the first guest byte is read, on every thread
//! at once (`SECCOMP_FILTER_FLAG_TSYNC`); threads made later inherit it. A
//! syscall off the list kills the whole process (`SECCOMP_RET_KILL_PROCESS`),
//! which the kernel records in its log as an audit record (`type=1326 ...
//! pid=P ... syscall=N`): the supervisor reads it back to say which syscall
//! it was ([`parse_audit_record`]).
//!
//! The lists are written for what the processes do, then checked by running
//! every end-to-end test with them on; [`Mode::Log`] lets a list be tried
//! without killing anything (each syscall off it is logged the same way and
//! allowed).
//!
//! `tegmen-vmm` runs threads of three kinds, each narrowed further
//! ([`Kind::VmmVcpu`], [`Kind::VmmControl`], and each inline device's
//! worker with the list of the backend that serves the same device): the
//! process's list ([`Kind::Vmm`], the union of theirs) is installed on
//! every thread once the VM is built, then each thread adds its own on top
//! of it before it runs guest code or reads guest bytes (stacked filters:
//! the most restrictive answer wins, so a thread can do only what both
//! allow). New threads inherit their parent's filters, so device workers
//! are started by a thread that has only the process's list
//! ([`crate::builtin::worker`]), never by a vCPU thread.
//!
//! What none of them may do, whatever a guest makes them do: execute a
//! program, trace or read another process, mount, change root or
//! namespace, load a kernel module or BPF program, open a perf event, reboot,
//! or make a network socket (the vsock backend makes Unix sockets to reach
//! host ports; the other sockets are made before the list is in force).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Whether and how a process's list is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A syscall off the list kills the process.
    #[default]
    Kill,
    /// A syscall off the list is logged by the kernel and allowed: for
    /// finding what a list lacks, never for running untrusted guests.
    Log,
    /// No filter (debugging).
    Off,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Kill => "kill",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// The kinds of process with a list of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `tegmen-vsock-backend`.
    VsockBackend,
    /// `tegmen-fs-backend`.
    FsBackend,
    /// `tegmen-net-backend`.
    NetBackend,
    /// `tegmen-vmm` as a whole: what any of its threads may do (installed
    /// on all of them before the guest runs; each then narrows itself).
    Vmm,
    /// A vCPU thread of `tegmen-vmm`: `KVM_RUN`, the exits it answers
    /// (console, virtio-mmio registers, a device's activation and reset),
    /// never a file or a socket opened, nor a thread started.
    VmmVcpu,
    /// `tegmen-vmm`'s main thread once the vCPUs run: it waits, kicks the
    /// vCPUs out of `KVM_RUN` at the end, and tears the VM down.
    VmmControl,
}

impl Kind {
    /// The process's name, as logs and the supervisor say it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::VsockBackend => "tegmen-vsock-backend",
            Kind::FsBackend => "tegmen-fs-backend",
            Kind::NetBackend => "tegmen-net-backend",
            Kind::Vmm => "tegmen-vmm",
            Kind::VmmVcpu => "tegmen-vmm vCPU",
            Kind::VmmControl => "tegmen-vmm control",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused the rules (a bug in a list).
    #[error("seccomp filter for {0}: {1}")]
    Build(&'static str, String),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter of {0}: {1}")]
    Install(&'static str, String),
}

/// What every Rust process with threads, logs and an epoll loop needs: the
/// allocator, threads and their signals, time, and I/O on fds it holds.
const RUNTIME: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // vhost-user: the front-end's messages carry fds (memory regions, kick
    // and call eventfds).
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Socket files removed at the end.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The vsock backend on top: hybrid-vsock connections to host ports are
/// `connect(2)`s to `<uds>_<port>`, which needs a fresh socket each
/// (`socket(2)` is allowed for `AF_UNIX` only).
const VSOCK: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// The fs backend on top: serving files inside its share (the process's
/// root after its sandbox), with the guest's uid and gid per request.
const FS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_copy_file_range,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_renameat2,
    libc::SYS_renameat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_syncfs,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_flock,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    libc::SYS_lgetxattr,
    libc::SYS_lsetxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_fchdir,
    libc::SYS_umask,
    libc::SYS_dup3,
    // Each request runs with the guest's credentials on its thread.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_capget,
    libc::SYS_capset,
];

/// The net backend on top: frames to and from its tap.
const NET: &[i64] = &[];

/// A vCPU thread: the allocator, its futexes and signals (the kick out of
/// `KVM_RUN`), writes (console, logs, irqfds and kicks), and what a
/// device's activation or reset does from the register write that asks
/// for it: a worker's epoll and eventfd, the vsock device's timer and its
/// connections closed. The worker thread itself is started elsewhere.
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_shutdown,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `ioctl(KVM_RUN)`: `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;
/// `ioctl(KVM_GET_REGS)`: `_IOR(KVMIO, 0x81, struct kvm_regs)`, read
/// where a VM stops, for the RIP it reports.
pub const KVM_GET_REGS: u64 = 0x8090_ae81;

/// `prctl(2)` with these options only: thread names and the no-new-privs /
/// dumpable bits some crates check.
const PRCTL_OPTIONS: &[u64] = &[
    libc::PR_SET_NAME as u64,
    libc::PR_GET_NAME as u64,
    libc::PR_GET_DUMPABLE as u64,
    libc::PR_GET_NO_NEW_PRIVS as u64,
    libc::PR_CAPBSET_READ as u64,
];

/// `ioctl(2)` requests: non-blocking and close-on-exec modes (the net
/// backend adds the tap's offloads); no other device is reachable.
const IOCTLS: &[u64] = &[libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX, libc::TCGETS];

/// The syscalls allowed without conditions for `kind` (`prctl` and `ioctl`
/// are allowed only with the arguments of [`PRCTL_OPTIONS`] and
/// [`IOCTLS`], and the vsock backend's `socket` for `AF_UNIX` only).
pub fn allowed_syscalls(kind: Kind) -> Vec<i64> {
    let lists: &[&[i64]] = match kind {
        Kind::VsockBackend => &[RUNTIME, VSOCK],
        Kind::FsBackend => &[RUNTIME, FS],
        Kind::NetBackend => &[RUNTIME, NET],
        Kind::Vmm => &[RUNTIME, VSOCK, FS, NET, VCPU],
        Kind::VmmVcpu => &[VCPU],
        Kind::VmmControl => &[RUNTIME],
    };
    let mut all: Vec<i64> = lists.iter().flat_map(|l| l.iter()).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

fn arg_is(index: u8, values: &[u64], kind: Kind) -> Result<Vec<SeccompRule>, Error> {
    values
        .iter()
        .map(|&v| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| Error::Build(kind.name(), e.to_string()))
        })
        .collect()
}

/// The process a list is made for: the one that makes it, which installs
/// it.
fn own_pid() -> u32 {
    std::process::id()
}

/// Every syscall `kind` may make, with the argument conditions of those
/// allowed only with some arguments, for the process `pid`: `tgkill` (how
/// threads signal each other) only reaches that process's threads. All
/// vsock and net backends serve as one unprivileged user, so the kernel's
/// permission check alone would let one of them, taken over by its guest,
/// signal every other sandbox's backends.
fn rules(kind: Kind, pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(kind).into_iter().map(|s| (s, vec![])).collect();
    if let Some(tgkill) = rules.get_mut(&libc::SYS_tgkill) {
        *tgkill = arg_is(0, &[u64::from(pid)], kind)?;
    }
    let mut prctl = PRCTL_OPTIONS.to_vec();
    if kind == Kind::Vmm {
        // For a thread to add its own list on top (seccompiler sets
        // no_new_privs first; it is set already, so this changes nothing).
        prctl.push(libc::PR_SET_NO_NEW_PRIVS as u64);
    }
    rules.insert(libc::SYS_prctl, arg_is(0, &prctl, kind)?);
    // The offloads the guest's driver negotiated, set on the tap (by the
    // vCPU thread whose register write activates the inline device).
    let tap = crate::devices::net::TUNSETOFFLOAD;
    let ioctls: Vec<u64> = match kind {
        Kind::NetBackend => [IOCTLS, &[tap]].concat(),
        Kind::Vmm | Kind::VmmVcpu => [IOCTLS, &[tap, KVM_RUN, KVM_GET_REGS]].concat(),
        _ => IOCTLS.to_vec(),
    };
    rules.insert(libc::SYS_ioctl, arg_is(1, &ioctls, kind)?);
    if matches!(kind, Kind::VsockBackend | Kind::Vmm) {
        rules.insert(libc::SYS_socket, arg_is(0, &[libc::AF_UNIX as u64], kind)?);
    }
    if kind == Kind::Vmm {
        // seccomp(SECCOMP_SET_MODE_FILTER, 0, list): a thread narrowing
        // itself, never the whole process (no TSYNC) nor a listener.
        let rule = [
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(libc::SECCOMP_SET_MODE_FILTER),
            ),
            SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0),
        ]
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .and_then(SeccompRule::new)
        .map_err(|e| Error::Build(kind.name(), e.to_string()))?;
        rules.insert(libc::SYS_seccomp, vec![rule]);
    }
    Ok(rules)
}

/// The BPF program of `kind` in `mode` (`None` for [`Mode::Off`]) for the
/// process `pid`, and how many syscalls it lets through (some only with
/// given arguments).
fn compiled(kind: Kind, mode: Mode, pid: u32) -> Result<Option<(BpfProgram, usize)>, Error> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let rules = rules(kind, pid)?;
    let count = rules.len();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| Error::Build(kind.name(), e.to_string()))?;
    BpfProgram::try_from(filter)
        .map(|prog| Some((prog, count)))
        .map_err(|e| Error::Build(kind.name(), e.to_string()))
}

/// The BPF program of `kind` in `mode` (`None` for [`Mode::Off`]), for
/// the calling process's threads.
pub fn program(kind: Kind, mode: Mode) -> Result<Option<BpfProgram>, Error> {
    Ok(compiled(kind, mode, own_pid())?.map(|(prog, _)| prog))
}

/// One BPF instruction of a compiled list.
pub type SockFilter = seccompiler::sock_filter;

/// Installs a compiled list on the calling thread only (for a forked child
/// that runs one, as tests do). False if the kernel refused it.
pub fn apply_to_this_thread(prog: &[SockFilter]) -> bool {
    seccompiler::apply_filter(prog).is_ok()
}

/// Keeps glibc's malloc to its main arena. By default each thread gets an
/// arena of its own, and the first time such an arena's heap shrinks glibc
/// opens `/proc/sys/vm/overcommit_memory`: an `openat` that the lists of
/// processes that open no files (the vsock and net backends, the builtin
/// monitor's vCPU and socket-serving threads) do not have. A guest that
/// made such a process allocate and free enough (a flood of vsock
/// connections did) got it killed. The main arena grows and shrinks with
/// `brk` and never reads that file. Call it first in `main`, before any
/// thread exists.
pub fn one_malloc_arena() {
    // SAFETY: mallopt takes two integers and changes malloc's settings only.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        log::warn!("mallopt(M_ARENA_MAX, 1) refused: threads may get arenas of their own");
    }
}

/// Sets no_new_privs and installs `kind`'s list in `mode` on every thread
/// of this process. Logs what it did.
pub fn install(kind: Kind, mode: Mode) -> Result<(), Error> {
    let Some((prog, count)) = compiled(kind, mode, own_pid())? else {
        log::warn!("seccomp: off, {} runs with every syscall", kind.name());
        return Ok(());
    };
    // seccompiler sets no_new_privs itself (a filter needs it without
    // CAP_SYS_ADMIN); it stays set for good.
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| Error::Install(kind.name(), e.to_string()))?;
    log::info!(
        "seccomp: {} allow-list of {count} syscalls in force ({mode})",
        kind.name()
    );
    Ok(())
}

/// A seccomp record of the kernel log (`audit: type=1326 ...`): the process
/// and the syscall it was stopped at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// The pid, in the kernel's initial pid namespace.
    pub pid: u32,
    /// The syscall number (x86_64).
    pub syscall: i64,
    /// The action's code: `0x80000000` kill process, `0x7ffc0000` log.
    pub code: u32,
}

/// Parses one kernel log line if it is a seccomp audit record.
pub fn parse_audit_record(line: &str) -> Option<AuditRecord> {
    if !line.contains("type=1326") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let code = field("code")?;
    Some(AuditRecord {
        pid: field("pid")?.parse().ok()?,
        syscall: field("syscall")?.parse().ok()?,
        code: u32::from_str_radix(code.strip_prefix("0x").unwrap_or(code), 16).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [Kind; 6] = [
        Kind::VsockBackend,
        Kind::FsBackend,
        Kind::NetBackend,
        Kind::Vmm,
        Kind::VmmVcpu,
        Kind::VmmControl,
    ];
    /// The lists `tegmen-vmm`'s threads add on top of [`Kind::Vmm`].
    const VMM_THREADS: [Kind; 5] = [
        Kind::VmmVcpu,
        Kind::VmmControl,
        Kind::VsockBackend,
        Kind::FsBackend,
        Kind::NetBackend,
    ];

    #[test]
    fn every_list_compiles_and_leaves_out_what_no_backend_may_do() {
        for kind in KINDS {
            assert!(program(kind, Mode::Kill).unwrap().is_some());
            assert!(program(kind, Mode::Log).unwrap().is_some());
            assert!(program(kind, Mode::Off).unwrap().is_none());
            let allowed = allowed_syscalls(kind);
            for banned in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_process_vm_readv,
                libc::SYS_process_vm_writev,
                libc::SYS_mount,
                libc::SYS_umount2,
                libc::SYS_pivot_root,
                libc::SYS_chroot,
                libc::SYS_setns,
                libc::SYS_unshare,
                libc::SYS_init_module,
                libc::SYS_finit_module,
                libc::SYS_bpf,
                libc::SYS_perf_event_open,
                libc::SYS_reboot,
                libc::SYS_kexec_load,
                libc::SYS_socket,
                libc::SYS_keyctl,
                libc::SYS_prctl,
                libc::SYS_ioctl,
                libc::SYS_seccomp,
            ] {
                assert!(!allowed.contains(&banned), "{} allows syscall {banned}", kind.name());
            }
        }
    }

    /// Runs `f` in a forked child under `kind`'s list and returns how the
    /// child ended. The child only makes raw syscalls after the fork.
    fn in_filtered_child(kind: Kind, f: fn()) -> libc::c_int {
        in_child_under(&[kind], f)
    }

    /// [`in_filtered_child`] under the lists of `kinds`, installed in that
    /// order (each under those before it, as `tegmen-vmm`'s threads do).
    fn in_child_under(kinds: &[Kind], f: fn()) -> libc::c_int {
        let progs: Vec<BpfProgram> = kinds
            .iter()
            .map(|&k| program(k, Mode::Kill).unwrap().unwrap())
            .collect();
        // SAFETY: the child calls only async-signal-safe code (prctl,
        // seccomp, raw syscalls, _exit) before it ends.
        match unsafe { libc::fork() } {
            0 => {
                let ok = progs.iter().all(|prog| seccompiler::apply_filter(prog).is_ok());
                if ok {
                    f();
                }
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(if ok { 0 } else { 99 }) }
            }
            pid => {
                assert!(pid > 0);
                let mut status = 0;
                // SAFETY: waits for our own child.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                status
            }
        }
    }

    #[test]
    fn a_syscall_off_the_list_kills_the_process_and_one_on_it_does_not() {
        for kind in KINDS {
            // SAFETY: raw syscalls without side effects that matter.
            let status = in_filtered_child(kind, || unsafe {
                libc::syscall(libc::SYS_getpid);
                libc::syscall(libc::SYS_write, 2, b"".as_ptr(), 0);
            });
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{kind:?}: {status:#x}"
            );
            // SAFETY: the filter stops it before the kernel acts on it.
            let status = in_filtered_child(kind, || unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0);
            });
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: {status:#x}"
            );
            // Unix sockets for the vsock backend's host connections only.
            let status = in_filtered_child(kind, || unsafe {
                let fd = libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::syscall(libc::SYS_close, fd);
            });
            assert_eq!(
                libc::WIFEXITED(status),
                matches!(kind, Kind::VsockBackend | Kind::Vmm),
                "{kind:?}: {status:#x}"
            );
            // prctl only with the options on its list.
            let status = in_filtered_child(kind, || unsafe {
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
            });
            assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        }
    }

    /// `tgkill` reaches the threads of the process the list was made for,
    /// and no other process: made here for pid 1, the forked child may
    /// probe init's thread (signal 0 delivers nothing) and dies for
    /// probing its own.
    #[test]
    fn tgkill_reaches_only_the_process_the_list_is_for() {
        fn in_child_for_init(kind: Kind, f: fn()) -> libc::c_int {
            let (prog, _) = compiled(kind, Mode::Kill, 1).unwrap().unwrap();
            // SAFETY: the child makes raw syscalls only, then ends.
            match unsafe { libc::fork() } {
                0 => {
                    if seccompiler::apply_filter(&prog).is_ok() {
                        f();
                    }
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(0) }
                }
                pid => {
                    assert!(pid > 0);
                    let mut status = 0;
                    // SAFETY: waits for our own child.
                    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                    status
                }
            }
        }
        for kind in KINDS {
            if !allowed_syscalls(kind).contains(&libc::SYS_tgkill) {
                continue;
            }
            // SAFETY: signal 0 only checks that the thread exists.
            let status = in_child_for_init(kind, || unsafe {
                libc::syscall(libc::SYS_tgkill, 1, 1, 0);
            });
            assert!(libc::WIFEXITED(status), "{kind:?}: {status:#x}");
            // SAFETY: as above, for the child's own thread.
            let status = in_child_for_init(kind, || unsafe {
                let pid = libc::syscall(libc::SYS_getpid);
                libc::syscall(libc::SYS_tgkill, pid, libc::syscall(libc::SYS_gettid), 0);
            });
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{kind:?}: {status:#x}"
            );
        }
    }

    /// Every syscall (and every ioctl, prctl option and socket family) a
    /// thread of `tegmen-vmm` may make is on the process's list too: a
    /// stacked filter cannot give back what the one below denies.
    #[test]
    fn the_vmm_threads_lists_lie_within_the_process_list() {
        let process = rules(Kind::Vmm, own_pid()).unwrap();
        for kind in VMM_THREADS {
            for (nr, conditions) in rules(kind, own_pid()).unwrap() {
                let Some(base) = process.get(&nr) else {
                    panic!("{} allows syscall {nr}, tegmen-vmm does not", kind.name());
                };
                // Unconditional below, or each of its rules there too.
                if !base.is_empty() {
                    assert!(!conditions.is_empty(), "{}: syscall {nr} unconditional", kind.name());
                    for rule in &conditions {
                        assert!(
                            base.contains(rule),
                            "{}: syscall {nr} with {rule:?}, which tegmen-vmm's list does not allow",
                            kind.name()
                        );
                    }
                }
            }
        }
        // The vCPU list is the narrow one: no file, socket or thread.
        let vcpu = allowed_syscalls(Kind::VmmVcpu);
        for banned in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_unlink,
            libc::SYS_setresuid,
        ] {
            assert!(!vcpu.contains(&banned), "the vCPU list allows syscall {banned}");
        }
    }

    /// A thread of `tegmen-vmm` narrows itself under the process's list
    /// (which lets it install one more), and then has only what its own
    /// list allows even where the process's would.
    #[test]
    fn the_vmm_threads_narrow_themselves_under_the_process_list() {
        // SAFETY (all closures): raw syscalls on bad fds or with bad
        // arguments, stopped by the filter or failing harmlessly.
        let ok = |s: libc::c_int| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0;
        let killed = |s: libc::c_int| libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGSYS;
        // KVM_RUN on no vCPU fails with EBADF, but is let through.
        let s = in_child_under(&[Kind::Vmm, Kind::VmmVcpu], || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, KVM_RUN, 0);
            libc::syscall(libc::SYS_ioctl, -1, KVM_GET_REGS, 0);
            libc::syscall(libc::SYS_eventfd2, 0, 0);
        });
        assert!(ok(s), "{s:#x}");
        // The process's list allows these; the vCPU's does not.
        for f in [
            (|| unsafe {
                libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY);
            }) as fn(),
            || unsafe {
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
            },
            || unsafe {
                libc::syscall(libc::SYS_clone3, 0, 0);
            },
        ] {
            assert!(killed(in_child_under(&[Kind::Vmm, Kind::VmmVcpu], f)));
            assert!(!killed(in_child_under(&[Kind::Vmm], f)));
        }
        // Nor may a vCPU thread narrow itself further, nor start a thread.
        let s = in_child_under(&[Kind::Vmm, Kind::VmmVcpu, Kind::VmmVcpu], || {});
        assert!(killed(s), "{s:#x}");
        // The control thread: no KVM, no file.
        let s = in_child_under(&[Kind::Vmm, Kind::VmmControl], || unsafe {
            libc::syscall(libc::SYS_ioctl, -1, KVM_RUN, 0);
        });
        assert!(killed(s), "{s:#x}");
        let s = in_child_under(&[Kind::Vmm, Kind::VmmControl], || unsafe {
            libc::syscall(libc::SYS_nanosleep, &libc::timespec { tv_sec: 0, tv_nsec: 1 }, 0);
        });
        assert!(ok(s), "{s:#x}");
        // TSYNC is not for a thread of tegmen-vmm.
        let s = in_child_under(&[Kind::Vmm], || unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 1, 0);
        });
        assert!(killed(s), "{s:#x}");
    }

    #[test]
    fn the_kvm_ioctl_numbers_are_those_of_the_headers() {
        let io = |nr: u64| (0xae << 8) | nr;
        let ior = |nr: u64, size: usize| (2 << 30) | ((size as u64) << 16) | io(nr);
        assert_eq!(KVM_RUN, io(0x80));
        assert_eq!(KVM_GET_REGS, ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()));
    }

    #[test]
    fn audit_records_are_read_back() {
        let line = "[82922.999770] audit: type=1326 audit(1796315066.005:2): auid=4294967295 uid=0 gid=0 \
                    ses=4294967295 pid=24543 comm=\"k\" exe=\"/tmp/sc/k\" sig=31 arch=c000003e syscall=110 \
                    compat=0 ip=0x7f6747134829 code=0x80000000";
        assert_eq!(
            parse_audit_record(line),
            Some(AuditRecord {
                pid: 24543,
                syscall: 110,
                code: 0x8000_0000
            })
        );
        // /dev/kmsg's own format.
        let kmsg = "5,1234,82922999770,-;audit: type=1326 audit(1.0:2): pid=7 sig=0 syscall=41 code=0x7ffc0000";
        assert_eq!(
            parse_audit_record(kmsg).map(|r| (r.pid, r.syscall, r.code)),
            Some((7, 41, 0x7ffc_0000))
        );
        assert_eq!(parse_audit_record("audit: type=1400 pid=1 syscall=2 code=0x1"), None);
        assert_eq!(parse_audit_record("audit: type=1326 pid=x syscall=2 code=0x1"), None);
    }
}
