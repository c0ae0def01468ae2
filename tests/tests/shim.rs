//! End-to-end: `containerd-shim-tegmen-v2` under Debian's containerd 1.6,
//! driven by `ctr run --runtime io.containerd.tegmen.v2` (containerd
//! started here, finding the shim on its PATH). Each task runs in a real
//! guest; the shim's configuration (a private state root) reaches it as
//! containerd's runtime options (`--runtime-config-path`).

use std::time::{Duration, Instant};

use tegmen_tests::clients::{assert_pods_gone, host_kernel, run_in_terminal, shim_pids as shims, Containerd, IMAGE};
use tegmen_tests::cri::shim_config;
use tegmen_tests::TestRoot;

const RUNTIME: &str = "io.containerd.tegmen.v2";

/// `ctr run -d` of the busybox image with the shim: `args` are the task id
/// and its command.
fn run_detached(c: &Containerd, config: &str, args: &[&str]) {
    let mut all = vec![
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        config,
        IMAGE,
    ];
    all.extend_from_slice(args);
    c.ok(&all);
}

/// `ctr run --rm` with the shim and its configuration; `args` are ctr's
/// further options, the image or rootfs, the id and the command.
fn run_rm(c: &Containerd, config: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["run", "--rm", "--runtime", RUNTIME, "--runtime-config-path", config];
    all.extend_from_slice(args);
    c.out(&all)
}

/// `ctr run --rm`: output, the exit code as ctr's, the guest's kernel;
/// `--log-uri file://` gets both streams; nothing left afterwards.
#[test]
fn ctr_run_with_the_shim() {
    let root = TestRoot::new("shim-run");
    let config = shim_config(&root);
    let before = shims();
    let c = Containerd::start("shim-run");
    let cfg = config.to_str().unwrap();
    let (code, out, err) = run_rm(
        &c,
        cfg,
        &[
            IMAGE,
            "r1",
            "sh",
            "-c",
            "echo hello from the shim; echo \"$(uname -r) $(uname -v)\"; echo to-stderr >&2; exit 3",
        ],
    );
    assert_eq!(code, 3, "ctr run: {out}{err}\n{}", c.log());
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from the shim"), "output {out:?} {err}");
    let kernel = lines.next().unwrap_or_default();
    assert!(
        !kernel.is_empty() && kernel != host_kernel(),
        "the task ran on the host kernel: {kernel:?}"
    );
    assert!(err.contains("to-stderr"), "stderr: {err:?}");
    assert_pods_gone(&root.root().join("state"), &before);

    let log = root.root().join("r2.log");
    let uri = format!("file://{}", log.display());
    let (code, out, err) = run_rm(
        &c,
        cfg,
        &["--log-uri", &uri, IMAGE, "r2", "sh", "-c", "seq 1 20000; echo done >&2"],
    );
    assert_eq!(code, 0, "ctr run --log-uri: {out}{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    let want: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert!(text.starts_with(&want[..want.len() - 6]), "log {} bytes", text.len());
    assert!(text.contains(&want[want.len() - 30..]), "the log lost bytes");
    assert!(text.contains("done\n"), "stderr in the log");
    assert_pods_gone(&root.root().join("state"), &before);

    // A `binary://` logger (containerd's protocol: stdout on fd 3, stderr
    // on fd 4, ready when fd 5 closes), as nerdctl and docker use it.
    let logger = root.root().join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" > \"$1.env\"\n\
         cat <&3 > \"$1.out\" & cat <&4 > \"$1.err\"; wait\n",
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let base = root.root().join("r4");
    let uri = format!("binary://{}?{}", logger.display(), base.display());
    let (code, out, err) = run_rm(
        &c,
        cfg,
        &["--log-uri", &uri, IMAGE, "r4", "sh", "-c", "seq 1 20000; echo done >&2"],
    );
    assert_eq!(code, 0, "ctr run --log-uri binary://: {out}{err}");
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", base.display())).unwrap_or_default();
    // The logger may still be writing its last bytes when ctr returns.
    let deadline = Instant::now() + Duration::from_secs(10);
    while read("err") != "done\n" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        read("out") == want,
        "the logger got {} bytes of stdout",
        read("out").len()
    );
    assert_eq!(read("err"), "done\n");
    assert_eq!(read("env").trim(), format!("{}/r4", c.namespace));
    assert_pods_gone(&root.root().join("state"), &before);

    // A logger that cannot start: Create fails naming it, nothing is left.
    let (code, out, err) = run_rm(&c, cfg, &["--log-uri", "binary:///no/such/logger", IMAGE, "r5", "true"]);
    assert_ne!(code, 0, "a missing logger: {out}{err}");
    assert!(err.contains("/no/such/logger"), "the error names the logger: {err}");
    let _ = c.out(&["containers", "delete", "r5"]);
    assert_pods_gone(&root.root().join("state"), &before);

    // A rootfs that is not there: Create fails naming it, nothing is left.
    let missing = root.root().join("no-such-rootfs");
    let (code, out, err) = run_rm(&c, cfg, &["--rootfs", missing.to_str().unwrap(), "r3", "true"]);
    assert_ne!(code, 0, "a missing rootfs: {out}{err}");
    assert!(err.contains("no-such-rootfs"), "the error names the rootfs: {err}");
    let _ = c.out(&["containers", "delete", "r3"]);
    assert_pods_gone(&root.root().join("state"), &before);
}

