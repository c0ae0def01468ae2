//! The one interface the supervisor drives VMs through, and the choice of
//! backend. Nothing above this module knows which backend runs: each one
//! presents the same hybrid-vsock Unix socket and shares the same host
//! directory over virtio-fs.

pub mod builtin;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, HypervisorChoice, Override};
use crate::host::{self, HwVirt};
use crate::process::ProcessRecord;
use crate::{Error, Result};

/// A device backend's counters socket in the run directory is
/// `<device><STATS_SUFFIX>` (`vsock`, `fs`, `net0`, ...): one JSON line per
/// connection (`tegmen_vmm::vhost_user::stats`), read by `supervisor metrics`.
pub const STATS_SUFFIX: &str = ".stats";

/// Everything a backend needs to start one sandbox VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Extra kernel parameters, after the backend's own.
    pub kernel_params: String,
    /// The sandbox directory: backend sockets and logs go here.
    pub run_dir: PathBuf,
    /// The hybrid-vsock Unix socket the host connects to.
    pub vsock_socket: PathBuf,
    /// The host directory exported over virtio-fs with tag `tegmen`.
    pub shared_dir: PathBuf,
    /// Where the guest's serial console is written.
    pub console_log: PathBuf,
    /// Hardware-accelerated (KVM) or emulated.
    pub accel: Accel,
    /// The host cgroup every process of the VM is started in.
    pub cgroup: Option<crate::cgroup::HostCgroup>,
    /// Network interfaces, each on a tap (Tegmen's own virtio-net device).
    pub nics: Vec<Nic>,
    /// How the syscall allow-lists of the VM's own processes are enforced.
    pub seccomp: tegmen_vmm::seccomp::Mode,
}

/// One guest NIC: Tegmen's virtio-net device on a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap's name (opened, or made, in `netns`).
    pub tap: String,
    /// The network namespace the tap is in; this process's when `None`.
    pub netns: Option<PathBuf>,
    pub mac: [u8; 6],
    pub mtu: u16,
}

impl Nic {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        mac_string(&self.mac)
    }
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// A VM backend. One value drives one VM.
pub trait Hypervisor: Send {
    fn name(&self) -> &'static str;
    /// Starts the VM and every helper process it needs; returns once the
    /// guest is running. `record` is called for each host process as soon
    /// as it exists, so that a supervisor killed mid-start leaves a trace to
    /// clean up from.
    fn start(&mut self, spec: &VmSpec, record: &mut dyn FnMut(ProcessRecord)) -> Result<()>;
    /// `Some(how it ended)` once the VM has ended, `None` while it runs.
    fn exited(&mut self) -> Option<String>;
    /// Waits up to `timeout` for the VM to end by itself; true if it did.
    fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.exited().is_none() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
    /// Ends the VM now and collects every process it started.
    fn kill(&mut self);
}

/// The backend `hypervisor = ...` resolves to on this host, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    pub backend: Backend,
    pub accel: Accel,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Qemu,
    Builtin,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Builtin => "builtin",
        }
    }
}

/// Hardware virtualization as the config sees it: the CPU flags unless the
/// configuration overrides them.
pub fn effective_hw_virt(config: &Config) -> (bool, String) {
    match config.hardware_virtualization {
        Override::Yes => (true, "forced on by hardware_virtualization = \"yes\"".into()),
        Override::No => (false, "forced off by hardware_virtualization = \"no\"".into()),
        Override::Auto => match host::hardware_virtualization() {
            HwVirt::IntelVmx => (true, "/proc/cpuinfo has vmx".into()),
            HwVirt::AmdSvm => (true, "/proc/cpuinfo has svm".into()),
            HwVirt::None => (false, "/proc/cpuinfo has neither vmx nor svm".into()),
        },
    }
}

pub fn choose_backend(config: &Config) -> Result<BackendChoice> {
    let (hw, why) = effective_hw_virt(config);
    choose(config.hypervisor, hw, &why)
}

