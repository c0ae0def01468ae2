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

/// Set in the environment of the re-executed agent once the root is no
/// longer the initramfs.
const ROOT_SWITCHED_ENV: &str = "TEGMEN_ROOT_SWITCHED";

/// Moves PID 1 off the initramfs onto a tmpfs root, then re-executes it.
///
/// The initramfs is the root of the mount tree, and pivot_root(2) refuses
/// to move away from it, so containers could only be chroot-ed (runc's
/// `--no-pivot`). On a tmpfs moved over `/` they get a real pivot_root.
/// Returns only when the switch has already happened (or on error).
pub fn switch_root_off_initramfs() -> Result<()> {
    if std::env::var_os(ROOT_SWITCHED_ENV).is_some() {
        return Ok(());
    }
    let new_root = Path::new("/newroot");
    std::fs::create_dir_all(new_root).context("creating /newroot")?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("mounting a tmpfs on /newroot")?;
    for dir in ["dev", "proc", "sys", "run", "tmp", "etc"] {
        std::fs::create_dir_all(new_root.join(dir)).with_context(|| format!("creating /newroot/{dir}"))?;
    }
    std::fs::copy("/init", new_root.join("init")).context("copying /init to the new root")?;
    // The initramfs cannot be unmounted; free what it holds instead.
    let _ = std::fs::remove_file("/init");
    // The debug console's tools (busybox and its applet links), if the
    // image has them.
    move_dir_entries(Path::new("/bin"), &new_root.join("bin")).context("moving /bin to the new root")?;
    std::env::set_current_dir(new_root).context("entering /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).context("moving the new root onto /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    std::env::set_current_dir("/").context("entering the new root")?;
    let err = std::os::unix::process::CommandExt::exec(std::process::Command::new("/init").env(ROOT_SWITCHED_ENV, "1"));
    Err(err).context("re-executing /init on the new root")
}

/// Moves the regular files and symlinks of `from` (not below) to `to`,
/// which is made; nothing when `from` does not exist.
fn move_dir_entries(from: &Path, to: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", src.display()))?;
        if kind.is_symlink() {
            let target = std::fs::read_link(&src).with_context(|| format!("reading {}", src.display()))?;
            std::os::unix::fs::symlink(&target, &dst).with_context(|| format!("linking {}", dst.display()))?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        } else {
            continue;
        }
        let _ = std::fs::remove_file(&src);
    }
    Ok(())
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
    // The guest's own `lo` is up, as a node's is: a pod without a network
    // namespace of its own (hostNetwork, `ctr run --net-host`) runs here.
    if let Err(e) = crate::network::loopback_up() {
        log::warn!("bringing lo up: {e}");
    }

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

/// The builtin monitor's boot mark (`tegmen_vmm::builtin::BOOT_MARK_PORT`):
/// written once the agent serves, so the host knows when the guest was
/// ready. Under QEMU nothing listens there and the write is dropped.
const BOOT_MARK_PORT: u16 = 0x440;

/// Writes the boot mark. Best effort: without I/O port access (not PID 1
/// of a VM) nothing is written.
pub fn signal_boot_mark() {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm changes this thread's I/O permission bitmap only.
        if unsafe { libc::ioperm(u64::from(BOOT_MARK_PORT), 1, 1) } != 0 {
            log::debug!("boot mark: ioperm: {}", std::io::Error::last_os_error());
            return;
        }
        // SAFETY: one byte to an I/O port this thread may now use; the
        // instruction touches no memory.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") BOOT_MARK_PORT, in("al") 1u8, options(nomem, nostack, preserves_flags));
        }
        // SAFETY: as above, giving the port up again.
        unsafe { libc::ioperm(u64::from(BOOT_MARK_PORT), 1, 0) };
    }
}
