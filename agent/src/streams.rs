//! The agent's side of the stdio streams (protocol in
//! `tegmen_agent_api::stream`): a listener on the stream port; each
//! connection names one stream of one process, gets that process's end of
//! the pipe (or the pty master) from the container layer, and is copied to
//! or from it by a thread of its own until EOF.
//!
//! A port-forward connection ([`crate::ports`]) comes the same way.
//!
//! Blocking copies give back-pressure for free: when the host reads slowly
//! the pipe fills and the process's writes block; nothing is dropped.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use tegmen_agent_api::stream::{read_line, StreamHeader, StreamKind};

use crate::container::{ContainerManager, StdioStream};

/// Where the stream listener listens.
pub enum StreamListener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl StreamListener {
    /// `vsock://-1:PORT` or `unix:///path`.
    pub fn bind(address: &str) -> Result<StreamListener> {
        if let Some(port) = address.strip_prefix("vsock://-1:") {
            let port: u32 = port.parse().with_context(|| format!("vsock port in {address}"))?;
            let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
                .context("creating a vsock socket")?;
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(libc::VMADDR_CID_ANY, port),
            )
            .with_context(|| format!("binding vsock port {port}"))?;
            listen(&fd, Backlog::new(128).expect("valid backlog")).context("listening on vsock")?;
            return Ok(StreamListener::Vsock(fd));
        }
        if let Some(path) = address.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
            return Ok(StreamListener::Unix(
                UnixListener::bind(path).with_context(|| format!("binding {path}"))?,
            ));
        }
        bail!("unsupported stream address {address} (vsock://-1:PORT or unix:///PATH)")
    }

    /// The next connection, as a stream socket. A vsock stream socket takes
    /// the same read/write/shutdown calls as a Unix one, so both are carried
    /// in a `UnixStream`.
    fn accept(&self) -> std::io::Result<UnixStream> {
        match self {
            StreamListener::Unix(l) => l.accept().map(|(s, _)| s),
            StreamListener::Vsock(fd) => {
                let raw = accept4(std::os::fd::AsRawFd::as_raw_fd(fd), SockFlag::SOCK_CLOEXEC)?;
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(unsafe { UnixStream::from_raw_fd(raw) })
            }
        }
    }
}

/// Serves stream connections forever on a thread of its own.
pub fn spawn(listener: StreamListener, manager: Arc<ContainerManager>) -> Result<()> {
    std::thread::Builder::new().name("streams".into()).spawn(move || loop {
        match listener.accept() {
            Ok(conn) => {
                let manager = manager.clone();
                let _ = std::thread::Builder::new().name("stream".into()).spawn(move || {
                    if let Err(e) = serve(conn, &manager) {
                        log::debug!("stream: {e:#}");
                    }
                });
            }
            Err(e) => {
                log::warn!("stream listener: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    })?;
    Ok(())
}

fn serve(mut conn: UnixStream, manager: &ContainerManager) -> Result<()> {
    let line = read_line(&mut conn).context("reading the stream header")?;
    match tegmen_agent_api::stream::parse_forward(&line) {
        Some(Ok(port)) => return crate::ports::forward(conn, port).map_err(anyhow::Error::msg),
        Some(Err(e)) => {
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes());
            bail!(e);
        }
        None => {}
    }
    let header = match StreamHeader::parse(&line) {
        Ok(h) => h,
        Err(e) => {
            let _ = conn.write_all(format!("ERR {e}\n").as_bytes());
            bail!(e);
        }
    };
    let exec = (!header.exec_id.is_empty()).then_some(header.exec_id.as_str());
    let stream = match header.kind {
        StreamKind::Stdin => StdioStream::Stdin,
        StreamKind::Stdout => StdioStream::Stdout,
        StreamKind::Stderr => StdioStream::Stderr,
        StreamKind::Tty => StdioStream::Tty,
    };
    let fd = match manager.take_stdio(&header.container_id, exec, stream) {
        Ok(fd) => fd,
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            let _ = conn.write_all(format!("ERR {msg}\n").as_bytes());
            bail!(msg);
        }
    };
    conn.write_all(b"OK\n")?;
    let file = std::fs::File::from(fd);
    match header.kind {
        StreamKind::Stdout | StreamKind::Stderr => {
            copy_until_eof(&file, &conn);
            let _ = conn.shutdown(Shutdown::Write);
        }
        StreamKind::Stdin => {
            copy_until_eof(&conn, &file);
            // Dropping `file` closes the pipe: the process reads EOF.
        }
        StreamKind::Tty => {
            let input = conn.try_clone()?;
            let master = file.try_clone()?;
            std::thread::spawn(move || copy_until_eof(&input, &master));
            copy_until_eof(&file, &conn);
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
    Ok(())
}

/// Copies until EOF or an error on either side. A pty master reads EIO once
/// the last slave is closed: that is its EOF.
fn copy_until_eof(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
