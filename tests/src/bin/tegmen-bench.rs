//! Measurements behind `make bench` that need the agent API (called by
//! scripts/bench/bench.py, which prints them next to their references).
//!
//!   tegmen-bench agent-true host|guest RUNS   create+start+wait+remove of /bin/true
//!   tegmen-bench stdout-throughput MIB        stdout of a container in a guest
//!   tegmen-bench cri RUNS                     pods through containerd's CRI plugin,
//!                                             the tegmen handler next to runc's
//!   tegmen-bench l1 RUNS SMP_BOOTS            inside a nested L1 (one L1 boot per
//!                                             part): the builtin monitor next to
//!                                             QEMU with KVM, and the failure rate of
//!                                             2-vCPU guests with 2 L1 vCPUs
//!   tegmen-bench l1-inside HV RUNS BUNDLE     (run by `l1` inside L1)
//!   tegmen-bench l1-smp HV BOOTS              (run by `l1` inside L1)
//!   tegmen-bench workloads UDS SHARED MIB     fs and vsock throughput of a guest
//!                                             booted by bench.py with one pair of
//!                                             backends (ours or the references):
//!                                             its agent on the hybrid vsock UDS,
//!                                             its share the directory SHARED
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

/// The KiB of `field` (`RssAnon:`, `VmRSS:`, ...) in /proc/PID/status.
fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn vm_rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmRSS:")
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

fn l1_root(name: &str, hypervisor: &str) -> TestRoot {
    let mut root = TestRoot::new(name);
    root.config.hypervisor = match hypervisor {
        "builtin" => tegmen_supervisor::config::HypervisorChoice::Builtin,
        "qemu" => tegmen_supervisor::config::HypervisorChoice::Qemu,
        other => panic!("hypervisor {other:?}: builtin or qemu"),
    };
    root
}

/// Inside L1, on backend `hypervisor`: boot to agent ready `runs` times,
/// the host memory of the VM's processes beyond guest RAM (RssAnon +
/// RssFile; guest RAM is a memfd, RssShmem) and in all, and `tegmen run`
/// of the hello container in `bundle` `runs` times.
fn l1_inside(hypervisor: &str, runs: usize, bundle: &std::path::Path) -> serde_json::Value {
    let root = l1_root(&format!("l1-{hypervisor}"), hypervisor);
    let options = SandboxOptions {
        owned_by_current_process: true,
        ..Default::default()
    };
    let (mut boots, mut marks) = (Vec::new(), Vec::new());
    let (mut beyond, mut total) = (0, 0);
    for i in 0..runs {
        let id = format!("b{i}");
        let t = Instant::now();
        let sb = Sandbox::create(&root.config, &id, &options).unwrap_or_else(|e| panic!("boot {id}: {e}"));
        boots.push(t.elapsed().as_secs_f64());
        let state = tegmen_supervisor::sandbox::read_state(sb.dir()).unwrap();
        if let Some(ms) = state.boot_to_agent_ms {
            marks.push(ms as f64 / 1000.0);
        }
        if i == 0 {
            // Idle a moment so that boot-time allocations settle.
            std::thread::sleep(std::time::Duration::from_secs(2));
            for p in &state.processes {
                beyond += status_kib(p.pid, "RssAnon:") + status_kib(p.pid, "RssFile:");
                total += status_kib(p.pid, "VmRSS:");
            }
        }
        sb.shutdown().expect("shutdown");
    }
    let config = root.root().join("tegmen.toml");
    std::fs::write(
        &config,
        format!(
            "root = \"{}\"\nhypervisor = \"{hypervisor}\"\n[guest]\nboot_timeout_secs = 180\n",
            root.root().join("tegmen").display()
        ),
    )
    .unwrap();
    let tegmen = tegmen_tests::workspace_binary("tegmen");
    let mut run = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let out = std::process::Command::new(&tegmen)
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(root.root().join("runc-root"))
            .args(["run", &format!("hello{i}")])
            .current_dir(bundle)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim() == "hello",
            "tegmen run on {hypervisor}: {} {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        run.push(secs);
    }
    serde_json::json!({
        "hypervisor": hypervisor,
        "boot_seconds": boots,
        "boot_to_agent_seconds": marks,
        "rss_beyond_guest_kib": beyond,
        "rss_kib": total,
        "tegmen_run_seconds": run,
    })
}

