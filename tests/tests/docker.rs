//! End-to-end: `tegmen` as a docker runtime. dockerd 20.10 (Debian's
//! docker.io) is started by the test with its own data root, exec root,
//! socket and containerd, without iptables or a bridge (the containers run
//! with `--network none`), and `tegmen` registered by path in daemon.json:
//! docker's containerd and its runc shim drive `tegmen` as they drive runc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tegmen_tests::clients::{
    assert_container_gone, assert_vm_running, host_kernel, run_in_terminal, text, tool, Scratch,
};
use tegmen_tests::image::write_rootfs_tar;
use tegmen_tests::{busybox_rootfs, mounts_below, processes_mentioning, wait_child, workspace_binary};

const IMAGE: &str = "busybox:latest";

/// A dockerd of this test's own; stopped (by its pid), with everything it
/// ran, when dropped.
struct Docker {
    dir: Scratch,
    daemon: Child,
}

impl Docker {
    fn start(name: &str) -> Docker {
        let dockerd = tool("dockerd");
        tool("docker");
        let dir = Scratch::new(&format!("docker-{name}"));
        let runtime = workspace_binary("tegmen").canonicalize().unwrap();
        std::fs::write(
            dir.0.join("daemon.json"),
            serde_json::json!({"runtimes": {"tegmen": {"path": runtime}}}).to_string(),
        )
        .unwrap();
        let log = std::fs::File::create(dir.0.join("dockerd.log")).unwrap();
        let d = &dir.0;
        let daemon = Command::new(dockerd)
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver=overlay2",
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        let docker = Docker { dir, daemon };
        let deadline = Instant::now() + Duration::from_secs(60);
        while docker.out(&["version"]).0 != 0 {
            assert!(Instant::now() < deadline, "dockerd did not come up:\n{}", docker.log());
            std::thread::sleep(Duration::from_millis(300));
        }
        let rootfs = docker.dir.0.join("image-rootfs");
        busybox_rootfs(&rootfs);
        let tar = docker.dir.0.join("busybox-rootfs.tar");
        write_rootfs_tar(&rootfs, &tar).unwrap();
        docker.ok(&["import", "--change", "CMD [\"sh\"]", tar.to_str().unwrap(), IMAGE]);
        docker
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tool("docker"));
        c.arg("-H").arg(self.host()).args(args).stdin(Stdio::null());
        c
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.0.join("docker.sock").display())
    }

    fn out(&self, args: &[&str]) -> (i32, String, String) {
        text(&self.cmd(args).output().expect("running docker"))
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.out(args);
        assert_eq!(code, 0, "docker {args:?}: {out}{err}");
        out
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("dockerd.log")).unwrap_or_default()
    }

    /// The `--root` docker's shim gives `tegmen`: dockerd's
    /// `<exec-root>/runtime-runc` (for every runtime of runc's type), and
    /// below it the shim's namespace.
    fn runtime_root(&self) -> PathBuf {
        self.dir.0.join("exec/runtime-runc/moby")
    }

    /// Waits until `docker logs name` holds `want`.
    fn wait_logs(&self, name: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, out, err) = self.out(&["logs", name]);
            if out.contains(want) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no {want:?} in the logs of {name}: {out}{err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Nothing of any container is left below the runtime's root:
    /// no sandbox, no process naming it, no mount.
    fn assert_runtime_empty(&self) {
        let root = self.runtime_root();
        let sandboxes = root.join("sandboxes");
        assert!(sandboxes.is_dir(), "no {}: did tegmen run at all?", sandboxes.display());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left: Vec<_> = std::fs::read_dir(&sandboxes)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            let procs = processes_mentioning(&root);
            let mounts = mounts_below(&root);
            if left.is_empty() && procs.is_empty() && mounts.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left: sandboxes {left:?}, processes {procs:?}, mounts {mounts:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd(&["ps", "-aq"]).output() {
            let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(String::from)
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.cmd(&args).output();
            }
        }
        // dockerd stops the containerd it started on SIGTERM.
        // SAFETY: kill() sends a signal to our own child.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        if wait_child(&mut self.daemon, Duration::from_secs(30)).is_none() {
            kill_pid_file(&self.dir.0.join("exec/containerd/containerd.pid"));
        }
    }
}

fn kill_pid_file(path: &Path) {
    if let Some(pid) = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: kill() sends a signal; the pid is the one our dockerd wrote.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// `docker run --rm`: output and exit code, the container on the guest's
/// kernel; with `-t`, through a pty (the shim's console socket); nothing
/// left after either.
#[test]
fn docker_run_output_exit_code_and_terminal() {
    let d = Docker::start("run");
    let (code, out, err) = d.out(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--runtime",
        "tegmen",
        IMAGE,
        "sh",
        "-c",
        "echo hello from docker; uname -r; exit 3",
    ]);
    assert_eq!(code, 3, "docker run: {out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from docker"), "{out:?} {err}");
    let kernel = lines.next().unwrap_or_default();
    assert!(
        !kernel.is_empty() && !host_kernel().starts_with(kernel),
        "the container ran on the host kernel: {kernel:?}"
    );
    d.assert_runtime_empty();

    let line = format!(
        "{} -H {} run --rm -t --network none --runtime tegmen {IMAGE} sh -c 'tty; exit 5'",
        tool("docker").display(),
        d.host()
    );
    let (status, out) = run_in_terminal(&line, Duration::from_secs(120));
    assert_eq!(status, Some(5), "docker run -t: {out:?}\n{}", d.log());
    assert!(out.contains("/dev/pts/0"), "no terminal in the container: {out:?}");
    d.assert_runtime_empty();
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "");
}

/// `docker run -d`, `logs`, `exec` (output and exit code), `stop` (SIGTERM
/// reaches a trap, its exit code is the container's), `rm`; `rm -f` of a
/// running container; nothing left.
#[test]
fn docker_detached_logs_exec_stop_rm() {
    let d = Docker::start("detached");
    let script = "echo started; trap 'echo bye; exit 7' TERM; while :; do sleep 0.2; done";
    let id = d.ok(&[
        "run",
        "-d",
        "--name",
        "d1",
        "--network",
        "none",
        "--runtime",
        "tegmen",
        IMAGE,
        "sh",
        "-c",
        script,
    ]);
    let id = id.trim().to_string();
    assert_eq!(id.len(), 64, "docker run -d prints the id: {id:?}");
    assert_vm_running(&d.runtime_root(), &id);
    d.wait_logs("d1", "started");

    let (code, out, err) = d.out(&["exec", "d1", "sh", "-c", "echo exec-ok; exit 4"]);
    assert_eq!((code, out.as_str()), (4, "exec-ok\n"), "docker exec: {err}");

    d.ok(&["stop", "-t", "30", "d1"]);
    assert_eq!(d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "d1"]).trim(), "7");
    d.wait_logs("d1", "bye");
    d.ok(&["rm", "d1"]);
    assert_container_gone(&d.runtime_root(), &id);

    let id2 = d.ok(&[
        "run",
        "-d",
        "--name",
        "d2",
        "--network",
        "none",
        "--runtime",
        "tegmen",
        IMAGE,
        "sleep",
        "1000",
    ]);
    let id2 = id2.trim().to_string();
    assert_vm_running(&d.runtime_root(), &id2);
    d.ok(&["rm", "-f", "d2"]);
    assert_container_gone(&d.runtime_root(), &id2);
    d.assert_runtime_empty();
    assert_eq!(d.ok(&["ps", "-aq"]).trim(), "");
}
