//! The builtin monitor on this host's /dev/kvm, with tiny guests assembled
//! here (GNU as and ld) and booted through the same path as a kernel: an
//! ELF64 file whose PVH note names a 32-bit entry point. `/dev/kvm` may
//! emulate guest code instruction by instruction (no vmx/svm), so each
//! guest runs only a few hundred instructions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tegmen_vmm::builtin::{StopReason, Vm, VmConfig};

/// Assembles and links `source` into an ELF64 whose first segment is at
/// 1 MiB, as a kernel's.
fn assemble(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&src, source).unwrap();
    let status = Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src).status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "assembling {name} (binutils' as is needed)"
    );
    let status = Command::new("ld")
        .args(["-m", "elf_x86_64", "-Ttext-segment=0x100000", "-e", "_start", "-o"])
        .arg(&elf)
        .arg(&obj)
        .status();
    assert!(status.is_ok_and(|s| s.success()), "linking {name}");
    elf
}

/// A 32-bit guest whose text follows the `_start` label; the note makes it
/// PVH.
fn tiny_guest(dir: &Path, name: &str, body: &str) -> PathBuf {
    let text = format!(
        r#"
    .code32
    .section .text
    .globl _start
_start:
{body}
halt:
    hlt
    jmp halt

    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18
    .asciz "Xen"
    .long _start
"#
    );
    assemble(dir, name, &text)
}

/// Prints `text` on the serial port.
fn print(text: &str) -> String {
    let mut s = String::from("    mov $0x3f8, %dx\n");
    for b in text.bytes() {
        s.push_str(&format!("    mov ${b}, %al\n    out %al, %dx\n"));
    }
    s
}

const BOOT_MARK: &str = "    mov $0x440, %dx\n    mov $1, %al\n    out %al, %dx\n";
const I8042_RESET: &str = "    mov $0xfe, %al\n    out %al, $0x64\n";

fn kvm_available() -> bool {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm is missing");
        return false;
    }
    true
}

fn config(dir: &Path, kernel: PathBuf) -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: 32,
        kernel,
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        console: Some(dir.join("console.log")),
        // A test harness's threads are not to be filtered.
        seccomp: tegmen_vmm::seccomp::Mode::Off,
    }
}

#[test]
fn a_tiny_guest_prints_marks_its_boot_and_resets() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{}{}{}", print("hello from a tiny guest\n"), BOOT_MARK, I8042_RESET);
    let kernel = tiny_guest(dir.path(), "hello", &body);
    let vm = Vm::new(&config(dir.path(), kernel)).expect("VM");
    let out = vm.run(Some(Duration::from_secs(60))).expect("run");
    assert_eq!(out.reason, StopReason::Reset);
    let mark = out.boot_mark.expect("the boot mark was written");
    assert!(mark < Duration::from_secs(60));
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert_eq!(console, "hello from a tiny guest\n");
}

#[test]
fn the_guest_finds_its_boot_information() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // %ebx points at hvm_start_info: print 'P' if its magic is right, then
    // the first byte of the command line it names.
    let body = r#"
    mov $0x3f8, %dx
    cmpl $0x336ec578, (%ebx)
    jne 1f
    mov $'P', %al
    out %al, %dx
1:
    mov 24(%ebx), %esi
    mov (%esi), %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
"#;
    let body = format!("{body}{I8042_RESET}");
    let kernel = tiny_guest(dir.path(), "info", &body);
    let mut c = config(dir.path(), kernel);
    c.cmdline = "Xconsole=ttyS0".into();
    let out = Vm::new(&c).unwrap().run(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(out.reason, StopReason::Reset);
    assert_eq!(std::fs::read_to_string(dir.path().join("console.log")).unwrap(), "PX\n");
}

/// No IDT: the breakpoint faults, the fault faults. Hardware KVM reports
/// the triple fault as a shutdown; this host's KVM as an internal error
/// the monitor does not handle. Either way the VM stops, naming the exit
/// and the guest's RIP (the `int3` at the entry point), and never hangs.
#[test]
fn a_fault_without_an_idt_stops_the_vm_with_the_exit_and_rip() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_guest(dir.path(), "fault", "    int3\n");
    let entry = entry_point(&kernel);
    let out = Vm::new(&config(dir.path(), kernel))
        .unwrap()
        .run(Some(Duration::from_secs(60)))
        .unwrap();
    match out.reason {
        StopReason::Shutdown { vcpu: 0, .. } => {}
        StopReason::Unhandled { vcpu: 0, reason, rip } => {
            assert_eq!(reason, "InternalError");
            assert_eq!(rip, entry, "RIP of the faulting instruction");
        }
        other => panic!("expected a shutdown or an unhandled exit, got {other:?}"),
    }
    assert!(out.boot_mark.is_none());
}

