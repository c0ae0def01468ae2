//! Port-forward into a pod's VM.
//!
//! containerd's CRI serves `kubectl port-forward` by dialling
//! `localhost:PORT` inside the pod's network namespace on the host. With a
//! VM, the listener is in the guest, and nothing listens there on the host
//! side (Kata's gap). A [`PortMirror`] closes it: it asks the guest every
//! [`POLL`] which TCP ports something listens on, and for each one listens
//! on the same port on the namespace's loopback (127.0.0.1, and ::1 where
//! the namespace has it). Each connection is forwarded over vsock to the
//! agent, which connects to the port in the guest. A port the guest stops
//! listening on stops being mirrored.
//!
//! Bounded: at most [`MAX_MIRRORED`] ports and [`MAX_CONNECTIONS`]
//! connections at once (more are closed at once); the guest's reply is
//! checked by the agent client.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How often the guest's listening ports are asked for.
pub const POLL: Duration = Duration::from_secs(1);
/// Ports mirrored at once, at most.
pub const MAX_MIRRORED: usize = 256;
/// Forwarded connections open at once, at most.
pub const MAX_CONNECTIONS: usize = 64;

type Ports = dyn Fn() -> Result<Vec<u16>> + Send + Sync;
type Dial = dyn Fn(u16) -> Result<UnixStream> + Send + Sync;

/// One mirrored port's listeners; `closed` tells its accept threads to go
/// (a port dropped and mirrored again gets a new set).
struct Mirrored {
    listeners: Vec<TcpListener>,
    closed: Arc<AtomicBool>,
}