/// A detached task: its VM, `tasks exec` (output and exit code), `tasks
/// ps`, pause/resume, `tasks kill` reaching a TERM trap, the exit code
/// reported by `tasks delete`, and nothing left after `containers delete`.
#[test]
fn ctr_detached_task_exec_kill_with_the_shim() {
    let root = TestRoot::new("shim-task");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let c = Containerd::start("shim-task");
    let cfg = config.to_str().unwrap();
    let script = "trap 'exit 9' TERM; while :; do sleep 0.2; done";
    run_detached(&c, cfg, &["t1", "sh", "-c", script]);
    assert_eq!(c.task_status("t1"), "RUNNING");
    let sandbox = state.join("sandboxes/t1");
    let st = tegmen_supervisor::sandbox::read_state(&sandbox).expect("the pod's sandbox");
    assert_eq!(st.face, tegmen_supervisor::sandbox::Face::Shim);
    assert_eq!(st.containers.len(), 1);
    assert!(st.processes.iter().any(|p| p.name == "qemu" && p.is_alive()));
    // `supervisor list` / `inspect` show the pod, its face and container.
    let supervisor = tegmen_tests::workspace_binary("supervisor");
    let list = std::process::Command::new(&supervisor)
        .arg("--root")
        .arg(&state)
        .arg("list")
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let row = list
        .lines()
        .find(|l| l.starts_with("t1 "))
        .unwrap_or_else(|| panic!("{list}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (cols[1], cols[2], cols[cols.len() - 1]),
        ("running", "shim", "t1"),
        "{list}"
    );
    let inspect = std::process::Command::new(&supervisor)
        .arg("--root")
        .arg(&state)
        .args(["inspect", "--json", "t1"])
        .output()
        .unwrap();
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect prints JSON");
    assert_eq!(inspect["face"], "shim");
    assert_eq!(inspect["containers"][0]["id"], "t1");
    assert!(
        inspect["containers"][0]["bundle"]
            .as_str()
            .is_some_and(|b| b.ends_with("/t1")),
        "{inspect}"
    );

    let (code, out, err) = c.out(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "t1",
        "sh",
        "-c",
        "echo exec-ok; exit 6",
    ]);
    assert_eq!((code, out.as_str()), (6, "exec-ok\n"), "ctr tasks exec: {err}");
    // A missing binary is an error, not a hang.
    let started = Instant::now();
    let (code, out, err) = c.out(&["tasks", "exec", "--exec-id", "e-missing", "t1", "/no/such/binary"]);
    assert_ne!(code, 0, "exec of a missing binary: {out}{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the failed exec took {:?}",
        started.elapsed()
    );
    assert!(err.contains("/no/such/binary"), "the error names the binary: {err}");
    let ps = c.ok(&["tasks", "ps", "t1"]);
    assert!(ps.lines().count() >= 2, "tasks ps: {ps}");

    c.ok(&["tasks", "pause", "t1"]);
    assert_eq!(c.task_status("t1"), "PAUSED");
    c.ok(&["tasks", "resume", "t1"]);
    assert_eq!(c.task_status("t1"), "RUNNING");

    c.ok(&["tasks", "kill", "t1"]);
    c.wait_stopped("t1");
    let (code, out, err) = c.out(&["tasks", "delete", "t1"]);
    assert_eq!(code, 0, "ctr tasks delete: {out}{err}");
    assert!(
        err.contains("task t1 exit with non-zero exit code 9"),
        "ctr tasks delete: {err}"
    );
    c.ok(&["containers", "delete", "t1"]);
    assert_pods_gone(&state, &before);
}