/// A write to a port with no device is ignored (logged once), as on a
/// real bus; a write to an MMIO address with no device stops the VM with
/// the address and the RIP of the instruction, never a hang.
#[test]
fn an_unhandled_port_is_ignored_and_an_unhandled_mmio_write_stops_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "    mov $0x1234, %dx\n    mov $7, %al\n    out %al, %dx\n    in %dx, %al\n    cmp $0xff, %al\n    jne halt\n{}    movl $0x5a5a5a5a, 0xe0000000\n",
        print("past the port\n")
    );
    let kernel = tiny_guest(dir.path(), "mmio", &body);
    let entry = entry_point(&kernel);
    let out = Vm::new(&config(dir.path(), kernel))
        .unwrap()
        .run(Some(Duration::from_secs(60)))
        .unwrap();
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert_eq!(
        console, "past the port\n",
        "the port read gave all ones and the guest went on"
    );
    match out.reason {
        StopReason::Unhandled { vcpu: 0, reason, rip } => {
            assert_eq!(reason, "MMIO write of 4 bytes at 0xe0000000: no device there");
            // The movl is the last instruction of the body, after the
            // port accesses and the print.
            assert!(rip > entry && rip < entry + 400, "RIP {rip:#x}, entry {entry:#x}");
        }
        other => panic!("expected an unhandled MMIO write, got {other:?}"),
    }
}

/// The ELF entry point of a tiny guest.
fn entry_point(elf: &Path) -> u64 {
    let data = std::fs::read(elf).unwrap();
    u64::from_le_bytes(data[24..32].try_into().unwrap())
}

#[test]
fn a_guest_that_never_stops_is_stopped_by_the_host() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_guest(dir.path(), "spin", "spin:\n    jmp spin\n");
    let t = std::time::Instant::now();
    let out = Vm::new(&config(dir.path(), kernel))
        .unwrap()
        .run(Some(Duration::from_millis(500)))
        .unwrap();
    assert_eq!(out.reason, StopReason::Stopped);
    assert!(t.elapsed() < Duration::from_secs(20), "stopping took {:?}", t.elapsed());
}

#[test]
fn bad_kernels_and_sizes_are_named() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let err = |c: &VmConfig| Vm::new(c).err().expect("an error").to_string();

    let c = config(dir.path(), dir.path().join("missing-vmlinux"));
    let e = err(&c);
    assert!(e.contains("missing-vmlinux") && e.contains("No such file"), "{e}");

    let not_elf = dir.path().join("bzImage");
    std::fs::write(
        &not_elf,
        b"MZ\x00\x00 this is no ELF file at all, padded out to a header's length....",
    )
    .unwrap();
    let e = err(&config(dir.path(), not_elf));
    assert!(e.contains("not an ELF vmlinux"), "{e}");

    // Too little memory for kernel + initramfs.
    let kernel = tiny_guest(dir.path(), "small", I8042_RESET);
    let initramfs = dir.path().join("big.cpio");
    std::fs::write(&initramfs, vec![0u8; 8 << 20]).unwrap();
    let mut c = config(dir.path(), kernel.clone());
    c.memory_mib = 4;
    c.initramfs = Some(initramfs);
    let e = err(&c);
    assert!(
        e.contains("4 MiB of memory is too little") && e.contains("big.cpio"),
        "{e}"
    );

    let mut c = config(dir.path(), kernel.clone());
    c.vcpus = 0;
    assert!(err(&c).contains("at least one vCPU"));
    let mut c = config(dir.path(), kernel);
    c.cmdline = "x".repeat(4096);
    assert!(err(&c).contains("command line"));
}

/// A device that only answers the transport's questions.
struct Probe;

impl tegmen_vmm::builtin::virtio_mmio::VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        u32::from(b'*')
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16]
    }
    fn features(&self) -> u64 {
        tegmen_vmm::builtin::virtio_mmio::VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        _: vm_memory::GuestMemoryMmap,
        _: u64,
        _: Vec<(virtio_queue::Queue, vmm_sys_util::eventfd::EventFd)>,
        _: std::sync::Arc<tegmen_vmm::builtin::virtio_mmio::Interrupt>,
    ) -> Result<(), String> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// The guest reads the first virtio-mmio device's magic, version and
