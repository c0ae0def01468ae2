//! End-to-end: real sandbox VMs (QEMU + our vhost-user devices + the agent
//! as PID 1) booted, questioned, shut down and faulted, each test checking
//! that nothing is left behind.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tegmen_supervisor::config::Config;
use tegmen_supervisor::sandbox::{self, Sandbox, SandboxOptions};
use tegmen_supervisor::Error;
use tegmen_tests::{busybox_initramfs, processes_mentioning, workspace_binary, TestRoot};

fn options() -> SandboxOptions {
    SandboxOptions {
        owned_by_current_process: true,
        ..Default::default()
    }
}

/// Boots, checks what the guest reports, shuts down.
fn boot_and_verify(config: &Config, id: &str) {
    let sb = Sandbox::create(config, id, &options()).unwrap_or_else(|e| panic!("sandbox {id}: {e}"));
    let check = sb.agent().check().expect("Check");
    assert!(check.uptime_seconds > 0.0);
    let details = sb.agent().guest_details().expect("GuestDetails");
    assert_eq!(details.sandbox_id, id, "the sandbox id read back through virtio-fs");
    let share = details
        .mounts
        .iter()
        .find(|m| m.target == "/run/tegmen/shared")
        .unwrap_or_else(|| panic!("no mount on /run/tegmen/shared in {:?}", details.mounts));
    assert_eq!(share.fstype, "virtiofs");
    assert_eq!(share.source, "tegmen");
    assert!(
        details.memory_total_bytes > 100 << 20,
        "memory {}",
        details.memory_total_bytes
    );
    assert_eq!(details.cpus, config.guest.vcpus);
    assert!(
        details.kernel_release.starts_with("6."),
        "kernel {}",
        details.kernel_release
    );
    let dir = sb.dir().to_path_buf();
    sb.shutdown().expect("shutdown");
    assert!(!dir.exists(), "{} remains", dir.display());
}

#[test]
fn a_sandbox_boots_answers_and_shuts_down_cleanly() {
    let t = TestRoot::new("basic");
    let sb = Sandbox::create(&t.config, "basic", &options()).expect("create");
    let v = sb.agent().version().expect("Version");
    assert_eq!(v.api_version, tegmen_agent_api::API_VERSION);
    assert!(!v.agent_version.is_empty());
    // The state file records the running VM and its boot time.
    let state = sandbox::read_state(sb.dir()).unwrap();
    assert_eq!(state.status, sandbox::Status::Running);
    assert!(state.boot_to_agent_ms.is_some());
    let names: Vec<&str> = state.processes.iter().map(|p| p.name.as_str()).collect();
    // QEMU with the devices as vhost-user backends, or the builtin
    // monitor with them inline.
    match state.hypervisor.as_str() {
        "qemu" => assert_eq!(names, ["tegmen-vsock-backend", "tegmen-fs-backend", "qemu"]),
        "builtin" => assert_eq!(names, ["tegmen-vmm"]),
        other => panic!("backend {other:?}"),
    }
    assert!(state.processes.iter().all(|p| p.is_alive()));
    // A file written into the share before boot is what the guest reads.
    let details = sb.agent().guest_details().unwrap();
    assert_eq!(details.sandbox_id, "basic");
    let processes = state.processes.clone();
    sb.shutdown().expect("shutdown");
    for p in &processes {
        assert!(!p.is_alive(), "{} still runs", p.name);
    }
    t.assert_nothing_left();
}

#[test]
fn twenty_sandboxes_one_after_another_leave_nothing() {
    let t = TestRoot::new("seq");
    for i in 0..20 {
        boot_and_verify(&t.config, &format!("seq-{i}"));
        t.assert_nothing_left();
    }
}

#[test]
fn four_sandboxes_at_once_leave_nothing() {
    let t = TestRoot::new("par");
    std::thread::scope(|s| {
        for i in 0..4 {
            let config = &t.config;
            s.spawn(move || boot_and_verify(config, &format!("par-{i}")));
        }
    });
    t.assert_nothing_left();
}

#[test]
fn an_id_in_use_is_refused_without_harming_the_first() {
    let t = TestRoot::new("dup");
    let first = Sandbox::create(&t.config, "dup", &options()).expect("create");
    match Sandbox::create(&t.config, "dup", &options()) {
        Err(Error::SandboxExists(id)) => assert_eq!(id, "dup"),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a second sandbox with the same id was created"),
    }
    first.agent().check().expect("the first sandbox still answers");
    first.shutdown().unwrap();
    t.assert_nothing_left();
}

