//! End-to-end: Kubernetes' way in. containerd 1.6's CRI plugin with a
//! `tegmen` runtime handler (`runtime_type = "io.containerd.tegmen.v2"`),
//! driven by a CRI v1 client (the `k8s-cri` crate over tonic) as the
//! kubelet drives it: RunPodSandbox → CreateContainer → StartContainer →
//! ExecSync → ContainerStatus → the container log → ListContainerStats →
//! Stop/Remove → StopPodSandbox → RemovePodSandbox, and nothing left.

use tegmen_tests::clients::{assert_pods_gone, shim_pids as shims, Containerd};
use tegmen_tests::cri::*;
use tegmen_tests::{host_cgroup, TestRoot};

const HANDLER: &str = "tegmen";

#[test]
fn a_kubernetes_pod_through_cri_is_one_vm() {
    let root = TestRoot::new("cri");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let logs = root.root().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let before = shims();
    let c = Containerd::start_cri("cri", &config);
    let scratch = host_cgroup::Scratch(format!("/tegmen-e2e-cri-{}", std::process::id()));
    let cgroup_parent = format!("{}/podweb", scratch.0);
    runtime().block_on(async {
        let mut rt = connect(&c.socket()).await;
        let mut pod_cfg = pod_config("web", &logs, &[("io.tegmen.vm.memory_mib", "384")]);
        // As the kubelet's cgroupfs driver names a pod's cgroup.
        pod_cfg.linux.as_mut().unwrap().cgroup_parent = cgroup_parent.clone();
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
        let mut app_cfg = container_config("app", &["sleep", "3600"]);
        app_cfg.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
            memory_limit_in_bytes: 96 << 20,
            cpu_shares: 256,
            ..Default::default()
        });
        let app = rt
            .create_container(CreateContainerRequest {
                config: Some(app_cfg),
                ..create("app", &[])
            })
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
        assert!(
            cpu.usage_core_nano_seconds.as_ref().is_some_and(|v| v.value > 0),
            "{s:?}"
        );
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

        // On the host, the pod's VM is in the sandbox container's cgroup
        // (below the pod's, which bounds it); the app container's cgroup
        // exists as runc would make it, with its limits, and is empty.
        let sandbox_cg = format!("{cgroup_parent}/{pod}");
        let app_cg = format!("{cgroup_parent}/{app}");
        for controller in ["memory", "cpu", "pids"] {
            let inside = host_cgroup::procs(controller, &sandbox_cg);
            for p in &st.processes {
                assert!(
                    inside.contains(&p.pid),
                    "{controller}: {} not in {sandbox_cg}: {inside:?}",
                    p.name
                );
            }
            assert_eq!(host_cgroup::procs(controller, &app_cg), Vec::<i32>::new());
        }
        let limit = host_cgroup::read("memory", &app_cg, "memory.limit_in_bytes", "memory.max");
        assert_eq!(limit, (96u64 << 20).to_string());
        // The app container's own limit holds in the guest.
        let r = rt
            .exec_sync(exec(
                &[
                    "sh",
                    "-c",
                    "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/memory.max",
                ],
                30,
            ))
            .await
            .expect("ExecSync")
            .into_inner();
        let out = String::from_utf8_lossy(&r.stdout);
        assert_eq!(
            out.trim(),
            (96u64 << 20).to_string(),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );

        // `kubectl exec -it`: a terminal through CRI's streaming server.
        let url = rt
            .exec(ExecRequest {
                container_id: app.clone(),
                cmd: vec!["sh".into()],
                tty: true,
                stdin: true,
                stdout: true,
                stderr: false,
            })
            .await
            .expect("Exec")
            .into_inner()
            .url;
        let session = tokio::task::spawn_blocking(move || {
            let mut s = TtySession::connect(&url);
            s.resize(100, 30);
            s.input("stty size; tty; echo tty-$((6*7))\n");
            s.read_until(|s| s.stdout.contains("tty-42"));
            s.resize(61, 17);
            s.input("stty size\n");
            s.read_until(|s| s.stdout.contains("17 61"));
            s.input("exit 3\n");
            s.read_until(|_| false);
            s
        })
        .await
        .unwrap();
        assert!(
            session.stdout.contains("30 100") && session.stdout.contains("17 61"),
            "the window sizes reached the terminal: {:?}",
            session.stdout
        );
        assert!(session.stdout.contains("/dev/pts/"), "a terminal: {:?}", session.stdout);
        assert!(
            session.status.contains("NonZeroExitCode") && session.status.contains("\"message\":\"3\""),
            "exit status 3 on the error channel: {}",
            session.status
        );

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
        for id in [&pod, &app] {
            let cg = format!("{cgroup_parent}/{id}");
            assert!(host_cgroup::gone_everywhere(&cg), "{cg} left");
        }
    });
    assert_pods_gone(&state, &before);
    drop(scratch);
    assert!(host_cgroup::gone_everywhere(&cgroup_parent));

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

