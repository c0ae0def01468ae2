//! The builtin backend: Tegmen's own KVM monitor, `tegmen-vmm`, one
//! process per VM with the vsock and virtio-fs devices inline — no QEMU,
//! no vhost-user backends. Only where KVM can run a Linux guest (vmx/svm).
//!
//! The guest resets through the i8042 controller (`reboot=k`) to power
//! off; `tegmen-vmm` then exits and removes the hybrid-vsock socket.

use std::process::{Child, Command};

use super::{helper_binary, spawn_logged, Hypervisor, VmSpec};
use crate::process::ProcessRecord;
use crate::Result;

pub struct Builtin {
    child: Option<Child>,
    exit: Option<String>,
    /// `vmm.log`, where the monitor says why the VM stopped.
    log: Option<std::path::PathBuf>,
}

impl Builtin {
    pub fn new() -> Builtin {
        Builtin {
            child: None,
            exit: None,
            log: None,
        }
    }

    /// `tegmen-vmm`'s command line for `spec`.
    pub fn command_line(program: &std::path::Path, spec: &VmSpec) -> Command {
        let mut cmdline = String::from("console=ttyS0 reboot=k panic=-1 quiet");
        if !spec.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&spec.kernel_params);
        }
        let mut cmd = Command::new(program);
        cmd.arg("--kernel")
            .arg(&spec.kernel)
            .arg("--initramfs")
            .arg(&spec.initramfs)
            .args(["--memory-mib", &spec.memory_mib.to_string()])
            .args(["--vcpus", &spec.vcpus.min(u32::from(u8::MAX)).to_string()])
            .args(["--cmdline", &cmdline])
            .arg("--console")
            .arg(&spec.console_log)
            .arg("--vsock-uds")
            .arg(&spec.vsock_socket)
            .arg("--shared-dir")
            .arg(&spec.shared_dir)
            .args(["--fs-tag", tegmen_agent_api::SHARED_FS_TAG])
            .arg("--stats-dir")
            .arg(&spec.run_dir)
            .args(["--seccomp", &spec.seccomp.to_string()]);
        if let Some(ns) = spec.nics.first().and_then(|n| n.netns.as_ref()) {
            cmd.arg("--netns").arg(ns);
        }
        for nic in &spec.nics {
            cmd.arg("--net")
                .arg(format!("tap={},mac={},mtu={}", nic.tap, nic.mac_string(), nic.mtu));
        }
        cmd
    }
}

impl Default for Builtin {
    fn default() -> Self {
        Builtin::new()
    }
}

impl Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn start(&mut self, spec: &VmSpec, record: &mut dyn FnMut(ProcessRecord)) -> Result<()> {
        let netns: Vec<_> = spec.nics.iter().map(|n| n.netns.clone()).collect();
        if netns.windows(2).any(|w| w[0] != w[1]) {
            return Err(crate::Error::Hypervisor(
                "the builtin monitor lives in one network namespace: its NICs' taps must all be there".into(),
            ));
        }
        let program = helper_binary("tegmen-vmm")?;
        let cmd = Builtin::command_line(&program, spec);
        let child = spawn_logged(
            "tegmen-vmm",
            cmd,
            &spec.run_dir.join("vmm.log"),
            spec.cgroup.as_ref(),
            record,
        )?;
        let pid = child.id();
        self.child = Some(child);
        self.log = Some(spec.run_dir.join("vmm.log"));
        // The monitor makes its taps once in the namespace: the caller
        // wires them next, so they must be there first.
        let taps: Vec<&str> = spec.nics.iter().map(|n| n.tap.as_str()).collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !taps.is_empty() && !has_links(pid, &taps) {
            if let Some(why) = self.exited() {
                return Err(crate::Error::Hypervisor(format!(
                    "tegmen-vmm ended before its taps were made ({why}); see {}",
                    spec.run_dir.join("vmm.log").display()
                )));
            }
            if std::time::Instant::now() > deadline {
                return Err(crate::Error::Hypervisor(format!(
                    "tegmen-vmm made no taps {taps:?} in 10 s"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    fn exited(&mut self) -> Option<String> {
        if self.exit.is_none() {
            let child = self.child.as_mut();
            let pid = child.as_ref().map_or(0, |c| c.id());
            if let Some(Ok(Some(status))) = child.map(|c| c.try_wait()) {
                use std::os::unix::process::ExitStatusExt;
                if status.signal() == Some(libc::SIGSYS) {
                    // Killed by its allow-list: no reason in its log.
                    self.exit = Some(super::describe_exit("tegmen-vmm", pid, status));
                    return self.exit.clone();
                }
                let why = self
                    .log
                    .as_deref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .and_then(|log| stop_reason(&log));
                self.exit = Some(match why {
                    Some(why) => format!("tegmen-vmm {status}: {why}"),
                    None => format!("tegmen-vmm {status}"),
                });
            }
        }
        self.exit.clone()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if self.exit.is_none() {
            self.exit = Some("killed".into());
        }
    }
}

impl Drop for Builtin {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
    }
}

/// Why the monitor's VM stopped, from the JSON line it prints last
/// (`{"reason": ..., "boot_mark_ms": ...}`), or, for a VM that never ran,
/// its last error line.
fn stop_reason(log: &str) -> Option<String> {
    let json = log.lines().rev().filter(|l| l.starts_with('{')).find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        Some(v.get("reason")?.as_str()?.to_string())
    });
    json.or_else(|| {
        let line = log.lines().rev().find(|l| l.contains(" ERROR] "))?;
        Some(line.split_once(" ERROR] ")?.1.to_string())
    })
}

/// Whether every link in `names` is in process `pid`'s network namespace
/// (`/proc/<pid>/net/dev` lists that namespace's).
fn has_links(pid: u32, names: &[&str]) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) else {
        return false;
    };
    let links = links_of_net_dev(&text);
    names.iter().all(|n| links.contains(n))
}

