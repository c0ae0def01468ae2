//! Tegmen's virtual machine monitor pieces.
//!
//! Each virtio device is written once, against `vm-memory` and
//! `virtio-queue`, in [`devices`]. The same device code is reachable two
//! ways: served to an external VMM (QEMU) as a vhost-user backend, in
//! [`vhost_user`], and — once the builtin monitor lands — inline on its
//! virtio-mmio bus.

pub mod builtin;
pub mod devices;
pub mod privileges;
pub mod seccomp;
pub mod unix_path;
pub mod vhost_user;

/// The log set-up of Tegmen's VMM processes (`tegmen-vmm` and the
/// vhost-user backends): `RUST_LOG`, `info` by default, to stderr, each line
/// with its UTC time in microseconds (`supervisor logs` merges the logs of a
/// sandbox by it).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .format_timestamp_micros()
        .init();
}
