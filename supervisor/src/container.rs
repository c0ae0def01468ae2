//! Containers in a running sandbox: their host mounts below the share and
//! their creation and removal in the guest.
//!
//! A sandbox holds any number of containers. [`Sandbox::add_container`]
//! bind-mounts a container's rootfs on `shared/<part>/rootfs` and the n-th
//! host bind mount of its spec on `shared/<part>/mounts/<n>`, then has the
//! agent create it on `/run/tegmen/shared/<part>/rootfs`. The part is
//! `<id>`, but for an id used before in this sandbox: that one gets
//! `<id>.<n>`, a name never used before. The guest caches the entries of
//! the share (up to the fs cache policy's timeout), so a container removed
//! and added again under the same id must not meet its predecessor's
//! cached, now stale, entries (its old rootfs). The share is a
//! *shared* mount on the host and the file system backends hold *slave*
//! copies of it (see `tegmen_vmm::devices::fs::sandbox`), so mounts made
//! after the VM booted reach the guest at once, while the backends stay
//! confined to the share. [`Sandbox::remove_container`] removes the
//! container in the guest and unmounts its part; the sandbox goes on.
//!
//! A read-only rootfs is bound and made read-only away from the share
//! first (`staging/`, a private place), then moved below it: the
//! propagated copies are clones of the mount as it is attached, so they
//! are read-only too (a remount after attaching would not propagate).

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tegmen_agent_api::agent::CreateContainerRequest;
use tegmen_agent_api::GUEST_SHARED_DIR;

use crate::sandbox::{mounts_below, now_secs, unmount_below, validate_id, ContainerEntry, Sandbox};
use crate::{Error, Result};

/// One host bind mount of a spec, to be made below the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// Index into the spec's `mounts`.
    pub index: usize,
    pub source: PathBuf,
    /// `ro` in its options: read-only on the host too, so that the guest
    /// (whose kernel may ignore the flag) cannot write through the share.
    pub readonly: bool,
}

/// What a sandbox needs to add one container.
#[derive(Debug, Clone)]
pub struct NewContainer<'a> {
    pub id: &'a str,
    /// The root file system on the host, absolute.
    pub rootfs: &'a Path,
    pub readonly: bool,
    /// The spec's host bind mounts; the n-th is bound on
    /// `<share>/<part>/mounts/<n>` and the guest spec's source is set there.
    pub binds: &'a [HostBind],
    /// The spec as the guest gets it, but for the binds' sources.
    pub guest_spec: serde_json::Value,
    /// Mount points of the spec's mounts, made in a read-only rootfs
    /// before it is made read-only, as runc makes them in the bundle.
    pub mount_destinations: Vec<(String, bool)>,
    pub terminal: bool,
    /// False: the container's stdin is at EOF from the start.
    pub stdin: bool,
    /// The bundle it comes from, recorded in `state.json`.
    pub bundle: Option<PathBuf>,
    /// A host cgroup of its own, beside the VM's (a pod's app container,
    /// as runc would make it: found by whoever looks, empty).
    pub cgroup: Option<crate::cgroup::CgroupRequest>,
}

/// A container added to a sandbox.
#[derive(Debug, Clone)]
pub struct AddedContainer {
    /// Its init's pid in the guest.
    pub guest_pid: i32,
    /// The host mount points made for it, outermost first.
    pub mounts: Vec<PathBuf>,
    /// Its part of the share on the host (`shared/<id>`, or `<id>.<n>`).
    pub share: PathBuf,
}