/// A shim killed with SIGKILL: containerd runs the binary's `delete`, which
/// removes the pod's VM; nothing is left.
#[test]
fn a_killed_shim_leaves_nothing_after_delete() {
    let root = TestRoot::new("shim-kill");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let c = Containerd::start("shim-kill");
    run_detached(&c, config.to_str().unwrap(), &["k1", "sleep", "1000"]);
    let ours: Vec<i32> = shims().into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(ours.len(), 1, "one shim for the pod: {ours:?}");
    // ctr's cgroup for the task (/<namespace>/k1): the VM is in it.
    let cgroups = tegmen_tests::host_cgroup::recorded(&state.join("sandboxes/k1"));
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|d| d.ends_with("k1") && d.exists()),
        "{cgroups:?}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(ours[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.task_status("k1") != "STOPPED" && !c.task_status("k1").is_empty() {
        assert!(Instant::now() < deadline, "k1 never stopped after its shim died");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = c.out(&["tasks", "delete", "k1"]);
    c.ok(&["containers", "delete", "k1"]);
    assert_pods_gone(&state, &before);
    let left: Vec<_> = cgroups.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "host cgroups left after the shim was killed: {left:?}");
}

/// The PID column of `ctr tasks ls` for `id`.
fn task_pid(c: &Containerd, id: &str) -> u32 {
    let out = c.ok(&["tasks", "ls"]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {id} in {out}"))
}

/// A pod as CRI makes one, through ctr: a sandbox container, then an app
/// container with the pod's annotations that names the pod's namespaces
/// as `/proc/<task pid>/ns/…`. Both run in one VM (one QEMU, one shim),
/// see the same guest boot id and the same net, IPC and UTS namespaces,
/// and the app reaches a listener of the sandbox on the pod's loopback.
/// Removing the app leaves the sandbox running; removing the sandbox
/// ends the pod.
#[test]
fn a_pod_is_one_vm_with_shared_namespaces() {
    let root = TestRoot::new("shim-pod");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let c = Containerd::start("shim-pod");
    let cfg = config.to_str().unwrap();
    let pod = "pod1";
    let ns_report = "echo boot=$(cat /proc/sys/kernel/random/boot_id) net=$(readlink /proc/self/ns/net) \
                     ipc=$(readlink /proc/self/ns/ipc) uts=$(readlink /proc/self/ns/uts) host=$(hostname)";
    let sandbox_script = format!("{ns_report} > /tmp/ns; while :; do echo pong-from-sandbox | nc -l -p 7777; done");
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        cfg,
        "--annotation",
        &format!("io.kubernetes.cri.sandbox-id={pod}"),
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        IMAGE,
        pod,
        "sh",
        "-c",
        &sandbox_script,
    ]);
    let shim_pid = task_pid(&c, pod);
    assert!(shims().contains(&(shim_pid as i32)), "the task pid is the shim's");
    // A container of a pod that has no shim is refused, saying so.
    let (code, out, err) = c.out(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.sandbox-id=no-such-pod",
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        IMAGE,
        "orphan",
        "true",
    ]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("no-such-pod"), "the error names the pod: {err}");
    let _ = c.out(&["containers", "delete", "orphan"]);
    let ns = |t: &str| format!("{t}:/proc/{shim_pid}/ns/{}", if t == "network" { "net" } else { t });
    let app_script = format!("sleep 1; {ns_report}; echo ping | nc 127.0.0.1 7777");
    let (code, out, err) = c.out(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        &format!("io.kubernetes.cri.sandbox-id={pod}"),
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--with-ns",
        &ns("network"),
        "--with-ns",
        &ns("ipc"),
        "--with-ns",
        &ns("uts"),
        IMAGE,
        "app1",
        "sh",
        "-c",
        &app_script,
    ]);
    assert_eq!(code, 0, "app container: {out}{err}\n{}", c.log());
    let mut lines = out.lines();
    let app_ns = lines.next().unwrap_or_default().to_string();
    assert_eq!(lines.next(), Some("pong-from-sandbox"), "the pod's loopback: {out:?}");

    // The sandbox's view, read through an exec in it.
    let sandbox_ns = c.ok(&["tasks", "exec", "--exec-id", "e1", pod, "cat", "/tmp/ns"]);
    assert_eq!(sandbox_ns.trim(), app_ns.trim(), "same boot id and namespaces");
    assert_eq!(
        shims().iter().filter(|p| !before.contains(p)).count(),
        1,
        "one shim for the pod"
    );
    let st = tegmen_supervisor::sandbox::read_state(&state.join("sandboxes").join(pod)).unwrap();
    let qemus = st.processes.iter().filter(|p| p.name == "qemu").count();
    assert_eq!(qemus, 1, "one VM for the pod");
    assert_eq!(
        st.containers.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        [pod],
        "the app container was removed from the pod"
    );
    assert_eq!(c.task_status(pod), "RUNNING", "the sandbox goes on");

    c.ok(&["tasks", "kill", "-s", "KILL", pod]);
    c.wait_stopped(pod);
    c.ok(&["tasks", "delete", pod]);
    c.ok(&["containers", "delete", pod]);
    assert_pods_gone(&state, &before);
}

