//! End-to-end inside a nested L1 (see `tegmen_tests::nested`): this host's
//! KVM cannot run a Linux guest, L1's can, so there the builtin monitor
//! (`tegmen-vmm`) boots the real guest image and `hypervisor = "auto"`
//! picks it with no override.

use std::time::Duration;

use tegmen_tests::nested::run_in_l1;
use tegmen_tests::workspace_binary;

/// How long one L1 run may take (it boots in ~3 s; the guest inside in ~4 s).
const L1_TIMEOUT: Duration = Duration::from_secs(600);

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
