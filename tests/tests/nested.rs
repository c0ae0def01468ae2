//! End-to-end inside a nested L1 (see `tegmen_tests::nested`): this host's
//! KVM cannot run a Linux guest, L1's can, so there the builtin monitor
//! (`tegmen-vmm`) boots the real guest image and `hypervisor = "auto"`
//! picks it with no override.

use std::time::Duration;

use tegmen_tests::nested::run_in_l1;
use tegmen_tests::workspace_binary;

/// How long one L1 run may take (it boots in ~3 s; the guest inside in ~4 s).
const L1_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a whole test executable may take in L1: the container suite
/// takes ~7.5 min there on 2 idle cores, and more on a busier CI machine
/// (600 s once cut QEMU's run short in its large-output scenario).
const L1_SUITE_TIMEOUT: Duration = Duration::from_secs(1800);

fn bin_dir() -> String {
    workspace_binary("supervisor")
        .canonicalize()
        .unwrap()
        .parent()
        .unwrap()
        .display()
        .to_string()
}

/// `supervisor check --boot` in L1: svm and /dev/kvm are there, `auto`
/// chooses the builtin monitor with KVM, the real guest boots on it, its
/// agent answers over the inline vsock device and reads the sandbox id back
/// through the inline virtio-fs device; the sandbox is shut down and gone.
#[test]
fn supervisor_check_boots_the_guest_on_the_builtin_monitor_in_l1() {
    let script = format!(
        r#"set -e
grep -qw svm /proc/cpuinfo
test -c /dev/kvm
printf 'root = "/run/tegmen"\n[guest]\nboot_timeout_secs = 180\n' > /tmp/tegmen.toml
{bin}/supervisor --config /tmp/tegmen.toml check --boot
test -z "$(ls /run/tegmen/sandboxes 2>/dev/null)"
"#,
        bin = bin_dir()
    );
    let run = run_in_l1("check-boot", &script, L1_TIMEOUT);
    assert_eq!(run.exit, Some(0), "{}", run.report());
    for want in [
        "hardware virtualization: yes",
        "backend: builtin with KVM",
        "boot to agent ready",
        "sandbox id read back through virtio-fs: check-",
        "shutdown: ok",
    ] {
        assert!(run.output.contains(want), "no {want:?}:\n{}", run.report());
    }
    eprintln!("{}", run.output);
}

/// The harness itself: a scenario that hangs gets its diagnosis (L1's
/// processes with their wait channels) appended to its output before L1 is
/// killed, and L1's heartbeat on the console shows L1 itself was alive.
#[test]
fn a_scenario_that_hangs_is_diagnosed_before_l1_is_killed() {
    let run = run_in_l1("hang", "echo started; sleep 1000\n", Duration::from_secs(45));
    assert_eq!(run.exit, None, "{}", run.report());
    assert!(run.output.starts_with("started\n"), "{}", run.report());
    assert!(
        run.output.contains("=== tegmen-l1: the scenario still runs after 2")
            && run.output.contains("sleep 1000")
            && run.output.contains("=== tegmen-l1: end of diagnosis"),
        "{}",
        run.report()
    );
    assert!(run.console.contains("tegmen-l1: alive, up "), "{}", run.report());
    assert!(run.console.contains("[L1 killed after 45s]"), "{}", run.report());
}

