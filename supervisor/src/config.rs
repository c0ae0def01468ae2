//! The configuration file, `/etc/tegmen/config.toml` by default.
//!
//! Every key is optional and Tegmen works without the file. Example:
//!
//! ```toml
//! hypervisor = "auto"          # auto | qemu | builtin
//! hardware_virtualization = "auto"   # auto | yes | no: overrides /proc/cpuinfo
//! root = "/run/tegmen"
//! seccomp = "kill"             # kill | log | off: the syscall allow-lists of the VM's host processes
//!
//! [guest]
//! kernel = "/usr/share/tegmen/vmlinux"
//! initramfs = "/usr/share/tegmen/initramfs.cpio.gz"
//! memory_mib = 256
//! vcpus = 1
//! kernel_params = ""
//! boot_timeout_secs = 60
//! host_overhead_mib = 256      # host memory of a VM beyond its guest RAM (its host cgroup's memory limit)
//! debug_console = false        # `supervisor exec ID -- CMD` may run programs in the guest
//!
//! [qemu]
//! path = "qemu-system-x86_64"
//! sandbox = true               # QEMU's own -sandbox filter while seccomp = "kill"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tegmen/config.toml";
pub const DEFAULT_ROOT: &str = "/run/tegmen";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorChoice {
    #[default]
    Auto,
    Qemu,
    Builtin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Override {
    #[default]
    Auto,
    Yes,
    No,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub hypervisor: HypervisorChoice,
    pub hardware_virtualization: Override,
    pub root: PathBuf,
    /// The syscall allow-lists of the processes that serve a guest (the
    /// vhost-user backends): `kill` (default) ends a process at a syscall
    /// off its list, `log` only logs it (to find what a list lacks), `off`
    /// is for debugging.
    pub seccomp: tegmen_vmm::seccomp::Mode,
    pub guest: GuestConfig,
    pub qemu: QemuConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel_params: String,
    pub boot_timeout_secs: u64,
    /// Host memory a VM's processes need beyond its guest RAM (QEMU or
    /// tegmen-vmm with TCG's code cache, the backends, the monitor): with a
    /// container memory limit, the VM's host cgroup gets guest RAM plus this.
    pub host_overhead_mib: u32,
    /// Lets `supervisor exec` run programs in the guest outside every
    /// container (the agent refuses otherwise). Off by default: it is a way
    /// into every sandbox booted with it.
    pub debug_console: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub path: String,
    /// QEMU's own syscall filter (`-sandbox on`, denying obsolete calls,
    /// privilege changes, spawning and resource control) while `seccomp`
    /// is `kill`; off for a QEMU built without seccomp support.
    pub sandbox: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hypervisor: HypervisorChoice::Auto,
            hardware_virtualization: Override::Auto,
            root: PathBuf::from(DEFAULT_ROOT),
            seccomp: tegmen_vmm::seccomp::Mode::Kill,
            guest: GuestConfig::default(),
            qemu: QemuConfig::default(),
        }
    }
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: None,
            initramfs: None,
            memory_mib: 256,
            vcpus: 1,
            kernel_params: String::new(),
            boot_timeout_secs: 60,
            host_overhead_mib: 256,
            debug_console: false,
        }
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            path: "qemu-system-x86_64".into(),
            sandbox: true,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default path gives the defaults,
    /// a missing file named explicitly is an error.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => return Ok(Config::default()),
            Err(e) => return Err(Error::io("reading configuration", path, e)),
        };
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.message().to_string() + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                msg,
            })
        };
        if !(64..=1024 * 1024).contains(&self.guest.memory_mib) {
            return bad(format!(
                "guest.memory_mib = {} is outside 64..=1048576",
                self.guest.memory_mib
            ));
        }
        if !(1..=255).contains(&self.guest.vcpus) {
            return bad(format!("guest.vcpus = {} is outside 1..=255", self.guest.vcpus));
        }
        if self.guest.boot_timeout_secs == 0 {
            return bad("guest.boot_timeout_secs must be at least 1".into());
        }
        if !self.root.is_absolute() {
            return bad(format!("root = {:?} must be an absolute path", self.root));
        }
        Ok(())
    }

    /// Where sandboxes live: `<root>/sandboxes`.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c.hypervisor, HypervisorChoice::Auto);
        assert_eq!(c.guest.memory_mib, 256);
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(c.seccomp, tegmen_vmm::seccomp::Mode::Kill);
    }

    #[test]
    fn the_seccomp_switch_is_read_and_checked() {
        use tegmen_vmm::seccomp::Mode;
        for (text, mode) in [("kill", Mode::Kill), ("log", Mode::Log), ("off", Mode::Off)] {
            let c = Config::parse(&format!("seccomp = \"{text}\"\n"), Path::new("x.toml")).unwrap();
            assert_eq!(c.seccomp, mode);
        }
        let e = Config::parse("seccomp = \"on\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("on") && e.contains("kill"), "{e}");
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "hypervisor = \"qemu\"\nhardware_virtualization = \"no\"\n[guest]\nmemory_mib = 512\nvcpus = 2\n[qemu]\npath = \"/opt/qemu\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.hypervisor, HypervisorChoice::Qemu);
        assert_eq!(c.hardware_virtualization, Override::No);
        assert_eq!(c.guest.memory_mib, 512);
        assert_eq!(c.guest.vcpus, 2);
        assert_eq!(c.qemu.path, "/opt/qemu");
        assert!(c.qemu.sandbox, "on by default");
        let c = Config::parse("[qemu]\nsandbox = false\n", Path::new("x.toml")).unwrap();
        assert!(!c.qemu.sandbox);
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let e = Config::parse("hypervisor = \"xen\"\n", Path::new("/etc/t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/t.toml") && e.contains("xen"), "{e}");
        let e = Config::parse("[guest]\nmemroy_mib = 1\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("memroy_mib"), "{e}");
        let e = Config::parse("[guest]\nvcpus = 0\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("guest.vcpus"), "{e}");
        let e = Config::parse("root = \"rel\"\n", Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }

    #[test]
    fn missing_default_file_is_fine_but_missing_named_file_is_not() {
        let e = Config::load(Some(Path::new("/nonexistent/tegmen.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/tegmen.toml"), "{e}");
    }
}