/// device id, sets ACKNOWLEDGE and reads the status back, finds nothing in
/// the next window, and notifies queue 0 twice: the queue's eventfd (a KVM
/// ioeventfd) counts both.
#[test]
fn a_tiny_guest_reads_a_virtio_mmio_device() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
    mov $0xd0000000, %esi
    mov $0x3f8, %dx
    mov (%esi), %eax
    out %al, %dx
    shr $8, %eax
    out %al, %dx
    shr $8, %eax
    out %al, %dx
    shr $8, %eax
    out %al, %dx
    mov 4(%esi), %eax
    add $'0', %al
    out %al, %dx
    mov 8(%esi), %eax
    out %al, %dx
    movl $1, 0x70(%esi)
    mov 0x70(%esi), %eax
    add $'0', %al
    out %al, %dx
    mov 0x1000(%esi), %eax
    cmp $0xffffffff, %eax
    jne 1f
    mov $'-', %al
    out %al, %dx
1:
    movl $0, 0x50(%esi)
    movl $0, 0x50(%esi)
    mov $'\n', %al
    out %al, %dx
"#;
    let body = format!("{body}{I8042_RESET}");
    let kernel = tiny_guest(dir.path(), "mmio", &body);
    let vm = Vm::with_devices(&config(dir.path(), kernel), vec![Box::new(Probe)]).unwrap();
    let kick = vm.queue_kick(0, 0).expect("device 0 has queue 0");
    assert!(vm.queue_kick(0, 1).is_none() && vm.queue_kick(1, 0).is_none());
    let out = vm.run(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(
        kick.read().unwrap(),
        2,
        "both notifications of queue 0 reached its eventfd"
    );
    assert_eq!(out.reason, StopReason::Reset);
    // "virt", version 2, device '*', status 1, nothing at the next window.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("console.log")).unwrap(),
        "virt2*1-\n"
    );
}

/// The `tegmen-vmm` process: a tiny guest with the vsock and fs devices
/// inline; one JSON line says how it ended and when the boot mark came;
/// its vsock socket is gone afterwards. A kernel that is missing ends it
/// with status 2 and the file named.
#[test]
fn the_vmm_process_runs_a_guest_with_its_devices() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let body = format!("{}{}{}", print("vmm process\n"), BOOT_MARK, I8042_RESET);
    let kernel = tiny_guest(dir.path(), "proc", &body);
    let uds = dir.path().join("vsock");
    let out = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32", "--timeout-secs", "60"])
        .arg("--console")
        .arg(dir.path().join("console.log"))
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("sandboxed:"),
        "the monitor pivots into its directory: {stderr}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["reason"], "reset");
    assert!(v["boot_mark_ms"].as_f64().unwrap() > 0.0);
    assert!(v["first_entry_ms"].as_f64().unwrap() <= v["boot_mark_ms"].as_f64().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("console.log")).unwrap(),
        "vmm process\n"
    );
    assert!(!uds.exists(), "the vsock socket is removed");

    let out = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(dir.path().join("no-such-vmlinux"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-vmlinux"));

    // Sandboxed, the share must be below the sandbox directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(elsewhere.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not below the sandbox directory"), "{stderr}");
    assert!(!uds.exists(), "nothing left after the refusal");
    // Unsandboxed, it may be anywhere.
    let out = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32", "--sandbox", "none"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(elsewhere.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!uds.exists());

    // --stats-dir: each inline device's counters on `<device>.stats` while
    // the VM runs (bound before the pivot), one JSON line per connection.
    let spin = tiny_guest(dir.path(), "spin", "spin:\n    jmp spin\n");
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&spin)
        .args(["--memory-mib", "32", "--timeout-secs", "30"])
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share)
        .arg("--stats-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read = |name: &str| -> Option<serde_json::Value> {
        let mut text = String::new();
        let mut conn = std::os::unix::net::UnixStream::connect(dir.path().join(name)).ok()?;
        std::io::Read::read_to_string(&mut conn, &mut text).ok()?;
        serde_json::from_str(&text).ok()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (vsock, fs) = loop {
        if let (Some(v), Some(f)) = (read("vsock.stats"), read("fs.stats")) {
            break (v, f);
        }
        assert!(std::time::Instant::now() < deadline, "no counters served");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = vmm.kill();
    let _ = vmm.wait();
    assert_eq!((&vsock["device"], &fs["device"]), (&"vsock".into(), &"fs".into()));
    assert_eq!(vsock["counters"]["tx_packets"], 0, "{vsock}");
    assert_eq!(fs["counters"]["chains"], 0, "{fs}");
}

/// A 64-bit ELF without a PVH note boots through the 64-bit Linux boot
/// protocol: it starts in long mode (a 64-bit shift works) and `%rsi`
/// points at the zero page (boot flag 0xaa55, the command line pointer).
#[test]
fn a_guest_without_pvh_boots_in_long_mode_with_a_zero_page() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = r#"
    .code64
    .section .text
    .globl _start
_start:
    mov $0x3f8, %dx
    movabs $0x3100000000, %rax
    shr $32, %rax
    out %al, %dx
    cmpw $0xaa55, 0x1fe(%rsi)
    jne 1f
    mov $'Z', %al
    out %al, %dx
1:
    mov 0x228(%rsi), %ebx
    mov (%rbx), %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
2:  hlt
    jmp 2b
"#;
    let elf = assemble(dir.path(), "lm", source);
    let mut c = config(dir.path(), elf);
    c.cmdline = "Kconsole=ttyS0".into();
    let out = Vm::new(&c).unwrap().run(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(out.reason, StopReason::Reset);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("console.log")).unwrap(),
        "1ZK\n"
    );
}

