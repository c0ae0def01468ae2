//! What the client tests share: scratch directories, the busybox image as
//! an OCI archive, containerd started with its own root, state and sockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::image::write_oci_archive;
use crate::{busybox_rootfs, mounts_below, processes_mentioning, wait_child, workspace_binary};

/// Runs the shell command `line` with a terminal of its own (`script`),
/// as a user at a terminal would; returns its exit status (None after
/// `timeout`) and its output with the terminal's `\r` removed.
pub fn run_in_terminal(line: &str, timeout: Duration) -> (Option<i32>, String) {
    tool("script");
    let mut child = Command::new("script")
        .args(["-qec", line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, timeout);
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out);
    (status, out.replace('\r', ""))
}

/// containerd on the config in `dir`, its log appended to `containerd.log`.
fn spawn_containerd(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    // containerd looks for `containerd-shim-tegmen-v2` on its PATH.
    let bin_dir = workspace_binary("containerd-shim-tegmen-v2")
        .canonicalize()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    Command::new("containerd")
        .env("PATH", path)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting containerd")
}

/// The CNI bridge of this test process's CRI containerd.
fn bridge_name() -> String {
    format!("tgme2e{}", std::process::id() % 1_000_000)
}

/// The pod sandbox image of the CRI tests: busybox sleeping.
pub const PAUSE_IMAGE: &str = "localhost/pause:tegmen";

pub const IMAGE: &str = "docker.io/library/busybox:latest";

pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/setup.sh (as `make test` does)");
}

/// A scratch directory for one client, removed (after unmounting whatever
/// is below it) when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = PathBuf::from(format!("/var/tmp/tegmen-e2e-{name}-{}", std::process::id()));
        let s = Scratch(dir);
        s.clean();
        std::fs::create_dir_all(&s.0).unwrap();
        s
    }

    pub fn clean(&self) {
        tegmen_supervisor::sandbox::unmount_below(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }

    /// The pod sandbox image as an OCI archive: busybox's `sleep`.
    pub fn pause_image(&self) -> PathBuf {
        let rootfs = self.0.join("image-rootfs");
        if !rootfs.exists() {
            busybox_rootfs(&rootfs);
        }
        let archive = self.0.join("pause-oci.tar");
        write_oci_archive(&rootfs, PAUSE_IMAGE, &["sleep", "2147483647"], &archive).expect("writing the pause image");
        archive
    }

    /// The busybox image as an OCI archive.
    pub fn image(&self) -> PathBuf {
        let rootfs = self.0.join("image-rootfs");
        busybox_rootfs(&rootfs);
        let archive = self.0.join("busybox-oci.tar");
        write_oci_archive(&rootfs, IMAGE, &["sh"], &archive).expect("writing the image archive");
        archive
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.clean();
    }
}

pub fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Panics naming what the container `id` left on the host: processes that
/// name it (QEMU, backends, monitors), its sandbox directory under `root`,
/// mounts below that directory.
pub fn assert_container_gone(root: &Path, id: &str) {
    let dir = root.join("sandboxes").join(id);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let procs = processes_mentioning(&dir);
        let mounts = mounts_below(&dir);
        let exists = dir.exists();
        if procs.is_empty() && mounts.is_empty() && !exists {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} left: processes {procs:?}, mounts {mounts:?}, directory present: {exists}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A process of the container's VM is running (so it is not runc's).
pub fn assert_vm_running(root: &Path, id: &str) {
    let dir = root.join("sandboxes").join(id);
    let procs = processes_mentioning(&dir);
    assert!(
        procs.iter().any(|(_, cmd)| cmd.contains("qemu-system")),
        "no QEMU for {id}: {procs:?}"
    );
}

/// Host kernel, to tell the guest's apart.
pub fn host_kernel() -> String {
    let u = nix::sys::utsname::uname().unwrap();
    format!("{} {}", u.release().to_string_lossy(), u.version().to_string_lossy())
}

// ------------------------------------------------------------ containerd

/// A containerd started here: own root, state, sockets and namespace,
/// CRI off; stopped (by its pid) and cleaned when dropped.
pub struct Containerd {
    pub dir: Scratch,
    daemon: Child,
    pub namespace: String,
    /// `tegmen`, for `--runc-binary`.
    pub runtime: PathBuf,
}

impl Containerd {
    /// containerd without its CRI plugin, namespace private to the test.
    pub fn start(name: &str) -> Containerd {
        Containerd::start_with(name, None)
    }

    /// containerd with its CRI plugin on (namespace `k8s.io`): handler
    /// `tegmen` is the shim with `shim_config` as its ConfigPath; pods get
    /// CNI's loopback network; the sandbox image is a busybox `sleep`.
    pub fn start_cri(name: &str, shim_config: &Path) -> Containerd {
        Containerd::start_with(name, Some(shim_config))
    }

