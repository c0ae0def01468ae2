//! A CRI v1 client (the `k8s-cri` crate over tonic) for containerd's CRI
//! plugin, as the kubelet drives it: used by the CRI tests and `make bench`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::clients::IMAGE;

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connecting to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

pub fn shim_config(root: &crate::TestRoot) -> PathBuf {
    let path = root.root().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "root = \"{}\"\n[guest]\nboot_timeout_secs = 180\n",
            root.root().join("state").display()
        ),
    )
    .unwrap();
    path
}

pub fn pod_config(name: &str, logs: &Path, annotations: &[(&str, &str)]) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

pub fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// StopPodSandbox then RemovePodSandbox, as the kubelet ends a pod.
pub async fn stop_and_remove_pod(rt: &mut RuntimeServiceClient<Channel>, pod: String) {
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod })
        .await
        .expect("RemovePodSandbox");
}

pub async fn wait_exited(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = rt
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .expect("a status");
        if status.state == ContainerState::ContainerExited as i32 {
            return status;
        }
        assert!(Instant::now() < deadline, "{id} never exited: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The stdout lines of a CRI log file (`<time> <stream> <P|F> <text>`),
/// partial lines joined.
pub fn cri_log_stdout(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, stream, tag) = (parts.next(), parts.next(), parts.next());
        let body = parts.next().unwrap_or("");
        if stream != Some("stdout") {
            continue;
        }
        out.push_str(body);
        if tag == Some("F") {
            out.push('\n');
        }
    }
    out
}

/// One `kubectl exec -it` session through CRI's streaming server: a
/// websocket speaking `v4.channel.k8s.io` (each message starts with its
/// channel: 0 stdin, 1 stdout, 2 stderr, 3 the exit status, 4 resize).
pub struct TtySession {
    ws: ChannelSocket,
    /// Everything that arrived on stdout so far.
    pub stdout: String,
    /// The status document of channel 3, once the process ended.
    pub status: String,
    pub closed: bool,
}

type ChannelSocket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

/// A websocket to CRI's streaming server speaking `v4.channel.k8s.io`
/// (what kubectl asks for), reads timing out every 200 ms.
fn channel_socket(url: &str) -> ChannelSocket {
    use tungstenite::client::IntoClientRequest;
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut req = ws_url.into_client_request().expect("a websocket URL");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v4.channel.k8s.io".parse().unwrap());
    let (ws, resp) = tungstenite::connect(req).unwrap_or_else(|e| panic!("websocket to {url}: {e}"));
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        Some("v4.channel.k8s.io"),
        "the server speaks the protocol kubectl asked for"
    );
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    }
    ws
}

/// `kubectl port-forward` to one `port` through the URL a PortForward
/// answered with: what the pod's server sends (the data channel after
/// its port prefix) until `want` is in it, the connection closes, or
/// 20 s pass; and what came on the error channel.
pub fn port_forward_read(url: &str, port: u16, want: &str) -> (String, String) {
    let mut ws = channel_socket(&format!("{url}?port={port}"));
    // Each channel's first message is its port, little-endian.
    let (mut data, mut error) = (Vec::new(), Vec::new());
    let (mut data_prefix, mut error_prefix) = (true, true);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&data).contains(want) && Instant::now() < deadline {
        match ws.read() {
            Ok(tungstenite::Message::Binary(m)) if !m.is_empty() => {
                let (first, to) = match m[0] {
                    0 => (&mut data_prefix, &mut data),
                    1 => (&mut error_prefix, &mut error),
                    _ => continue,
                };
                let body = &m[1..];
                if std::mem::take(first) {
                    assert_eq!(body, port.to_le_bytes(), "a channel opens with its port");
                } else {
                    to.extend_from_slice(body);
                }
            }
            Ok(tungstenite::Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = ws.close(None);
    (
        String::from_utf8_lossy(&data).into_owned(),
        String::from_utf8_lossy(&error).into_owned(),
    )
}

impl TtySession {
    /// Connects to the URL an `Exec` answered with.
    pub fn connect(url: &str) -> TtySession {
        TtySession {
            ws: channel_socket(url),
            stdout: String::new(),
            status: String::new(),
            closed: false,
        }
    }

    fn send(&mut self, channel: u8, body: &[u8]) {
        let mut msg = vec![channel];
        msg.extend_from_slice(body);
        self.ws.send(tungstenite::Message::binary(msg)).expect("websocket send");
    }

    pub fn input(&mut self, text: &str) {
        self.send(0, text.as_bytes());
    }

    pub fn resize(&mut self, width: u16, height: u16) {
        self.send(4, format!("{{\"Width\":{width},\"Height\":{height}}}").as_bytes());
    }

    /// Reads until `done` holds or the session closes (or 60 s pass).
    pub fn read_until(&mut self, done: impl Fn(&TtySession) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) && !self.closed {
            assert!(
                Instant::now() < deadline,
                "the session stalled; stdout so far: {:?}",
                self.stdout
            );
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(data)) if !data.is_empty() => {
                    let text = String::from_utf8_lossy(&data[1..]).into_owned();
                    match data[0] {
                        1 | 2 => self.stdout.push_str(&text),
                        3 => self.status.push_str(&text),
                        _ => {}
                    }
                }
                Ok(tungstenite::Message::Close(_)) => self.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => self.closed = true,
                Err(tungstenite::Error::Protocol(_)) => self.closed = true,
                Err(e) => panic!("websocket read: {e}"),
            }
        }
    }
}
