//! The container's record, `container.json` in its sandbox directory
//! (`<root>/sandboxes/<id>/`), and its status computed live from it: the
//! monitor or the VM gone means `stopped`, whatever the record says.
//! Updates are read-modify-write under an `flock` on `container.lock`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::config::Config;
use crate::process::ProcessRecord;
use crate::sandbox::{self, Layout};

const RECORD: &str = "container.json";
const LOCK: &str = "container.lock";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub oci_version: String,
    pub bundle: PathBuf,
    /// The rootfs on the host, absolute (runc's `rootfs` in `state`).
    pub rootfs: PathBuf,
    /// RFC 3339 with nanoseconds.
    pub created: String,
    pub annotations: BTreeMap<String, String>,
    /// The spec's `process`, the base of `exec` without `--process`.
    pub process: serde_json::Value,
    pub terminal: bool,
    /// The init's host monitor, once it is ready.
    pub monitor: Option<ProcessRecord>,
    pub started: bool,
    pub paused: bool,
    /// The init's exit status, once the monitor has seen it.
    pub exit_code: Option<i32>,
    /// Host mount points this container made (rootfs and bind mounts).
    pub mounts: Vec<PathBuf>,
    /// The spec's runtime-namespace hooks, run on the host (`poststart`
    /// at start and `poststop` at delete need them after the bundle may be
    /// gone).
    #[serde(default)]
    pub hooks: serde_json::Value,
}

impl ContainerRecord {
    /// The OCI state a hook reads on stdin.
    pub fn hook_state(&self, status: Status) -> serde_json::Value {
        super::hooks::state(
            &self.oci_version,
            &self.id,
            status.as_str(),
            pid(status, Some(self)),
            &self.bundle.display().to_string(),
            &serde_json::to_value(&self.annotations).unwrap_or_default(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// The directory of container `id` (its sandbox's).
pub fn container_dir(config: &Config, id: &str) -> PathBuf {
    Layout::new(config, id).dir
}

/// True if anything (even a half-made sandbox) uses `id`.
pub fn exists(config: &Config, id: &str) -> bool {
    container_dir(config, id).exists()
}

/// The record, `None` while `create` has not written it yet; an error
/// naming the id when there is no such container at all.
pub fn load(config: &Config, id: &str) -> Result<Option<ContainerRecord>> {
    let dir = container_dir(config, id);
    let path = dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| Error::io("parsing", &path, std::io::Error::other(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("state.json").exists() {
                Ok(None)
            } else {
                Err(Error::NotExist(id.to_string()))
            }
        }
        Err(e) => Err(Error::io("reading", &path, e)),
    }
}

/// The record of a container that must exist and be fully created.
pub fn load_existing(config: &Config, id: &str) -> Result<ContainerRecord> {
    load(config, id)?.ok_or_else(|| Error::State(format!("container {id} is still being created")))
}

pub fn save(config: &Config, rec: &ContainerRecord) -> Result<()> {
    let dir = container_dir(config, &rec.id);
    let _lock = lock(&dir)?;
    write(&dir, rec)
}

fn write(dir: &Path, rec: &ContainerRecord) -> Result<()> {
    let path = dir.join(RECORD);
    let tmp = dir.join(format!(".{RECORD}.{}", std::process::id()));
    let text = serde_json::to_vec_pretty(rec).expect("the record serializes");
    std::fs::write(&tmp, text).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming", &path, e))
}

/// Changes the record under the lock.
pub fn update(config: &Config, id: &str, change: impl FnOnce(&mut ContainerRecord)) -> Result<ContainerRecord> {
    let dir = container_dir(config, id);
    let _lock = lock(&dir)?;
    let mut rec = load_existing(config, id)?;
    change(&mut rec);
    write(&dir, &rec)?;
    Ok(rec)
}

struct Lock(std::fs::File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn lock(dir: &Path) -> Result<Lock> {
    let path = dir.join(LOCK);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotExist(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => Error::io("opening", &path, e),
        })?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io("locking", &path, std::io::Error::last_os_error()));
    }
    Ok(Lock(f))
}

/// The status, computed live.
pub fn status(config: &Config, id: &str, rec: Option<&ContainerRecord>) -> Status {
    let dir = container_dir(config, id);
    let Some(rec) = rec else {
        // `create` is still booting, or died doing so (its sandbox then
        // has a dead owner, or none).
        let creating = sandbox::read_state(&dir)
            .ok()
            .and_then(|s| s.owner)
            .is_some_and(|o| o.is_alive());
        return if creating { Status::Creating } else { Status::Stopped };
    };
    if rec.exit_code.is_some() {
        return Status::Stopped;
    }
    let Some(monitor) = &rec.monitor else {
        return Status::Creating;
    };
    if !monitor.is_alive() || !sandbox::vm_alive(&dir) {
        return Status::Stopped;
    }
    if rec.paused {
        Status::Paused
    } else if rec.started {
        Status::Running
    } else {
        Status::Created
    }
}

/// runc's `state` output, its fields in runc's order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateJson {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub bundle: String,
    pub rootfs: String,
    pub created: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The pid callers see: the monitor's, 0 once stopped or before it exists.
fn pid(status: Status, rec: Option<&ContainerRecord>) -> i32 {
    match (status, rec.and_then(|r| r.monitor.as_ref())) {
        (Status::Stopped, _) | (_, None) => 0,
        (_, Some(m)) => m.pid,
    }
}

/// runc's `state` output.
pub fn state_json(config: &Config, id: &str, rec: Option<&ContainerRecord>) -> StateJson {
    let status = status(config, id, rec);
    let pid = pid(status, rec);
    StateJson {
        oci_version: rec.map(|r| r.oci_version.clone()).unwrap_or_default(),
        id: id.to_string(),
        pid,
        status: status.as_str().to_string(),
        bundle: rec.map(|r| r.bundle.display().to_string()).unwrap_or_default(),
        rootfs: rec.map(|r| r.rootfs.display().to_string()).unwrap_or_default(),
        created: rec
            .map(|r| r.created.clone())
            .unwrap_or_else(|| super::log::rfc3339(0, 0)),
        owner: String::new(),
        annotations: rec.map(|r| r.annotations.clone()).unwrap_or_default(),
    }
}

/// Every container id under the root.
pub fn list_ids(config: &Config) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(config.sandboxes_dir()) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    ids.sort();
    ids
}