/// Containers on the builtin monitor in L1, through `tegmen` (auto picks
/// the builtin monitor): an exit code and output of `run`, then a detached
/// container (its monitor jailed by pivot_root, not chroot, the agent's
/// boot mark received, and `supervisor check` showing each of the
/// monitor's threads under the list of its kind) with an exec and its
/// exit code, SIGTERM ending it, and delete; nothing of them is left in
/// L1.
#[test]
fn tegmen_runs_containers_on_the_builtin_monitor_in_l1() {
    let bundle = workspace_binary("supervisor")
        .canonicalize()
        .unwrap()
        .parent()
        .unwrap()
        .join("l1")
        .join("containers-bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    tegmen_tests::busybox_rootfs(&bundle.join("rootfs"));
    let spec = tegmen_tests::runc_like_spec(&["sh", "-c", "echo hello from L2; exit 7"], false);
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let detached = tegmen_tests::runc_like_spec(&["sh", "-c", "trap 'exit 3' TERM; while :; do sleep 1; done"], false);
    std::fs::write(bundle.join("detached.json"), detached.to_string()).unwrap();
    let script = format!(
        r#"set -x
B={bin}
T="$B/tegmen --root /run/tegmen"
cd {bundle}
out=$($T run c1 < /dev/null); rc=$?
echo "run: rc=$rc out=$out"
[ "$rc" = 7 ] && [ "$out" = "hello from L2" ] || exit 10
cp detached.json config.json
$T run -d c2 < /dev/null > /dev/null 2> /tmp/c2.err || {{ cat /tmp/c2.err; exit 12; }}
grep '"hypervisor"' /run/tegmen/sandboxes/c2/state.json | grep -q builtin || {{ cat /run/tegmen/sandboxes/c2/state.json; exit 13; }}
log=/run/tegmen/sandboxes/c2/vmm.log
cat $log
# Jailed by pivot_root (L1's root is not its initramfs), and the agent's
# boot mark reached the monitor.
grep -q 'is now /' $log && ! grep -q 'falling back to chroot' $log || exit 21
grep -q 'boot mark: ' $log || exit 22
[ "$($T exec c2 echo exec-ok)" = exec-ok ] || exit 14
# Each of the monitor's threads under its own list, on the process's.
grep -q 'tegmen-vmm allow-list of .* in force (kill)' $log || exit 23
grep -q "the virtio-fs workers' root is" $log || exit 27
printf 'root = "/run/tegmen"\n' > /tmp/tegmen.toml
$B/supervisor --config /tmp/tegmen.toml check c2 > /tmp/check.txt 2>&1 || {{ cat /tmp/check.txt; exit 24; }}
cat /tmp/check.txt
for t in vcpu0 vsock virtio-fs; do
    grep -Eq "seccomp filters by thread: 2: [^;]*$t" /tmp/check.txt || exit 25
done
grep -Eq 'seccomp filters by thread: 2: [^;]*; 1: [^;]*spawner' /tmp/check.txt || exit 26
$T exec c2 sh -c 'exit 5'; [ $? = 5 ] || exit 15
$T kill c2 TERM || exit 16
for i in $(seq 100); do $T state c2 | grep -q '"stopped"' && break; sleep 0.2; done
$T state c2 | grep -q '"stopped"' || exit 17
$T delete c2 || exit 18
[ -z "$(ls /run/tegmen/sandboxes)" ] || exit 19
pgrep -l tegmen-vmm && exit 20
echo all-ok
"#,
        bin = bin_dir(),
        bundle = bundle.display()
    );
    let run = run_in_l1("containers", &script, L1_TIMEOUT);
    assert_eq!(run.exit, Some(0), "{}", run.report());
    assert!(run.output.contains("all-ok"), "{}", run.report());
    let _ = std::fs::remove_dir_all(&bundle);
}

/// Runs this package's test executable `name` inside L1 with `args` (a
/// filter and flags) and `TEGMEN_TEST_HYPERVISOR=hypervisor`; returns the
/// run and the number of tests that passed, having checked that none
/// failed and none skipped.
fn tests_in_l1(run_name: &str, name: &str, args: &str, hypervisor: &str) -> (tegmen_tests::nested::L1Run, usize) {
    tests_in_l1_with(run_name, name, args, hypervisor, "")
}

/// [`tests_in_l1`] with more `NAME=value` words in the environment.
fn tests_in_l1_with(
    run_name: &str,
    name: &str,
    args: &str,
    hypervisor: &str,
    env: &str,
) -> (tegmen_tests::nested::L1Run, usize) {
    let exe = tegmen_tests::test_binary(name).canonicalize().unwrap();
    let script = format!(
        "export TEGMEN_TEST_HYPERVISOR={hypervisor} RUST_BACKTRACE=1 {env}\n{exe} {args} --test-threads=1 2>&1\n",
        exe = exe.display()
    );
    let run = run_in_l1(run_name, &script, L1_SUITE_TIMEOUT);
    assert_eq!(run.exit, Some(0), "{}", run.report());
    assert!(
        !run.output.contains("skipped:"),
        "a test skipped in L1:\n{}",
        run.report()
    );
    let passed = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("test result: ok. ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no test result line:\n{}", run.report()));
    eprintln!("{}", run.output);
    (run, passed)
}

/// How many lines of `seq` the large-output scenario writes in L1 (2 × 10
/// MB, well past the vsock buffers' 256 KiB): the full 2 × 106 MB took from
/// ~5 to over 25 minutes there on either backend, varying from run to run
/// (every L2 exit is emulated by this host's TCG), which `make test` cannot
/// afford. The full size runs on this host on QEMU TCG and in-process.
const L1_LARGE_OUTPUT: &str = "TEGMEN_TEST_LARGE_OUTPUT_LINES=1300000";