fn expect_error(config: &Config, id: &str) -> String {
    match Sandbox::create(config, id, &options()) {
        Ok(_) => panic!("sandbox {id} was created"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_or_corrupt_kernel_and_initramfs_are_named() {
    let t = TestRoot::new("image");
    let files = t.root().join("files");
    std::fs::create_dir_all(&files).unwrap();

    let mut c = t.config.clone();
    c.guest.kernel = Some(files.join("no-vmlinux"));
    let e = expect_error(&c, "img1");
    assert!(e.contains("no-vmlinux"), "{e}");

    let bad_kernel = files.join("vmlinux-garbage");
    std::fs::write(&bad_kernel, b"this is not a kernel image at all........").unwrap();
    c.guest.kernel = Some(bad_kernel);
    let e = expect_error(&c, "img2");
    assert!(e.contains("vmlinux-garbage") && e.contains("not an ELF"), "{e}");

    let mut c = t.config.clone();
    let bad_initrd = files.join("initrd-garbage");
    std::fs::write(&bad_initrd, b"garbage!").unwrap();
    c.guest.initramfs = Some(bad_initrd);
    let e = expect_error(&c, "img3");
    assert!(e.contains("initrd-garbage"), "{e}");
    c.guest.initramfs = Some(files.join("no-initrd"));
    let e = expect_error(&c, "img4");
    assert!(e.contains("no-initrd"), "{e}");
    std::fs::remove_dir_all(&files).unwrap();
    t.assert_nothing_left();
}

/// Guest memory too small for the initramfs: refused with an error naming
/// the memory, nothing left.
#[test]
fn guest_memory_too_small_for_the_initramfs_is_named() {
    let t = TestRoot::new("smallmem");
    // A valid newc archive of 80 MiB (one file of zeros) for a 64 MiB guest.
    let big = tegmen_tests::Cpio::default()
        .file("padding", 0o644, &vec![0u8; 80 << 20])
        .finish();
    let initrd = t.root().join("big.cpio");
    std::fs::write(&initrd, big).unwrap();
    let mut c = t.config.clone();
    c.guest.memory_mib = 64;
    c.guest.initramfs = Some(initrd.clone());
    let e = expect_error(&c, "smallmem");
    eprintln!("{e}");
    assert!(
        e.contains("64 MiB of memory is too little") || e.contains("too large"),
        "{e}"
    );
    std::fs::remove_file(initrd).unwrap();
    t.assert_nothing_left();
}

#[test]
fn qemu_missing_is_named() {
    let t = TestRoot::new("noqemu");
    let mut c = t.config.clone();
    c.qemu.path = "/nonexistent/qemu-system-x86_64".into();
    let e = expect_error(&c, "noqemu");
    assert!(
        e.contains("QEMU not found") && e.contains("/nonexistent/qemu-system-x86_64"),
        "{e}"
    );
    t.assert_nothing_left();
}

/// A 64-character id under a long root (as under containerd's
/// `/run/containerd/runc/k8s.io`) puts every socket path of the sandbox
/// beyond `sun_path`'s 108 bytes: the sandbox still boots, answers and
/// goes without leftovers.
#[test]
fn socket_paths_longer_than_sun_path_work() {
    let t = TestRoot::new("long");
    let mut c = t.config.clone();
    c.root = t.root().join("x".repeat(40));
    let id = "f".repeat(64);
    let vsock = c.sandboxes_dir().join(&id).join("vsock");
    assert!(vsock.as_os_str().len() > 108, "{}", vsock.display());
    boot_and_verify(&c, &id);
    assert!(processes_mentioning(&c.root).is_empty());
    t.assert_nothing_left();
}

/// Boots an initramfs whose /init is a busybox script (it never runs the
/// agent); returns the error the boot ended with.
fn boot_busybox_init(t: &TestRoot, name: &str, script: &str, timeout_secs: u64) -> String {
    let initrd = t.root().join(format!("{name}.cpio"));
    std::fs::write(&initrd, busybox_initramfs(script)).unwrap();
    let mut c = t.config.clone();
    c.guest.initramfs = Some(initrd.clone());
    c.guest.boot_timeout_secs = timeout_secs;
    let e = expect_error(&c, name);
    std::fs::remove_file(initrd).unwrap();
    e
}

#[test]
fn an_agent_that_never_answers_times_out_with_the_console() {
    let t = TestRoot::new("mute");
    let started = Instant::now();
    let script = "echo tegmen-test: this init never answers; exec /bin/busybox sleep 1000";
    let e = boot_busybox_init(&t, "mute", script, 15);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(e.contains("did not answer within 15s"), "{e}");
    assert!(
        e.contains("tegmen-test: this init never answers"),
        "the console tail is in the error: {e}"
    );
    t.assert_nothing_left();
}

#[test]
fn a_guest_that_ends_during_boot_is_reported() {
    let t = TestRoot::new("reboot");
    let e = boot_busybox_init(
        &t,
        "reboot",
        "echo tegmen-test: rebooting at once; /bin/busybox reboot -f",
        180,
    );
    assert!(e.contains("exited during boot"), "{e}");
    assert!(e.contains("tegmen-test: rebooting at once"), "{e}");
    t.assert_nothing_left();
}

/// Waits for the sandbox's state file to list its running monitor (QEMU
/// or `tegmen-vmm`), returns it.
fn wait_for_monitor(config: &Config, id: &str) -> tegmen_supervisor::process::ProcessRecord {
    let dir = config.sandboxes_dir().join(id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(state) = sandbox::read_state(&dir) {
            if let Some(q) = state
                .processes
                .iter()
                .find(|p| p.name == "qemu" || p.name == "tegmen-vmm")
            {
                return q.clone();
            }
        }
        assert!(Instant::now() < deadline, "the monitor of {id} never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The VM's monitor (QEMU or `tegmen-vmm`) killed with SIGKILL while the
/// guest boots: the error says so, and nothing is left.
#[test]
fn the_monitor_killed_mid_boot_is_reported_and_cleaned() {
    let t = TestRoot::new("kill");
    let config = t.config.clone();
    let creator = std::thread::spawn(move || Sandbox::create(&config, "kill", &options()).map(|_| ()));
    let qemu = wait_for_monitor(&t.config, "kill");
    std::thread::sleep(Duration::from_millis(300));
    qemu.kill();
    let e = creator.join().unwrap().expect_err("create must fail").to_string();
    assert!(e.contains("exited during boot") && e.contains("signal: 9"), "{e}");
    t.assert_nothing_left();
}

#[test]
fn a_supervisor_killed_with_sigkill_is_cleaned_up_at_the_next_start() {
    let t = TestRoot::new("sigkill");
    let mut child = std::process::Command::new(workspace_binary("supervisor"))
        .arg("--root")
        .arg(t.root())
        .args(["check", "--boot"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let id = format!("check-{}", child.id());
    let qemu = wait_for_monitor(&t.config, &id);
    child.kill().unwrap();
    child.wait().unwrap();
    // The VM outlives its killed supervisor ...
    assert!(qemu.is_alive(), "QEMU should still run until cleanup");
    assert!(!processes_mentioning(t.root()).is_empty());
    // ... until the next start finds it stale and removes all of it.
    let removed = sandbox::cleanup_stale(&t.config).unwrap();
    assert_eq!(removed, vec![id]);
    assert!(!qemu.is_alive());
    t.assert_nothing_left();
}

#[test]
fn supervisor_check_boot_reports_and_exits_zero() {
    let t = TestRoot::new("cli");
    let out = std::process::Command::new(workspace_binary("supervisor"))
        .arg("--root")
        .arg(t.root())
        .args(["check", "--boot"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "hardware virtualization:",
        "backend: qemu",
        "qemu: ",
        "guest kernel: ",
        "boot to agent ready:",
        "virtiofs",
        "shutdown: ok",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing from:\n{stdout}");
    }
    t.assert_nothing_left();
    let _ = PathBuf::new();
}

/// The guest image boots on Tegmen's own KVM monitor (`tegmen-vmm`, vsock
/// and virtio-fs inline) and answers as under QEMU. Needs KVM that runs a
/// Linux guest (vmx or svm); skipped elsewhere, saying so.
#[test]
fn the_builtin_monitor_boots_the_guest() {
    let t = TestRoot::new("builtin");
    let mut c = t.config.clone();
    let (hw, why) = tegmen_supervisor::hypervisor::effective_hw_virt(&c);
    if !hw {
        eprintln!("skipped: the builtin monitor needs hardware virtualization, and {why}");
        return;
    }
    c.hypervisor = tegmen_supervisor::config::HypervisorChoice::Builtin;
    boot_and_verify(&c, "builtin");
    let sb = Sandbox::create(&c, "builtin2", &options()).expect("create");
    let state = sandbox::read_state(sb.dir()).unwrap();
    let names: Vec<&str> = state.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["tegmen-vmm"], "one process, no QEMU");
    sb.shutdown().expect("shutdown");
    t.assert_nothing_left();
}
