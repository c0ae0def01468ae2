//! Checks and completes the OCI documents the agent is given (a container's
//! config.json, an exec's process object) before libcontainer sees them, so
//! a bad document is refused with an error naming the field, and the few
//! things the agent decides itself (the rootfs, the terminal, the cgroup)
//! are set in it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};

use super::ContainerError;

/// Where containers' cgroups go when the spec names none: `/tegmen/<id>`
/// below the cgroup v2 root.
const DEFAULT_CGROUP_PARENT: &str = "/tegmen";

/// The cgroup v2 root libcontainer uses.
pub(super) const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Container ids as runc and libcontainer accept them.
pub(super) fn validate_id(id: &str) -> Result<(), ContainerError> {
    let valid = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(ContainerError::InvalidArgument(format!(
            "invalid container id {id:?}: use 1 to 1024 of a-z A-Z 0-9 _ + - . (not . or ..)"
        )))
    }
}

/// A container's config.json made ready for libcontainer.
pub(super) struct Prepared {
    pub spec: Spec,
    /// The container's cgroup directory (below [`CGROUP_ROOT`]).
    pub cgroup_dir: PathBuf,
}

pub(super) fn prepare_container(
    id: &str,
    spec_json: &str,
    rootfs: &Path,
    terminal: bool,
) -> Result<Prepared, ContainerError> {
    let mut spec: Spec =
        serde_json::from_str(spec_json).map_err(|e| ContainerError::InvalidSpec(format!("config.json: {e}")))?;
    if !spec.version().starts_with("1.") {
        return Err(ContainerError::InvalidSpec(format!(
            "ociVersion {:?}: only 1.x.y is supported",
            spec.version()
        )));
    }
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| ContainerError::InvalidSpec("process: missing".into()))?;
    check_process(process, "process")?;
    process.set_terminal(Some(terminal));

    let rootfs = rootfs
        .canonicalize()
        .map_err(|e| ContainerError::io(format!("rootfs {}", rootfs.display()), e))?;
    if !rootfs.is_dir() {
        return Err(ContainerError::InvalidArgument(format!(
            "rootfs {}: not a directory",
            rootfs.display()
        )));
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs);
    spec.set_root(Some(root));

    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| ContainerError::InvalidSpec("linux: missing (only Linux containers are supported)".into()))?;
    if let Some(namespaces) = linux.namespaces() {
        for ns in namespaces {
            if let Some(path) = ns.path() {
                check_namespace_path(path)?;
            }
        }
    }
    let cgroups_path = match linux.cgroups_path() {
        Some(p) if !p.as_os_str().is_empty() => p.clone(),
        _ => PathBuf::from(format!("{DEFAULT_CGROUP_PARENT}/{id}")),
    };
    if cgroups_path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ContainerError::InvalidSpec(format!(
            "linux.cgroupsPath {:?}: must not contain '..'",
            cgroups_path
        )));
    }
    if cgroups_path.to_string_lossy().contains(':') && !cgroups_path.is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "linux.cgroupsPath {:?}: systemd cgroup paths (slice:prefix:name) are not supported; \
             give a path like /tegmen/{id}",
            cgroups_path
        )));
    }
    linux.set_cgroups_path(Some(cgroups_path.clone()));
    if let Some(resources) = linux.resources_mut() {
        super::cgroup::convert_io_weight(resources);
    }
    let relative = cgroups_path.strip_prefix("/").unwrap_or(&cgroups_path);
    let cgroup_dir = Path::new(CGROUP_ROOT).join(relative);
    Ok(Prepared { spec, cgroup_dir })
}

/// The propagation each spec mount asks for in its options (`shared`,
/// `rslave`, ...), as (destination, mount flags): runc sets it on the
/// mount once it is made, and so does the agent (libcontainer leaves it).
pub(super) fn mount_propagation(spec: &Spec) -> Vec<(PathBuf, libc::c_ulong)> {
    let mut out = Vec::new();
    for m in spec.mounts().iter().flatten() {
        for o in m.options().iter().flatten() {
            let flags = match o.as_str() {
                "shared" => libc::MS_SHARED,
                "rshared" => libc::MS_SHARED | libc::MS_REC,
                "slave" => libc::MS_SLAVE,
                "rslave" => libc::MS_SLAVE | libc::MS_REC,
                "private" => libc::MS_PRIVATE,
                "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
                "unbindable" => libc::MS_UNBINDABLE,
                "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
                _ => continue,
            };
            out.push((m.destination().clone(), flags));
        }
    }
    out
}

