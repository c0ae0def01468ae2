//! Shared helpers of Tegmen's end-to-end tests: configurations rooted in a
//! private state directory per test, leftover checks, and tiny initramfs
//! archives for fault tests.

pub mod clients;
pub mod cri;
pub mod image;
pub mod nested;
pub mod netns;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tegmen_supervisor::agent_client::{AgentClient, StreamEndpoint};
use tegmen_supervisor::config::Config;

/// A configuration whose state root is private to one test (short, so every
/// socket path fits `sun_path`), removed when dropped.
pub struct TestRoot {
    pub config: Config,
}

impl TestRoot {
    pub fn new(name: &str) -> TestRoot {
        let root = PathBuf::from(format!("/run/tegmen-e2e/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("creating the test root");
        let mut config = Config {
            root,
            ..Config::default()
        };
        // Generous: several emulated guests may share two host cores.
        config.guest.boot_timeout_secs = 180;
        config.hypervisor = hypervisor_for_tests();
        TestRoot { config }
    }

    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// Panics naming whatever a sandbox left behind under this root: a
    /// sandbox directory, a process whose command line names the root, or a
    /// mount below it.
    pub fn assert_nothing_left(&self) {
        let root = self.root();
        let sandboxes = self.config.sandboxes_dir();
        if let Ok(entries) = std::fs::read_dir(&sandboxes) {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert!(names.is_empty(), "left in {}: {names:?}", sandboxes.display());
        }
        let procs = processes_mentioning(root);
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
        let mounts = mounts_below(root);
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
    }
}

impl Drop for TestRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.root());
    }
}

/// (pid, command line) of every process whose arguments name `path`.
pub fn processes_mentioning(path: &Path) -> Vec<(i32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(true);
        if text.contains(&needle) && !zombie {
            found.push((pid, text));
        }
    }
    found
}

pub fn mounts_below(path: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(path))
        .map(str::to_string)
        .collect()
}

/// A `newc` cpio archive (uncompressed; the kernel takes it as is).
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio {
            data: Vec::new(),
            ino: 1,
        }
    }
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8], rdev: (u32, u32)) {
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(mut self, name: &str) -> Self {
        self.entry(name, 0o040755, &[], (0, 0));
        self
    }

    pub fn file(mut self, name: &str, mode: u32, body: &[u8]) -> Self {
        self.entry(name, 0o100000 | mode, body, (0, 0));
        self
    }

    pub fn char_dev(mut self, name: &str, major: u32, minor: u32) -> Self {
        self.entry(name, 0o020600, &[], (major, minor));
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.data
    }
}

/// An initramfs whose /init is a busybox shell script: for guests that
/// boot but never run the agent.
pub fn busybox_initramfs(script: &str) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian's busybox-static) is needed");
    Cpio::default()
        .dir("dev")
        .char_dev("dev/console", 5, 1)
        .dir("bin")
        .file("bin/busybox", 0o755, &busybox)
        .file("init", 0o755, format!("#!/bin/busybox sh\n{script}\n").as_bytes())
        .finish()
}

/// The backend the tests' sandboxes use: `auto` unless
/// `TEGMEN_TEST_HYPERVISOR` says `qemu` or `builtin` (the nested L1 runs
/// the same scenarios once on each, on the same KVM).
pub fn hypervisor_for_tests() -> tegmen_supervisor::config::HypervisorChoice {
    use tegmen_supervisor::config::HypervisorChoice;
    match std::env::var("TEGMEN_TEST_HYPERVISOR").as_deref() {
        Err(_) | Ok("") | Ok("auto") => HypervisorChoice::Auto,
        Ok("qemu") => HypervisorChoice::Qemu,
        Ok("builtin") => HypervisorChoice::Builtin,
        Ok(other) => panic!("TEGMEN_TEST_HYPERVISOR={other:?}: expected auto, qemu or builtin"),
    }
}

/// An integration-test executable of this package (`containers`,
/// `sandbox`, ...), as cargo built it in `deps/` beside this one: the
/// newest `<name>-<hash>`.
pub fn test_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let prefix = format!("{name}-");
    let newest = std::fs::read_dir(deps)
        .unwrap()
        .flatten()
        .filter(|e| {
            let f = e.file_name();
            let f = f.to_string_lossy();
            f.strip_prefix(&prefix)
                .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    match newest {
        Some((_, path)) => path,
        None => panic!(
            "no test executable {name}-<hash> in {}: `cargo test -p tegmen-tests` builds it",
            deps.display()
        ),
    }
}

/// A binary of the workspace (`supervisor`, `tegmen-agent`, ...) built
/// beside the test executable by `cargo build --workspace --bins`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "{name} not found next to {}: run `cargo build --workspace --bins` first",
        exe.display()
    );
}

/// `tegmen-guest-probe` (tests/guest-probe), built static like the agent,
/// since it runs inside a guest's container: what a hostile guest does
/// to the host over vsock. Built once per test process, in a target
/// directory of its own (the one `cargo test` holds stays locked).
pub fn guest_probe() -> PathBuf {
    static PROBE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
            let target_dir = repo.join("target/guest-probe");
            let triple = "x86_64-unknown-linux-gnu";
            let out = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .current_dir(repo)
                .env(
                    "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                    "-C target-feature=+crt-static",
                )
                .args([
                    "build",
                    "--quiet",
                    "--profile",
                    "guest",
                    "-p",
                    "tegmen-guest-probe",
                    "--target",
                    triple,
                ])
                .arg("--target-dir")
                .arg(&target_dir)
                .output()
                .expect("running cargo to build tegmen-guest-probe");
            assert!(
                out.status.success(),
                "building tegmen-guest-probe: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            target_dir.join(triple).join("guest/tegmen-guest-probe")
        })
        .clone()
}

