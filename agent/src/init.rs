//! PID 1's set-up of the guest: the base file systems every container
//! runtime expects (/proc, /sys, /dev, /run, cgroup v2) and the sandbox's
//! shared directory, mounted from virtio-fs.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use tegmen_agent_api::{GUEST_SHARED_DIR, SHARED_FS_TAG};

struct BaseMount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

fn base_mounts() -> [BaseMount; 7] {
    [
        BaseMount {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        BaseMount {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        BaseMount {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        BaseMount {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
            data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        },
        BaseMount {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: NOSUID_NODEV_NOEXEC,
            data: Some("mode=1777"),
        },
        BaseMount {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
            data: Some("mode=0755"),
        },
        BaseMount {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
    ]
}

pub fn setup_guest() -> Result<()> {
    for m in base_mounts() {
        std::fs::create_dir_all(m.target).with_context(|| format!("creating {}", m.target))?;
        mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data)
            .with_context(|| format!("mounting {} ({}) on {}", m.source, m.fstype, m.target))?;
    }
    if !Path::new("/dev/ptmx").exists() {
        std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").context("linking /dev/ptmx")?;
    }
    // All cgroup v2 controllers the kernel has are made available to the
    // containers' cgroups below the root.
    enable_cgroup_controllers();

    std::fs::create_dir_all(GUEST_SHARED_DIR).with_context(|| format!("creating {GUEST_SHARED_DIR}"))?;
    mount(
        Some(SHARED_FS_TAG),
        GUEST_SHARED_DIR,
        Some("virtiofs"),
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        None::<&str>,
    )
    .with_context(|| format!("mounting the virtio-fs share '{SHARED_FS_TAG}' on {GUEST_SHARED_DIR}"))?;
    log::info!("guest file systems ready, share '{SHARED_FS_TAG}' on {GUEST_SHARED_DIR}");
    Ok(())
}

fn enable_cgroup_controllers() {
    let Ok(available) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") else {
        return;
    };
    let enable: Vec<String> = available.split_whitespace().map(|c| format!("+{c}")).collect();
    if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" ")) {
        log::warn!("enabling cgroup controllers {available:?}: {e}");
    }
}