impl Sandbox {
    /// Mounts the container's file systems below the share and creates it
    /// in the guest, stopped before its process runs. On any error the
    /// mounts are undone.
    pub fn add_container(&mut self, c: &NewContainer) -> Result<AddedContainer> {
        validate_id(c.id)?;
        let reused = self.state().retired_shares.iter().any(|r| r == c.id);
        let part = if reused {
            format!("{}.{}", c.id, self.state().shares_made)
        } else {
            c.id.to_string()
        };
        self.update_state(|s| s.shares_made += 1)?;
        let mut guest_spec = c.guest_spec.clone();
        for (n, b) in c.binds.iter().enumerate() {
            guest_spec["mounts"][b.index]["source"] = format!("{GUEST_SHARED_DIR}/{part}/mounts/{n}").into();
        }
        let host_cgroup = c.cgroup.as_ref().map(|r| r.create()).transpose()?;
        let shared = self.shared_dir();
        let staging = self.dir().join("staging");
        let mut mounts = Vec::new();
        let made = mount_container(&shared.join(&part), &staging, c, &mut mounts);
        let created = made.and_then(|()| {
            self.agent().create_container(&CreateContainerRequest {
                container_id: c.id.into(),
                spec_json: guest_spec.to_string(),
                rootfs: format!("{part}/rootfs"),
                terminal: c.terminal,
                stdin: c.stdin,
                ..Default::default()
            })
        });
        match created {
            Ok(guest_pid) => {
                let entry = ContainerEntry {
                    id: c.id.to_string(),
                    bundle: c.bundle.clone(),
                    created: now_secs(),
                    host_cgroup,
                    share: part.clone(),
                };
                self.update_state(|s| s.containers.push(entry))?;
                Ok(AddedContainer {
                    guest_pid,
                    mounts,
                    share: shared.join(part),
                })
            }
            Err(e) => {
                unmount_container(&shared.join(&part));
                let _ = self.update_state(|s| s.retire_share(c.id));
                if let Some(cg) = host_cgroup {
                    let _ = cg.remove();
                }
                Err(e)
            }
        }
    }

    /// Removes container `id` in the guest (killing what is left of it)
    /// and unmounts its part of the share. The mounts go even when the
    /// guest refuses, so nothing of the container stays on the host.
    pub fn remove_container(&mut self, id: &str) -> Result<()> {
        validate_id(id)?;
        let removed = self.agent().remove_container(id, true);
        let entry = self.state().containers.iter().find(|c| c.id == id).cloned();
        let part = self.shared_dir().join(entry.as_ref().map_or(id, |c| c.share_part()));
        let unmounted = unmount_container(&part);
        let cgroup = entry.and_then(|c| c.host_cgroup);
        let cgroup_removed = cgroup.map_or(Ok(()), |c| c.remove());
        self.update_state(|s| {
            s.containers.retain(|c| c.id != id);
            s.retire_share(id);
        })?;
        removed?;
        cgroup_removed?;
        if unmounted {
            Ok(())
        } else {
            Err(Error::Hypervisor(format!(
                "container {id}: {} could not be removed",
                part.display()
            )))
        }
    }
}

/// Unmounts everything below a container's part of the share and removes
/// it; true when nothing is left.
pub fn unmount_container(dir: &Path) -> bool {
    unmount_below(dir);
    if mounts_below(dir).is_empty() {
        // Never recurse into a file system still mounted below.
        let _ = std::fs::remove_dir_all(dir);
    }
    !dir.exists()
}

fn sys(what: String) -> impl FnOnce(nix::Error) -> Error {
    move |e| Error::io("mounting", what, std::io::Error::from(e))
}

/// Makes the container's mounts in its part of the share, `top`; each
/// mount point made is pushed to `made`.
fn mount_container(top: &Path, staging: &Path, c: &NewContainer, made: &mut Vec<PathBuf>) -> Result<()> {
    let rootfs = top.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| Error::io("creating", &rootfs, e))?;
    if !c
        .mount_destinations
        .iter()
        .any(|(d, _)| Path::new(d) == Path::new("/dev"))
    {
        make_dev_entries(c.rootfs, &c.guest_spec["linux"]["devices"]);
    }
    if c.readonly {
        make_mount_points(c.rootfs, &c.mount_destinations);
        bind_readonly(c.rootfs, &rootfs, &staging.join(c.id))?;
    } else {
        bind(c.rootfs, &rootfs).map_err(sys(format!("{} on {}", c.rootfs.display(), rootfs.display())))?;
    }
    made.push(rootfs);
    for (n, b) in c.binds.iter().enumerate() {
        let target = top.join("mounts").join(n.to_string());
        let parent = target.parent().expect("has a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
        make_point_like(&b.source, &target)?;
        if b.readonly {
            bind_readonly(&b.source, &target, &staging.join(format!("{}-{n}", c.id)))?;
        } else {
            bind(&b.source, &target).map_err(sys(format!("{} on {}", b.source.display(), target.display())))?;
        }
        made.push(target);
    }
    Ok(())
}

