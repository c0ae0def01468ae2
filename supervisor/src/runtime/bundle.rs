//! The bundle: `config.json` read and checked as runc checks it, the host
//! paths it names (rootfs, bind-mount sources), the spec rewritten for the
//! guest (bind sources become paths on the share), and the VM's size.
//!
//! Sizing: memory is `linux.resources.memory.limit` plus
//! [`MEMORY_OVERHEAD_MIB`] for the guest kernel, the agent and page cache,
//! never below the configured default; vCPUs are `ceil(quota / period)`
//! of `linux.resources.cpu`, at least 1, else the configured default.

use std::path::{Path, PathBuf};

use super::{Error, Result};
use crate::config::GuestConfig;

/// Memory the VM gets on top of the container's memory limit.
pub const MEMORY_OVERHEAD_MIB: u64 = 128;

pub struct Bundle {
    /// Absolute.
    pub dir: PathBuf,
    pub spec: serde_json::Value,
    /// The rootfs on the host, absolute.
    pub rootfs: PathBuf,
    pub readonly: bool,
    pub terminal: bool,
}

pub use crate::container::HostBind;

impl Bundle {
    /// Reads `<dir>/config.json` (dir relative to the current directory),
    /// for a container that is a VM of its own (`tegmen`).
    pub fn load(dir: &Path) -> Result<Bundle> {
        Bundle::load_pod_member(dir)
    }

    /// As [`Bundle::load`], for a container of a pod: its namespace paths
    /// name the pod's namespaces and are mapped into the guest by the shim.
    pub fn load_pod_member(dir: &Path) -> Result<Bundle> {
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io("reading", ".", e))?
                .join(dir)
        };
        // runc's words: it changes into the bundle, then reads the spec.
        let dir = std::fs::canonicalize(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Spec(format!("chdir {}: no such file or directory", dir.display())),
            _ => Error::io("resolving the bundle", &dir, e),
        })?;
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Spec("JSON specification file config.json not found".into()),
            _ => Error::io("open", &path, e),
        })?;
        Bundle::parse(dir, &text, &path)
    }

    /// The bundle at `dir` (absolute, resolved) whose `config.json`, read
    /// from `path`, holds `text`.
    pub fn parse(dir: PathBuf, text: &[u8], path: &Path) -> Result<Bundle> {
        let spec: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| Error::Spec(format!("parsing {}: {e}", path.display())))?;
        Bundle::from_spec(dir, spec, path)
    }

    fn from_spec(dir: PathBuf, spec: serde_json::Value, path: &Path) -> Result<Bundle> {
        let bad = |msg: String| Err(Error::Spec(format!("{}: {msg}", path.display())));
        if !spec.is_object() {
            return bad("not a JSON object".into());
        }
        if !spec["ociVersion"].is_string() {
            return bad("\"ociVersion\" must be a string".into());
        }
        let process = &spec["process"];
        if !process.is_object() {
            return bad("\"process\" is missing".into());
        }
        let args_ok = process["args"]
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x.is_string()));
        if !args_ok {
            return bad("\"process.args\" must be a non-empty list of strings".into());
        }
        let Some(root) = spec["root"]["path"].as_str().filter(|s| !s.is_empty()) else {
            return bad("\"root.path\" is missing".into());
        };
        if !spec["mounts"].is_null() && !spec["mounts"].is_array() {
            return bad("\"mounts\" must be a list".into());
        }
        let rootfs = if Path::new(root).is_absolute() {
            PathBuf::from(root)
        } else {
            dir.join(root)
        };
        if !rootfs.is_dir() {
            return Err(Error::Spec(format!("rootfs ({}) does not exist", rootfs.display())));
        }
        super::hooks::validate(&spec["hooks"]).map_err(|m| Error::Spec(format!("{}: {m}", path.display())))?;
        Ok(Bundle {
            readonly: spec["root"]["readonly"].as_bool().unwrap_or(false),
            terminal: spec["process"]["terminal"].as_bool().unwrap_or(false),
            dir,
            spec,
            rootfs,
        })
    }

    pub fn oci_version(&self) -> String {
        self.spec["ociVersion"].as_str().unwrap_or_default().to_string()
    }

    pub fn annotations(&self) -> std::collections::BTreeMap<String, String> {
        self.spec["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The spec's bind mounts of host paths.
    pub fn host_binds(&self) -> Vec<HostBind> {
        let Some(mounts) = self.spec["mounts"].as_array() else {
            return Vec::new();
        };
        mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| is_bind(m))
            .filter_map(|(index, m)| {
                let source = m["source"].as_str()?;
                Path::new(source).is_absolute().then(|| HostBind {
                    index,
                    source: PathBuf::from(source),
                    readonly: is_readonly(m),
                })
            })
            .collect()
    }

    /// The spec the agent gets (the sandbox sets the host binds' sources
    /// to their places on the share when it adds the container).
    /// The runtime-namespace hooks are left out: they run on the host.
    pub fn guest_spec(&self) -> serde_json::Value {
        let mut spec = self.spec.clone();
        super::hooks::take_host_hooks(&mut spec);
        spec
    }

    /// The hooks that run on the host ([`super::hooks::HOST_PHASES`]).
    pub fn host_hooks(&self) -> serde_json::Value {
        super::hooks::take_host_hooks(&mut self.spec.clone())
    }

    /// (memory MiB, vCPUs) of the VM.
    pub fn vm_size(&self, defaults: &GuestConfig) -> (u32, u32) {
        vm_size(&self.spec, defaults)
    }
}