/// Ten pods created and removed one after another, then three at once,
/// each with a container: nothing is left (no shim, VM, mount, directory).
#[test]
fn pods_in_a_row_and_at_once_leave_nothing() {
    let root = TestRoot::new("cri-many");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let logs = root.root().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let before = shims();
    let c = Containerd::start_cri("cri-many", &config);
    async fn one_pod(mut rt: RuntimeServiceClient<tonic::transport::Channel>, name: String, logs: std::path::PathBuf) {
        let cfg = pod_config(&name, &logs, &[]);
        let pod = rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: HANDLER.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"))
            .into_inner()
            .pod_sandbox_id;
        let ctr = rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("main", &["sleep", "600"])),
                sandbox_config: Some(cfg),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer in {name}: {e}"))
            .into_inner()
            .container_id;
        rt.start_container(StartContainerRequest { container_id: ctr })
            .await
            .unwrap_or_else(|e| panic!("StartContainer in {name}: {e}"));
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox {name}: {e}"));
        rt.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod })
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox {name}: {e}"));
    }
    runtime().block_on(async {
        let rt = connect(&c.socket()).await;
        for i in 0..10 {
            one_pod(rt.clone(), format!("seq-{i}"), logs.clone()).await;
        }
        assert_pods_gone(&state, &before);
        let at_once = (0..3).map(|i| one_pod(rt.clone(), format!("par-{i}"), logs.clone()));
        let handles: Vec<_> = at_once.map(tokio::spawn).collect();
        for h in handles {
            h.await.expect("a pod task panicked");
        }
    });
    assert_pods_gone(&state, &before);
}

/// CNI's network reaches the pods' VMs: each pod's guest has the address
/// CNI gave its netns (as PodSandboxStatus reports it), two pods on the
/// test's bridge talk to each other, and PortForward reaches a server in
/// a guest.
#[test]
fn pods_get_their_cni_address_and_reach_each_other() {
    let root = TestRoot::new("cri-net");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let logs = root.root().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let before = shims();
    let c = Containerd::start_cri("cri-net", &config);
    runtime().block_on(async {
        let mut rt = connect(&c.socket()).await;
        let mut pods = Vec::new();
        for (name, script) in [
            ("server", "while :; do echo from-the-server-pod | nc -l -p 8090; done"),
            ("client", "sleep 600"),
        ] {
            let cfg = pod_config(name, &logs, &[]);
            let pod = rt
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(cfg.clone()),
                    runtime_handler: HANDLER.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", c.log()))
                .into_inner()
                .pod_sandbox_id;
            let ip = rt
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                })
                .await
                .expect("PodSandboxStatus")
                .into_inner()
                .status
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap_or_default();
            assert!(ip.starts_with("10.213.0."), "pod {name}'s IP from CNI: {ip:?}");
            let ctr = rt
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(container_config(name, &["sh", "-c", script])),
                    sandbox_config: Some(cfg),
                })
                .await
                .unwrap_or_else(|e| panic!("CreateContainer in {name}: {e}"))
                .into_inner()
                .container_id;
            rt.start_container(StartContainerRequest {
                container_id: ctr.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer in {name}: {e}"));
            // The guest's eth0 has the address, and the veth's MAC.
            let r = rt
                .exec_sync(ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: ["ip", "addr", "show", "eth0"].map(String::from).to_vec(),
                    timeout: 30,
                })
                .await
                .expect("ExecSync ip addr")
                .into_inner();
            let text = String::from_utf8_lossy(&r.stdout);
            assert!(text.contains(&format!("inet {ip}/24")), "pod {name}'s eth0: {text}");
            let net = tegmen_supervisor::sandbox::read_state(&state.join("sandboxes").join(&pod))
                .expect("the pod's VM")
                .network
                .expect("the pod's netns is wired to the VM");
            let mac = &net.endpoints[0].mac;
            assert!(text.contains(mac.as_str()), "the veth's MAC {mac}: {text}");
            pods.push((pod, ctr, ip));
        }
        let server_ip = &pods[0].2;
        let r = rt
            .exec_sync(ExecSyncRequest {
                container_id: pods[1].1.clone(),
                cmd: [
                    "sh",
                    "-c",
                    &format!("for i in 1 2 3 4 5; do nc -w 5 {server_ip} 8090 && break; sleep 1; done"),
                ]
                .map(String::from)
                .to_vec(),
                timeout: 60,
            })
            .await
            .expect("ExecSync nc")
            .into_inner();
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            "from-the-server-pod\n",
            "pod to pod over the bridge: {}",
            String::from_utf8_lossy(&r.stderr)
        );

        // kubectl port-forward: CRI dials localhost:8090 in the pod's
        // netns on the host, where the guest's listener is mirrored.
        // (A URL serves one session: each attempt asks for its own.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let url = rt
                .port_forward(PortForwardRequest {
                    pod_sandbox_id: pods[0].0.clone(),
                    port: vec![8090],
                })
                .await
                .expect("PortForward")
                .into_inner()
                .url;
            let (data, error) = port_forward_read(&url, 8090, "from-the-server-pod\n");
            if data == "from-the-server-pod\n" {
                break;
            }
            eprintln!("port-forward: not yet: {data:?} / {error:?}");
            assert!(
                std::time::Instant::now() < deadline,
                "port-forward never reached the server: {data:?} / {error:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        // A port nothing listens on in the guest fails on the error channel.
        let url = rt
            .port_forward(PortForwardRequest {
                pod_sandbox_id: pods[0].0.clone(),
                port: vec![8099],
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url;
        let (data, error) = port_forward_read(&url, 8099, "never");
        assert!(data.is_empty() && error.contains("8099"), "{data:?} / {error:?}");

        for (pod, _, _) in pods {
            stop_and_remove_pod(&mut rt, pod).await;
        }
    });
    assert_pods_gone(&state, &before);
}
