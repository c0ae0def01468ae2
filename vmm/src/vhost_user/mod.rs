//! vhost-user backends: the devices of [`crate::devices`] served to an
//! external VMM over a vhost-user socket.

pub mod fs;
pub mod net;
mod relay;
pub mod vsock;
