//! End-to-end: Kubernetes' way in. containerd 1.6's CRI plugin with a
//! `tegmen` runtime handler (`runtime_type = "io.containerd.tegmen.v2"`),
//! driven by a CRI v1 client (the `k8s-cri` crate over tonic) as the
//! kubelet drives it: RunPodSandbox → CreateContainer → StartContainer →
//! ExecSync → ContainerStatus → the container log → ListContainerStats →
//! Stop/Remove → StopPodSandbox → RemovePodSandbox, and nothing left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tegmen_tests::clients::{Containerd, IMAGE};
use tegmen_tests::{mounts_below, TestRoot};
use tonic::transport::{Channel, Endpoint, Uri};

const HANDLER: &str = "tegmen";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
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

fn shim_config(root: &TestRoot) -> PathBuf {
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

fn pod_config(name: &str, logs: &Path, annotations: &[(&str, &str)]) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
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

/// Pids of running shims of ours.
fn shims() -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let first = cmd.split(|b| *b == 0).next().unwrap_or_default();
        if String::from_utf8_lossy(first).ends_with("containerd-shim-tegmen-v2") {
            found.push(pid);
        }
    }
    found
}

fn assert_pods_gone(state: &Path, before: &[i32]) {
    let sandboxes = state.join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<i32> = shims().into_iter().filter(|p| !before.contains(p)).collect();
        let dirs: Vec<String> = std::fs::read_dir(&sandboxes)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let mounts = mounts_below(state);
        if left.is_empty() && dirs.is_empty() && mounts.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: shims {left:?}, sandboxes {dirs:?}, mounts {mounts:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn wait_exited(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
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
fn cri_log_stdout(path: &Path) -> String {
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

#[test]
fn a_kubernetes_pod_through_cri_is_one_vm() {
    let root = TestRoot::new("cri");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let logs = root.root().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let before = shims();
    let c = Containerd::start_cri("cri", &config);
    runtime().block_on(async {
        let mut rt = connect(&c.socket()).await;
        let pod_cfg = pod_config("web", &logs, &[("io.tegmen.vm.memory_mib", "384")]);
        let pod = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_cfg.clone()),
                runtime_handler: HANDLER.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", c.log()))
            .into_inner()
            .pod_sandbox_id;
        let st = tegmen_supervisor::sandbox::read_state(&state.join("sandboxes").join(&pod)).expect("the pod's VM");
        assert_eq!(st.memory_mib, 384, "the pod annotation sized the VM");

        let create = |name: &str, cmd: &[&str]| CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(name, cmd)),
            sandbox_config: Some(pod_cfg.clone()),
        };
        // 10 MiB of output, byte for byte, in the CRI log.
        let writer = rt
            .create_container(create("writer", &["seq", "1", "1500000"]))
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", c.log()))
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest {
            container_id: writer.clone(),
        })
        .await
        .expect("StartContainer");
        let status = wait_exited(&mut rt, &writer).await;
        assert_eq!((status.exit_code, status.reason.as_str()), (0, "Completed"));
        let want: String = (1..=1_500_000).map(|i| format!("{i}\n")).collect();
        assert!(want.len() > 10 << 20);
        let got = cri_log_stdout(&logs.join("writer.log"));
        assert!(got == want, "the log has {} bytes, {} expected", got.len(), want.len());

        let failing = rt
            .create_container(create("failing", &["sh", "-c", "exit 7"]))
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest {
            container_id: failing.clone(),
        })
        .await
        .unwrap();
        let status = wait_exited(&mut rt, &failing).await;
        assert_eq!((status.exit_code, status.reason.as_str()), (7, "Error"));

        // A long-running container: ExecSync, its timeout, stats.
        let app = rt
            .create_container(create("app", &["sleep", "3600"]))
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest {
            container_id: app.clone(),
        })
        .await
        .unwrap();
        let exec = |cmd: &[&str], timeout: i64| ExecSyncRequest {
            container_id: app.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        };
        let r = rt
            .exec_sync(exec(&["sh", "-c", "echo out; echo err >&2; exit 3"], 30))
            .await
            .expect("ExecSync")
            .into_inner();
        assert_eq!(
            (r.stdout.as_slice(), r.stderr.as_slice(), r.exit_code),
            (&b"out\n"[..], &b"err\n"[..], 3)
        );
        // A child that keeps stdout open does not hold ExecSync.
        let r = rt
            .exec_sync(exec(&["sh", "-c", "sleep 100 & echo started"], 60))
            .await
            .expect("ExecSync with a background child")
            .into_inner();
        assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"started\n"[..], 0));
        // The timeout kills the exec.
        let timed = rt.exec_sync(exec(&["sleep", "31"], 2)).await;
        assert!(
            timed.as_ref().map_or(true, |r| r.get_ref().exit_code != 0),
            "ExecSync past its timeout: {timed:?}"
        );
        let ps = rt.exec_sync(exec(&["ps"], 30)).await.expect("ps").into_inner();
        let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
        assert!(!ps.contains("sleep 31"), "the timed-out exec still runs:\n{ps}");

        let stats = rt
            .list_container_stats(ListContainerStatsRequest {
                filter: Some(ContainerStatsFilter {
                    id: app.clone(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListContainerStats")
            .into_inner()
            .stats;
        assert_eq!(stats.len(), 1, "{stats:?}");
        let s = &stats[0];
        let cpu = s.cpu.as_ref().expect("cpu");
        let mem = s.memory.as_ref().expect("memory");
        assert!(cpu.timestamp > 0 && mem.timestamp > 0, "{s:?}");
        assert!(cpu.usage_core_nano_seconds.as_ref().is_some_and(|v| v.value > 0), "{s:?}");
        assert!(mem.working_set_bytes.as_ref().is_some_and(|v| v.value > 0), "{s:?}");

        // The pod is one VM holding its running containers (CRI deletes
        // the task of a container that exited: it left the VM then).
        let st = tegmen_supervisor::sandbox::read_state(&state.join("sandboxes").join(&pod)).unwrap();
        assert_eq!(st.processes.iter().filter(|p| p.name == "qemu").count(), 1);
        let mut ids: Vec<&str> = st.containers.iter().map(|c| c.id.as_str()).collect();
        ids.sort();
        let mut want_ids = vec![pod.as_str(), app.as_str()];
        want_ids.sort();
        assert_eq!(ids, want_ids, "writer {writer} and failing {failing} exited");
        assert_eq!(shims().iter().filter(|p| !before.contains(p)).count(), 1, "one shim");

        for id in [&app, &writer, &failing] {
            rt.stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: 5,
            })
            .await
            .expect("StopContainer");
            rt.remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .expect("RemoveContainer");
        }
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
    assert_pods_gone(&state, &before);

    // A malformed VM-size annotation fails RunPodSandbox, naming it.
    runtime().block_on(async {
        let mut rt = connect(&c.socket()).await;
        let e = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config("bad", &logs, &[("io.tegmen.vm.vcpus", "lots")])),
                runtime_handler: HANDLER.into(),
            })
            .await
            .expect_err("a bad annotation must fail");
        assert!(e.message().contains("io.tegmen.vm.vcpus"), "{e}");
        let pods = rt
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        for p in pods {
            let _ = rt
                .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: p.id })
                .await;
        }
    });
    assert_pods_gone(&state, &before);
}
