//! vhost-user backends: the devices of [`crate::devices`] served to an
//! external VMM over a vhost-user socket.

pub mod fs;
pub mod net;
mod relay;
pub mod stats;
pub mod vsock;

use std::io;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// Runs `f` on the vring's queue if it is ready, then signals the guest if
/// `f` says so.
pub(crate) fn with_queue(vring: &VringRwLock, f: impl FnOnce(&mut Queue) -> bool) -> io::Result<()> {
    let signal = {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return Ok(());
        }
        f(queue)
    };
    if signal {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// The worker's exit event, for `VhostUserBackendMut::exit_event`.
pub(crate) fn exit_event(device: &str) -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            log::error!("{device}: cannot create the worker exit event: {e}");
            None
        }
    }
}
