//! `containerd-shim-tegmen-v2`: containerd's shim v2 (task API
//! `containerd.task.v2`, as containerd 1.6 speaks it), one process and one
//! VM per pod.
//!
//! containerd runs the binary three ways:
//!
//! - `… -id ID start` in the container's bundle: finds the pod (the
//!   `io.kubernetes.cri.sandbox-id` annotation, else the container is its
//!   own pod), starts the pod's shim daemon unless it already answers on
//!   the pod's socket, writes `address` and `shim.pid` into the bundle and
//!   prints only the address.
//! - the daemon (no action): serves the task API on the socket handed
//!   over by `start` ([`service`]); the first Create of the pod boots its
//!   VM, later ones add containers to it; it exits after Shutdown once no
//!   container is left.
//! - `… -id ID -bundle B delete`, after a shim died: removes what the dead
//!   shim left (its VM, backends, mounts, directories) and prints a
//!   DeleteResponse (exit 137).
//!
//! Module map: [`spec`] maps a member's OCI spec into the guest, [`io`]
//! copies stdio, [`events`] publishes to containerd, [`service`] is the
//! task API.

pub mod events;
pub mod io;
pub mod service;
pub mod spec;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Where the daemon finds its listening socket.
const LISTEN_FD_ENV: &str = "TEGMEN_SHIM_LISTEN_FD";
/// The socket's path, for the daemon to remove at exit.
const SOCKET_ENV: &str = "TEGMEN_SHIM_SOCKET";
/// What the shim leaves in each bundle for a later `delete`.
pub const BUNDLE_STATE_FILE: &str = "tegmen-shim.json";

/// containerd's flags, Go style (`-name value`, `-flag`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    pub namespace: String,
    pub id: String,
    pub address: String,
    pub publish_binary: String,
    pub bundle: Option<PathBuf>,
    pub socket: Option<String>,
    pub debug: bool,
    /// `start`, `delete`, or empty for the daemon.
    pub action: String,
}

impl Flags {
    pub fn parse(args: &[String]) -> Result<Flags, String> {
        let mut f = Flags::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a.trim_start_matches('-');
            if !a.starts_with('-') {
                if !f.action.is_empty() {
                    return Err(format!("unexpected argument {a:?}"));
                }
                f.action = a.clone();
                continue;
            }
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("flag -{name} needs a value"))
            };
            match name {
                "namespace" => f.namespace = value()?,
                "id" => f.id = value()?,
                "address" => f.address = value()?,
                "publish-binary" => f.publish_binary = value()?,
                "bundle" => f.bundle = Some(value()?.into()),
                "socket" => f.socket = Some(value()?),
                "debug" => f.debug = inline.as_deref().is_none_or(|v| v == "true"),
                "v" | "version" => f.action = "version".into(),
                other => return Err(format!("flag provided but not defined: -{other}")),
            }
        }
        if f.action != "version" && f.id.is_empty() {
            return Err("-id is required".into());
        }
        if !matches!(f.action.as_str(), "" | "start" | "delete" | "version") {
            return Err(format!("unknown action {:?} (start, delete)", f.action));
        }
        Ok(f)
    }
}

/// What the shim writes into a container's bundle (besides `address`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleState {
    pub pod: String,
    pub root: PathBuf,
    pub shim_pid: u32,
}

/// The pod's socket: one per (containerd, namespace, pod), as containerd's
/// own shims derive theirs.
pub fn socket_path(flags: &Flags, pod: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}/{}/{}", flags.address, flags.namespace, pod));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from("/run/containerd/s").join(hex)
}

pub(crate) fn pid_file_of(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

/// The configuration: the file containerd's runtime options name, else
/// the default file.
pub fn load_config(config_path: Option<&Path>) -> Result<Config, String> {
    Config::load(config_path).map_err(|e| e.to_string())
}

/// Reads the `runtimeoptions.v1.Options` containerd may write on `start`'s
/// stdin; returns its config path.
fn config_path_from_stdin() -> Option<PathBuf> {
    use protobuf::Message;
    use std::io::Read;
    let mut bytes = Vec::new();
    // containerd closes stdin after writing (or gives none).
    let _ = std::io::stdin().take(1 << 20).read_to_end(&mut bytes);
    if bytes.is_empty() {
        return None;
    }
    let any = protobuf::well_known_types::any::Any::parse_from_bytes(&bytes).ok()?;
    service::config_path_from_options(&any)
}

/// `start`: see the module docs.
pub fn start(flags: &Flags) -> Result<String, String> {
    let bundle = std::env::current_dir().map_err(|e| format!("the bundle (cwd): {e}"))?;
    let spec_path = bundle.join("config.json");
    let text = std::fs::read(&spec_path).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    let spec: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("parsing {}: {e}", spec_path.display()))?;
    let pod = spec::pod_id(&flags.id, &spec);
    let socket = socket_path(flags, &pod);
    let address = format!("unix://{}", socket.display());
    let config_path = config_path_from_stdin();

    let running_pid = std::os::unix::net::UnixStream::connect(&socket)
        .ok()
        .and_then(|_| std::fs::read_to_string(pid_file_of(&socket)).ok())
        .and_then(|s| s.trim().parse::<u32>().ok());
    let pid = match running_pid {
        Some(pid) => pid,
        None => {
            if !spec::is_sandbox_container(&flags.id, &spec) {
                return Err(format!(
                    "container {}: the shim of pod {pod} is not running (its sandbox must be created first)",
                    flags.id
                ));
            }
            spawn_daemon(flags, &socket, &bundle, config_path.as_deref())?
        }
    };
    write_atomically(&bundle.join("address"), address.as_bytes())?;
    write_atomically(&bundle.join("shim.pid"), pid.to_string().as_bytes())?;
    Ok(address)
}