    fn start_with(name: &str, cri: Option<&Path>) -> Containerd {
        tool("containerd");
        tool("ctr");
        tool("containerd-shim-runc-v2");
        let dir = Scratch::new(&format!("ctrd-{name}"));
        let d = dir.0.display();
        let plugins = match cri {
            None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string(),
            Some(shim_config) => {
                std::fs::create_dir_all(dir.0.join("cni")).unwrap();
                // CRI wants an eth0 with an address: a bridge of this
                // test's own, no gateway and no masquerade (no iptables).
                std::fs::write(
                    dir.0.join("cni/10-tegmen-e2e.conflist"),
                    serde_json::json!({
                        "cniVersion": "0.4.0", "name": "tegmen-e2e",
                        "plugins": [{"type": "bridge", "bridge": bridge_name(), "isGateway": false,
                                     "ipMasq": false, "hairpinMode": false,
                                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.213.0.0/24"}]],
                                              "dataDir": format!("{d}/cni-ipam")}}]
                    })
                    .to_string(),
                )
                .unwrap();
                let cri = "[plugins.\"io.containerd.grpc.v1.cri\"";
                let runtimes = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes";
                format!(
                    "{cri}]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  restrict_oom_score_adj = true\n  \
                     netns_mounts_under_state_dir = true\n\
                     {cri}.cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{d}/cni\"\n\
                     {cri}.containerd]\n  default_runtime_name = \"runc\"\n\
                     {runtimes}.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
                     {runtimes}.tegmen]\n  runtime_type = \"io.containerd.tegmen.v2\"\n  \
                     pod_annotations = [\"io.tegmen.*\"]\n\
                     {runtimes}.tegmen.options]\n  ConfigPath = \"{}\"\n",
                    shim_config.display()
                )
            }
        };
        std::fs::write(
            dir.0.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n{plugins}\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [debug]\n  address = \"{d}/debug.sock\"\n"
            ),
        )
        .unwrap();
        let daemon = spawn_containerd(&dir.0);
        let c = Containerd {
            dir,
            daemon,
            namespace: if cri.is_some() {
                "k8s.io".to_string()
            } else {
                format!("tegmen-e2e-{name}-{}", std::process::id())
            },
            runtime: workspace_binary("tegmen").canonicalize().unwrap(),
        };
        c.wait_up();
        let image = c.dir.image();
        c.ok(&["images", "import", image.to_str().unwrap()]);
        if cri.is_some() {
            let pause = c.dir.pause_image();
            c.ok(&["images", "import", pause.to_str().unwrap()]);
        }
        c
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.out(&["version"]).0 != 0 {
            assert!(Instant::now() < deadline, "containerd did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills containerd (SIGKILL) and starts it again on the same state:
    /// it finds the running shims again from their bundles' `address`.
    pub fn restart(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        self.daemon = spawn_containerd(&self.dir.0);
        self.wait_up();
    }

    /// Waits (30 s at most) until task `id` is STOPPED.
    pub fn wait_stopped(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.task_status(id) != "STOPPED" {
            assert!(Instant::now() < deadline, "{id} never stopped");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The containerd socket (gRPC: ctr and CRI clients).
    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("containerd.sock")
    }

    /// True when the CRI plugin is on.
    fn cri(&self) -> bool {
        self.namespace == "k8s.io"
    }

    /// containerd's own log (the shims' logs are copied into it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("containerd.log")).unwrap_or_default()
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.0.join("containerd.sock"))
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn out(&self, args: &[&str]) -> (i32, String, String) {
        text(&self.cmd(args).output().expect("running ctr"))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.out(args);
        assert_eq!(code, 0, "ctr {args:?}: {out}{err}");
        out
    }

    /// The runtime root the runc shim gives `--root`.
    pub fn runtime_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }

    pub fn task_status(&self, id: &str) -> String {
        let out = self.ok(&["tasks", "ls"]);
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let tasks = self.out(&["tasks", "ls", "-q"]).1;
        for t in tasks.lines() {
            let _ = self.cmd(&["tasks", "kill", "-s", "KILL", t]).output();
            std::thread::sleep(Duration::from_millis(300));
            let _ = self.cmd(&["tasks", "delete", "-f", t]).output();
        }
        let containers = self.out(&["containers", "ls", "-q"]).1;
        for c in containers.lines() {
            let _ = self.cmd(&["containers", "delete", c]).output();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if wait_child(&mut self.daemon, Duration::from_secs(10)).is_none() {
            let _ = self.daemon.wait();
        }
        let _ = std::fs::remove_dir_all(self.runtime_root());
        if self.cri() {
            let _ = Command::new("ip").args(["link", "del", &bridge_name()]).output();
        }
    }
}

/// Pids of running shims of ours.
pub fn shim_pids() -> Vec<i32> {
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

/// Waits until no shim runs and nothing of a sandbox is left in `state`.
pub fn assert_pods_gone(state: &Path, before: &[i32]) {
    let sandboxes = state.join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<i32> = shim_pids().into_iter().filter(|p| !before.contains(p)).collect();
        let dirs: Vec<String> = std::fs::read_dir(&sandboxes)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
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