fn choose(choice: HypervisorChoice, hw: bool, why: &str) -> Result<BackendChoice> {
    let accel = if hw { Accel::Kvm } else { Accel::Tcg };
    let accel_text = match accel {
        Accel::Kvm => "KVM",
        Accel::Tcg => "TCG software emulation",
    };
    match choice {
        HypervisorChoice::Builtin if !hw => Err(Error::Hypervisor(format!(
            "hypervisor = \"builtin\" needs KVM that runs a Linux guest, but {why}; use \"qemu\" or \"auto\""
        ))),
        HypervisorChoice::Builtin => Ok(BackendChoice {
            backend: Backend::Builtin,
            accel,
            reason: format!("hypervisor = \"builtin\" in the configuration; KVM because {why}"),
        }),
        HypervisorChoice::Qemu => Ok(BackendChoice {
            backend: Backend::Qemu,
            accel,
            reason: format!("hypervisor = \"qemu\" in the configuration; {accel_text} because {why}"),
        }),
        HypervisorChoice::Auto if hw => Ok(BackendChoice {
            backend: Backend::Builtin,
            accel,
            reason: format!("auto: {why}, so Tegmen's own KVM monitor (builtin)"),
        }),
        HypervisorChoice::Auto => Ok(BackendChoice {
            backend: Backend::Qemu,
            accel,
            reason: format!("auto: {why}, so a Linux guest cannot run on KVM here: qemu with {accel_text}"),
        }),
    }
}

/// Creates the driver for `choice`.
pub fn new_hypervisor(config: &Config, choice: &BackendChoice) -> Result<Box<dyn Hypervisor>> {
    match choice.backend {
        Backend::Qemu => Ok(Box::new(qemu::Qemu::new(&config.qemu.path, config.qemu.sandbox)?)),
        Backend::Builtin => Ok(Box::new(builtin::Builtin::new())),
    }
}

/// Starts a VM's host process `name` with stdout and stderr in `log`, in a
/// session of its own (the VM outlives the command that started it, and a
/// terminal's ^C does not reach it), in the VM's host cgroup from its
/// first instruction, and records it at once.
pub(crate) fn spawn_logged(
    name: &str,
    mut cmd: std::process::Command,
    log: &Path,
    cgroup: Option<&crate::cgroup::HostCgroup>,
    record: &mut dyn FnMut(ProcessRecord),
) -> Result<std::process::Child> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).map_err(|e| Error::io("creating log", log, e))?;
    let err = out.try_clone().map_err(|e| Error::io("creating log", log, e))?;
    cmd.stdin(std::process::Stdio::null()).stdout(out).stderr(err);
    // Open here, written in the child: they stay open (close-on-exec) until
    // spawn returns.
    let procs = match cgroup {
        Some(c) => c.procs_files()?,
        None => Vec::new(),
    };
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: setsid and write(2) are async-signal-safe; the closure only
    // reads the descriptor list it owns.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            crate::cgroup::join_self(&fds)
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.spawn().map_err(|e| Error::io("starting", program, e))?;
    drop(procs);
    if let Some(rec) = ProcessRecord::of(name, child.id() as i32) {
        record(rec);
    }
    Ok(child)
}

/// Finds one of Tegmen's helper programs (the vhost-user backends): in
/// `$TEGMEN_LIBEXEC_DIR`, next to the running executable, or one directory
/// up (test binaries live in `target/<profile>/deps`).
pub fn helper_binary(name: &str) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("TEGMEN_LIBEXEC_DIR") {
        dirs.push(dir.into());
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    dirs.push(PathBuf::from("/usr/libexec/tegmen"));
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Hypervisor(format!("helper program {name} not found in {}", display_list(&dirs))))
}

