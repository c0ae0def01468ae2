//! A pod member's OCI spec, mapped for the guest.
//!
//! - **Which pod.** A container belongs to the pod named by its
//!   `io.kubernetes.cri.sandbox-id` annotation; without it (plain `ctr
//!   run`) it is a pod of its own whose id is the container's.
//! - **Namespaces.** CRI names the pod's namespaces in app containers as
//!   `/proc/<task pid>/ns/<name>`, and the task pid it gets is the shim's:
//!   such a path means "the sandbox container's namespace in the guest" and
//!   becomes `/proc/<sandbox init's guest pid>/ns/<name>`. The sandbox
//!   container's own network namespace path (CNI's `/var/run/netns/cni-…`)
//!   is the VM's: its interfaces are wired to the guest's NICs, so the
//!   sandbox container runs in the guest's own network namespace, where
//!   they are (and the pod's other containers join it). Any other host
//!   namespace path is refused.
//! - **cgroups.** The host's `cgroupsPath` (cgroupfs or systemd form) is
//!   the VM's business on the host; in the guest each container gets
//!   `/tegmen/<pod>/<container>`.
//! - **VM size.** `io.tegmen.vm.memory_mib` / `io.tegmen.vm.vcpus` on the
//!   sandbox container (reached through containerd's `pod_annotations`),
//!   else the spec's limits as `tegmen` sizes a VM, else the configured
//!   default.
//! - **Loopback.** A sandbox container with a new network namespace of
//!   its own (no path: `ctr run`) gets `lo` up there
//!   ([`LOOPBACK_ANNOTATION`]), as CNI's loopback plugin does on a node;
//!   the guest's own namespace (a pod's with CNI, a hostNetwork pod's)
//!   has it up from boot.

use crate::config::GuestConfig;

pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
pub const MEMORY_ANNOTATION: &str = "io.tegmen.vm.memory_mib";
pub const VCPUS_ANNOTATION: &str = "io.tegmen.vm.vcpus";
/// Asks the agent to bring `lo` up in a container's new network namespace.
pub const LOOPBACK_ANNOTATION: &str = "io.tegmen.guest.loopback";
/// Bounds of the VM-size annotations.
pub const MEMORY_RANGE_MIB: (u32, u32) = (64, 256 * 1024);
pub const VCPUS_RANGE: (u32, u32) = (1, 64);

fn annotation<'a>(spec: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    spec["annotations"][key].as_str()
}

/// The pod a container with this spec belongs to.
pub fn pod_id(container_id: &str, spec: &serde_json::Value) -> String {
    annotation(spec, SANDBOX_ID_ANNOTATION)
        .filter(|s| !s.is_empty())
        .unwrap_or(container_id)
        .to_string()
}

/// True for the container that makes the pod (CRI's sandbox container,
/// or a container without a pod annotation).
pub fn is_sandbox_container(container_id: &str, spec: &serde_json::Value) -> bool {
    match annotation(spec, CONTAINER_TYPE_ANNOTATION) {
        Some("sandbox") => true,
        Some(_) => false,
        None => pod_id(container_id, spec) == container_id,
    }
}

/// The VM's (memory MiB, vCPUs) for the pod whose sandbox container has
/// `spec`. A malformed or out-of-range annotation is an error naming it.
pub fn vm_size(spec: &serde_json::Value, defaults: &GuestConfig) -> Result<(u32, u32), String> {
    let (mut memory, mut vcpus) = crate::runtime::bundle::vm_size_of(spec, defaults);
    let parse = |key: &str, (lo, hi): (u32, u32)| -> Result<Option<u32>, String> {
        let Some(text) = annotation(spec, key) else {
            return Ok(None);
        };
        let value: u32 = text
            .trim()
            .parse()
            .map_err(|_| format!("annotation {key}={text:?}: not a whole number"))?;
        if !(lo..=hi).contains(&value) {
            return Err(format!("annotation {key}={value}: must be between {lo} and {hi}"));
        }
        Ok(Some(value))
    };
    if let Some(m) = parse(MEMORY_ANNOTATION, MEMORY_RANGE_MIB)? {
        memory = m;
    }
    if let Some(v) = parse(VCPUS_ANNOTATION, VCPUS_RANGE)? {
        vcpus = v;
    }
    Ok((memory, vcpus))
}