/// `ctr run -t` and `ctr tasks exec -t` through the shim: a pty in the
/// guest, the client's terminal size passed on, the exit code.
#[test]
fn ctr_run_with_a_terminal_through_the_shim() {
    let root = TestRoot::new("shim-tty");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let c = Containerd::start("shim-tty");
    let ctr = format!("ctr --address {} --namespace {}", c.socket().display(), c.namespace);
    let run_in_script = |line: &str| run_in_terminal(&format!("stty rows 27 cols 91; {line}"), Duration::from_secs(90));
    let (status, out) = run_in_script(&format!(
        "{ctr} run --rm -t --runtime {RUNTIME} --runtime-config-path {} {IMAGE} tty1 \
         sh -c 'tty; stty size; exit 5'",
        config.display()
    ));
    assert_eq!(status, Some(5), "ctr run -t: {out:?}\n{}", c.log());
    assert!(out.contains("/dev/pts/0\n"), "no terminal inside: {out:?}");
    assert!(out.contains("27 91\n"), "terminal size not passed on: {out:?}");
    assert_pods_gone(&state, &before);

    run_detached(&c, config.to_str().unwrap(), &["tty2", "sleep", "600"]);
    let (status, out) = run_in_script(&format!("{ctr} tasks exec -t --exec-id e1 tty2 sh -c 'tty; exit 4'"));
    assert_eq!(status, Some(4), "ctr tasks exec -t: {out:?}");
    assert!(out.contains("/dev/pts/"), "no terminal in the exec: {out:?}");
    c.ok(&["tasks", "kill", "-s", "KILL", "tty2"]);
    c.wait_stopped("tty2");
    c.ok(&["tasks", "delete", "tty2"]);
    c.ok(&["containers", "delete", "tty2"]);
    assert_pods_gone(&state, &before);
}

