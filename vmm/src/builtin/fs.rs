//! The virtio-fs device hosted inline by the builtin monitor: the same
//! [`FsDevice`] `tegmen-fs-backend` serves to QEMU, behind the virtio-mmio
//! transport, its queues run by a [`Worker`] on the driver's kicks.
//!
//! Confinement: inline, the device serves from the monitor's own process,
//! which has entered its sandbox (a mount namespace whose root is the
//! sandbox directory) before the guest runs. [`jail_workers_to`] then gives
//! the device's workers a root of their own, the share itself, as the fs
//! backend's whole process has.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{copy_config, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use super::worker::{Worker, WorkerEvent};
use crate::devices::fs::{FsDevice, MAX_QUEUE_SIZE};

/// Has the workers of every inline virtio-fs device run with `share` as
/// their root and working directory, and with the file-serving
/// capabilities alone: they are started from a thread that unshares its
/// file system attributes (`CLONE_FS`: root and working directory become
/// its own, and its children's) and chroots there. Call while the process
/// may still chroot (`CAP_SYS_CHROOT`), before its threads are filtered.
/// The device's files are opened already (the share's root and
/// `/proc/self/fd`, by [`FsDevice::new`]), so nothing else is needed there.
pub fn jail_workers_to(share: std::path::PathBuf) -> Result<(), String> {
    super::worker::start_spawner("fs-spawner", vec![crate::seccomp::Kind::FsBackend], move || {
        // SAFETY: unshare with a flag only; it affects this thread alone.
        if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
            return Err(format!("unshare(CLONE_FS): {}", std::io::Error::last_os_error()));
        }
        std::os::unix::fs::chroot(&share).map_err(|e| format!("chroot {}: {e}", share.display()))?;
        std::env::set_current_dir("/").map_err(|e| format!("chdir / in {}: {e}", share.display()))?;
        crate::privileges::drop_capabilities(crate::privileges::FILE_SERVING)
    })
}

/// virtio device id of a file system.
pub const VIRTIO_ID_FS: u32 = 26;

pub struct InlineFs {
    device: Arc<FsDevice>,
    worker: Option<Worker>,
}

impl InlineFs {
    pub fn new(device: FsDevice) -> InlineFs {
        InlineFs {
            device: Arc::new(device),
            worker: None,
        }
    }

    /// Takes snapshots of the device's counters (`tegmen-vmm --stats-dir`).
    pub fn counters(&self) -> impl Fn() -> serde_json::Value + Send + 'static {
        let device = self.device.clone();
        move || crate::vhost_user::stats::counters_of(&device.stats())
    }
}

impl VirtioDevice for InlineFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![MAX_QUEUE_SIZE; self.device.num_queues()]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.device.config_space().to_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<(Queue, EventFd)>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        if queues.is_empty() {
            return Err("virtio-fs needs at least its high-priority queue".into());
        }
        self.worker = None;
        let device = self.device.clone();
        let worker = Worker::spawn(
            "virtio-fs",
            crate::seccomp::Kind::FsBackend,
            None,
            queues,
            mem,
            interrupt,
            move |event, queues, mem| {
                let WorkerEvent::Queue(index) = event else {
                    return false;
                };
                let Some(queue) = queues.get_mut(index) else {
                    return false;
                };
                device.process_queue(queue, mem).unwrap_or_else(|e| {
                    log::warn!("virtio-fs queue {index}: {e}");
                    false
                })
            },
        )?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::fs::FsConfig;

    #[test]
    fn the_config_space_carries_the_tag_and_queue_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FsConfig::new(dir.path());
        config.tag = "tegmen".into();
        let fs = InlineFs::new(FsDevice::new(config).unwrap());
        assert_eq!(fs.device_type(), 26);
        assert_eq!(
            fs.queue_max_sizes(),
            vec![1024, 1024],
            "high priority + one request queue"
        );
        let mut tag = [0u8; 8];
        fs.read_config(0, &mut tag);
        assert_eq!(&tag, b"tegmen\0\0");
        let mut n = [0u8; 4];
        fs.read_config(36, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        let mut past = [0xffu8; 4];
        fs.read_config(40, &mut past);
        assert_eq!(past, [0; 4]);
        assert_ne!(fs.features() & VIRTIO_F_VERSION_1, 0);
    }
}
