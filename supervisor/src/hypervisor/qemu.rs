//! The QEMU backend: Debian's `qemu-system-x86_64 -M microvm`, with the
//! project's own vsock and fs devices attached as vhost-user backends
//! (`tegmen-vsock-backend`, `tegmen-fs-backend`), one pair per VM.
//!
//! Guest RAM is a shared memfd so the backends can map it. ACPI is off, so
//! QEMU announces the virtio-mmio devices on the kernel command line. A guest
//! reboot ends QEMU (`-no-reboot`): that is how the agent powers the VM off.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{helper_binary, spawn_logged, tail_lines, Accel, Hypervisor, VmSpec};
use crate::process::ProcessRecord;
use crate::{Error, Result};

/// How long a backend may take to create its vhost-user socket.
const BACKEND_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's `-sandbox` with everything it can deny denied: what it keeps
/// is what a VM needs, and QEMU kills itself on the rest.
pub const QEMU_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

pub struct Qemu {
    qemu: PathBuf,
    sandbox: bool,
    children: Vec<(String, Child)>,
    exit: Option<String>,
}

impl Qemu {
    /// `sandbox`: QEMU's own syscall filter when the VM's `seccomp` mode
    /// is `kill` (see [`QEMU_SANDBOX`]).
    pub fn new(qemu: &str, sandbox: bool) -> Result<Qemu> {
        let path = crate::host::find_program(qemu)
            .ok_or_else(|| Error::Hypervisor(format!("QEMU not found: {qemu} (install Debian's qemu-system-x86)")))?;
        Ok(Qemu {
            qemu: path,
            sandbox,
            children: Vec::new(),
            exit: None,
        })
    }

    pub fn binary(&self) -> &Path {
        &self.qemu
    }

