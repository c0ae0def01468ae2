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
use std::path::{Path, PathBuf};
use std::time::Duration;

use tegmen_agent_api::stream::{open_forward, open_stream, StreamHeader, StreamKind};
use tegmen_agent_api::STREAM_VSOCK_PORT;

use tegmen_agent_api::agent::*;
use tegmen_agent_api::agent_ttrpc::AgentClient as AgentStub;

use crate::{Error, Result};

/// The longest reply line the handshake accepts.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket.
pub fn hybrid_vsock_connect(socket: &Path, port: u32, timeout: Duration) -> std::io::Result<UnixStream> {
    let mut stream = tegmen_vmm::unix_path::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    read_handshake_reply(&mut stream, port)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Reads the hybrid-vsock device's answer to `CONNECT port` (`OK <host
/// port>\n`, at most [`MAX_HANDSHAKE_LINE`] bytes) a byte at a time, so
/// nothing of the stream after it is consumed.
pub fn read_handshake_reply(stream: &mut impl Read, port: u32) -> std::io::Result<()> {
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
    Ok(())
}

/// Most processes taken from one `ListProcesses` reply.
pub const MAX_PROCESS_DETAILS: usize = 65_536;
/// Longest command line taken from the guest, in bytes.
pub const MAX_COMMAND: usize = 4096;

/// A connection to one sandbox's agent. Clones share the connection.
#[derive(Clone)]
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

    /// Connects to an agent serving on a Unix socket (the agent run on the
    /// host, as the container tests do).
    pub fn connect_unix(socket: &Path, rpc_timeout: Duration) -> Result<AgentClient> {
        let stream = tegmen_vmm::unix_path::connect(socket)
            .map_err(|e| Error::Agent(format!("connecting to {}: {e}", socket.display())))?;
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

    pub fn configure_network(&self, req: &ConfigureNetworkRequest) -> Result<()> {
        self.stub
            .configure_network(self.ctx(), req)
            .map(|_| ())
            .map_err(|e| rpc_error("ConfigureNetwork", e))
    }

    pub fn shutdown(&self) -> Result<()> {
        self.stub
            .shutdown(self.ctx(), &ShutdownRequest::new())
            .map(|_| ())
            .map_err(|e| rpc_error("Shutdown", e))
    }
}

/// Containers in the guest. Calls that block until something happens
/// (`wait_process`, `get_event`) carry no deadline.
impl AgentClient {
    fn no_deadline(&self) -> ttrpc::context::Context {
        ttrpc::context::Context::default()
    }

    /// Creates a container stopped before its process runs; returns the
    /// pid of its init in the guest.
    pub fn create_container(&self, req: &CreateContainerRequest) -> Result<i32> {
        self.stub
            .create_container(self.ctx(), req)
            .map(|r| r.pid)
            .map_err(|e| rpc_error("CreateContainer", e))
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.stub
            .start_container(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("StartContainer", e))
    }

    pub fn exec_process(&self, req: &ExecProcessRequest) -> Result<i32> {
        self.stub
            .exec_process(self.ctx(), req)
            .map(|r| r.pid)
            .map_err(|e| rpc_error("ExecProcess", e))
    }

    /// Runs a debug process in the guest outside every container (the
    /// agent refuses unless the debug console is on); returns its pid.
    pub fn exec_debug(&self, req: &ExecDebugRequest) -> Result<i32> {
        self.stub
            .exec_debug(self.ctx(), req)
            .map(|r| r.pid)
            .map_err(|e| rpc_error("ExecDebug", e))
    }

    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.stub
            .signal_process(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("SignalProcess", e))
    }

    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.stub
            .wait_process(self.no_deadline(), &req)
            .map_err(|e| rpc_error("WaitProcess", e))
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<i32>> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.stub
            .list_processes(self.ctx(), &req)
            .map(|r| r.pids)
            .map_err(|e| rpc_error("ListProcesses", e))
    }

    /// The container's processes as the guest's /proc has them; the reply
    /// is the guest's, so it is bounded: at most [`MAX_PROCESS_DETAILS`]
    /// entries, commands cut at [`MAX_COMMAND`] bytes, states at 4.
    pub fn list_process_details(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let resp = self
            .stub
            .list_processes(self.ctx(), &req)
            .map_err(|e| rpc_error("ListProcesses", e))?;
        Ok(resp
            .processes
            .into_iter()
            .take(MAX_PROCESS_DETAILS)
            .map(|mut p| {
                cut(&mut p.command, MAX_COMMAND);
                cut(&mut p.state, 4);
                p
            })
            .collect())
    }

    /// The container's status, init pid and execs, as the agent has them;
    /// at most [`MAX_PROCESS_DETAILS`] exec ids are kept.
    pub fn container_state(&self, id: &str) -> Result<ContainerStateResponse> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let mut r = self
            .stub
            .container_state(self.ctx(), &req)
            .map_err(|e| rpc_error("ContainerState", e))?;
        r.exec_ids.truncate(MAX_PROCESS_DETAILS);
        r.exec_ids.iter_mut().for_each(|e| cut(e, MAX_COMMAND));
        cut(&mut r.status, 32);
        Ok(r)
    }

    pub fn stats_container(&self, id: &str) -> Result<ContainerStats> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.stub
            .stats_container(self.ctx(), &req)
            .map_err(|e| rpc_error("StatsContainer", e))
    }

    pub fn pause_container(&self, id: &str) -> Result<()> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.stub
            .pause_container(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("PauseContainer", e))
    }

    pub fn resume_container(&self, id: &str) -> Result<()> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.stub
            .resume_container(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("ResumeContainer", e))
    }

    pub fn update_container(&self, id: &str, resources_json: &str) -> Result<()> {
        let req = UpdateContainerRequest {
            container_id: id.into(),
            resources_json: resources_json.into(),
            ..Default::default()
        };
        self.stub
            .update_container(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("UpdateContainer", e))
    }

    pub fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let req = ResizeTtyRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.stub
            .resize_tty(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("ResizeTty", e))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.stub
            .close_stdin(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("CloseStdin", e))
    }

    /// Forgets exec `exec_id` of container `id` once it has exited.
    pub fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.stub
            .remove_process(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("RemoveProcess", e))
    }

    pub fn remove_container(&self, id: &str, force: bool) -> Result<()> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            force,
            ..Default::default()
        };
        self.stub
            .remove_container(self.ctx(), &req)
            .map(drop)
            .map_err(|e| rpc_error("RemoveContainer", e))
    }

    /// The TCP ports something listens on in the guest's network
    /// namespace; a reply out of bounds is refused.
    pub fn listening_ports(&self) -> Result<Vec<u16>> {
        let resp = self
            .stub
            .listening_ports(self.ctx(), &Empty::new())
            .map_err(|e| rpc_error("ListeningPorts", e))?;
        if resp.tcp.len() > MAX_LISTENING_PORTS {
            return Err(Error::Agent(format!(
                "ListeningPorts: {} ports, more than {MAX_LISTENING_PORTS}",
                resp.tcp.len()
            )));
        }
        resp.tcp
            .iter()
            .map(|&p| {
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| Error::Agent(format!("ListeningPorts: {p} is not a TCP port")))
            })
            .collect()
    }

    /// As watcher `watcher` (`supervisor events`): the next exit or OOM
    /// kill from its first call on, `None` after `wait` without one. The
    /// first reader's events ([`AgentClient::get_event`]) are not taken.
    pub fn watch_event(&self, watcher: &str, wait: Duration) -> Result<Option<Event>> {
        let req = GetEventRequest {
            watcher: watcher.into(),
            wait_ms: wait.as_millis().min(60_000) as u32,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout((wait + self.timeout).as_nanos() as i64);
        let e = self.stub.get_event(ctx, &req).map_err(|e| rpc_error("GetEvent", e))?;
        Ok(e.event.is_some().then_some(e))
    }

    /// Blocks until the agent reports the next exit or OOM kill.
    pub fn get_event(&self) -> Result<Event> {
        self.stub
            .get_event(self.no_deadline(), &GetEventRequest::new())
            .map_err(|e| rpc_error("GetEvent", e))
    }
}