/// Inside L1: `boots` boots of a 2-vCPU guest on `hypervisor`; how many
/// failed, and the first failure.
fn l1_smp(hypervisor: &str, boots: usize) -> serde_json::Value {
    let mut root = l1_root(&format!("smp-{hypervisor}"), hypervisor);
    root.config.guest.vcpus = 2;
    root.config.guest.boot_timeout_secs = 60;
    let options = SandboxOptions {
        owned_by_current_process: true,
        ..Default::default()
    };
    let (mut failed, mut first) = (0, None);
    for i in 0..boots {
        match Sandbox::create(&root.config, &format!("s{i}"), &options) {
            Ok(sb) => {
                if let Err(e) = sb.agent().check() {
                    failed += 1;
                    first.get_or_insert(format!("check: {e}"));
                }
                let _ = sb.shutdown();
            }
            Err(e) => {
                failed += 1;
                let e = e.to_string();
                first.get_or_insert(e.lines().next().unwrap_or_default().to_string());
            }
        }
    }
    serde_json::json!({ "hypervisor": hypervisor, "boots": boots, "failed": failed, "first_failure": first })
}

/// Boots L1 for each part and collects what the parts inside printed.
fn l1_bench(runs: usize, smp_boots: usize) -> serde_json::Value {
    use tegmen_tests::nested::run_in_l1_with;
    let me = std::env::current_exe().unwrap().canonicalize().unwrap();
    let bundle = me.parent().unwrap().join("l1").join("bench-bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    busybox_rootfs(&bundle.join("rootfs"));
    std::fs::write(
        bundle.join("config.json"),
        runc_like_spec(&["echo", "hello"], false).to_string(),
    )
    .unwrap();
    let collect = |name: &str, script: String, vcpus: u32| -> Vec<serde_json::Value> {
        let run = run_in_l1_with(name, &script, std::time::Duration::from_secs(3000), vcpus);
        assert_eq!(run.exit, Some(0), "{}", run.report());
        run.output
            .lines()
            .filter_map(|l| l.strip_prefix("L1BENCH "))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let me = me.display();
    let b = bundle.display();
    let single = collect(
        "bench",
        format!("set -e\nfor hv in builtin qemu; do r=$({me} l1-inside $hv {runs} {b}); echo \"L1BENCH $r\"; done\n"),
        1,
    );
    let smp = collect(
        "bench-smp",
        format!("set -e\nfor hv in builtin qemu; do r=$({me} l1-smp $hv {smp_boots}); echo \"L1BENCH $r\"; done\n"),
        2,
    );
    let _ = std::fs::remove_dir_all(&bundle);
    serde_json::json!({ "single": single, "smp": smp })
}

/// The guest's own clock (seconds since its boot) around `work`, from a
/// container on `bench/rootfs`: what the work took inside the guest,
/// without the container's start and removal.
/// A workload that fails says so in the JSON (`{"failed": why}`), next
/// to the numbers of those that did not.
fn guest_seconds(agent: &AgentClient, streams: &StreamEndpoint, id: &str, work: &str) -> Result<f64, String> {
    let script = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {work} >/dev/null 2>/tmp/err || {{ cat /tmp/err; exit 9; }}; \
         b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
    );
    let req = CreateContainerRequest {
        container_id: id.into(),
        spec_json: runc_like_spec(&["sh", "-c", &script], false).to_string(),
        rootfs: "bench/rootfs".into(),
        ..Default::default()
    };
    agent.create_container(&req).expect("CreateContainer");
    let mut out = streams.open(id, "", StreamKind::Stdout).expect("stdout stream");
    agent.start_container(id).expect("StartContainer");
    let mut text = String::new();
    out.read_to_string(&mut text).expect("stdout");
    let code = agent.wait_process(id, "").expect("WaitProcess").exit_code;
    agent.remove_container(id, false).expect("RemoveContainer");
    if code != 0 {
        return Err(format!("{work}: exit {code}: {}", text.trim()));
    }
    let t: Vec<f64> = text.split_whitespace().map(|w| w.parse().expect("an uptime")).collect();
    Ok(t[1] - t[0])
}

/// `f` of a workload's seconds, or what made it fail.
fn or_failed(r: &Result<f64, String>, f: impl Fn(f64) -> f64) -> serde_json::Value {
    match r {
        Ok(secs) => serde_json::json!(f(*secs)),
        Err(why) => serde_json::json!({ "failed": why }),
    }
}

/// No stdout byte for this long: the vsock stream has stalled.
const STALL: std::time::Duration = std::time::Duration::from_secs(20);

/// Files of the tree the metadata walk lists: 20 directories of 100.
const TREE: (usize, usize) = (20, 100);

/// fs sequential write and read (`mib` MiB) and a metadata walk (`ls -lR`
/// of a tree of [`TREE`] files), and a container's stdout through vsock,
/// in a guest whose agent answers on the hybrid vsock `uds` and whose
/// share is `shared` on the host.
fn workloads(uds: &std::path::Path, shared: &std::path::Path, mib: u64) -> serde_json::Value {
    let rootfs = shared.join("bench/rootfs");
    busybox_rootfs(&rootfs);
    std::fs::write(rootfs.join("big"), vec![0x5au8; (mib << 20) as usize]).expect("big");
    for d in 0..TREE.0 {
        let dir = rootfs.join(format!("tree/d{d}"));
        std::fs::create_dir_all(&dir).expect("tree");
        for f in 0..TREE.1 {
            std::fs::write(dir.join(format!("f{f}")), b"x").expect("tree file");
        }
    }
    let agent = AgentClient::connect(
        uds,
        1024,
        std::time::Duration::from_secs(30),
        std::time::Duration::from_secs(300),
    )
    .expect("the agent");
    let streams = StreamEndpoint::HybridVsock(uds.to_path_buf());
    let write = guest_seconds(
        &agent,
        &streams,
        "write",
        &format!("dd if=/dev/zero of=/written bs=1M count={mib} conv=fsync && rm /written"),
    );
    let read = guest_seconds(&agent, &streams, "read", "dd if=/big of=/dev/null bs=1M");
    let walk = guest_seconds(&agent, &streams, "walk", "ls -lR /tree");
    let cmd = format!("dd if=/dev/zero bs=1M count={mib} 2>/dev/null");
    let req = CreateContainerRequest {
        container_id: "vsock".into(),
        spec_json: runc_like_spec(&["sh", "-c", &cmd], false).to_string(),
        rootfs: "bench/rootfs".into(),
        ..Default::default()
    };
    agent.create_container(&req).expect("CreateContainer");
    let mut out = streams.open("vsock", "", StreamKind::Stdout).expect("stdout stream");
    // A stream that stops for this long has stalled: said, not waited for.
    out.set_read_timeout(Some(STALL)).expect("read timeout");
    agent.start_container("vsock").expect("StartContainer");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut first = None;
    let mut stalled = false;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                total += n as u64;
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                stalled = true;
                break;
            }
            Err(e) => panic!("stdout stream: {e}"),
        }
    }
    let vsock = first.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
    let mib_f = mib as f64;
    let vsock = if stalled {
        // The container may be blocked writing: it goes with the VM.
        serde_json::json!({ "stalled_after_bytes": total, "stall_s": STALL.as_secs() })
    } else {
        agent.wait_process("vsock", "").expect("WaitProcess");
        agent.remove_container("vsock", false).expect("RemoveContainer");
        assert_eq!(total, mib << 20, "stdout bytes");
        serde_json::json!(mib_f / vsock)
    };
    serde_json::json!({
        "write_mib_s": or_failed(&write, |s| mib_f / s),
        "read_mib_s": or_failed(&read, |s| mib_f / s),
        "walk_s": or_failed(&walk, |s| s),
        "vsock_mib_s": vsock,
    })
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
        ["l1", runs, smp] => println!("{}", l1_bench(runs.parse().unwrap(), smp.parse().unwrap())),
        ["l1-inside", hv, runs, bundle] => {
            println!("{}", l1_inside(hv, runs.parse().unwrap(), std::path::Path::new(bundle)))
        }
        ["l1-smp", hv, boots] => println!("{}", l1_smp(hv, boots.parse().unwrap())),
        ["workloads", uds, shared, mib] => println!(
            "{}",
            workloads(
                std::path::Path::new(uds),
                std::path::Path::new(shared),
                mib.parse().unwrap()
            )
        ),
        _ => {
            eprintln!(
                "usage: tegmen-bench agent-true host|guest RUNS | stdout-throughput MIB | cri RUNS | l1 RUNS SMP_BOOTS \
                 | workloads UDS SHARED MIB"
            );
            std::process::exit(2);
        }
    }
}
