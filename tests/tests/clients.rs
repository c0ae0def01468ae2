//! End-to-end: `tegmen` in place of runc under the real clients — podman
//! (Debian's 4.3, with conmon) and containerd (Debian's 1.6, started here
//! with its own root, state and socket, driven by `ctr`). Each container
//! runs in a real guest. Images are built offline from busybox.
//!
//! The clients and their daemons are installed by `scripts/setup.sh`.
//! podman calls the runtime without `--root`, so its containers live under
//! tegmen's default root, `/run/tegmen`; containerd's shim passes
//! `--root /run/containerd/runc/<namespace>`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tegmen_tests::clients::*;
use tegmen_tests::{wait_child, workspace_binary};

// ---------------------------------------------------------------- podman

/// podman isolated from the machine's: its own containers.conf,
/// storage.conf and directories; `--runtime` is tegmen by path.
struct Podman {
    dir: Scratch,
    runtime: PathBuf,
    /// The network namespace podman runs in (where its bridges go).
    netns: Option<String>,
}

impl Podman {
    fn new(name: &str) -> Podman {
        Podman::new_in(name, None)
    }

    /// podman run in the network namespace at `netns`, with the CNI
    /// networks in `<scratch>/cni` (`network_config_dir`).
    fn new_in(name: &str, netns: Option<&str>) -> Podman {
        tool("podman");
        tool("conmon");
        let dir = Scratch::new(&format!("podman-{name}"));
        let d = dir.0.display();
        // podman asks for RLIMIT_NOFILE/NPROC of 1048576 by default, beyond
        // this machine's hard limits. Networks are CNI's (no netavark
        // here), configured by the tests that use one.
        std::fs::write(
            dir.0.join("containers.conf"),
            format!(
                "[containers]\n\
             default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [engine]\n\
             cgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\n\
             [network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [\"/usr/lib/cni\"]\n\
             network_config_dir = \"{d}/cni\"\n"
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.0.join("cni")).unwrap();
        std::fs::write(
            dir.0.join("storage.conf"),
            format!("[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/storage\"\nrunroot = \"{d}/runroot\"\n"),
        )
        .unwrap();
        let p = Podman {
            dir,
            runtime: workspace_binary("tegmen").canonicalize().unwrap(),
            netns: netns.map(str::to_string),
        };
        let image = p.dir.image();
        let (code, out, err) = p.out(&["load", "-q", "-i", image.to_str().unwrap()]);
        assert_eq!(code, 0, "podman load: {out}{err}");
        p
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            None => Command::new("podman"),
            Some(path) => {
                // Only the network namespace: podman's mounts must stay
                // where the next podman command sees them.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={path}")).arg("podman");
                c
            }
        };
        c.env("CONTAINERS_CONF", self.dir.0.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.0.join("storage.conf"))
            .arg("--tmpdir")
            .arg(self.dir.0.join("tmp"))
            .arg("--runtime")
            .arg(&self.runtime)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// The command line for a shell (`script` runs it in a pty).
    fn shell_line(&self, args: &[&str]) -> String {
        let d = self.dir.0.display();
        format!(
            "CONTAINERS_CONF={d}/containers.conf CONTAINERS_STORAGE_CONF={d}/storage.conf \
             podman --tmpdir {d}/tmp --runtime {} {}",
            self.runtime.display(),
            args.join(" ")
        )
    }

    fn out(&self, args: &[&str]) -> (i32, String, String) {
        text(&self.cmd(args).output().expect("running podman"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.out(args);
        assert_eq!(code, 0, "podman {args:?}: {out}{err}");
        out.trim().to_string()
    }

    fn full_id(&self, name: &str) -> String {
        self.ok(&["inspect", name, "--format", "{{.Id}}"])
    }

    fn wait_logs(&self, name: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, out, _) = self.out(&["logs", name]);
            if out.contains(want) {
                return out;
            }
            assert!(Instant::now() < deadline, "{name}: logs never showed {want:?}: {out:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-af", "-t", "0"]).output();
        let _ = self.cmd(&["system", "reset", "-f"]).output();
    }
}

const DEFAULT_ROOT: &str = "/run/tegmen";

/// `podman run --rm` prints the container's output and returns its exit
/// code; the container saw the guest's kernel, not the host's; nothing of
/// it is left afterwards.
#[test]
fn podman_run_output_and_exit_code() {
    let p = Podman::new("run");
    let cidfile = p.dir.0.join("run.cid");
    let (code, out, err) = p.out(&[
        "run",
        "--rm",
        "--cidfile",
        cidfile.to_str().unwrap(),
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        "echo hello from podman; echo \"$(uname -r) $(uname -v)\"; exit 3",
    ]);
    assert_eq!(code, 3, "podman run: {out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from podman"), "output {out:?} {err}");
    let kernel = lines.next().unwrap_or_default();
    assert!(
        !kernel.is_empty() && kernel != host_kernel(),
        "the container ran on the host kernel: {kernel:?}"
    );
    let id = std::fs::read_to_string(&cidfile).expect("podman wrote the container id");
    assert_container_gone(Path::new(DEFAULT_ROOT), id.trim());
}

