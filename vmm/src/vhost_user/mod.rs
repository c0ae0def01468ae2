//! vhost-user backends: the devices of [`crate::devices`] served to an
//! external VMM over a vhost-user socket.

pub mod fs;
pub mod net;
mod relay;
pub mod stats;
pub mod vsock;

use std::io;
use std::sync::{mpsc, Arc, Mutex};

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
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

/// How serving one front-end ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The thread serving the front-end's requests returned (a disconnect
    /// is the normal end).
    Daemon(vhost_user_backend::Result<()>),
    /// A vring worker could not handle an event. vhost-user-backend ends
    /// such a worker without telling anyone, which would leave the
    /// front-end's queues served by nobody while it waits for them.
    Worker(String),
}

/// Where a backend's `handle_event` reports a failure that ends its vring
/// worker, so that [`run_daemon`] stops serving instead of hanging on.
#[derive(Clone, Debug, Default)]
pub(crate) struct WorkerFailures(Arc<Mutex<Option<mpsc::Sender<Ended>>>>);

impl WorkerFailures {
    /// Passes `result` through; an error is logged and reported first.
    pub(crate) fn check(&self, device: &str, result: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &result {
            let msg = format!("{device}: a vring worker failed: {e}");
            log::error!("{msg}");
            if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = tx.send(Ended::Worker(msg));
            }
        }
        result
    }
}

/// Waits until the started `daemon`'s front-end goes or one of its vring
/// workers reports a failure to `failures`, whichever comes first, then
/// tells every worker to exit.
pub(crate) fn run_daemon<T>(mut daemon: VhostUserDaemon<T>, failures: &WorkerFailures) -> Ended
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
    VhostUserDaemon<T>: Send,
{
    let handlers = daemon.get_epoll_handlers();
    let (tx, rx) = mpsc::channel();
    *failures.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
    let waiter = std::thread::Builder::new().name("vhost-user".into()).spawn(move || {
        let r = daemon.wait();
        let _ = tx.send(Ended::Daemon(r));
    });
    let ended = match waiter {
        Ok(_) => rx
            .recv()
            .unwrap_or(Ended::Worker("the vhost-user waiter vanished".into())),
        Err(e) => Ended::Worker(format!("cannot start the vhost-user waiter thread: {e}")),
    };
    for handler in handlers {
        handler.send_exit_event();
    }
    ended
}

impl Ended {
    /// A disconnect (the normal end) is `Ok`; anything else is what went
    /// wrong.
    pub(crate) fn into_result(self) -> Result<(), String> {
        use vhost::vhost_user::Error as VuError;
        use vhost_user_backend::Error as DaemonError;
        match self {
            Ended::Daemon(
                Ok(()) | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)),
            ) => Ok(()),
            Ended::Daemon(Err(e)) => Err(e.to_string()),
            Ended::Worker(msg) => Err(msg),
        }
    }
}
