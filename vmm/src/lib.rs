//! Tegmen's virtual machine monitor pieces.
//!
//! Each virtio device is written once, against `vm-memory` and
//! `virtio-queue`, in [`devices`]. The same device code is reachable two
//! ways: served to an external VMM (QEMU) as a vhost-user backend, in
//! [`vhost_user`], and — once the builtin monitor lands — inline on its
//! virtio-mmio bus.

pub mod builtin;
pub mod devices;
pub mod unix_path;
pub mod vhost_user;
