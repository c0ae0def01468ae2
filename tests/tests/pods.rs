//! End-to-end: one sandbox VM, many containers. Containers are added to a
//! sandbox that is already running (their rootfs and volumes mounted
//! below the share after the fs backend started), run, and are removed
//! while the sandbox goes on.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use tegmen_agent_api::stream::StreamKind;
use tegmen_supervisor::container::{self, HostBind, NewContainer};
use tegmen_supervisor::sandbox::{self, Sandbox, SandboxOptions};
use tegmen_tests::{busybox_rootfs, mounts_below, runc_like_spec, TestRoot};

fn read_all_in_thread(mut s: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    })
}

/// A container spec running `script`, with `volume` bound on /vol.
fn spec_with_volume(script: &str, volume: Option<&Path>, readonly: bool) -> serde_json::Value {
    let mut spec = runc_like_spec(&["sh", "-c", script], false);
    spec["root"]["readonly"] = readonly.into();
    if let Some(v) = volume {
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"destination": "/vol", "type": "bind", "source": v, "options": ["rbind"]}));
    }
    spec
}

/// Adds container `id` with `spec` on the host rootfs `rootfs`, the way a
/// face does; returns its part of the share on the host.
fn add(sb: &mut Sandbox, id: &str, rootfs: &Path, spec: &serde_json::Value) -> tegmen_supervisor::Result<PathBuf> {
    let mut binds = Vec::new();
    for (index, m) in spec["mounts"].as_array().unwrap().iter().enumerate() {
        if m["type"] == "bind" {
            binds.push(HostBind {
                index,
                source: m["source"].as_str().unwrap().into(),
                readonly: m["options"].as_array().is_some_and(|o| o.iter().any(|x| x == "ro")),
            });
        }
    }
    sb.add_container(&NewContainer {
        id,
        rootfs,
        readonly: spec["root"]["readonly"].as_bool().unwrap_or(false),
        binds: &binds,
        guest_spec: spec.clone(),
        mount_destinations: container::mount_destinations(spec),
        terminal: false,
        stdin: false,
        bundle: None,
        cgroup: None,
    })
    .map(|added| added.share)
}

/// Starts container `id` and returns (exit code, stdout + stderr).
fn run(sb: &Sandbox, id: &str) -> (i32, String) {
    let endpoint = sb.stream_endpoint();
    let out = read_all_in_thread(endpoint.open(id, "", StreamKind::Stdout).unwrap());
    let err = read_all_in_thread(endpoint.open(id, "", StreamKind::Stderr).unwrap());
    sb.agent().start_container(id).unwrap();
    let code = sb.agent().wait_process(id, "").unwrap().exit_code;
    let mut text = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
    text.push_str(&String::from_utf8_lossy(&err.join().unwrap()));
    (code, text)
}