/// `podman run` on a bridge network of podman's (CNI: bridge +
/// host-local, no masquerade), with podman in a network namespace of the
/// test's, where its bridge goes: the VM takes over the namespace podman
/// made for the container, the guest gets podman's address, and traffic
/// flows both ways with the bridge. Nothing is left on the bridge after.
#[test]
fn podman_bridge_network_reaches_the_container() {
    use tegmen_tests::netns::Netns;
    let host = Netns::new(&format!("tgpodman{}", std::process::id() % 100_000));
    let p = Podman::new_in("net", Some(&host.path()));
    let d = p.dir.0.display().to_string();
    std::fs::write(
        p.dir.0.join("cni/tgnet.conflist"),
        serde_json::json!({
            "cniVersion": "0.4.0", "name": "tgnet",
            "plugins": [{"type": "bridge", "bridge": "tgpbr0", "isGateway": true, "ipMasq": false,
                         "ipam": {"type": "host-local", "dataDir": format!("{d}/cni-ipam"),
                                  "ranges": [[{"subnet": "10.215.0.0/24", "gateway": "10.215.0.1"}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}]
        })
        .to_string(),
    )
    .unwrap();
    p.ok(&[
        "run",
        "-d",
        "--name",
        "tegmen-e2e-net",
        "--network",
        "tgnet",
        IMAGE,
        "sh",
        "-c",
        "while :; do echo from-the-podman-container | nc -l -p 8095; done",
    ]);
    let id = p.full_id("tegmen-e2e-net");
    assert_vm_running(Path::new(DEFAULT_ROOT), &id);
    let ip = p.ok(&[
        "inspect",
        "tegmen-e2e-net",
        "--format",
        "{{.NetworkSettings.Networks.tgnet.IPAddress}}",
    ]);
    assert!(ip.starts_with("10.215.0."), "podman's address: {ip:?}");
    // The bridge side reaches the server in the guest...
    assert_eq!(
        host.read_from(&ip, "8095", "the server in the guest"),
        "from-the-podman-container\n"
    );
    // ...and the guest reaches a server on the bridge, through the default
    // route CNI gave.
    let _server = host.spawn(&[
        "sh",
        "-c",
        "while :; do echo from-the-bridge | busybox nc -l -p 8096; done",
    ]);
    let out = p.ok(&[
        "exec",
        "tegmen-e2e-net",
        "sh",
        "-c",
        "ip addr show eth0; ip route; for i in 1 2 3 4 5; do nc -w 5 10.215.0.1 8096 && break; sleep 1; done",
    ]);
    assert!(out.contains(&format!("inet {ip}/24")), "the guest's eth0: {out}");
    assert!(out.contains("default via 10.215.0.1"), "the guest's routes: {out}");
    assert!(out.ends_with("from-the-bridge"), "from the bridge: {out}");
    p.ok(&["rm", "-f", "-t", "0", "tegmen-e2e-net"]);
    assert_container_gone(Path::new(DEFAULT_ROOT), &id);
    let links = host.links();
    assert!(!links.contains("veth"), "CNI's veth is gone from the bridge: {links}");
}

/// `podman run -d`, `logs`, `exec` (output and exit code), `stop` (SIGTERM
/// reaches a trap; its exit code is recorded), `kill` (137), `rm`.
#[test]
fn podman_detached_logs_exec_stop_kill() {
    let p = Podman::new("detached");
    let script = "echo started; trap 'echo got-term; exit 7' TERM; while :; do sleep 0.2; done";
    p.ok(&[
        "run",
        "-d",
        "--name",
        "tegmen-e2e-d",
        "--network",
        "none",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    let id = p.full_id("tegmen-e2e-d");
    p.wait_logs("tegmen-e2e-d", "started");
    assert_vm_running(Path::new(DEFAULT_ROOT), &id);

    let (code, out, err) = p.out(&["exec", "tegmen-e2e-d", "sh", "-c", "echo exec-ok; hostname; exit 4"]);
    assert_eq!(code, 4, "podman exec: {out}{err}");
    assert!(out.starts_with("exec-ok\n"), "exec output {out:?}");
    assert_eq!(
        p.ok(&["inspect", "tegmen-e2e-d", "--format", "{{.State.Status}}"]),
        "running"
    );

    p.ok(&["stop", "-t", "20", "tegmen-e2e-d"]);
    assert_eq!(
        p.ok(&["inspect", "tegmen-e2e-d", "--format", "{{.State.ExitCode}}"]),
        "7"
    );
    let logs = p.ok(&["logs", "tegmen-e2e-d"]);
    assert_eq!(logs, "started\ngot-term", "logs");
    p.ok(&["rm", "tegmen-e2e-d"]);
    assert_container_gone(Path::new(DEFAULT_ROOT), &id);

    // kill: SIGKILL by default, exit code 137.
    p.ok(&[
        "run",
        "-d",
        "--name",
        "tegmen-e2e-k",
        "--network",
        "none",
        IMAGE,
        "sleep",
        "1000",
    ]);
    let id = p.full_id("tegmen-e2e-k");
    p.ok(&["kill", "tegmen-e2e-k"]);
    p.ok(&["wait", "tegmen-e2e-k"]);
    assert_eq!(
        p.ok(&[
            "inspect",
            "tegmen-e2e-k",
            "--format",
            "{{.State.ExitCode}} {{.State.Status}}"
        ]),
        "137 exited"
    );
    p.ok(&["rm", "tegmen-e2e-k"]);
    assert_container_gone(Path::new(DEFAULT_ROOT), &id);
}

/// `podman run -it` through a pty (`script` provides it): the container's
/// stdin and stdout are its terminal, the terminal size is passed on, the
/// exit code comes back.
#[test]
fn podman_interactive_terminal() {
    let p = Podman::new("tty");
    tool("script");
    let line = p.shell_line(&["run", "-it", "--rm", "--network", "none", IMAGE, "sh"]);
    let mut child = Command::new("script")
        .args(["-qec", &format!("stty rows 27 cols 91; {line}"), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { out }, &mut s);
        s
    });
    // Typed ahead: the guest's shell reads it once it runs.
    use std::io::Write;
    stdin
        .write_all(b"tty; echo size=$(stty size); echo tty-done; exit 5\n")
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120));
    drop(stdin);
    let out = reader.join().unwrap().replace('\r', "");
    assert_eq!(status, Some(5), "podman run -it: {out:?}");
    assert!(out.contains("/dev/pts/0\n"), "no terminal inside: {out:?}");
    assert!(out.contains("size=27 91\n"), "terminal size not passed on: {out:?}");
}

/// `ctr run --runc-binary tegmen` of the imported image: output, and the
/// container's exit code as ctr's; nothing left after `--rm`; the same
/// with a terminal (`run -t`). The id has
/// 64 characters, as Kubernetes' do: below the shim's `--root` the
/// sandbox's socket paths exceed `sun_path`.
#[test]
fn containerd_ctr_run_exit_code() {
    let c = Containerd::start("run");
    let runtime = c.runtime.to_str().unwrap().to_string();
    let id = "c1".repeat(32);
    assert!(
        c.runtime_root()
            .join("sandboxes")
            .join(&id)
            .join("vhost-vsock.sock")
            .as_os_str()
            .len()
            > 108
    );
    let (code, out, err) = c.out(&[
        "run",
        "--rm",
        "--runc-binary",
        &runtime,
        IMAGE,
        &id,
        "sh",
        "-c",
        "echo hello from containerd; echo \"$(uname -r) $(uname -v)\"; exit 3",
    ]);
    assert_eq!(code, 3, "ctr run: {out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from containerd"), "output {out:?} {err}");
    let kernel = lines.next().unwrap_or_default();
    assert!(
        !kernel.is_empty() && kernel != host_kernel(),
        "the container ran on the host kernel: {kernel:?}"
    );
    assert_container_gone(&c.runtime_root(), &id);

    // With a terminal: the shim takes the pty master from the console
    // socket only after `tegmen create`'s output reached EOF.
    let line = format!(
        "ctr --address {} --namespace {} run --rm -t --runc-binary {runtime} {IMAGE} t2 sh -c 'tty; exit 5'",
        c.dir.0.join("containerd.sock").display(),
        c.namespace
    );
    let (status, out) = run_in_terminal(&line, Duration::from_secs(120));
    assert_eq!(status, Some(5), "ctr run -t: {out:?}");
    assert!(out.contains("/dev/pts/0"), "no terminal in the container: {out:?}");
    assert_container_gone(&c.runtime_root(), "t2");
    assert!(c.ok(&["containers", "ls", "-q"]).trim().is_empty());
}

/// A detached task: `ctr tasks exec` (output and exit code, and with a
/// terminal), `ctr tasks kill` (SIGTERM reaches a trap), the exit code
/// reported, `tasks delete` and `containers delete` leave nothing.
#[test]
fn containerd_task_exec_kill() {
    let c = Containerd::start("task");
    let runtime = c.runtime.to_str().unwrap().to_string();
    let script = "trap 'exit 9' TERM; while :; do sleep 0.2; done";
    c.ok(&["run", "-d", "--runc-binary", &runtime, IMAGE, "t1", "sh", "-c", script]);
    assert_eq!(c.task_status("t1"), "RUNNING");
    assert_vm_running(&c.runtime_root(), "t1");

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

    // With a terminal: ctr wants one itself, `script` gives it.
    let line = format!(
        "ctr --address {} --namespace {} tasks exec -t --exec-id e2 t1 tty",
        c.dir.0.join("containerd.sock").display(),
        c.namespace
    );
    let (status, out) = run_in_terminal(&line, Duration::from_secs(60));
    assert_eq!(status, Some(0), "ctr tasks exec -t: {out:?}");
    assert!(out.contains("/dev/pts/"), "no terminal in the exec: {out:?}");

    c.ok(&["tasks", "kill", "t1"]);
    c.wait_stopped("t1");
    // ctr reports the exit code of the task it deletes.
    let (code, out, err) = c.out(&["tasks", "delete", "t1"]);
    assert_eq!(code, 0, "ctr tasks delete: {out}{err}");
    assert!(
        err.contains("task t1 exit with non-zero exit code 9"),
        "ctr tasks delete: {err}"
    );
    c.ok(&["containers", "delete", "t1"]);
    assert_container_gone(&c.runtime_root(), "t1");
}