/// How the host reaches the agent's stream port.
#[derive(Debug, Clone)]
pub enum StreamEndpoint {
    /// Through a VM's hybrid-vsock socket, to vsock port [`STREAM_VSOCK_PORT`].
    HybridVsock(PathBuf),
    /// An agent on the host listening on a Unix socket.
    Unix(PathBuf),
}

impl StreamEndpoint {
    /// Opens one stdio stream of a process; the returned socket carries its
    /// raw bytes.
    pub fn open(&self, container_id: &str, exec_id: &str, kind: StreamKind) -> Result<UnixStream> {
        let mut conn = self
            .connect()
            .map_err(|e| Error::Agent(format!("opening the {} stream of {container_id}: {e}", kind.as_str())))?;
        let header = StreamHeader {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            kind,
        };
        open_stream(&mut conn, &header).map_err(|e| Error::Agent(e.to_string()))?;
        Ok(conn)
    }

    /// Opens a connection to TCP `port` in the guest's network namespace;
    /// the returned socket carries its bytes both ways.
    pub fn open_forward(&self, port: u16) -> Result<UnixStream> {
        let mut conn = self
            .connect()
            .map_err(|e| Error::Agent(format!("forwarding to guest port {port}: {e}")))?;
        // A guest that never answers must not hold the connection.
        let verdict = conn
            .set_read_timeout(Some(FORWARD_VERDICT_TIMEOUT))
            .and_then(|()| open_forward(&mut conn, port))
            .and_then(|()| conn.set_read_timeout(None));
        verdict.map_err(|e| Error::Agent(format!("forwarding to guest port {port}: {e}")))?;
        Ok(conn)
    }

    fn connect(&self) -> std::io::Result<UnixStream> {
        match self {
            StreamEndpoint::HybridVsock(path) => hybrid_vsock_connect(path, STREAM_VSOCK_PORT, Duration::from_secs(10)),
            StreamEndpoint::Unix(path) => tegmen_vmm::unix_path::connect(path),
        }
    }
}

/// How long the agent may take to answer a forward's opening line.
pub const FORWARD_VERDICT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most listening ports a guest may report (as many as the agent sends).
pub const MAX_LISTENING_PORTS: usize = 1024;

/// Cuts the guest's text `s` to at most `max` bytes, on a character
/// boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

fn rpc_error(method: &str, e: ttrpc::Error) -> Error {
    match e {
        ttrpc::Error::RpcStatus(s) => Error::AgentStatus {
            method: method.to_string(),
            code: format!("{:?}", s.code()),
            message: s.message().to_string(),
        },
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