/// A busybox root file system in `dir` (created): Debian's static busybox
/// with a symlink per applet, plus the few files a container expects.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("/bin/busybox (Debian's busybox-static) is needed");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    for d in ["etc", "proc", "sys", "dev", "tmp", "root", "var"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// An OCI spec as `runc spec` writes it (`tegmen spec` writes the same),
/// running `args`, with a writable rootfs `rootfs`.
pub fn runc_like_spec(args: &[&str], terminal: bool) -> serde_json::Value {
    let mut spec = tegmen_supervisor::runtime::commands::default_spec();
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = terminal.into();
    spec["root"]["readonly"] = false.into();
    spec
}

/// The agent run on the host, as root, over Unix sockets
/// (`tegmen-agent --listen unix://...`), in its own state directory: the
/// same container code as in the guest, without a VM. Stopped, and checked
/// to have left no process behind, when dropped.
pub struct HostAgent {
    dir: PathBuf,
    child: std::process::Child,
    pub agent: AgentClient,
}

impl HostAgent {
    pub fn start(name: &str) -> HostAgent {
        let dir = PathBuf::from(format!("/run/tegmen-e2e/host-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let api = dir.join("agent.sock");
        let child = std::process::Command::new(workspace_binary("tegmen-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", api.display()))
            .arg("--stream-listen")
            .arg(format!("unix://{}", dir.join("streams.sock").display()))
            .arg("--shared-dir")
            .arg(dir.join("shared"))
            .arg("--state-root")
            .arg(dir.join("state"))
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .expect("starting tegmen-agent on the host");
        let deadline = Instant::now() + Duration::from_secs(20);
        let agent = loop {
            if let Ok(a) = AgentClient::connect_unix(&api, Duration::from_secs(30)) {
                if a.check().is_ok() {
                    break a;
                }
            }
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "the host agent did not start: {log}");
            std::thread::sleep(Duration::from_millis(20));
        };
        HostAgent { dir, child, agent }
    }

    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    pub fn endpoint(&self) -> StreamEndpoint {
        StreamEndpoint::Unix(self.dir.join("streams.sock"))
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let left = processes_mentioning(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        if !std::thread::panicking() {
            assert!(left.is_empty(), "processes left behind by the host agent: {left:?}");
        }
    }
}

/// Waits up to `timeout` for `child`: its exit code, or `None` after
/// killing it once the time is up.
pub fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Host cgroups as a test looks at them (what runc's callers read).
pub mod host_cgroup {
    use std::path::{Path, PathBuf};

    /// True on a host with only cgroup v2.
    pub fn pure_v2() -> bool {
        Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    }

    /// The directory of cgroup `path` (from the root) in `controller`'s
    /// hierarchy.
    pub fn dir(controller: &str, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        if pure_v2() {
            Path::new("/sys/fs/cgroup").join(rel)
        } else {
            Path::new("/sys/fs/cgroup").join(controller).join(rel)
        }
    }

    /// The processes in it.
    pub fn procs(controller: &str, path: &str) -> Vec<i32> {
        std::fs::read_to_string(dir(controller, path).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// One control file, by its v1 and v2 names.
    pub fn read(controller: &str, path: &str, v1: &str, v2: &str) -> String {
        let file = dir(controller, path).join(if pure_v2() { v2 } else { v1 });
        std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
            .trim()
            .to_string()
    }

    /// The pids of the host processes a sandbox recorded (`state.json`).
    pub fn vm_pids(sandbox_dir: &Path) -> Vec<i32> {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sandbox_dir.join("state.json")).expect("state.json")).unwrap();
        state["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_i64().unwrap() as i32)
            .collect()
    }

    /// The host cgroup directories a sandbox recorded as its own (the VM's
    /// and its containers'), from its `state.json`.
    pub fn recorded(sandbox_dir: &Path) -> Vec<PathBuf> {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sandbox_dir.join("state.json")).expect("state.json")).unwrap();
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut take = |cg: &serde_json::Value| {
            for d in cg["created"].as_array().into_iter().flatten() {
                dirs.push(PathBuf::from(d.as_str().unwrap()));
            }
        };
        take(&state["host_cgroup"]);
        for c in state["containers"].as_array().into_iter().flatten() {
            take(&c["host_cgroup"]);
        }
        dirs
    }

    /// Removes cgroup `path` and the empty cgroups below it, in every
    /// hierarchy (a cgroup with a process stays).
    pub fn remove_everywhere(path: &str) {
        let rel = path.trim_start_matches('/');
        remove_tree(&Path::new("/sys/fs/cgroup").join(rel));
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                remove_tree(&e.path().join(rel));
            }
        }
    }

    fn remove_tree(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }

    /// A cgroup a test names as a parent: removed with all below it when
    /// the test ends, passed or not.
    pub struct Scratch(pub String);

    impl Drop for Scratch {
        fn drop(&mut self) {
            remove_everywhere(&self.0);
        }
    }

    /// True when cgroup `path` is in no hierarchy.
    pub fn gone_everywhere(path: &str) -> bool {
        let rel = path.trim_start_matches('/');
        if pure_v2() {
            return !Path::new("/sys/fs/cgroup").join(rel).exists();
        }
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().all(|e| !e.path().join(rel).exists()))
            .unwrap_or(true)
    }
}