fn write_atomically(path: &Path, body: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming {}: {e}", path.display()))
}

fn spawn_daemon(flags: &Flags, socket: &Path, bundle: &Path, config_path: Option<&Path>) -> Result<u32, String> {
    let dir = socket.parent().expect("the socket has a directory");
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("/proc/self/exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &flags.address,
    ]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    const CHILD_FD: RawFd = 3;
    cmd.env(LISTEN_FD_ENV, CHILD_FD.to_string())
        .env(SOCKET_ENV, socket)
        .current_dir(bundle)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = config_path {
        cmd.env(service::CONFIG_PATH_ENV, p);
    }
    let raw = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if raw == CHILD_FD {
                libc::fcntl(CHILD_FD, libc::F_SETFD, 0);
            } else if libc::dup2(raw, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("starting the shim daemon: {e}"))?;
    let pid = child.id();
    // The daemon is containerd's subreaper's child now; never waited here.
    std::mem::forget(child);
    std::fs::write(pid_file_of(socket), pid.to_string())
        .map_err(|e| format!("writing {}: {e}", pid_file_of(socket).display()))?;
    drop(listener);
    Ok(pid)
}

/// The daemon: serves until Shutdown. Never returns.
pub fn serve(flags: Flags) -> ! {
    // SAFETY: ignoring SIGPIPE installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let fd: Option<RawFd> = std::env::var(LISTEN_FD_ENV).ok().and_then(|v| v.parse().ok());
    let socket = std::env::var_os(SOCKET_ENV).map(PathBuf::from);
    let (Some(fd), Some(socket)) = (fd, socket) else {
        eprintln!("containerd-shim-tegmen-v2: run by containerd (`start`), not by hand");
        std::process::exit(1);
    };
    // SAFETY: `start` handed us this listening socket as fd `fd`.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let code = service::run(flags, listener.into_raw_fd(), &socket);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(pid_file_of(&socket));
    std::process::exit(code)
}

/// `delete`: cleans up after a dead shim; prints the DeleteResponse.
pub fn delete(flags: &Flags) -> Result<Vec<u8>, String> {
    use protobuf::Message;
    let bundle = match &flags.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(|e| format!("the bundle (cwd): {e}"))?,
    };
    if let Ok(text) = std::fs::read(bundle.join(BUNDLE_STATE_FILE)) {
        if let Ok(state) = serde_json::from_slice::<BundleState>(&text) {
            let shim_alive = crate::process::pid_alive(state.shim_pid as i32);
            let config = Config {
                root: state.root.clone(),
                ..Config::default()
            };
            if !shim_alive || state.pod == flags.id {
                // The pod's VM dies with its shim: nothing else drives it.
                let _ = crate::sandbox::destroy(&config, &state.pod);
            }
        }
    }
    service::unmount_rootfs(&bundle);
    let mut resp = tegmen_shim_api::shim::DeleteResponse::new();
    resp.exit_status = 128 + libc::SIGKILL as u32;
    resp.exited_at = protobuf::MessageField::some(service::timestamp_now());
    resp.write_to_bytes()
        .map_err(|e| format!("encoding the DeleteResponse: {e}"))
}

/// The binary's entry point.
pub fn main(args: Vec<String>) -> i32 {
    let flags = match Flags::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-tegmen-v2: {e}");
            return 1;
        }
    };
    match flags.action.as_str() {
        "version" => {
            println!("containerd-shim-tegmen-v2:\n  Version: {}", env!("CARGO_PKG_VERSION"));
            0
        }
        "start" => match start(&flags) {
            Ok(address) => {
                print!("{address}");
                let _ = std::io::stdout().flush();
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        "delete" => match delete(&flags) {
            Ok(bytes) => {
                let _ = std::io::stdout().write_all(&bytes);
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        _ => serve(flags),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn containerd_flags_parse() {
        let f = Flags::parse(&args(
            "-namespace k8s.io -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id abc -debug start",
        ))
        .unwrap();
        assert_eq!(f.namespace, "k8s.io");
        assert_eq!(f.id, "abc");
        assert_eq!(f.address, "/run/containerd/containerd.sock");
        assert!(f.debug);
        assert_eq!(f.action, "start");
        let f = Flags::parse(&args("-namespace=n -id x -bundle /b delete")).unwrap();
        assert_eq!(
            (f.namespace.as_str(), f.bundle.as_deref()),
            ("n", Some(Path::new("/b")))
        );
        assert!(Flags::parse(&args("-id x -bogus 1")).unwrap_err().contains("-bogus"));
        assert!(Flags::parse(&args("start")).unwrap_err().contains("-id"));
        assert!(Flags::parse(&args("-id x frobnicate")).is_err());
        assert!(Flags::parse(&args("-id")).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn one_socket_per_pod() {
        let f = Flags {
            address: "/run/containerd/containerd.sock".into(),
            namespace: "k8s.io".into(),
            ..Flags::default()
        };
        let a = socket_path(&f, "pod1");
        assert_eq!(a, socket_path(&f, "pod1"));
        assert_ne!(a, socket_path(&f, "pod2"));
        let other_ns = Flags {
            namespace: "default".into(),
            ..f.clone()
        };
        assert_ne!(a, socket_path(&other_ns, "pod1"));
        assert!(a.as_os_str().len() < 108, "fits sun_path");
    }
}