/// containerd killed and restarted mid-pod: it reconnects to the shim
/// from the bundle's `address`; State, Exec and a later exit still work.
#[test]
fn a_pod_survives_a_containerd_restart() {
    let root = TestRoot::new("shim-restart");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let mut c = Containerd::start("shim-restart");
    let script = "trap 'exit 9' TERM; while :; do sleep 0.2; done";
    run_detached(&c, config.to_str().unwrap(), &["s1", "sh", "-c", script]);
    let shim_pid = task_pid(&c, "s1");
    c.restart();
    assert_eq!(c.task_status("s1"), "RUNNING", "{}", c.log());
    assert_eq!(task_pid(&c, "s1"), shim_pid, "the same shim");
    let (code, out, err) = c.out(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "s1",
        "sh",
        "-c",
        "echo after-restart; exit 2",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (2, "after-restart\n"),
        "exec after the restart: {err}"
    );
    c.ok(&["tasks", "kill", "s1"]);
    c.wait_stopped("s1");
    let (code, out, err) = c.out(&["tasks", "delete", "s1"]);
    assert_eq!(code, 0, "ctr tasks delete: {out}{err}");
    assert!(err.contains("exit code 9"), "the exit after the restart: {err}");
    c.ok(&["containers", "delete", "s1"]);
    assert_pods_gone(&state, &before);
}

/// The pod's VM killed (QEMU, SIGKILL): its containers end with 255, as
/// containerd's clients expect of a dead sandbox, and delete leaves nothing.
#[test]
fn a_killed_vm_ends_the_pods_containers_with_255() {
    let root = TestRoot::new("shim-vmkill");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let c = Containerd::start("shim-vmkill");
    run_detached(&c, config.to_str().unwrap(), &["v1", "sleep", "1000"]);
    let st = tegmen_supervisor::sandbox::read_state(&state.join("sandboxes/v1")).unwrap();
    let qemu = st.processes.iter().find(|p| p.name == "qemu").expect("a QEMU");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu.pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    c.wait_stopped("v1");
    let (code, out, err) = c.out(&["tasks", "delete", "v1"]);
    assert_eq!(code, 0, "ctr tasks delete: {out}{err}");
    assert!(err.contains("exit code 255"), "a dead VM's container exits 255: {err}");
    c.ok(&["containers", "delete", "v1"]);
    assert_pods_gone(&state, &before);
}

/// The pod killed while an exec streams output: the exec's client ends
/// (no hang), and delete leaves nothing.
#[test]
fn a_pod_torn_down_while_an_exec_streams_output() {
    let root = TestRoot::new("shim-teardown");
    let config = shim_config(&root);
    let state = root.root().join("state");
    let before = shims();
    let c = Containerd::start("shim-teardown");
    run_detached(&c, config.to_str().unwrap(), &["d1", "sleep", "1000"]);
    let mut exec = c.cmd(&[
        "tasks",
        "exec",
        "--exec-id",
        "stream",
        "d1",
        "sh",
        "-c",
        "while :; do echo line; done",
    ]);
    let mut exec = exec
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = exec.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        let mut total = 0usize;
        while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    std::thread::sleep(Duration::from_secs(2));
    c.ok(&["tasks", "kill", "-a", "-s", "KILL", "d1"]);
    let status = tegmen_tests::wait_child(&mut exec, Duration::from_secs(30));
    if status.is_none() {
        let _ = exec.kill();
        let _ = exec.wait();
    }
    let streamed = reader.join().unwrap();
    assert!(status.is_some(), "ctr tasks exec hung after its pod was killed");
    assert!(streamed > 0, "the exec streamed nothing before the kill");
    c.wait_stopped("d1");
    c.ok(&["tasks", "delete", "d1"]);
    c.ok(&["containers", "delete", "d1"]);
    assert_pods_gone(&state, &before);
}
