//! `create` (and the first half of `run`): boot the container's VM with its
//! rootfs and host bind mounts below the share, create the container in
//! the guest, record it, start its monitor, write `--pid-file`.
//!
//! Host mounts (made before the VM's file system backend starts, see
//! [`Sandbox::create_prepared`]): the rootfs is bind-mounted (`MS_BIND |
//! MS_REC`, read-only when `root.readonly`) on `<sandbox>/shared/<id>/rootfs`,
//! the n-th host bind mount of the spec on `<sandbox>/shared/<id>/mounts/<n>`.
//! Everything made is removed again on any error.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Instant;

use nix::mount::{mount, MsFlags};
use tegmen_agent_api::agent::CreateContainerRequest;

use super::bundle::{Bundle, HostBind};
use super::hooks;
use super::monitor::{self, MonitorArgs};
use super::store::{self, ContainerRecord, Status};
use super::{log, validate_id, Error, Globals, Result};
use crate::process::ProcessRecord;
use crate::sandbox::{Sandbox, SandboxOptions};

#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub preserve_fds: u32,
    /// The monitor gets a session of its own (everything but attached `run`).
    pub detach: bool,
}

/// Creates the container; returns its monitor (a child of this process).
pub fn create(globals: &Globals, opts: &CreateOptions) -> Result<Child> {
    let id = opts.id.as_str();
    validate_id(id)?;
    if store::exists(&globals.config, id) {
        return Err(Error::Exists(id.to_string()));
    }
    let bundle = Bundle::load(&opts.bundle)?;
    if bundle.terminal && opts.console_socket.is_none() && opts.detach {
        return Err(Error::Spec(
            "cannot allocate tty if runc will detach without setting console socket".into(),
        ));
    }
    if !bundle.terminal && opts.console_socket.is_some() {
        return Err(Error::Spec(
            "cannot use console socket if runc will not detach or allocate tty".into(),
        ));
    }
    let binds = bundle.host_binds();
    for b in &binds {
        if std::fs::symlink_metadata(&b.source).is_err() {
            return Err(Error::MissingFile(b.source.clone()));
        }
    }
    let mut config = globals.config.clone();
    let (memory, vcpus) = bundle.vm_size(&config.guest);
    config.guest.memory_mib = memory;
    config.guest.vcpus = vcpus;
    log::debug(&format!("create {id}: VM of {memory} MiB and {vcpus} vCPU(s)"));

    let mut mounts = Vec::new();
    let t0 = Instant::now();
    let sandbox = Sandbox::create_prepared(
        &config,
        id,
        &SandboxOptions {
            owned_by_current_process: true,
        },
        &mut |shared| mount_all(shared, id, &bundle, &binds, &mut mounts),
    )
    .map_err(|e| match e {
        crate::Error::SandboxExists(_) => Error::Exists(id.to_string()),
        crate::Error::InvalidId { .. } => Error::InvalidId(id.to_string()),
        other => Error::Supervisor(other),
    })?;

    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json: bundle.guest_spec(id, &binds).to_string(),
        rootfs: format!("{id}/rootfs"),
        terminal: bundle.terminal,
        stdin: true,
        ..Default::default()
    };
    let booted = t0.elapsed();
    log::phase("vm-setup", booted - sandbox.boot_time() + sandbox.spawn_time());
    log::phase("guest-boot", sandbox.boot_time() - sandbox.spawn_time());
    let t1 = Instant::now();
    sandbox.agent().create_container(&req)?;
    log::phase("container-create", t1.elapsed());
    let t2 = Instant::now();
    let record = ContainerRecord {
        id: id.to_string(),
        oci_version: bundle.oci_version(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: log::rfc3339_now(true),
        annotations: bundle.annotations(),
        process: bundle.spec["process"].clone(),
        terminal: bundle.terminal,
        monitor: None,
        started: false,
        paused: false,
        exit_code: None,
        mounts,
        hooks: bundle.host_hooks(),
    };
    store::save(&globals.config, &record)?;
    let args = MonitorArgs {
        id: id.to_string(),
        exec_id: String::new(),
        terminal: bundle.terminal,
        console_socket: opts.console_socket.clone(),
    };
    let mut child = monitor::spawn(globals, &args, opts.preserve_fds, opts.detach)?;
    let finish = || -> Result<()> {
        let rec = ProcessRecord::of("monitor", child.id() as i32)
            .ok_or_else(|| Error::Sys(format!("the monitor of {id} exited at once")))?;
        let rec = store::update(&globals.config, id, |r| r.monitor = Some(rec))?;
        // The container exists in its VM, its process waits for `start`.
        let state = rec.hook_state(Status::Creating);
        hooks::run(&rec.hooks, "prestart", &state)?;
        hooks::run(&rec.hooks, "createRuntime", &state)?;
        if let Some(p) = &opts.pid_file {
            write_pid_file(p, child.id())?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    sandbox.detach()?;
    log::phase("monitor", t2.elapsed());
    Ok(child)
}

/// Mounts the rootfs and the host binds below `shared`; every mount point
/// made is pushed to `made`.
fn mount_all(
    shared: &Path,
    id: &str,
    bundle: &Bundle,
    binds: &[HostBind],
    made: &mut Vec<PathBuf>,
) -> crate::Result<()> {
    let sys = |what: String, e: nix::Error| crate::Error::io("mounting", what, std::io::Error::from(e));
    let rootfs = shared.join(id).join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| crate::Error::io("creating", &rootfs, e))?;
    bind(&bundle.rootfs, &rootfs)
        .map_err(|e| sys(format!("{} on {}", bundle.rootfs.display(), rootfs.display()), e))?;
    made.push(rootfs.clone());
    if bundle.readonly {
        // The guest cannot make mount points in a read-only share: make
        // them now, as runc makes them in the bundle's rootfs.
        make_mount_points(&bundle.rootfs, &bundle.spec);
        remount_readonly(&rootfs).map_err(|e| sys(format!("{} read-only", rootfs.display()), e))?;
    }
    for (n, b) in binds.iter().enumerate() {
        let target = shared.join(id).join("mounts").join(n.to_string());
        let parent = target.parent().expect("has a parent");
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io("creating", parent, e))?;
        let made_target = if b.source.is_dir() {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        };
        made_target.map_err(|e| crate::Error::io("creating", &target, e))?;
        bind(&b.source, &target).map_err(|e| sys(format!("{} on {}", b.source.display(), target.display()), e))?;
        made.push(target);
    }
    Ok(())
}

/// Creates the destination of every spec mount below `rootfs` that does
/// not exist yet: directories, or an empty file for a bind mount of a file.
/// A destination whose existing part passes through a symlink is left to
/// the guest (resolving it on the host could leave the rootfs).
fn make_mount_points(rootfs: &Path, spec: &serde_json::Value) {
    let Some(mounts) = spec["mounts"].as_array() else {
        return;
    };
    for m in mounts {
        let Some(dest) = m["destination"].as_str() else {
            continue;
        };
        let file = m["source"]
            .as_str()
            .is_some_and(|s| Path::new(s).is_absolute() && Path::new(s).is_file());
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
                Err(_) if last && file => {
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

/// Writes `pid` to `path` atomically, as runc does.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("reading", ".", e))?
            .join(path)
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}"));
    std::fs::write(&tmp, pid.to_string()).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming", &path, e))
}