/// The network namespace a spec names by path (CNI's or podman's), but
/// runc's placeholder for "not known yet" (`/proc/0/ns/net`).
pub fn network_namespace_path(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty() && *p != "/proc/0/ns/net")
        .map(PathBuf::from)
}

/// The guest spec of a container whose VM took over a network namespace:
/// it runs in the guest's own, where the NICs are.
pub fn join_guest_network(guest_spec: &mut serde_json::Value) {
    if let Some(ns) = guest_spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
}

fn is_bind(m: &serde_json::Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// A mount whose options end read-only (the last of `ro` and `rw` wins,
/// as with mount(8)).
fn is_readonly(m: &serde_json::Value) -> bool {
    m["options"]
        .as_array()
        .and_then(|o| o.iter().rev().find(|x| *x == "ro" || *x == "rw"))
        .is_some_and(|x| x == "ro")
}

/// (memory MiB, vCPUs) of a VM for a container with `spec`.
pub fn vm_size_of(spec: &serde_json::Value, defaults: &GuestConfig) -> (u32, u32) {
    vm_size(spec, defaults)
}

fn vm_size(spec: &serde_json::Value, defaults: &GuestConfig) -> (u32, u32) {
    let resources = &spec["linux"]["resources"];
    let memory = resources["memory"]["limit"]
        .as_i64()
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20) + MEMORY_OVERHEAD_MIB)
        .map(|m| m.clamp(u64::from(defaults.memory_mib), 1024 * 1024) as u32)
        .unwrap_or(defaults.memory_mib);
    let quota = resources["cpu"]["quota"].as_i64().filter(|q| *q > 0);
    let period = resources["cpu"]["period"]
        .as_u64()
        .filter(|p| *p > 0)
        .unwrap_or(100_000);
    let vcpus = quota
        .map(|q| (q as u64).div_ceil(period).clamp(1, 255) as u32)
        .unwrap_or(defaults.vcpus);
    (memory, vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(spec: serde_json::Value) -> Result<Bundle> {
        let dir = std::env::temp_dir();
        Bundle::from_spec(dir.clone(), spec, &dir.join("config.json"))
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "/"}})
    }

    #[test]
    fn sizes_follow_the_resources() {
        let d = GuestConfig::default();
        let mut s = minimal();
        assert_eq!(vm_size(&s, &d), (d.memory_mib, d.vcpus));
        s["linux"]["resources"] =
            serde_json::json!({"memory": {"limit": 512u64 << 20}, "cpu": {"quota": 150000, "period": 100000}});
        assert_eq!(vm_size(&s, &d), (512 + 128, 2));
        s["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16u64 << 20}, "cpu": {"quota": 1000}});
        assert_eq!(vm_size(&s, &d), (d.memory_mib, 1), "never below the default");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut s = minimal();
        s.as_object_mut().unwrap().remove("process");
        let e = bundle(s).err().unwrap().to_string();
        assert!(e.contains("\"process\""), "{e}");
        let mut s = minimal();
        s["root"]["path"] = "no-such-rootfs".into();
        let e = bundle(s).err().unwrap().to_string();
        assert!(e.contains("rootfs") && e.contains("does not exist"), "{e}");
        let mut s = minimal();
        s["linux"]["namespaces"] = serde_json::json!([{"type": "network", "path": "/proc/1/ns/net"}]);
        assert!(bundle(s.clone()).is_ok(), "a spec may name namespaces");
        assert_eq!(network_namespace_path(&s), Some(PathBuf::from("/proc/1/ns/net")));
        let mut g = s.clone();
        join_guest_network(&mut g);
        assert_eq!(g["linux"]["namespaces"], serde_json::json!([]));
        s["linux"]["namespaces"] = serde_json::json!([{"type": "network", "path": "/proc/0/ns/net"}, {"type": "pid"}]);
        assert_eq!(network_namespace_path(&s), None, "runc's placeholder");
        s["linux"]["namespaces"] = serde_json::json!([{"type": "network"}]);
        assert_eq!(
            network_namespace_path(&s),
            None,
            "a fresh one: loopback only in the guest"
        );
    }

    #[test]
    fn host_binds_are_the_bind_mounts() {
        let mut s = minimal();
        s["mounts"] = serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data"},
            {"destination": "/etc/hosts", "type": "none", "source": "/tmp/hosts", "options": ["rbind", "ro"]},
            {"destination": "/rw", "type": "bind", "source": "/srv/rw", "options": ["ro", "rbind", "rw"]},
        ]);
        let b = bundle(s).unwrap();
        let binds = b.host_binds();
        assert_eq!(binds.iter().map(|b| b.index).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(binds[0].source, Path::new("/srv/data"));
        assert_eq!(binds[1].source, Path::new("/tmp/hosts"));
        assert_eq!(
            binds.iter().map(|b| b.readonly).collect::<Vec<_>>(),
            [false, true, false]
        );
    }
}