/// The container scenarios of `containers.rs` (exit codes, pause, 2 × 10 MB
/// of stdout and stderr byte for byte, stdin, a terminal, exec, OOM and
/// stats, spec and kernel fields, bad input), each in its own guest on the
/// builtin monitor.
#[test]
fn the_container_scenarios_run_on_the_builtin_monitor_in_l1() {
    let (run, passed) = tests_in_l1_with(
        "containers-builtin",
        "containers",
        "::builtin",
        "builtin",
        L1_LARGE_OUTPUT,
    );
    assert_eq!(passed, 10, "{}", run.report());
}

/// The same container scenarios on QEMU with `-accel kvm` in L1: both
/// backends of the `Hypervisor` trait on the same KVM.
#[test]
fn the_container_scenarios_run_on_qemu_with_kvm_in_l1() {
    let (run, passed) = tests_in_l1_with("containers-qemu", "containers", "::guest", "qemu", L1_LARGE_OUTPUT);
    assert_eq!(passed, 10, "{}", run.report());
}

/// Sandboxes on the builtin monitor in L1, and its faults: boots (one, four
/// at once, a long socket path), an id in use, the kernel missing or not an
/// ELF and a broken initramfs, memory too small for the initramfs, an agent
/// that never answers, a guest that resets during boot, the monitor killed
/// with SIGKILL mid-boot, a supervisor killed with SIGKILL; each leaves
/// nothing behind in L1.
#[test]
fn sandboxes_and_their_faults_on_the_builtin_monitor_in_l1() {
    let tests = [
        "a_sandbox_boots_answers_and_shuts_down_cleanly",
        "four_sandboxes_at_once_leave_nothing",
        "socket_paths_longer_than_sun_path_work",
        "an_id_in_use_is_refused_without_harming_the_first",
        "missing_or_corrupt_kernel_and_initramfs_are_named",
        "guest_memory_too_small_for_the_initramfs_is_named",
        "an_agent_that_never_answers_times_out_with_the_console",
        "a_guest_that_ends_during_boot_is_reported",
        "the_monitor_killed_mid_boot_is_reported_and_cleaned",
        "a_supervisor_killed_with_sigkill_is_cleaned_up_at_the_next_start",
        "the_builtin_monitor_boots_the_guest",
    ];
    let args = format!("{} --exact", tests.join(" "));
    let (run, passed) = tests_in_l1("sandbox-builtin", "sandbox", &args, "builtin");
    assert_eq!(passed, tests.len(), "{}", run.report());
}

/// `tegmen`'s lifecycle on the builtin monitor in L1 (`auto` picks it), and
/// its faults mid-container: create / start / state / delete, kill, exec
/// and pause, a forced delete of a running container, the runtime's own
/// monitor SIGKILLed, and `tegmen-vmm` SIGKILLed; each leaves nothing in L1.
#[test]
fn the_runtime_and_its_faults_on_the_builtin_monitor_in_l1() {
    let tests = [
        "create_start_state_delete",
        "kill_exec_pause",
        "force_delete_running",
        "killed_monitor",
        "killed_vm",
    ];
    let args = format!("{} --exact --nocapture", tests.join(" "));
    let (run, passed) = tests_in_l1("runtime-builtin", "runtime", &args, "builtin");
    assert_eq!(passed, tests.len(), "{}", run.report());
    assert!(
        run.output.contains("killed_vm: SIGKILL to \"tegmen-vmm\""),
        "the builtin monitor was the one killed:\n{}",
        run.report()
    );
}

/// The builtin monitor's own tests with tiny hand-made guests
/// (`vmm/tests/builtin.rs`: boot protocols, the serial port, a virtio-mmio
/// device, faults and their RIP, an unhandled port and MMIO write, bad
/// kernels and sizes, the process with its devices) on L1's KVM, which runs
/// them as hardware would rather than instruction by instruction. All but
/// the NIC test: L1's kernel (the guest image's) has no tun driver.
#[test]
fn the_monitors_tiny_guest_tests_pass_on_kvm_in_l1() {
    let (run, passed) = tests_in_l1(
        "vmm-builtin",
        "builtin",
        "--skip the_vmm_process_hosts_a_nic_on_a_tap_in_a_namespace",
        "builtin",
    );
    assert!(passed >= 9, "{}", run.report());
}
