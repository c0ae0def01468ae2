//! The `/dev` of a container whose spec mounts nothing on `/dev`.
//!
//! libcontainer makes the default device nodes, the spec's
//! `linux.devices` and the `fd`, `stdin`, `stdout`, `stderr`, `kcore` and
//! `ptmx` links in the rootfs's own `/dev`, and fails on any that exists;
//! runc keeps what exists. Here the rootfs is on the share, where the
//! guest makes no device nodes, and it holds them already: the host made
//! runc's there before it shared the rootfs (and made it read-only, for a
//! read-only one). So the agent mounts an overlay on `<rootfs>/dev` whose
//! upper layer is in guest memory (in the agent's bundle of the container),
//! removes those names in it (only links and device nodes; libcontainer
//! makes them again at once), and for a read-only rootfs makes the
//! container's `/dev` read-only once the container is created, as it is in
//! runc's. What the container writes in `/dev` stays in guest memory.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use super::ContainerError;

/// libcontainer's default devices and links, below `/dev`.
const DEFAULT_NAMES: [&str; 12] = [
    "null", "zero", "full", "random", "urandom", "tty", "fd", "stdin", "stdout", "stderr", "kcore", "ptmx",
];

/// What was done to a container's `/dev`, undone by [`DevDir::undo`].
#[derive(Debug, Default)]
pub(super) struct DevDir {
    /// The overlay's mount point (`<rootfs>/dev`).
    pub overlay: Option<PathBuf>,
    /// The rootfs is read-only: so is the container's `/dev`, once made.
    pub readonly: bool,
}

/// True when the spec mounts something on `/dev`: libcontainer then makes
/// its nodes in that mount, and the rootfs's `/dev` is left alone.
fn mounts_dev(spec: &Spec) -> bool {
    spec.mounts()
        .iter()
        .flatten()
        .any(|m| m.destination().components().eq(Path::new("/dev").components()))
}

/// The names below `/dev` libcontainer will make for `spec`.
pub(super) fn made_names(spec: &Spec) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = DEFAULT_NAMES.iter().map(PathBuf::from).collect();
    let devices = spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default();
    for d in devices {
        if let Ok(rel) = d.path().strip_prefix("/dev") {
            let plain = rel.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if plain && !rel.as_os_str().is_empty() && !names.iter().any(|n| n == rel) {
                names.push(rel.to_path_buf());
            }
        }
    }
    names
}

/// Prepares `<rootfs>/dev` for libcontainer (see the module's text);
/// `scratch` is a directory of the agent's own for the overlay's layers.
pub(super) fn prepare(spec: &Spec, scratch: &Path) -> Result<DevDir, ContainerError> {
    if mounts_dev(spec) {
        return Ok(DevDir::default());
    }
    let Some(root) = spec.root().as_ref() else {
        return Ok(DevDir::default());
    };
    let dev = root.path().join("dev");
    let Ok(meta) = std::fs::symlink_metadata(&dev) else {
        // libcontainer makes it (a read-only rootfs has it from the host).
        return Ok(DevDir::default());
    };
    if !meta.is_dir() {
        // A link out of the rootfs is libcontainer's to refuse.
        return Ok(DevDir::default());
    }
    mount_overlay(&dev, scratch)?;
    let mut done = DevDir {
        overlay: Some(dev.clone()),
        readonly: root.readonly().unwrap_or(false),
    };
    if let Err(e) = remove_made(&dev, &made_names(spec)) {
        done.undo();
        return Err(e);
    }
    Ok(done)
}

/// Removes the links and device nodes among `names` below `dev`; files and
/// directories stay (libcontainer then fails on them, naming them).
fn remove_made(dev: &Path, names: &[PathBuf]) -> Result<(), ContainerError> {
    use std::os::unix::fs::FileTypeExt;
    for name in names {
        let path = dev.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let t = meta.file_type();
        if t.is_symlink() || t.is_char_device() || t.is_block_device() || t.is_fifo() || t.is_socket() {
            std::fs::remove_file(&path).map_err(|e| {
                ContainerError::io(format!("removing {} before libcontainer makes it", path.display()), e)
            })?;
        }
    }
    Ok(())
}

