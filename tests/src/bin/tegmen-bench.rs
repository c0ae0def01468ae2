//! Measurements behind `make bench` that need the agent API (called by
//! scripts/bench/bench.py, which prints them next to their references).
//!
//!   tegmen-bench agent-true host|guest RUNS   create+start+wait+remove of /bin/true
//!   tegmen-bench stdout-throughput MIB        stdout of a container in a guest
//!   tegmen-bench cri RUNS                     pods through containerd's CRI plugin,
//!                                             the tegmen handler next to runc's
//!
//! Prints one JSON object on stdout.

use std::io::Read;
use std::time::Instant;

use tegmen_agent_api::agent::CreateContainerRequest;
use tegmen_agent_api::stream::StreamKind;
use tegmen_supervisor::agent_client::{AgentClient, StreamEndpoint};
use tegmen_supervisor::sandbox::{Sandbox, SandboxOptions};
use tegmen_tests::{busybox_rootfs, runc_like_spec, HostAgent, TestRoot};

/// Runs `args` in container `id` (rootfs `rootfs` in the share) to the end;
/// returns the bytes it wrote on stdout.
fn run_once(agent: &AgentClient, streams: &StreamEndpoint, id: &str, rootfs: &str, args: &[&str]) -> u64 {
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json: runc_like_spec(args, false).to_string(),
        rootfs: rootfs.into(),
        ..Default::default()
    };
    agent.create_container(&req).expect("CreateContainer");
    let mut out = streams.open(id, "", StreamKind::Stdout).expect("stdout stream");
    let mut err = streams.open(id, "", StreamKind::Stderr).expect("stderr stream");
    agent.start_container(id).expect("StartContainer");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        err.read_to_end(&mut sink).map(|_| ())
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let _ = drain.join();
    let code = agent.wait_process(id, "").expect("WaitProcess").exit_code;
    assert_eq!(code, 0, "{args:?} exited with {code}");
    agent.remove_container(id, false).expect("RemoveContainer");
    total
}

fn agent_true(agent: &AgentClient, streams: &StreamEndpoint, shared: &std::path::Path, runs: usize) -> Vec<f64> {
    busybox_rootfs(&shared.join("bench/rootfs"));
    (0..runs)
        .map(|i| {
            let start = Instant::now();
            run_once(agent, streams, &format!("true-{i}"), "bench/rootfs", &["/bin/true"]);
            start.elapsed().as_secs_f64()
        })
        .collect()
}

fn boot(name: &str) -> (TestRoot, Sandbox) {
    let root = TestRoot::new(name);
    let sb = Sandbox::create(
        &root.config,
        name,
        &SandboxOptions {
            owned_by_current_process: true,
            ..Default::default()
        },
    )
    .expect("boot");
    (root, sb)
}

/// RSS (KiB) of the shims of a handler started since `before` (pids).
fn shim_rss_kib(binary: &str, before: &[i32]) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if before.contains(&pid) {
            continue;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == binary) {
            total += vm_rss_kib(pid);
        }
    }
    total
}

fn vm_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// For each handler: RunPodSandbox → first container running (seconds),
/// a second container created and started in the running pod (seconds),
/// the shim's RSS with one container and with ten.
fn cri_bench(runs: usize) -> serde_json::Value {
    use tegmen_tests::cri::*;
    let root = TestRoot::new("bench-cri");
    let config = shim_config(&root);
    let logs = root.root().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let c = tegmen_tests::clients::Containerd::start_cri("bench-cri", &config);
    let mut result = serde_json::Map::new();
    runtime().block_on(async {
        let mut rt = connect(&c.socket()).await;
        for (handler, shim) in [
            ("runc", "containerd-shim-runc-v2"),
            ("tegmen", "containerd-shim-tegmen-v2"),
        ] {
            let (mut first, mut second) = (Vec::new(), Vec::new());
            let (mut rss1, mut rss10) = (0, 0);
            for i in 0..runs {
                let before = all_pids();
                let pod_cfg = pod_config(&format!("bench-{handler}-{i}"), &logs, &[]);
                let start = Instant::now();
                let pod = rt
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(pod_cfg.clone()),
                        runtime_handler: handler.into(),
                    })
                    .await
                    .expect("RunPodSandbox")
                    .into_inner()
                    .pod_sandbox_id;
                let add = |n: usize| {
                    let req = CreateContainerRequest {
                        pod_sandbox_id: pod.clone(),
                        config: Some(container_config(&format!("c{n}"), &["sleep", "3600"])),
                        sandbox_config: Some(pod_cfg.clone()),
                    };
                    let mut rt = rt.clone();
                    async move {
                        let id = rt
                            .create_container(req)
                            .await
                            .expect("CreateContainer")
                            .into_inner()
                            .container_id;
                        rt.start_container(StartContainerRequest { container_id: id })
                            .await
                            .expect("StartContainer");
                    }
                };
                add(1).await;
                first.push(start.elapsed().as_secs_f64());
                let t = Instant::now();
                add(2).await;
                second.push(t.elapsed().as_secs_f64());
                if i == 0 {
                    rss1 = shim_rss_kib(shim, &before);
                    for n in 3..=10 {
                        add(n).await;
                    }
                    rss10 = shim_rss_kib(shim, &before);
                }
                stop_and_remove_pod(&mut rt, pod).await;
            }
            result.insert(
                handler.into(),
                serde_json::json!({"first": first, "second": second, "shim_rss_kib": rss1, "shim_rss_10_kib": rss10}),
            );
        }
    });
    serde_json::Value::Object(result)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["agent-true", "host", runs] => {
            let host = HostAgent::start("bench");
            let times = agent_true(&host.agent, &host.endpoint(), &host.shared_dir(), runs.parse().unwrap());
            println!("{}", serde_json::json!({ "seconds": times }));
        }
        ["agent-true", "guest", runs] => {
            let (_root, sb) = boot("bench-true");
            let times = agent_true(
                sb.agent(),
                &sb.stream_endpoint(),
                &sb.shared_dir(),
                runs.parse().unwrap(),
            );
            sb.shutdown().expect("shutdown");
            println!("{}", serde_json::json!({ "seconds": times }));
        }
        ["stdout-throughput", mib] => {
            let (_root, sb) = boot("bench-tput");
            busybox_rootfs(&sb.shared_dir().join("bench/rootfs"));
            let cmd = format!(
                "dd if=/dev/zero bs=1M count={} 2>/dev/null",
                mib.parse::<u64>().unwrap()
            );
            let start = Instant::now();
            let bytes = run_once(
                sb.agent(),
                &sb.stream_endpoint(),
                "tput",
                "bench/rootfs",
                &["sh", "-c", &cmd],
            );
            let secs = start.elapsed().as_secs_f64();
            sb.shutdown().expect("shutdown");
            println!("{}", serde_json::json!({ "bytes": bytes, "seconds": secs }));
        }
        ["cri", runs] => println!("{}", cri_bench(runs.parse().unwrap())),
        _ => {
            eprintln!("usage: tegmen-bench agent-true host|guest RUNS | stdout-throughput MIB | cri RUNS");
            std::process::exit(2);
        }
    }
}