    fn spawn(
        &mut self,
        name: &str,
        cmd: Command,
        log: &Path,
        spec: &VmSpec,
        record: &mut dyn FnMut(ProcessRecord),
    ) -> Result<()> {
        let child = spawn_logged(name, cmd, log, spec.cgroup.as_ref(), record)?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Waits until `socket` exists, or fails with the backend's log if it
    /// died or took too long.
    fn wait_socket(&mut self, name: &str, socket: &Path, log: &Path) -> Result<()> {
        let deadline = Instant::now() + BACKEND_READY_TIMEOUT;
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Some(status) = self.child_exit(name) {
                return Err(Error::Hypervisor(format!(
                    "{name} ended before creating {} ({status}):\n{}",
                    socket.display(),
                    tail_lines(log, 10)
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Hypervisor(format!(
                    "{name} did not create {} within {}s:\n{}",
                    socket.display(),
                    BACKEND_READY_TIMEOUT.as_secs(),
                    tail_lines(log, 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn child_exit(&mut self, name: &str) -> Option<String> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| n == name)?;
        let pid = child.id();
        child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| super::describe_exit(name, pid, s))
    }

    /// A backend its allow-list ended: the VM cannot go on without it.
    fn backend_killed_by_seccomp(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        self.children.iter_mut().find_map(|(name, child)| {
            let pid = child.id();
            match child.try_wait() {
                Ok(Some(s)) if name != "qemu" && s.signal() == Some(libc::SIGSYS) => {
                    Some(super::describe_exit(name, pid, s))
                }
                _ => None,
            }
        })
    }

    /// QEMU's command line. It runs in `spec.run_dir` and names the
    /// vhost-user sockets relative to it (`vsock_vhost` and `fs_vhost` are
    /// file names there): their full paths may not fit a socket address.
    pub fn command_line(&self, spec: &VmSpec, vsock_vhost: &Path, fs_vhost: &Path) -> Command {
        let mut cmd = self.base_command_line(spec, vsock_vhost, fs_vhost);
        for (i, nic) in spec.nics.iter().enumerate() {
            cmd.args(["-chardev", &format!("socket,id=net{i},path={}", net_socket_name(i))])
                .args(["-netdev", &format!("vhost-user,id=n{i},chardev=net{i}")])
                .args([
                    "-device",
                    &format!(
                        "virtio-net-device,netdev=n{i},mac={},host_mtu={},rx_queue_size={q},tx_queue_size={q}",
                        nic.mac_string(),
                        nic.mtu,
                        q = NET_QUEUE_SIZE
                    ),
                ]);
        }
        cmd
    }

    fn base_command_line(&self, spec: &VmSpec, vsock_vhost: &Path, fs_vhost: &Path) -> Command {
        let mut cmd = Command::new(&self.qemu);
        cmd.current_dir(&spec.run_dir);
        let mem = format!("{}M", spec.memory_mib);
        let (accel, cpu) = match spec.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg,thread=multi", "max"),
        };
        let mut append = String::from("console=ttyS0 reboot=t panic=-1 quiet");
        if !spec.kernel_params.is_empty() {
            append.push(' ');
            append.push_str(&spec.kernel_params);
        }
        cmd.args(["-name", &format!("tegmen-{}", spec.id)])
            .args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem"])
            .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")])
            .args(["-accel", accel, "-cpu", cpu])
            .args(["-m", &mem, "-smp", &spec.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"])
            // Times on its messages, for `supervisor logs`.
            .args(["-msg", "timestamp=on"])
            .args([
                "-chardev",
                &format!("file,id=console,path={}", spec.console_log.display()),
            ])
            .args(["-serial", "chardev:console"])
            .args(["-chardev", &format!("socket,id=vsock,path={}", vsock_vhost.display())])
            .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
            .args(["-chardev", &format!("socket,id=fs,path={}", fs_vhost.display())])
            .args([
                "-device",
                &format!(
                    "vhost-user-fs-device,chardev=fs,tag={}",
                    tegmen_agent_api::SHARED_FS_TAG
                ),
            ])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initramfs)
            .args(["-append", &append])
            .arg("-no-reboot");
        if self.sandbox && spec.seccomp == tegmen_vmm::seccomp::Mode::Kill {
            cmd.args(["-sandbox", QEMU_SANDBOX]);
        }
        cmd
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&mut self, spec: &VmSpec, record: &mut dyn FnMut(ProcessRecord)) -> Result<()> {
        let vsock_vhost = spec.run_dir.join("vhost-vsock.sock");
        let fs_vhost = spec.run_dir.join("vhost-fs.sock");

        let vsock_log = spec.run_dir.join("vsock-backend.log");
        let mut cmd = Command::new(helper_binary("tegmen-vsock-backend")?);
        cmd.arg("--socket")
            .arg(&vsock_vhost)
            .arg("--uds-path")
            .arg(&spec.vsock_socket)
            .arg("--stats-socket")
            .arg(spec.run_dir.join(format!("vsock{}", super::STATS_SUFFIX)));
        cmd.arg("--seccomp").arg(spec.seccomp.to_string());
        cmd.arg("--user").arg(BACKEND_USER);
        self.spawn("tegmen-vsock-backend", cmd, &vsock_log, spec, record)?;

        let fs_log = spec.run_dir.join("fs-backend.log");
        let mut cmd = Command::new(helper_binary("tegmen-fs-backend")?);
        cmd.arg("--socket")
            .arg(&fs_vhost)
            .arg("--shared-dir")
            .arg(&spec.shared_dir)
            .arg("--stats-socket")
            .arg(spec.run_dir.join(format!("fs{}", super::STATS_SUFFIX)));
        cmd.arg("--seccomp").arg(spec.seccomp.to_string());
        self.spawn("tegmen-fs-backend", cmd, &fs_log, spec, record)?;

        for (i, nic) in spec.nics.iter().enumerate() {
            let log = spec.run_dir.join(format!("net{i}-backend.log"));
            let mut cmd = Command::new(helper_binary("tegmen-net-backend")?);
            cmd.arg("--socket").arg(spec.run_dir.join(net_socket_name(i))).args([
                "--tap",
                &nic.tap,
                "--mac",
                &nic.mac_string(),
                "--mtu",
                &nic.mtu.to_string(),
            ]);
            if let Some(ns) = &nic.netns {
                cmd.arg("--netns").arg(ns);
            }
            cmd.arg("--stats-socket")
                .arg(spec.run_dir.join(format!("net{i}{}", super::STATS_SUFFIX)));
            cmd.arg("--seccomp").arg(spec.seccomp.to_string());
            cmd.arg("--user").arg(BACKEND_USER);
            self.spawn(&format!("tegmen-net-backend-{i}"), cmd, &log, spec, record)?;
        }

        self.wait_socket("tegmen-vsock-backend", &vsock_vhost, &vsock_log)?;
        self.wait_socket("tegmen-fs-backend", &fs_vhost, &fs_log)?;
        for i in 0..spec.nics.len() {
            let log = spec.run_dir.join(format!("net{i}-backend.log"));
            self.wait_socket(
                &format!("tegmen-net-backend-{i}"),
                &spec.run_dir.join(net_socket_name(i)),
                &log,
            )?;
        }

        let name = |p: &Path| PathBuf::from(p.file_name().expect("a socket file name"));
        let cmd = self.command_line(spec, &name(&vsock_vhost), &name(&fs_vhost));
        self.spawn("qemu", cmd, &spec.run_dir.join("qemu.log"), spec, record)?;
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        if self.exit.is_none() {
            if let Some(status) = self.child_exit("qemu") {
                self.exit = Some(status);
            } else if let Some(why) = self.backend_killed_by_seccomp() {
                self.exit = Some(why);
            }
        }
        self.exit.clone()
    }

    fn kill(&mut self) {
        // QEMU first: the backends end by themselves when it disconnects,
        // then anything left is killed.
        for (name, child) in self.children.iter_mut().rev() {
            if matches!(child.try_wait(), Ok(None)) {
                if name != "qemu" {
                    // Give a backend a moment to notice the disconnect and
                    // remove its sockets itself.
                    let deadline = Instant::now() + Duration::from_millis(500);
                    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if self.exit.is_none() {
            self.exit = Some("killed".into());
        }
        self.children.clear();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if !self.children.is_empty() {
            self.kill();
        }
    }
}

/// The user and group the vsock and net backends serve as once their
/// sockets are bound (`--user`): the overflow ids ("nobody"), owning no
/// file, so that a backend a guest took over cannot signal or touch what
/// root owns. The fs backend stays root: it serves files as their owners.
/// A host program that takes guest connections on `<vsock>_<port>` lets
/// this user connect to its socket.
pub const BACKEND_USER: &str = "65534:65534";

/// The size of a NIC's queues (on virtio-mmio the guest may take up to
/// 1024 whatever this says; `tegmen-net-backend` serves that).
const NET_QUEUE_SIZE: u16 = 1024;

/// The vhost-user socket of NIC `i`, in the sandbox directory.
fn net_socket_name(i: usize) -> String {
    format!("vhost-net{i}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tegmen_vmm::seccomp::Mode;

    fn spec(seccomp: Mode) -> VmSpec {
        VmSpec {
            id: "s1".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio.gz".into(),
            memory_mib: 256,
            vcpus: 1,
            kernel_params: String::new(),
            run_dir: "/run/tegmen/sandboxes/s1".into(),
            vsock_socket: "/run/tegmen/sandboxes/s1/vsock".into(),
            shared_dir: "/run/tegmen/sandboxes/s1/shared".into(),
            console_log: "/run/tegmen/sandboxes/s1/console.log".into(),
            accel: Accel::Tcg,
            cgroup: None,
            nics: Vec::new(),
            seccomp,
        }
    }

    fn sandbox_arg(sandbox: bool, seccomp: Mode) -> Option<String> {
        let q = Qemu {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            sandbox,
            children: Vec::new(),
            exit: None,
        };
        let cmd = q.base_command_line(&spec(seccomp), Path::new("/v.sock"), Path::new("/f.sock"));
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let i = args.iter().position(|a| a == "-sandbox")?;
        Some(args[i + 1].clone())
    }

    #[test]
    fn qemu_filters_itself_when_the_backends_do() {
        assert_eq!(sandbox_arg(true, Mode::Kill).as_deref(), Some(QEMU_SANDBOX));
        assert_eq!(sandbox_arg(true, Mode::Log), None, "QEMU's filter has no log mode");
        assert_eq!(sandbox_arg(true, Mode::Off), None);
        assert_eq!(sandbox_arg(false, Mode::Kill), None, "qemu.sandbox = false");
    }
}