/// Rewrites `spec` (already the guest spec: bind sources on the share) for
/// the guest; see the module docs. `shim_pid` is the pid the shim gave
/// containerd; `sandbox_guest_pid` the sandbox container's init in the
/// guest (None for the sandbox container itself).
pub fn map_for_guest(
    spec: &mut serde_json::Value,
    pod: &str,
    container_id: &str,
    shim_pid: u32,
    sandbox_guest_pid: Option<i32>,
) -> Result<(), String> {
    let pod_prefix = format!("/proc/{shim_pid}/ns/");
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        for ns in namespaces.iter_mut() {
            let Some(path) = ns["path"].as_str().filter(|p| !p.is_empty()).map(str::to_string) else {
                continue;
            };
            let kind = ns["type"].as_str().unwrap_or_default().to_string();
            if let Some(name) = path.strip_prefix(&pod_prefix) {
                let Some(guest_pid) = sandbox_guest_pid else {
                    return Err(format!(
                        "linux.namespaces: {path}: the pod's own sandbox container cannot join the pod"
                    ));
                };
                ns["path"] = format!("/proc/{guest_pid}/ns/{name}").into();
            } else if kind == "network" && sandbox_guest_pid.is_none() {
                // The pod's netns on the host (CNI's), taken over by the
                // VM: the container runs in the guest's, with the NICs.
                *ns = serde_json::Value::Null;
            } else {
                return Err(format!(
                    "linux.namespaces: {kind} namespace {path}: only the pod's namespaces can be joined"
                ));
            }
        }
    }
    if let Some(namespaces) = spec["linux"]["namespaces"].as_array_mut() {
        namespaces.retain(|ns| !ns.is_null());
    }
    if spec["linux"].is_object() {
        spec["linux"]["cgroupsPath"] = format!("/tegmen/{pod}/{container_id}").into();
    }
    let new_network = spec["linux"]["namespaces"]
        .as_array()
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "network"));
    if sandbox_guest_pid.is_none() && new_network {
        // The pod's network namespace: its `lo` is up, as CNI leaves it.
        spec["annotations"][LOOPBACK_ANNOTATION] = "up".into();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(annotations: serde_json::Value) -> serde_json::Value {
        json!({"annotations": annotations, "linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "mount"}
        ], "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc"}})
    }

    #[test]
    fn containers_are_grouped_by_the_sandbox_annotation() {
        let s = spec(json!({SANDBOX_ID_ANNOTATION: "pod1", CONTAINER_TYPE_ANNOTATION: "container"}));
        assert_eq!(pod_id("c1", &s), "pod1");
        assert!(!is_sandbox_container("c1", &s));
        let s = spec(json!({SANDBOX_ID_ANNOTATION: "pod1", CONTAINER_TYPE_ANNOTATION: "sandbox"}));
        assert!(is_sandbox_container("pod1", &s));
        let plain = spec(json!({}));
        assert_eq!(pod_id("c1", &plain), "c1", "ctr run: a pod of its own");
        assert!(is_sandbox_container("c1", &plain));
    }

    #[test]
    fn pod_namespaces_map_to_the_sandbox_init_in_the_guest() {
        let mut s = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/proc/77/ns/net"},
            {"type": "ipc", "path": "/proc/77/ns/ipc"},
            {"type": "uts", "path": "/proc/77/ns/uts"},
            {"type": "mount"}
        ]}});
        map_for_guest(&mut s, "pod1", "c1", 77, Some(5)).unwrap();
        let ns = &s["linux"]["namespaces"];
        assert_eq!(ns[0]["path"], "/proc/5/ns/net");
        assert_eq!(ns[1]["path"], "/proc/5/ns/ipc");
        assert_eq!(ns[2]["path"], "/proc/5/ns/uts");
        assert!(ns[3].get("path").is_none());
        assert_eq!(s["linux"]["cgroupsPath"], "/tegmen/pod1/c1");
        assert!(s["annotations"].get(LOOPBACK_ANNOTATION).is_none());
    }

    #[test]
    fn the_sandbox_netns_is_the_guests_and_other_host_paths_refused() {
        let mut s = spec(json!({}));
        map_for_guest(&mut s, "pod1", "pod1", 77, None).unwrap();
        assert_eq!(s["linux"]["namespaces"], json!([{"type": "pid"}, {"type": "mount"}]));
        assert!(s["annotations"].get(LOOPBACK_ANNOTATION).is_none());
        // hostNetwork, `ctr run --net-host`: the guest's own namespace.
        let mut s = json!({"linux": {"namespaces": [{"type": "pid"}]}});
        map_for_guest(&mut s, "p2", "p2", 77, None).unwrap();
        assert_eq!(s["linux"]["namespaces"], json!([{"type": "pid"}]));
        assert!(s["annotations"].get(LOOPBACK_ANNOTATION).is_none());
        // ctr run: a new namespace of its own, with lo up.
        let mut s = json!({"linux": {"namespaces": [{"type": "network"}]}});
        map_for_guest(&mut s, "c1", "c1", 77, None).unwrap();
        assert_eq!(s["linux"]["namespaces"], json!([{"type": "network"}]));
        assert_eq!(s["annotations"][LOOPBACK_ANNOTATION], "up", "the pod's lo is up");
        let mut s = json!({"linux": {"namespaces": [{"type": "ipc", "path": "/proc/1/ns/ipc"}]}});
        let e = map_for_guest(&mut s, "pod1", "c1", 77, Some(5)).unwrap_err();
        assert!(e.contains("ipc namespace /proc/1/ns/ipc"), "{e}");
        let mut s = json!({"linux": {"namespaces": [{"type": "net", "path": "/proc/77/ns/net"}]}});
        assert!(map_for_guest(&mut s, "pod1", "pod1", 77, None).is_err());
    }

    #[test]
    fn vm_size_annotations_are_checked_and_named() {
        let d = GuestConfig::default();
        assert_eq!(vm_size(&spec(json!({})), &d).unwrap(), (d.memory_mib, d.vcpus));
        let s = spec(json!({MEMORY_ANNOTATION: "512", VCPUS_ANNOTATION: "2"}));
        assert_eq!(vm_size(&s, &d).unwrap(), (512, 2));
        for (k, v) in [
            (MEMORY_ANNOTATION, "lots"),
            (MEMORY_ANNOTATION, "1"),
            (MEMORY_ANNOTATION, "99999999999"),
            (VCPUS_ANNOTATION, "0"),
            (VCPUS_ANNOTATION, "-1"),
        ] {
            let e = vm_size(&spec(json!({k: v})), &d).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }
}
