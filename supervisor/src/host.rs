//! What this host offers a sandbox: hardware virtualization, KVM, QEMU.
//!
//! "Can KVM run a Linux guest" is decided by the `vmx`/`svm` CPU flags, never
//! by `/dev/kvm` existing: some hosts expose a KVM API that only runs guests
//! built for it (instructions are emulated one by one), where a Linux boot
//! never finishes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What `/proc/cpuinfo` says about hardware virtualization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwVirt {
    IntelVmx,
    AmdSvm,
    None,
}

impl HwVirt {
    pub fn present(self) -> bool {
        self != HwVirt::None
    }
}

pub fn hardware_virtualization() -> HwVirt {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    hw_virt_from_cpuinfo(&text)
}

pub fn hw_virt_from_cpuinfo(text: &str) -> HwVirt {
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return HwVirt::IntelVmx,
                "svm" => return HwVirt::AmdSvm,
                _ => {}
            }
        }
    }
    HwVirt::None
}

pub fn kvm_device_present() -> bool {
    Path::new("/dev/kvm").exists()
}

/// Looks a program up on `PATH` (or takes it as is when it has a slash).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The first line of `qemu --version`, e.g. "QEMU emulator version 7.2.19".
pub fn qemu_version(qemu: &Path) -> Option<String> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_decide_hardware_virtualization() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n";
        let amd = "flags\t\t: fpu svm\n";
        let none = "flags\t\t: fpu sse2 hypervisor\nvmx flags\t: ept\n";
        assert_eq!(hw_virt_from_cpuinfo(intel), HwVirt::IntelVmx);
        assert_eq!(hw_virt_from_cpuinfo(amd), HwVirt::AmdSvm);
        // "vmx flags" is a different line: only the `flags` line counts.
        assert_eq!(hw_virt_from_cpuinfo(none), HwVirt::None);
        assert_eq!(hw_virt_from_cpuinfo(""), HwVirt::None);
    }

    #[test]
    fn find_program_takes_paths_and_searches_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("/nonexistent/qemu").is_none());
        assert!(find_program("tegmen-no-such-program").is_none());
    }
}
