//! `create` (and the first half of `run`): boot the container's VM, add the
//! container to it (its rootfs and host bind mounts below the share, then
//! the container in the guest: [`Sandbox::add_container`]), record it,
//! start its monitor, write `--pid-file`. Everything made is removed again
//! on any error.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Instant;

use super::bundle::Bundle;
use super::hooks;
use super::monitor::{self, MonitorArgs};
use super::store::{self, ContainerRecord, Status};
use super::{log, validate_id, Error, Globals, Result};
use crate::container::{self, NewContainer};
use crate::process::ProcessRecord;
use crate::sandbox::{Face, Sandbox, SandboxOptions};

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
    // runc's order: the spec, the id, then whether it is taken.
    let bundle = Bundle::load(&opts.bundle)?;
    validate_id(id)?;
    if store::exists(&globals.config, id) {
        return Err(Error::Exists(id.to_string()));
    }
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
    let cgroup = crate::cgroup::vm_request(
        &bundle.spec,
        id,
        globals.systemd_cgroup,
        (memory, vcpus),
        config.guest.host_overhead_mib,
    )?;

    // A network namespace by path (podman's, CNI's): the VM takes over
    // its interfaces and the container runs in the guest's own namespace.
    let netns = super::bundle::network_namespace_path(&bundle.spec);
    let t0 = Instant::now();
    let mut sandbox = Sandbox::create(
        &config,
        id,
        &SandboxOptions {
            owned_by_current_process: true,
            face: Face::Tegmen,
            cgroup: Some(cgroup),
            nics: Vec::new(),
            netns: netns.clone(),
        },
    )
    .map_err(|e| match e {
        crate::Error::SandboxExists(_) => Error::Exists(id.to_string()),
        crate::Error::InvalidId { .. } => Error::InvalidId(id.to_string()),
        other => Error::Supervisor(other),
    })?;
    let booted = t0.elapsed();
    log::phase("vm-setup", booted - sandbox.boot_time() + sandbox.spawn_time());
    log::phase("guest-boot", sandbox.boot_time() - sandbox.spawn_time());
    let t1 = Instant::now();
    let mut guest_spec = bundle.guest_spec();
    if netns.is_some() {
        super::bundle::join_guest_network(&mut guest_spec);
    }
    if globals.systemd_cgroup {
        // The guest knows no systemd: its cgroup is the path systemd's
        // form stands for.
        let host_path = sandbox.host_cgroup().map(|c| c.path.display().to_string());
        guest_spec["linux"]["cgroupsPath"] = host_path.unwrap_or_else(|| format!("/tegmen/{id}")).into();
    }
    let added = sandbox.add_container(&NewContainer {
        id,
        rootfs: &bundle.rootfs,
        readonly: bundle.readonly,
        binds: &binds,
        guest_spec,
        mount_destinations: container::mount_destinations(&bundle.spec),
        terminal: bundle.terminal,
        stdin: true,
        bundle: Some(bundle.dir.clone()),
        cgroup: None,
    })?;
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
        mounts: added.mounts,
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
        // The container's init on the host, as runc's is: in its cgroup.
        if let Some(cg) = sandbox.host_cgroup() {
            cg.add(child.id() as i32)?;
        }
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
