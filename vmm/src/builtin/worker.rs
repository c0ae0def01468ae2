//! The thread behind an inline virtio device: it waits (epoll) on one kick
//! per queue (the driver's notifications: a KVM ioeventfd, or the
//! transport), on the device's own host-side descriptor if it has one, and
//! on an exit event; hands each event to the device's handler, and raises
//! the interrupt when the handler used buffers.
//!
//! Under seccomp ([`confine_workers`]), workers are started by a thread of
//! their own, the spawner, that has only the monitor's process list: a
//! worker inherits its parent's filters, and a device is activated from a
//! vCPU thread, whose list starts no thread. Each worker then narrows
//! itself to its device's list before it reads a guest byte.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::seccomp::{self, Kind};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{Interrupt, INT_VRING};

const EXIT_TOKEN: u64 = u64::MAX;
const HOST_TOKEN: u64 = u64::MAX - 1;

/// What woke the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The device's host-side descriptor is readable.
    Host,
    /// The driver notified this queue (an index into the device's queues).
    Queue(usize),
}

/// How the device's host-side descriptor wakes the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// While it is readable (the handler drains what it can).
    Level,
    /// When it becomes readable: for a descriptor that may stay readable
    /// while the guest has no room (a tap), the handler then reads until
    /// it is empty or the guest is full, and kicks bring it back.
    Edge,
}

/// Something for a spawner to run.
type Job = Box<dyn FnOnce() + Send>;

/// The lists workers narrow themselves to, once [`confine_workers`] ran.
static FILTERS: OnceLock<Vec<(Kind, seccompiler::BpfProgram)>> = OnceLock::new();

/// The spawners: each with the device kinds it starts workers of (none
/// listed: any other kind).
static SPAWNERS: Mutex<Vec<(Vec<Kind>, mpsc::Sender<Job>)>> = Mutex::new(Vec::new());

/// From now on, the workers of `kinds` (none listed: of every kind no
/// other spawner takes) are started by a spawner thread named `name` that
/// first runs `setup` on itself, for what a thread's children share with
/// it and the rest of the process does not: a root and working directory
/// of their own (after `unshare(CLONE_FS)`), their own capabilities. It
/// has the filters of the calling thread, and those installed on every
/// thread later.
pub fn start_spawner(
    name: &str,
    kinds: Vec<Kind>,
    setup: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let (ready, set_up) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = setup();
            let ok = result.is_ok();
            let _ = ready.send(result);
            if ok {
                for job in queue {
                    job();
                }
            }
        })
        .map_err(|e| format!("starting {name}: {e}"))?;
    set_up
        .recv()
        .map_err(|_| format!("{name} ended while setting up"))?
        .map_err(|e| format!("{name}: {e}"))?;
    SPAWNERS.lock().unwrap_or_else(|p| p.into_inner()).push((kinds, jobs));
    Ok(())
}

/// From now on, workers are started by a spawner thread started here (so
/// it has the filters of the calling thread: call it once the process's
/// list is in force, before any thread narrows itself), and a worker of
/// device kind `k` installs `filters`' list for `k` on itself first. For a
/// process with one VM (`tegmen-vmm`); a second call is refused.
pub fn confine_workers(filters: Vec<(Kind, seccompiler::BpfProgram)>) -> Result<(), String> {
    FILTERS
        .set(filters)
        .map_err(|_| "device workers are confined already".to_string())?;
    start_spawner("spawner", Vec::new(), || Ok(()))
}

/// Starts a thread with `body`, from the spawner of `kind` if there is one.
fn start(name: &str, kind: Kind, body: impl FnOnce() + Send + 'static) -> std::io::Result<JoinHandle<()>> {
    let builder = std::thread::Builder::new().name(name.to_string());
    let spawner = {
        let spawners = SPAWNERS.lock().unwrap_or_else(|p| p.into_inner());
        spawners
            .iter()
            .find(|(kinds, _)| kinds.contains(&kind))
            .or_else(|| spawners.iter().find(|(kinds, _)| kinds.is_empty()))
            .map(|(_, jobs)| jobs.clone())
    };
    let Some(jobs) = spawner else {
        return builder.spawn(body);
    };
    let (done, started) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(builder.spawn(body));
    });
    let gone = || std::io::Error::other("the device workers' spawner is gone");
    jobs.send(job).map_err(|_| gone())?;
    started.recv().map_err(|_| gone())?
}

pub struct Worker {
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread; `handler` runs for every event and returns
    /// whether the guest must be interrupted.
    ///
    /// `kind` names the list the worker narrows itself to under
    /// [`confine_workers`]: the backend's that serves the same device.
    pub fn spawn<H>(
        name: &str,
        kind: Kind,
        host_fd: Option<(RawFd, Trigger)>,
        queues: Vec<(Queue, EventFd)>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut handler: H,
    ) -> Result<Worker, String>
    where
        H: FnMut(WorkerEvent, &mut [Queue], &GuestMemoryMmap) -> bool + Send + 'static,
    {
        let exit = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let (mut queues, kicks): (Vec<Queue>, Vec<EventFd>) = queues.into_iter().unzip();
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        let add = |fd: RawFd, token: u64, events: EventSet| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(|e| format!("epoll_ctl: {e}"))
        };
        add(exit.as_raw_fd(), EXIT_TOKEN, EventSet::IN)?;
        if let Some((fd, trigger)) = host_fd {
            let events = match trigger {
                Trigger::Level => EventSet::IN,
                Trigger::Edge => EventSet::IN | EventSet::EDGE_TRIGGERED,
            };
            add(fd, HOST_TOKEN, events)?;
        }
        for (i, k) in kicks.iter().enumerate() {
            add(k.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        let worker_kicks = kicks;
        let filter = match FILTERS.get() {
            Some(filters) => Some(
                filters
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map(|(_, prog)| prog.clone())
                    .ok_or_else(|| format!("no seccomp list for the {} worker", kind.name()))?,
            ),
            None => None,
        };
        let thread = start(name, kind, move || {
            if let Some(prog) = filter {
                // Fail closed: a worker that cannot narrow itself ends
                // the monitor rather than serve unfiltered.
                if !seccomp::apply_to_this_thread(&prog) {
                    log::error!("device worker: cannot install the {} list; stopping", kind.name());
                    std::process::abort();
                }
            }
            let mut events = vec![EpollEvent::default(); 8];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => {
                        log::error!("device worker: epoll_wait: {e}");
                        return;
                    }
                };
                let mut signal = false;
                for ev in &events[..n] {
                    let event = match ev.data() {
                        EXIT_TOKEN => return,
                        HOST_TOKEN => WorkerEvent::Host,
                        token => {
                            let index = token as usize;
                            if let Some(k) = worker_kicks.get(index) {
                                let _ = k.read();
                            }
                            WorkerEvent::Queue(index)
                        }
                    };
                    signal |= handler(event, &mut queues, &mem);
                }
                if signal {
                    interrupt.raise(INT_VRING);
                }
            }
        })
        .map_err(|e| format!("starting the device worker: {e}"))?;
        Ok(Worker {
            exit,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    /// Ends the thread and waits for it.
    fn drop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
