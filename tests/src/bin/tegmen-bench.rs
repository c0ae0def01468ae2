//! Measurements behind `make bench` that need the agent API (called by
//! scripts/bench/bench.py, which prints them next to their references).
//!
//!   tegmen-bench agent-true host|guest RUNS   create+start+wait+remove of /bin/true
//!   tegmen-bench stdout-throughput MIB        stdout of a container in a guest
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
        _ => {
            eprintln!("usage: tegmen-bench agent-true host|guest RUNS | stdout-throughput MIB");
            std::process::exit(2);
        }
    }
}