/// `tegmen-vmm --netns --net`: the process enters the namespace, makes
/// the tap there and hosts the virtio-net device on the mmio bus (the
/// guest reads device id 1 and the MAC's last byte from its config
/// space); the tap goes with the process. A bad NIC spec is named.
#[test]
fn the_vmm_process_hosts_a_nic_on_a_tap_in_a_namespace() {
    if !kvm_available() {
        return;
    }
    let ns = format!("tgvmm{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).output().expect("ip(8)");
    assert!(ip(&["netns", "add", &ns]).status.success());
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
        }
    }
    let _gone = Gone(ns.clone());
    let dir = tempfile::tempdir().unwrap();
    let body = r#"
    mov $0xd0000000, %esi
    mov $0x3f8, %dx
    mov 8(%esi), %eax
    add $'0', %al
    out %al, %dx
    mov 0x104(%esi), %eax
    shr $8, %eax
    add $'0', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
"#;
    let kernel = tiny_guest(dir.path(), "nic", body);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32", "--timeout-secs", "20", "--sandbox", "none"])
        .arg("--console")
        .arg(dir.path().join("console.log"))
        .arg("--netns")
        .arg(format!("/var/run/netns/{ns}"))
        .args(["--net", "tap=tgvmm0,mac=02:00:00:00:00:07,mtu=1400"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let links = || String::from_utf8_lossy(&ip(&["-n", &ns, "-o", "link"]).stdout).into_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !links().contains("tgvmm0") {
        assert!(std::time::Instant::now() < deadline, "no tap in {ns}: {}", links());
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = dir.path().join("console.log");
    while std::fs::read_to_string(&console).unwrap_or_default() != "17\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest saw {:?}",
            std::fs::read_to_string(&console)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while links().contains("tgvmm0") {
        assert!(std::time::Instant::now() < deadline, "the tap is left: {}", links());
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--net", "tap=t0,mtu=1400"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mac=MAC"));
    let out = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--netns",
            "/var/run/netns/no-such-ns",
            "--net",
            "tap=t0,mac=02:00:00:00:00:01",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-ns"));
}

/// Drives the virtio-mmio device at `base` to DRIVER_OK with `queues`
/// queues of 8 entries in zeroed guest RAM from `rings`, VERSION_1 as the
/// only feature.
fn activate_queues(base: u32, rings: u32, queues: u32) -> String {
    let mut s = format!(
        "    mov ${base:#x}, %esi\n    movl $0, 0x70(%esi)\n    movl $1, 0x70(%esi)\n    movl $3, 0x70(%esi)\n    \
         movl $1, 0x24(%esi)\n    movl $1, 0x20(%esi)\n    movl $0, 0x24(%esi)\n    movl $0, 0x20(%esi)\n    \
         movl $11, 0x70(%esi)\n"
    );
    for q in 0..queues {
        let ring = rings + q * 0x10000;
        s.push_str(&format!(
            "    movl ${q}, 0x30(%esi)\n    movl $8, 0x38(%esi)\n    movl ${desc:#x}, 0x80(%esi)\n    movl $0, 0x84(%esi)\n    \
             movl ${avail:#x}, 0x90(%esi)\n    movl $0, 0x94(%esi)\n    movl ${used:#x}, 0xa0(%esi)\n    \
             movl $0, 0xa4(%esi)\n    movl $1, 0x44(%esi)\n",
            desc = ring,
            avail = ring + 0x1000,
            used = ring + 0x2000
        ));
    }
    s.push_str("    movl $15, 0x70(%esi)\n");
    s
}

/// `tegmen-vmm`'s threads each run under a seccomp list of their kind,
/// on top of the process's (`Seccomp_filters` of each thread, kill mode,
/// the default): the vCPU thread activates the guest's vsock device, has
/// it kicked, resets it and activates it again — the worker being started
/// from the spawner each time, the first one gone — and the VM then runs
/// until the host stops it and tears down under the control thread's
/// list. The virtio-fs device, activated too, has its worker rooted in the
/// share, the others' root being the sandbox directory. Every thread holds
/// only the file-serving capabilities.
#[test]
fn the_vmm_threads_run_under_their_own_seccomp_lists() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let body = format!(
        "{activate}{a}    movl $1, 0x50(%esi)\n    movl $0, 0x70(%esi)\n{activate}{fs}{b}",
        activate = activate_queues(0xd000_0000, 0x20_0000, 3),
        fs = activate_queues(0xd000_1000, 0x30_0000, 2),
        a = print("A"),
        b = print("B"),
    );
    let kernel = tiny_guest(dir.path(), "threads", &body);
    let uds = dir.path().join("vsock");
    let console = dir.path().join("console.log");
    let vmm = Command::new(env!("CARGO_BIN_EXE_tegmen-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory-mib", "32", "--timeout-secs", "5"])
        .arg("--console")
        .arg(&console)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = vmm.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::fs::read_to_string(&console).unwrap_or_default() != "AB" {
        assert!(std::time::Instant::now() < deadline, "the guest did not get to B");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Each thread: its name, filters and effective capabilities; its root.
    use std::os::unix::fs::MetadataExt;
    let mut threads = Vec::new();
    let mut roots = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap().trim().to_string();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| Some(l.strip_prefix(name)?.strip_prefix(':')?.trim().to_string()))
                .unwrap()
        };
        let tid: u32 = task.file_name().unwrap().to_str().unwrap().parse().unwrap();
        threads.push((
            tid,
            comm,
            field("Seccomp_filters"),
            field("CapEff"),
            field("NoNewPrivs"),
        ));
        let root = std::fs::metadata(task.join("root")).unwrap();
        roots.push((threads.last().unwrap().1.clone(), (root.dev(), root.ino())));
    }
    let out = vmm.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let filters = |name: &str| -> Vec<&str> { threads.iter().filter(|t| t.1 == name).map(|t| t.2.as_str()).collect() };
    let main = threads.iter().find(|t| t.0 == pid).expect("the main thread");
    assert_eq!(main.2, "2", "the control thread narrowed itself: {threads:?}\n{stderr}");
    assert_eq!(filters("vcpu0"), ["2"], "{threads:?}");
    assert_eq!(
        filters("vsock"),
        ["2"],
        "one worker, narrowed; the first one ended at the reset: {threads:?}"
    );
    assert_eq!(filters("spawner"), ["1"], "{threads:?}");
    assert_eq!(filters("virtio-fs"), ["2"], "{threads:?}");
    assert_eq!(filters("fs-spawner"), ["1"], "{threads:?}");
    let id = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    };
    for (name, root) in &roots {
        let want = if name == "virtio-fs" || name == "fs-spawner" {
            id(&share)
        } else {
            id(dir.path())
        };
        assert_eq!(*root, want, "the root of thread {name}: {roots:?}");
    }
    let file_serving = format!(
        "{:016x}",
        tegmen_vmm::privileges::mask_of(tegmen_vmm::privileges::FILE_SERVING)
    );
    for t in &threads {
        assert_eq!(t.3, file_serving, "{t:?}");
        assert_eq!(t.4, "1", "no_new_privs: {t:?}");
    }
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["reason"], "stopped by the host", "{stderr}");
    assert!(stderr.contains("seccomp: tegmen-vmm allow-list of"), "{stderr}");
    assert!(stderr.contains("in force (kill)"), "{stderr}");
    assert!(
        !uds.exists(),
        "the vsock socket is removed under the control thread's list"
    );
}