/// In a forked helper: enters the mount namespace of the created (not yet
/// started) init `pid`, whose root is the container's, and sets each
/// mount's propagation.
pub(super) fn apply_mount_propagation(
    pid: i32,
    mounts: &[(PathBuf, libc::c_ulong)],
) -> Result<(), super::error::Failure> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let fail = |what: String| super::error::Failure::other(format!("{what}: {}", std::io::Error::last_os_error()));
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| super::error::Failure::other(format!("/proc/{pid}/ns/mnt: {e}")))?;
    // SAFETY: setns on a namespace fd we own, in a single-threaded helper.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(fail(format!("entering the mount namespace of {pid}")));
    }
    for (dest, flags) in mounts {
        let target = std::ffi::CString::new(dest.as_os_str().as_bytes())
            .map_err(|_| super::error::Failure::other(format!("mount {}: NUL in the path", dest.display())))?;
        // SAFETY: a propagation change: only the target string is read.
        let r = unsafe {
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                *flags,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(fail(format!("setting the propagation of mount {}", dest.display())));
        }
    }
    Ok(())
}

/// A namespace to join must be another process's in this guest,
/// `/proc/<pid>/ns/<name>`: a pod's containers join its sandbox
/// container's namespaces that way. Paths of the host (a CNI netns under
/// `/var/run/netns`) mean nothing in the guest and are refused.
fn check_namespace_path(path: &Path) -> Result<(), ContainerError> {
    let text = path.to_string_lossy();
    let ok = text
        .strip_prefix("/proc/")
        .and_then(|rest| rest.split_once("/ns/"))
        .is_some_and(|(pid, name)| {
            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty() && !name.contains('/')
        });
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidSpec(format!(
            "linux.namespaces: {text}: only /proc/<pid>/ns/<name> of a process in this guest can be joined"
        )))
    }
}

/// An exec's OCI process object made ready for libcontainer.
pub(super) fn prepare_process(process_json: &str, terminal: bool) -> Result<Process, ContainerError> {
    let mut process: Process =
        serde_json::from_str(process_json).map_err(|e| ContainerError::InvalidSpec(format!("process: {e}")))?;
    check_process(&process, "process")?;
    process.set_terminal(Some(terminal));
    Ok(process)
}

fn check_process(process: &Process, field: &str) -> Result<(), ContainerError> {
    match process.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => {}
        _ => {
            return Err(ContainerError::InvalidSpec(format!(
                "{field}.args: must name the program to run"
            )))
        }
    }
    if let Some(bad) = process
        .args()
        .iter()
        .flatten()
        .chain(process.env().iter().flatten())
        .find(|s| s.contains('\0'))
    {
        return Err(ContainerError::InvalidSpec(format!(
            "{field}: {bad:?} contains a NUL byte"
        )));
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "{field}.cwd {:?}: must be an absolute path",
            process.cwd()
        )));
    }
    if let Some(env) = process.env() {
        if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
            return Err(ContainerError::InvalidSpec(format!(
                "{field}.env: {bad:?} is not KEY=VALUE"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids() {
        assert!(super::validate_id("abc-1.2_3+x").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "é"] {
            assert!(super::validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_bad_processes() {
        let err = super::prepare_process(r#"{"user":{"uid":0,"gid":0},"cwd":"/","args":[]}"#, false).unwrap_err();
        assert!(err.to_string().contains("process.args"), "{err}");
        let err = super::prepare_process(r#"{"user":{"uid":0,"gid":0},"cwd":"rel","args":["sh"]}"#, false).unwrap_err();
        assert!(err.to_string().contains("process.cwd"), "{err}");
        let err = super::prepare_process(
            r#"{"user":{"uid":0,"gid":0},"cwd":"/","args":["sh"],"env":["NOEQ"]}"#,
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("process.env"), "{err}");
        let err = super::prepare_process(r#"{"user":{"uid":0,"gid":0},"cwd":"/","args":"sh"}"#, false).unwrap_err();
        assert!(matches!(err, super::ContainerError::InvalidSpec(_)), "{err}");
        let p = super::prepare_process(r#"{"user":{"uid":0,"gid":0},"cwd":"/","args":["sh"]}"#, true).unwrap();
        assert_eq!(p.terminal(), Some(true));
    }
}
