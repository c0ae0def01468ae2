//! A nested L1 "node" for the tests that need a KVM that runs Linux: this
//! host has no vmx/svm, but QEMU's TCG emulates AMD SVM with nested
//! paging, so a Linux L1 booted under `qemu-system-x86_64 -accel tcg -cpu
//! max` has a real `/dev/kvm` and `svm` in its /proc/cpuinfo, and
//! `hypervisor = "auto"` picks the builtin monitor there.
//!
//! L1 is the guest image's own vmlinux (it has KVM and KVM_AMD built in)
//! with a busybox initramfs made here. The host's whole file system is
//! shared into it over virtio-fs — Tegmen's own `tegmen-fs-backend` over
//! vhost-user — and L1's init runs the scenario chrooted into that share,
//! with L1's own /proc, /sys, /dev, cgroup v2 and tmpfs on /run, /tmp and
//! /var/tmp over the host's: the host's binaries, libraries and guest
//! image are at their usual paths, and nothing the scenario makes in those
//! directories reaches the host. The share is moved over L1's root first,
//! so that the monitors' `pivot_root` works there as on a host booted from
//! a disk (from an initramfs root it is refused).
//!
//! Results come back through the share: the scenario's output goes to
//! `output.log` and its exit status to `exit` in the run's directory (below
//! `target/`), both read by the host once L1 has powered off. The L1
//! console is kept beside them (`console.log`) and shown on failure.
//!
//! Boot parameters, from `../shared/ENVIRONMENT.md`'s experiment: one L1
//! vCPU and `kvm_amd.vgif=0` (L1 froze now and then otherwise, and L2
//! triple-faulted at random with two L1 vCPUs), and `tsc_early_khz=<the
//! host's TSC rate> tsc=reliable` (TCG's TSC is the host's; without it L1
//! sometimes fails to calibrate it, and then its KVM never enters a guest).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{busybox_initramfs, wait_child, workspace_binary};

/// What a scenario in L1 gave.
#[derive(Debug)]
pub struct L1Run {
    /// The scenario's exit status; `None` if L1 never reported one (it hung,
    /// crashed, or did not boot).
    pub exit: Option<i32>,
    /// The scenario's stdout and stderr.
    pub output: String,
    /// L1's serial console.
    pub console: String,
    /// From starting QEMU to its exit (of the last attempt).
    pub took: Duration,
    /// How many times L1 froze and the run was made again.
    pub froze: u32,
}

impl L1Run {
    /// Everything, for an assertion message.
    pub fn report(&self) -> String {
        format!(
            "L1 scenario exit {:?} after {:.1} s (L1 froze {} time(s) before)\n--- output ---\n{}\n--- L1 console ---\n{}",
            self.exit,
            self.took.as_secs_f64(),
            self.froze,
            self.output,
            self.console
        )
    }
}