impl Mirrored {
    /// Wakes the accept threads: accept(2) fails on a listening socket
    /// that was shut down, and `closed` tells them it is for good.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // SAFETY: shutdown(2) on a socket we own.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

struct Inner {
    stop: AtomicBool,
    /// The mirrored ports.
    listeners: Mutex<BTreeMap<u16, Mirrored>>,
    open: AtomicUsize,
    dial: Box<Dial>,
}

/// Mirrors the guest's listening ports on a network namespace's loopback
/// until dropped.
pub struct PortMirror {
    inner: Arc<Inner>,
}

impl PortMirror {
    /// Starts mirroring in `netns` (this process's own when `None`):
    /// `ports` lists the guest's listening ports, `dial` opens a forwarded
    /// connection to one.
    pub fn start(
        netns: Option<&Path>,
        ports: impl Fn() -> Result<Vec<u16>> + Send + Sync + 'static,
        dial: impl Fn(u16) -> Result<UnixStream> + Send + Sync + 'static,
    ) -> Result<PortMirror> {
        let ns = netns
            .map(|p| {
                std::fs::File::open(p).map_err(|e| Error::Network(format!("network namespace {}: {e}", p.display())))
            })
            .transpose()?;
        let inner = Arc::new(Inner {
            stop: AtomicBool::new(false),
            listeners: Mutex::new(BTreeMap::new()),
            open: AtomicUsize::new(0),
            dial: Box::new(dial),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let poller = inner.clone();
        let ports: Box<Ports> = Box::new(ports);
        std::thread::Builder::new()
            .name("port-mirror".into())
            .spawn(move || {
                // This thread's binds (and its accept threads) are in the
                // pod's namespace.
                if let Some(ns) = &ns {
                    if let Err(e) = nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
                        let _ = ready_tx.send(Err(Error::Network(format!("entering the network namespace: {e}"))));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(()));
                poll_loop(&poller, &*ports);
            })
            .map_err(|e| Error::Network(format!("starting the port mirror: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| Error::Network("the port mirror thread ended".into()))??;
        Ok(PortMirror { inner })
    }

    /// The ports mirrored now.
    pub fn mirrored(&self) -> Vec<u16> {
        lock(&self.inner.listeners).keys().copied().collect()
    }
}

impl Drop for PortMirror {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        for (_, m) in std::mem::take(&mut *lock(&self.inner.listeners)) {
            m.close();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn poll_loop(inner: &Arc<Inner>, ports: &Ports) {
    // Ports the namespace refused (in use there), and when: retried after
    // RETRY, or at once when the guest listens on them anew.
    let mut refused = BTreeMap::new();
    while !inner.stop.load(Ordering::SeqCst) {
        match ports() {
            Ok(list) => sync(inner, &list, &mut refused),
            Err(e) => tracing::debug!("port mirror: {e}"),
        }
        for _ in 0..10 {
            if inner.stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(POLL / 10);
        }
    }
    for (_, m) in std::mem::take(&mut *lock(&inner.listeners)) {
        m.close();
    }
}

/// How long a port the namespace refused waits before it is tried again.
const RETRY: Duration = Duration::from_secs(10);

fn sync(inner: &Arc<Inner>, guest: &[u16], refused: &mut BTreeMap<u16, Instant>) {
    let wanted: BTreeSet<u16> = guest.iter().copied().collect();
    refused.retain(|p, at| wanted.contains(p) && at.elapsed() < RETRY);
    let mut map = lock(&inner.listeners);
    let gone: Vec<u16> = map.keys().filter(|p| !wanted.contains(p)).copied().collect();
    for p in gone {
        if let Some(m) = map.remove(&p) {
            m.close();
        }
    }
    for &port in &wanted {
        if map.contains_key(&port) || refused.contains_key(&port) {
            continue;
        }
        if map.len() >= MAX_MIRRORED {
            break;
        }
        let mut ls = Vec::new();
        for ip in [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()] {
            match TcpListener::bind(SocketAddr::new(ip, port)) {
                Ok(l) => ls.push(l),
                Err(e) => tracing::debug!("port mirror: {ip} port {port}: {e}"),
            }
        }
        if ls.is_empty() {
            tracing::warn!("port mirror: guest port {port} cannot be mirrored on the pod's loopback");
            refused.insert(port, Instant::now());
            continue;
        }
        let closed = Arc::new(AtomicBool::new(false));
        for l in &ls {
            match l.try_clone() {
                Ok(l) => spawn_acceptor(inner.clone(), port, l, closed.clone()),
                Err(e) => tracing::warn!("port mirror: port {port}: {e}"),
            }
        }
        map.insert(port, Mirrored { listeners: ls, closed });
    }
}

fn spawn_acceptor(inner: Arc<Inner>, port: u16, listener: TcpListener, closed: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new()
        .name(format!("mirror-{port}"))
        .spawn(move || loop {
            let conn = listener.accept();
            let still = !inner.stop.load(Ordering::SeqCst) && !closed.load(Ordering::SeqCst);
            match conn {
                Ok((tcp, _)) if still => {
                    if inner.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                        inner.open.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!("port mirror: {MAX_CONNECTIONS} connections open, one to port {port} closed");
                        continue;
                    }
                    let inner = inner.clone();
                    let spawned = std::thread::Builder::new().name(format!("forward-{port}")).spawn({
                        let inner = inner.clone();
                        move || {
                            match (inner.dial)(port) {
                                Ok(guest) => splice(tcp, guest),
                                Err(e) => tracing::debug!("port mirror: {e}"),
                            }
                            inner.open.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                    if spawned.is_err() {
                        inner.open.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                Ok(_) => return,
                Err(_) if !still => return,
                Err(e) => {
                    tracing::debug!("port mirror: accept on port {port}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
}

/// Copies both ways until each side has ended, passing each end on.
fn splice(tcp: TcpStream, guest: UnixStream) {
    let (Ok(tcp_in), Ok(guest_out)) = (tcp.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut &tcp_in, &mut &guest_out);
        let _ = guest_out.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut &guest, &mut &tcp);
    let _ = tcp.shutdown(Shutdown::Write);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A free port on this namespace's loopback, as far as one can tell.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fake guest: `dial` answers each connection with a greeting that
    /// names the port, then echoes what it reads.
    fn fake_dial(port: u16) -> Result<UnixStream> {
        let (host, mut guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = guest.write_all(format!("guest port {port}\n").as_bytes());
            let mut buf = [0u8; 64];
            while let Ok(n) = guest.read(&mut buf) {
                if n == 0 || guest.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        Ok(host)
    }

    #[test]
    fn guest_ports_are_mirrored_on_loopback_and_dropped_when_gone() {
        let port = free_port();
        let listed = Arc::new(Mutex::new(vec![port]));
        let l = listed.clone();
        let mirror = PortMirror::start(None, move || Ok(l.lock().unwrap().clone()), fake_dial).unwrap();
        wait_for("the port is mirrored", || mirror.mirrored() == [port]);
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"ping").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert_eq!(got, format!("guest port {port}\nping"));

        // The guest stops listening: so does the mirror.
        listed.lock().unwrap().clear();
        wait_for("the mirror stops", || mirror.mirrored().is_empty());
        wait_for("nothing listens", || TcpStream::connect(("127.0.0.1", port)).is_err());
        drop(mirror);
    }

    #[test]
    fn a_port_in_use_is_skipped_and_connections_are_bounded() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let taken6 = TcpListener::bind(("::1", busy)).ok();
        let port = free_port();
        // A guest that never answers: each connection stays open.
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        let mirror = PortMirror::start(
            None,
            move || Ok(vec![busy, port]),
            move |_| {
                let (host, guest) = UnixStream::pair().unwrap();
                h.lock().unwrap().push(guest);
                Ok(host)
            },
        )
        .unwrap();
        wait_for("the free port is mirrored", || mirror.mirrored() == [port]);
        let clients: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        wait_for("all are forwarded", || held.lock().unwrap().len() == MAX_CONNECTIONS);
        // One more is closed at once, not forwarded.
        let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
        extra.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            extra.read(&mut buf).unwrap(),
            0,
            "the connection over the bound is closed"
        );
        assert_eq!(held.lock().unwrap().len(), MAX_CONNECTIONS);
        drop(clients);
        drop(mirror);
        drop((taken, taken6));
    }

    #[test]
    fn a_path_that_is_not_a_namespace_is_named() {
        let e = PortMirror::start(Some(Path::new("/no/such/netns")), || Ok(vec![]), fake_dial)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("/no/such/netns"), "{e}");
    }
}
