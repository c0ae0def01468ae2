//! The supervisor's side of the agent API: ttrpc over the VM's hybrid-vsock
//! Unix socket.
//!
//! Hybrid vsock: the host connects to the backend's Unix socket, writes
//! `CONNECT <port>\n` and reads one `OK <host port>\n` line; from then on the
//! stream is the guest's vsock connection. The reply line is read byte by
//! byte so nothing after it is consumed.

use std::io::{Read, Write};
use std::os::unix::io::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tegmen_agent_api::agent::*;
use tegmen_agent_api::agent_ttrpc::AgentClient as AgentStub;

use crate::{Error, Result};

/// The longest reply line the handshake accepts.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket.
pub fn hybrid_vsock_connect(socket: &Path, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("vsock port {port}: connection closed by the guest side"),
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "hybrid vsock: reply line too long",
            ));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("hybrid vsock: unexpected reply {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// A connection to one sandbox's agent.
pub struct AgentClient {
    stub: AgentStub,
    timeout: Duration,
}

impl AgentClient {
    /// Connects once (no retries) to the agent on `port`; each later RPC
    /// may take up to `rpc_timeout`.
    pub fn connect(socket: &Path, port: u32, connect_timeout: Duration, rpc_timeout: Duration) -> Result<AgentClient> {
        let stream = hybrid_vsock_connect(socket, port, connect_timeout).map_err(|e| {
            Error::Agent(format!(
                "connecting to vsock port {port} through {}: {e}",
                socket.display()
            ))
        })?;
        let client =
            ttrpc::Client::new(stream.into_raw_fd()).map_err(|e| Error::Agent(format!("ttrpc client: {e}")))?;
        Ok(AgentClient {
            stub: AgentStub::new(client),
            timeout: rpc_timeout,
        })
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.timeout.as_nanos() as i64)
    }

    pub fn check(&self) -> Result<CheckResponse> {
        self.stub
            .check(self.ctx(), &CheckRequest::new())
            .map_err(|e| rpc_error("Check", e))
    }

    pub fn version(&self) -> Result<VersionResponse> {
        self.stub
            .version(self.ctx(), &VersionRequest::new())
            .map_err(|e| rpc_error("Version", e))
    }

    pub fn guest_details(&self) -> Result<GuestDetailsResponse> {
        self.stub
            .guest_details(self.ctx(), &GuestDetailsRequest::new())
            .map_err(|e| rpc_error("GuestDetails", e))
    }

    pub fn shutdown(&self) -> Result<()> {
        self.stub
            .shutdown(self.ctx(), &ShutdownRequest::new())
            .map(|_| ())
            .map_err(|e| rpc_error("Shutdown", e))
    }
}

fn rpc_error(method: &str, e: ttrpc::Error) -> Error {
    match e {
        ttrpc::Error::RpcStatus(s) => Error::Agent(format!("{method}: {:?}: {}", s.code(), s.message())),
        other => Error::Agent(format!("{method}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(reply: &'static [u8]) -> (tempfile::TempDir, std::path::PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap();
            s.write_all(reply).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (dir, path, h)
    }

    #[test]
    fn handshake_sends_connect_and_stops_after_the_ok_line() {
        let (_d, path, h) = serve_once(b"OK 1073741824\npayload");
        let mut s = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(h.join().unwrap(), "CONNECT 1024\n");
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "payload", "bytes after the OK line belong to the stream");
    }

    #[test]
    fn refused_and_garbage_replies_are_errors() {
        let (_d, path, _h) = serve_once(b"");
        let e = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        let (_d, path, _h) = serve_once(b"NO\n");
        assert!(hybrid_vsock_connect(&path, 1024, Duration::from_secs(5)).is_err());
        let (_d, path, _h) = serve_once(&[b'x'; 200]);
        let e = hybrid_vsock_connect(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
    }
}
