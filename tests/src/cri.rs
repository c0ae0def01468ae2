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