/// A mount point for `source` at `point`: a directory, or an empty file.
fn make_point_like(source: &Path, point: &Path) -> Result<()> {
    let made = if source.is_dir() {
        std::fs::create_dir(point)
    } else {
        std::fs::File::create(point).map(drop)
    };
    made.map_err(|e| Error::io("creating", point, e))
}

/// Binds `source` read-only on `target`, in the share, so that the
/// backends' copies of it are read-only too: a flag set by a remount does
/// not propagate to them, so the bind is made read-only on `stage`, a
/// point outside the share, and then moved into place (a move reaches
/// them as a new mount, flags and all). The guest's kernel is no party
/// to it: not even its root writes through.
fn bind_readonly(source: &Path, target: &Path, stage: &Path) -> Result<()> {
    let staging = stage.parent().expect("a stage has a parent");
    std::fs::create_dir_all(staging).map_err(|e| Error::io("creating", staging, e))?;
    // A point left by a supervisor that died here goes first (it is empty).
    let _ = std::fs::remove_dir(stage).or_else(|_| std::fs::remove_file(stage));
    make_point_like(source, stage)?;
    let staged = bind(source, stage)
        .map_err(sys(format!("{} on {}", source.display(), stage.display())))
        .and_then(|()| remount_readonly(stage).map_err(sys(format!("{} read-only", stage.display()))))
        .and_then(|()| {
            mount(Some(stage), target, None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(sys(format!(
                "moving {} to {}",
                stage.display(),
                target.display()
            )))
        });
    if staged.is_err() {
        let _ = umount2(stage, MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir(stage).or_else(|_| std::fs::remove_file(stage));
    let _ = std::fs::remove_dir(staging);
    staged
}

/// The mount points of a spec's mounts: (destination, is a file bind).
pub fn mount_destinations(spec: &serde_json::Value) -> Vec<(String, bool)> {
    let Some(mounts) = spec["mounts"].as_array() else {
        return Vec::new();
    };
    mounts
        .iter()
        .filter_map(|m| {
            let dest = m["destination"].as_str()?;
            let file = m["source"]
                .as_str()
                .is_some_and(|s| Path::new(s).is_absolute() && Path::new(s).is_file());
            Some((dest.to_string(), file))
        })
        .collect()
}

/// Creates each destination below `rootfs` that does not exist yet:
/// directories, or an empty file for a bind mount of a file. A destination
/// whose existing part passes through a symlink is left to the guest
/// (resolving it on the host could leave the rootfs).
fn make_mount_points(rootfs: &Path, destinations: &[(String, bool)]) {
    for (dest, file) in destinations {
        let parts: Vec<_> = Path::new(dest)
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(p) => Some(p),
                _ => None,
            })
            .collect();
        let mut at = rootfs.to_path_buf();
        for (i, part) in parts.iter().enumerate() {
            at.push(part);
            let last = i + 1 == parts.len();
            match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.file_type().is_symlink() => break,
                Ok(_) => continue,
                Err(_) if last && *file => {
                    let _ = std::fs::File::create(&at);
                }
                Err(_) => {
                    if std::fs::create_dir(&at).is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// The device nodes every container gets (runc's and libcontainer's
/// defaults): (name below /dev, major, minor), all character devices 0666.
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// What runc leaves in the `/dev` of a rootfs whose spec mounts nothing
/// there, made before the rootfs is bound (and made read-only), as runc
/// makes it (the guest makes no device nodes on the share: its
/// libcontainer makes them in an overlay in guest memory): the
/// directory, the default device nodes and the spec's `linux.devices`, the
/// `fd`, `stdin`, `stdout`, `stderr`, `core` and `ptmx` links. What exists
/// is kept; a `/dev` that is not a directory (a symlink) is left alone.
fn make_dev_entries(rootfs: &Path, devices: &serde_json::Value) {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let dev = rootfs.join("dev");
    if std::fs::symlink_metadata(&dev).is_err() {
        let _ = std::fs::create_dir(&dev);
    }
    if !std::fs::symlink_metadata(&dev).is_ok_and(|m| m.is_dir()) {
        return;
    }
    struct Node {
        rel: PathBuf,
        kind: SFlag,
        major: u64,
        minor: u64,
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    }
    let mut nodes: Vec<Node> = DEFAULT_DEVICES
        .iter()
        .map(|(n, major, minor)| Node {
            rel: PathBuf::from(n),
            kind: SFlag::S_IFCHR,
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: None,
            gid: None,
        })
        .collect();
    for d in devices.as_array().into_iter().flatten() {
        let Some(rel) = d["path"].as_str().and_then(|p| p.strip_prefix("/dev/")) else {
            continue;
        };
        let kind = match d["type"].as_str() {
            Some("c") | Some("u") => SFlag::S_IFCHR,
            Some("b") => SFlag::S_IFBLK,
            Some("p") => SFlag::S_IFIFO,
            _ => continue,
        };
        let rel = PathBuf::from(rel);
        if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            continue;
        }
        nodes.retain(|n| n.rel != rel);
        let num = |k: &str| d[k].as_u64();
        nodes.push(Node {
            rel,
            kind,
            major: num("major").unwrap_or(0),
            minor: num("minor").unwrap_or(0),
            mode: num("fileMode").map_or(0o666, |m| m as u32 & 0o7777),
            uid: num("uid").map(|u| u as u32),
            gid: num("gid").map(|g| g as u32),
        });
    }
    for Node {
        rel,
        kind,
        major,
        minor,
        mode,
        uid,
        gid,
    } in nodes
    {
        let path = dev.join(&rel);
        if std::fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        // Parents of a nested node (/dev/net/tun), never through a symlink.
        let mut at = dev.clone();
        let mut ok = true;
        for part in rel.parent().into_iter().flat_map(|p| p.components()) {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => ok = false,
                Err(_) => ok = std::fs::create_dir(&at).is_ok(),
            }
            if !ok {
                break;
            }
        }
        if !ok {
            continue;
        }
        let perm = Mode::from_bits_truncate(mode);
        if mknod(&path, kind, perm, makedev(major, minor)).is_ok() {
            // mknod applies the umask; runc's nodes have the mode asked for.
            let _ = nix::sys::stat::fchmodat(None, &path, perm, nix::sys::stat::FchmodatFlags::NoFollowSymlink);
            if uid.is_some() || gid.is_some() {
                let _ = nix::unistd::fchownat(
                    None,
                    &path,
                    uid.map(nix::unistd::Uid::from_raw),
                    gid.map(nix::unistd::Gid::from_raw),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                );
            }
        }
    }
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
        ("pts/ptmx", "ptmx"),
    ];
    if Path::new("/proc/kcore").exists() {
        links.push(("/proc/kcore", "core"));
    }
    for (target, name) in links {
        let path = dev.join(name);
        if std::fs::symlink_metadata(&path).is_err() {
            let _ = std::os::unix::fs::symlink(target, &path);
        }
    }
}

fn bind(source: &Path, target: &Path) -> nix::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
}

fn remount_readonly(target: &Path) -> nix::Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
}

/// Makes `dir` a mount point of its own with shared propagation, so that
/// mounts made below it later reach the backends' slave copies.
pub fn make_shared_mount(dir: &Path) -> Result<()> {
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys(format!("{} on itself", dir.display())))?;
    mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED, None::<&str>).map_err(|e| {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        sys(format!("{} shared", dir.display()))(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_made_inside_the_rootfs_only() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("hostfile");
        std::fs::write(&file, b"x").unwrap();
        let rootfs = root.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, rootfs.join("escape")).unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/data/deep", "type": "bind", "source": "/srv"},
            {"destination": "/etc/hosts", "type": "bind", "source": file.to_str().unwrap()},
            {"destination": "/escape/tmp/x", "type": "tmpfs", "source": "tmpfs"},
        ]});
        make_mount_points(&rootfs, &mount_destinations(&spec));
        assert!(rootfs.join("data/deep").is_dir());
        assert!(rootfs.join("etc/hosts").is_file());
        assert!(!outside.join("tmp").exists(), "nothing made through the symlink");
        assert!(
            std::fs::symlink_metadata(rootfs.join("escape"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "the symlink is left alone"
        );
    }
}