fn mount_overlay(dev: &Path, scratch: &Path) -> Result<(), ContainerError> {
    let (upper, work) = (scratch.join("dev-upper"), scratch.join("dev-work"));
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| ContainerError::io(format!("creating {}", d.display()), e))?;
    }
    let bad = |p: &Path| {
        p.as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':' | b'\\'))
    };
    if [dev, &upper, &work].iter().any(|p| bad(p)) {
        return Err(ContainerError::InvalidArgument(format!(
            "{}: a read-only rootfs path with ',', ':' or '\\' cannot get a /dev overlay",
            dev.display()
        )));
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        dev.display(),
        upper.display(),
        work.display()
    );
    let c = |s: &[u8]| CString::new(s).expect("no NUL in these paths");
    let (src, target, fstype, data) = (
        c(b"overlay"),
        c(dev.as_os_str().as_bytes()),
        c(b"overlay"),
        c(data.as_bytes()),
    );
    // SAFETY: mount(2) reads the four NUL-terminated strings we own.
    let r = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
    if r != 0 {
        return Err(ContainerError::io(
            format!(
                "mounting an overlay on {} (read-only rootfs without a /dev mount)",
                dev.display()
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl DevDir {
    /// Unmounts the overlay (its layers go with the agent's bundle).
    pub(super) fn undo(&mut self) {
        if let Some(dev) = self.overlay.take() {
            let _ = nix::mount::umount2(&dev, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// In the mount namespace of the container's init `pid` (from a
/// single-threaded helper): makes its `/dev` read-only.
pub(super) fn make_readonly_in(pid: i32) -> Result<(), super::error::Failure> {
    use std::os::fd::AsRawFd;
    let fail = |what: &str| super::error::Failure::other(format!("{what}: {}", std::io::Error::last_os_error()));
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| super::error::Failure::other(format!("/proc/{pid}/ns/mnt: {e}")))?;
    // SAFETY: setns on a namespace fd we own, in a single-threaded helper.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(fail("entering the container's mount namespace"));
    }
    let target = c"/dev";
    let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
    // SAFETY: a remount of the bind at /dev: only the target string is read.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(fail("making the container's /dev read-only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn names_are_the_defaults_and_the_spec_devices() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"devices": [
                {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
                {"path": "/dev/../etc/passwd", "type": "c", "major": 1, "minor": 3},
                {"path": "/elsewhere", "type": "c", "major": 1, "minor": 3}
            ]}
        }));
        let names = made_names(&s);
        assert_eq!(names.len(), DEFAULT_NAMES.len() + 1);
        assert!(names.contains(&PathBuf::from("net/tun")));
        assert!(names.contains(&PathBuf::from("ptmx")));
    }

    #[test]
    fn existing_links_and_nodes_go_files_and_dirs_stay() {
        let dir = std::env::temp_dir().join(format!("tegmen-devdir-{}", std::process::id()));
        let dev = dir.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink("/proc/self/fd", dev.join("fd")).unwrap();
        std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")).unwrap();
        std::fs::write(dev.join("null"), b"a file the image ships").unwrap();
        std::fs::create_dir(dev.join("shm")).unwrap();
        let names: Vec<PathBuf> = ["fd", "ptmx", "null", "shm", "tty"].iter().map(PathBuf::from).collect();
        remove_made(&dev, &names).unwrap();
        assert!(std::fs::symlink_metadata(dev.join("fd")).is_err());
        assert!(std::fs::symlink_metadata(dev.join("ptmx")).is_err());
        assert!(dev.join("null").is_file());
        assert!(dev.join("shm").is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dev_mount_leaves_the_rootfs_alone() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/nonexistent-rootfs"},
            "mounts": [{"destination": "/dev/", "type": "tmpfs", "source": "tmpfs"}]
        }));
        assert!(mounts_dev(&s));
        let done = prepare(&s, Path::new("/nonexistent-scratch")).unwrap();
        assert!(done.overlay.is_none());
    }
}