fn links_of_net_dev(text: &str) -> Vec<&str> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Accel;
    use std::path::{Path, PathBuf};

    /// A monitor its allow-list killed is named as such, not by its log.
    #[test]
    fn a_monitor_killed_by_sigsys_is_a_seccomp_violation() {
        let mut b = Builtin::new();
        b.child = Some(Command::new("sh").args(["-c", "kill -SYS $$"]).spawn().unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let said = loop {
            if let Some(said) = b.exited() {
                break said;
            }
            assert!(std::time::Instant::now() < deadline, "sh did not end");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(said.starts_with("seccomp violation in tegmen-vmm"), "{said}");
        b.kill();
    }

    #[test]
    fn the_reason_the_vm_stopped_is_read_from_the_log() {
        let log = "[WARN] port write of 1 bytes at 0x80\n{\"reason\":\"unhandled exit on vCPU 0 at RIP 0x401000: MMIO write of 4 bytes at 0xe0000000: no device there\",\"boot_mark_ms\":null}\n[ERROR] the VM stopped\n";
        assert_eq!(
            stop_reason(log).as_deref(),
            Some("unhandled exit on vCPU 0 at RIP 0x401000: MMIO write of 4 bytes at 0xe0000000: no device there")
        );
        assert_eq!(stop_reason("no json here\n{\"reason\": 3}\n"), None);
        let never_ran = "[2026-12-03T06:00:00.000001Z INFO ] loading\n[2026-12-03T06:00:00.000002Z ERROR] 64 MiB of memory is too little\n";
        assert_eq!(
            stop_reason(never_ran).as_deref(),
            Some("64 MiB of memory is too little")
        );
        assert_eq!(stop_reason(""), None);
    }

    #[test]
    fn the_vmm_gets_the_guest_and_the_sandbox_paths() {
        let spec = VmSpec {
            id: "s1".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio.gz".into(),
            memory_mib: 384,
            vcpus: 2,
            kernel_params: "loglevel=3".into(),
            run_dir: "/run/tegmen/sandboxes/s1".into(),
            vsock_socket: "/run/tegmen/sandboxes/s1/vsock".into(),
            shared_dir: "/run/tegmen/sandboxes/s1/shared".into(),
            console_log: "/run/tegmen/sandboxes/s1/console.log".into(),
            accel: Accel::Kvm,
            cgroup: None,
            nics: Vec::new(),
            seccomp: tegmen_vmm::seccomp::Mode::Kill,
        };
        let cmd = Builtin::command_line(Path::new("/usr/libexec/tegmen/tegmen-vmm"), &spec);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let value = |flag: &str| {
            let i = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("{flag} missing: {args:?}"));
            PathBuf::from(&args[i + 1])
        };
        assert_eq!(value("--kernel"), PathBuf::from("/k/vmlinux"));
        assert_eq!(value("--memory-mib"), PathBuf::from("384"));
        assert_eq!(value("--vcpus"), PathBuf::from("2"));
        assert_eq!(value("--vsock-uds"), spec.vsock_socket);
        assert_eq!(value("--shared-dir"), spec.shared_dir);
        assert_eq!(value("--fs-tag"), PathBuf::from("tegmen"));
        assert_eq!(value("--stats-dir"), spec.run_dir);
        assert_eq!(value("--seccomp"), PathBuf::from("kill"));
        let cmdline = value("--cmdline").to_string_lossy().into_owned();
        assert!(
            cmdline.contains("reboot=k") && cmdline.ends_with("loglevel=3"),
            "{cmdline}"
        );
        assert!(!args.contains(&"--netns".to_string()) && !args.contains(&"--net".to_string()));

        // NICs: the namespace once, then one --net each.
        let nic = |tap: &str, last: u8| crate::hypervisor::Nic {
            tap: tap.into(),
            netns: Some("/var/run/netns/cni-1".into()),
            mac: [2, 0, 0, 0, 0, last],
            mtu: 1450,
        };
        let spec = VmSpec {
            nics: vec![nic("tap0_tg", 1), nic("tap1_tg", 2)],
            ..spec
        };
        let cmd = Builtin::command_line(Path::new("/usr/libexec/tegmen/tegmen-vmm"), &spec);
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let nets: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(a, _)| *a == "--net")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            nets,
            [
                "tap=tap0_tg,mac=02:00:00:00:00:01,mtu=1450",
                "tap=tap1_tg,mac=02:00:00:00:00:02,mtu=1450"
            ]
        );
        let i = args.iter().position(|a| a == "--netns").expect("--netns");
        assert_eq!(args[i + 1], "/var/run/netns/cni-1");
        // What tegmen-vmm parses back.
        for n in nets {
            n.parse::<tegmen_vmm::devices::net::NicArg>().unwrap();
        }
    }

    #[test]
    fn links_are_read_from_proc_net_dev() {
        let text = "Inter-|   Receive                            |  Transmit\n \
                    face |bytes    packets errs drop fifo frame compressed multicast|bytes\n    \
                    lo:       0       0    0    0    0     0          0         0        0\n  \
                    eth0: 1296      16    0    0    0     0          0         0      936\n\
                    tap0_tg:       0       0    0    0    0     0          0         0        0\n";
        assert_eq!(links_of_net_dev(text), ["lo", "eth0", "tap0_tg"]);
        assert!(has_links(std::process::id(), &["lo"]));
        assert!(!has_links(std::process::id(), &["no-such-link0"]));
    }
}