/// The host's TSC rate in kHz, rounded to a MHz as the kernel would print
/// it: timed against the monotonic clock.
pub fn host_tsc_khz() -> u64 {
    // SAFETY: rdtsc reads the time-stamp counter; it has no side effects.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), tsc());
    let khz = (c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1000.0;
    ((khz / 1000.0).round() as u64) * 1000
}

/// L1's /init: the kernel file systems, the host's share, the chroot, the
/// scenario, the results, power off. A heartbeat on L1's console every 30 s
/// tells an L1 that froze from a scenario that hangs; if the scenario still
/// runs after `diagnose_after`, its processes (state, kernel wait channel)
/// and the tails of the logs below /run and /tmp (the sandboxes' consoles
/// and monitors) are appended to its output before the host gives up.
fn l1_init(run_dir: &Path, diagnose_after: Duration) -> String {
    let dir = run_dir.display();
    let diag = diagnose_after.as_secs();
    format!(
        r#"/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "tegmen-l1: up $(cut -d' ' -f1 /proc/uptime) s, svm: $(grep -c -w svm /proc/cpuinfo), kvm: $(ls /dev/kvm 2>&1)"
mkdir -p /host
if ! mount -t virtiofs host /host; then echo "tegmen-l1: cannot mount the host's share"; reboot -f; fi
h=/host
mount -t proc proc $h/proc
mount -t sysfs sys $h/sys
mount -t cgroup2 cgroup2 $h/sys/fs/cgroup
mount -t devtmpfs dev $h/dev
mkdir -p $h/dev/pts $h/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $h/dev/pts
mount -t tmpfs shm $h/dev/shm
# (not over the directory of this run: a checkout may live in /var/tmp)
for d in run tmp var/tmp; do
    case {dir}/ in /$d/*) continue;; esac
    mount -t tmpfs -o mode=1777 tmp $h/$d
done
hostname tegmen-l1
# The share becomes / (as switch_root does it, but keeping this initramfs
# for the end): a root that is a mount over the initramfs, not the
# initramfs itself, from which the monitors can pivot_root into their jail.
# This shell keeps the initramfs as its own root.
cd $h
mount --move . /
while sleep 30; do echo "tegmen-l1: alive, up $(cut -d' ' -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg)" > /dev/console; done &
chroot . /bin/sh -c 'cd {dir} && sh ./diagnose.sh {diag} & cd {dir} && sh ./scenario.sh > ./output.log 2>&1; echo $? > ./exit; echo "tegmen-l1: scenario exit $(cat ./exit), up $(cut -d" " -f1 /proc/uptime) s"; sync'
reboot -f
"#
    )
}

/// Run in L1 beside the scenario, in the run's directory: after `$1`
/// seconds, or whenever the host creates `diagnose-now` there (for a look
/// at a run by hand), if the scenario has not written `exit`, what L1 is
/// doing goes to the end of `output.log`.
const DIAGNOSE: &str = r#"start=$(cut -d. -f1 /proc/uptime)
while [ ! -e ./exit ]; do
    sleep 5
    now=$(cut -d. -f1 /proc/uptime)
    if [ -e ./diagnose-now ]; then
        rm -f ./diagnose-now
    elif [ $((now - start)) -lt "$1" ] || [ -n "$done" ]; then
        continue
    else
        done=1
    fi
    [ -e ./exit ] && break
    {
    echo "=== tegmen-l1: the scenario still runs after $((now - start)) s; what L1 is doing:"
    ps -eo pid,ppid,stat,time,wchan:24,args 2>/dev/null || ps
    for f in $(find /run /tmp -name '*.log' -size +0 2>/dev/null); do
        echo "--- $f (last 40 lines)"
        tail -n 40 "$f"
    done
    echo "=== tegmen-l1: end of diagnosis"
    } >> ./output.log 2>&1
    sync
done
"#;

/// Boots L1, runs the shell `script` there (as root, in the host's file
/// system with L1's kernel; `set -e` is not implied) and returns what it
/// gave; gives up after `timeout`. The run's files are in
/// `target/l1/<name>`, kept for a look after a failure.
///
/// An L1 that freezes (its console's heartbeat stops for [`FROZEN_AFTER`]:
/// TCG's emulated SVM still wedges L1 now and then, see the module's
/// notes) is killed, with its registers kept in `frozen-<n>.txt` and a
/// line on stderr, and the run is made once more from the start: a freeze
/// of the emulated node says nothing of the scenario. A second freeze is
/// the result.
pub fn run_in_l1(name: &str, script: &str, timeout: Duration) -> L1Run {
    run_in_l1_with(name, script, timeout, 1)
}

/// [`run_in_l1`] with `vcpus` L1 vCPUs (the suite uses one: with two, L2
/// triple-faults now and then, which `make bench` measures).
pub fn run_in_l1_with(name: &str, script: &str, timeout: Duration, vcpus: u32) -> L1Run {
    let mut froze = 0;
    loop {
        match attempt(name, script, timeout, vcpus) {
            Attempt::Done(mut run) => {
                run.froze = froze;
                return run;
            }
            Attempt::Frozen(mut run, what) if froze > 0 => {
                run.froze = froze;
                run.console.push_str(&format!("\n[L1 froze again: {what}]\n"));
                return run;
            }
            Attempt::Frozen(_, what) => {
                froze += 1;
                let dir = l1_base().join(name);
                let kept = l1_base().join(format!("{name}.frozen"));
                let _ = std::fs::remove_dir_all(&kept);
                let _ = std::fs::rename(&dir, &kept);
                eprintln!(
                    "tegmen-tests: L1 of {name:?} froze ({what}); its files are in {}; running it once more",
                    kept.display()
                );
            }
        }
    }
}

/// How long L1's console may stay silent (its heartbeat comes every 30 s)
/// before L1 counts as frozen.
pub const FROZEN_AFTER: Duration = Duration::from_secs(180);

/// [`FROZEN_AFTER`], or `TEGMEN_TEST_L1_FROZEN_AFTER` seconds (to try the
/// watch on an L1 stopped from its monitor).
fn frozen_after() -> Duration {
    std::env::var("TEGMEN_TEST_L1_FROZEN_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(FROZEN_AFTER, Duration::from_secs)
}

/// How one boot of L1 ended.
enum Attempt {
    /// The scenario's exit, or the time-out.
    Done(L1Run),
    /// L1 stopped answering, and what QEMU was doing then.
    Frozen(L1Run, String),
}

/// Where the runs' directories are: below target/, on the host's file
/// system (not a tmpfs of L1), with symlinks resolved, as L1 sees the
/// host's tree as it is.
fn l1_base() -> std::path::PathBuf {
    let base = workspace_binary("supervisor").parent().unwrap().join("l1");
    std::fs::create_dir_all(&base).unwrap();
    base.canonicalize().unwrap()
}

/// What a frozen L1's QEMU is doing: its CPU use over a second, and the
/// vCPUs' registers from its monitor (kept in the run's `frozen.txt`).
fn frozen_state(vm: &Child, dir: &Path) -> String {
    let cpu_ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", vm.id())).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let t0 = cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    // /proc counts in USER_HZ, 100 on x86_64.
    let hz = 100;
    let cpu = match (t0, cpu_ticks()) {
        (Some(a), Some(b)) => format!("QEMU used {} % of a CPU", (b.saturating_sub(a)) * 100 / hz),
        _ => "QEMU's CPU use unknown".to_string(),
    };
    let mut registers = String::new();
    if let Ok(mut monitor) = std::os::unix::net::UnixStream::connect(dir.join("monitor.sock")) {
        use std::io::{Read, Write};
        let _ = monitor.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = monitor.write_all(b"info registers -a\ninfo cpus\n");
        let mut buf = [0u8; 65536];
        while let Ok(n) = monitor.read(&mut buf) {
            if n == 0 {
                break;
            }
            registers.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    // Without the monitor's echo of the commands, character by character.
    let registers: String = registers
        .lines()
        .filter(|l| !l.contains('\x1b'))
        .map(|l| format!("{l}\n"))
        .collect();
    let rip = registers
        .split_whitespace()
        .find_map(|w| w.strip_prefix("RIP="))
        .map(|r| format!(", L1 at RIP {r}"))
        .unwrap_or_default();
    let _ = std::fs::write(dir.join("frozen.txt"), format!("{cpu}\n{registers}"));
    format!("no heartbeat for {} s, {cpu}{rip}", frozen_after().as_secs())
}

/// One boot of L1 for [`run_in_l1_with`].
fn attempt(name: &str, script: &str, timeout: Duration, vcpus: u32) -> Attempt {
    let qemu = "qemu-system-x86_64";
    let image = tegmen_supervisor::guest_image::GuestImage::resolve(&tegmen_supervisor::config::Config::default())
        .expect("the guest image: run guest-image/build.sh");
    let kernel = image.kernel;
    let dir = l1_base().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("scenario.sh"), script).unwrap();
    std::fs::write(dir.join("diagnose.sh"), DIAGNOSE).unwrap();
    let initrd = dir.join("l1-initramfs.cpio");
    // Time for the diagnosis to be written before the host gives up.
    let diagnose_after = timeout.saturating_sub(Duration::from_secs(90)).max(timeout / 2);
    std::fs::write(&initrd, busybox_initramfs(&l1_init(&dir, diagnose_after))).unwrap();

    // The host's root, over Tegmen's virtio-fs backend (not confined: it
    // serves `/` itself).
    let fs_socket = dir.join("fs.sock");
    let mut backend = Command::new(workspace_binary("tegmen-fs-backend"))
        .arg("--socket")
        .arg(&fs_socket)
        .args(["--shared-dir", "/", "--tag", "host", "--sandbox", "none"])
        .args(["--thread-pool-size", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("fs-backend.log")).unwrap())
        .spawn()
        .expect("starting tegmen-fs-backend");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs_socket.exists() {
        assert!(Instant::now() < deadline, "tegmen-fs-backend made no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 tsc_early_khz={} tsc=reliable kvm_amd.vgif=0",
        host_tsc_khz()
    );
    let mem = "3072M";
    let console = dir.join("console.log");
    let t0 = Instant::now();
    let mut vm: Child = Command::new(qemu)
        .current_dir(&dir)
        .args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem"])
        .args(["-object", &format!("memory-backend-memfd,id=mem,size={mem},share=on")])
        .args(["-accel", "tcg", "-cpu", "max", "-m", mem, "-smp", &vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        // For a look at a frozen L1's registers.
        .args(["-monitor", "unix:monitor.sock,server=on,wait=off"])
        .args(["-chardev", &format!("file,id=console,path={}", console.display())])
        .args(["-serial", "chardev:console"])
        .args(["-chardev", "socket,id=fs,path=fs.sock"])
        .args(["-device", "vhost-user-fs-device,chardev=fs,tag=host"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append, "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log")).unwrap())
        .spawn()
        .expect("starting qemu-system-x86_64");
    // Until QEMU exits, the time is up, or L1's console stays silent.
    let deadline = Instant::now() + timeout;
    let (mut heard, mut console_len) = (Instant::now(), 0);
    let mut frozen = None;
    let status = loop {
        if let Some(s) = vm.try_wait().unwrap() {
            break s.code();
        }
        let len = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
        if len != console_len {
            (heard, console_len) = (Instant::now(), len);
        } else if heard.elapsed() > frozen_after() {
            frozen = Some(frozen_state(&vm, &dir));
        }
        if frozen.is_some() || Instant::now() > deadline {
            let _ = vm.kill();
            let _ = vm.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = t0.elapsed();
    // The backend ends when QEMU disconnects; end it anyway.
    if wait_child(&mut backend, Duration::from_secs(5)).is_none() {
        let _ = backend.kill();
        let _ = backend.wait();
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let mut console_text = read("console.log");
    if status.is_none() && frozen.is_none() {
        console_text.push_str(&format!("\n[L1 killed after {timeout:?}]\n"));
    }
    let run = L1Run {
        exit: read("exit").trim().parse().ok(),
        output: read("output.log"),
        console: console_text,
        took,
        froze: 0,
    };
    match frozen {
        Some(what) => Attempt::Frozen(run, what),
        None => Attempt::Done(run),
    }
}