fn display_list(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The last `max_lines` lines of a log file (bounded read), for errors.
pub fn tail_lines(path: &Path, max_lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_BYTES: u64 = 16 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("({} is missing)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(MAX_BYTES).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(max_lines)..].join("\n");
    if tail.trim().is_empty() {
        format!("({} is empty)", path.display())
    } else {
        tail
    }
}

/// How a process of a VM ended, as said in errors: a process killed for a
/// syscall off its allow-list is named as such, with the syscall from the
/// kernel's audit record of it when the kernel log still has one.
pub fn describe_exit(name: &str, pid: u32, status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if status.signal() != Some(libc::SIGSYS) {
        return format!("{name} {status}");
    }
    match seccomp_kill_of(pid) {
        Some(nr) => format!("seccomp violation in {name}, syscall {nr}"),
        None => {
            format!("seccomp violation in {name} (killed by SIGSYS; no audit record of the syscall in the kernel log)")
        }
    }
}

/// The syscall the kernel's log says process `pid` was killed at by its
/// seccomp filter (the last such record).
fn seccomp_kill_of(pid: u32) -> Option<i64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut found = None;
    // One record per read; a record is at most 8 KiB. EAGAIN ends the log,
    // EPIPE says records were overwritten while reading (read on).
    let mut buf = vec![0u8; 8192];
    for _ in 0..1_000_000 {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(r) = tegmen_vmm::seccomp::parse_audit_record(&String::from_utf8_lossy(&buf[..n])) {
                    if r.pid == pid && r.code == 0x8000_0000 {
                        found = Some(r.syscall);
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_uses_tcg_without_hardware_virtualization_and_says_why() {
        let c = choose(HypervisorChoice::Auto, false, "/proc/cpuinfo has neither vmx nor svm").unwrap();
        assert_eq!(c.backend, Backend::Qemu);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("neither vmx nor svm"), "{}", c.reason);
        let c = choose(HypervisorChoice::Auto, true, "/proc/cpuinfo has vmx").unwrap();
        assert_eq!((c.backend, c.accel), (Backend::Builtin, Accel::Kvm));
        assert!(
            c.reason.contains("has vmx") && c.reason.contains("builtin"),
            "{}",
            c.reason
        );
    }

    #[test]
    fn builtin_needs_hardware_virtualization() {
        let e = choose(
            HypervisorChoice::Builtin,
            false,
            "/proc/cpuinfo has neither vmx nor svm",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("builtin") && e.contains("neither vmx nor svm"), "{e}");
        let c = choose(HypervisorChoice::Builtin, true, "/proc/cpuinfo has svm").unwrap();
        assert_eq!((c.backend, c.accel), (Backend::Builtin, Accel::Kvm));
        // qemu stays available on either host.
        let c = choose(HypervisorChoice::Qemu, true, "/proc/cpuinfo has svm").unwrap();
        assert_eq!((c.backend, c.accel), (Backend::Qemu, Accel::Kvm));
    }

    #[test]
    fn tail_lines_is_bounded_and_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(tail_lines(&p, 2), "line 998\nline 999");
        assert!(tail_lines(&dir.path().join("nope"), 2).contains("missing"));
    }

    /// A forked child that applies the vsock backend's allow-list and
    /// makes a syscall off it, as a backend would.
    fn child_killed_by_its_filter() -> (u32, std::process::ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        let prog =
            tegmen_vmm::seccomp::program(tegmen_vmm::seccomp::Kind::VsockBackend, tegmen_vmm::seccomp::Mode::Kill)
                .unwrap()
                .unwrap();
        // SAFETY: the child makes raw syscalls only, then ends.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let _ = tegmen_vmm::seccomp::apply_to_this_thread(&prog);
            // SAFETY: socket(2) for an Internet socket: off the list.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
            // SAFETY: ends the child if the filter did not.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        (pid as u32, std::process::ExitStatus::from_raw(status))
    }

    #[test]
    fn a_seccomp_kill_is_named_with_its_syscall() {
        let (pid, status) = child_killed_by_its_filter();
        let said = describe_exit("tegmen-vsock-backend", pid, status);
        if std::fs::File::open("/dev/kmsg").is_ok() {
            assert_eq!(said, "seccomp violation in tegmen-vsock-backend, syscall 41");
        } else {
            assert!(
                said.starts_with("seccomp violation in tegmen-vsock-backend (killed by SIGSYS"),
                "{said}"
            );
        }
        // SIGSYS sent by someone else: no audit record to find.
        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGSYS) };
        let status = child.wait().unwrap();
        assert_eq!(
            describe_exit("x", child.id(), status),
            "seccomp violation in x (killed by SIGSYS; no audit record of the syscall in the kernel log)"
        );
        let status = std::process::Command::new("false").status().unwrap();
        assert_eq!(describe_exit("qemu", 1, status), "qemu exit status: 1");
    }
}