#[test]
fn containers_are_added_to_and_removed_from_a_running_sandbox() {
    let t = TestRoot::new("pod");
    let mut sb = Sandbox::create(
        &t.config,
        "pod",
        &SandboxOptions {
            owned_by_current_process: true,
            ..Default::default()
        },
    )
    .expect("boot");
    let shared = sb.shared_dir();

    // Two root file systems and a volume outside the share, mounted only
    // now, after the fs backend took its copy of the mounts.
    let work = t.root().join("work");
    for (name, marker) in [("a", "rootfs of a"), ("b", "rootfs of b")] {
        let r = work.join(name);
        busybox_rootfs(&r);
        std::fs::write(r.join("marker"), marker).unwrap();
    }
    let vol = work.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("data"), "from the host volume").unwrap();

    let share_a = add(
        &mut sb,
        "a",
        &work.join("a"),
        &spec_with_volume(
            "cat /marker; echo; cat /vol/data; echo out > /vol/written",
            Some(&vol),
            false,
        ),
    )
    .expect("add a");
    // b has a read-only root, made read-only before it reached the share:
    // the guest's view must be read-only too.
    let share_b = add(
        &mut sb,
        "b",
        &work.join("b"),
        &spec_with_volume(
            "cat /marker; echo; if touch /newfile 2>/dev/null; then echo writable; else echo read-only; fi; sleep 30",
            None,
            true,
        ),
    )
    .expect("add b");
    let state = sandbox::read_state(sb.dir()).unwrap();
    let ids: Vec<&str> = state.containers.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"], "state.json lists the containers");

    let (code, out) = run(&sb, "a");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "rootfs of a\nfrom the host volume");
    assert_eq!(
        std::fs::read_to_string(vol.join("written")).unwrap(),
        "out\n",
        "the guest wrote through the volume"
    );

    // Removing a unmounts its part of the share; b and the VM go on.
    sb.remove_container("a").expect("remove a");
    assert_eq!(share_a, shared.join("a"));
    assert!(!share_a.exists(), "shared/a is gone");
    assert!(mounts_below(&share_a).is_empty(), "{:?}", mounts_below(&shared));
    assert!(work.join("a/marker").exists(), "the rootfs itself is untouched");

    let endpoint = sb.stream_endpoint();
    let mut out_b = endpoint.open("b", "", StreamKind::Stdout).unwrap();
    sb.agent().start_container("b").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("read-") && !String::from_utf8_lossy(&seen).contains("writable") {
        let n = out_b.read(&mut buf).unwrap();
        assert!(n > 0, "b's stdout ended early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.starts_with("rootfs of b\nread-"), "{text}");
    assert!(!work.join("b/newfile").exists());

    // A container whose rootfs is missing is refused, leaving nothing.
    let e = add(
        &mut sb,
        "c",
        &work.join("no-such-rootfs"),
        &spec_with_volume("true", None, false),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no-such-rootfs"), "{e}");
    assert!(!shared.join("c").exists());

    // Removing a running container kills it.
    sb.remove_container("b").expect("remove b");
    assert!(!share_b.exists());
    assert!(sandbox::read_state(sb.dir()).unwrap().containers.is_empty());
    // The same id can come back, in a part of the share of its own: the
    // guest may still hold a's cached entries of a moment ago.
    let again = add(
        &mut sb,
        "a",
        &work.join("a"),
        &spec_with_volume("cat /marker", None, false),
    )
    .expect("add a again");
    assert_eq!(again, shared.join("a.3"));
    let (code, out) = run(&sb, "a");
    assert_eq!((code, out.as_str()), (0, "rootfs of a"));
    sb.remove_container("a").unwrap();
    // At once, and on another rootfs: the guest's entries of a moment ago
    // (cached for a second by default) must not be met.
    for rootfs in ["a", "b"] {
        add(
            &mut sb,
            "x",
            &work.join(rootfs),
            &spec_with_volume("cat /marker", None, false),
        )
        .expect("add x");
        if rootfs == "a" {
            sb.remove_container("x").unwrap();
        }
    }
    let (code, out) = run(&sb, "x");
    assert_eq!((code, out.as_str()), (0, "rootfs of b"));
    sb.remove_container("x").unwrap();

    // A container in the guest's own network namespace (a hostNetwork
    // pod's) finds `lo` up, as on a node.
    let mut spec = spec_with_volume("ip link show lo", None, false);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "network");
    add(&mut sb, "hostnet", &work.join("a"), &spec).expect("add hostnet");
    let (code, out) = run(&sb, "hostnet");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("LOOPBACK,UP"), "lo is up: {out}");
    sb.remove_container("hostnet").unwrap();

    sb.shutdown().expect("shutdown");
    t.assert_nothing_left();
}

/// Spec mounts' propagation options are applied in the guest as runc
/// applies them: visible in the container's mountinfo.
#[test]
fn mount_propagation_options_show_in_the_guest_mountinfo() {
    let t = TestRoot::new("prop");
    let mut sb = Sandbox::create(
        &t.config,
        "prop",
        &SandboxOptions {
            owned_by_current_process: true,
            ..Default::default()
        },
    )
    .expect("boot");
    let rootfs = t.root().join("work/rootfs");
    busybox_rootfs(&rootfs);
    let mut spec = runc_like_spec(&["cat", "/proc/self/mountinfo"], false);
    let options = [
        ("/m-shared", "shared"),
        ("/m-rshared", "rshared"),
        ("/m-private", "private"),
        ("/m-unbindable", "unbindable"),
        ("/m-runbindable", "runbindable"),
        ("/m-rslave", "rslave"),
    ];
    for (dest, opt) in options {
        spec["mounts"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": [opt]}));
    }
    add(&mut sb, "p1", &rootfs, &spec).expect("add");
    let (code, out) = run(&sb, "p1");
    assert_eq!(code, 0, "{out}");
    // mountinfo: id parent major:minor root mountpoint options [optional fields] - type source
    let tags = |dest: &str| -> String {
        let line = out
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(dest))
            .unwrap_or_else(|| panic!("{dest} not mounted:\n{out}"));
        let fields: Vec<&str> = line.split(' ').collect();
        let end = fields.iter().position(|f| *f == "-").unwrap();
        fields[6..end].join(" ")
    };
    assert!(tags("/m-shared").starts_with("shared:"), "{}", tags("/m-shared"));
    assert!(tags("/m-rshared").starts_with("shared:"), "{}", tags("/m-rshared"));
    assert_eq!(tags("/m-private"), "", "private: no propagation tags");
    assert_eq!(tags("/m-unbindable"), "unbindable");
    assert_eq!(tags("/m-runbindable"), "unbindable");
    assert!(!tags("/m-rslave").contains("shared:"), "{}", tags("/m-rslave"));
    sb.remove_container("p1").unwrap();
    sb.shutdown().expect("shutdown");
    t.assert_nothing_left();
}
