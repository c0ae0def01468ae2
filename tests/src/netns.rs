//! Network namespaces and processes in them, made by a test and gone
//! when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A network namespace made here, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Netns {
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Netns(name.to_string())
    }
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    pub fn links(&self) -> String {
        let o = Command::new("ip").args(["-n", &self.0, "-o", "link"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    /// Runs `args` in the namespace, in a process group of its own that
    /// goes when the returned value is dropped (a shell loop's children too).
    pub fn spawn(&self, args: &[&str]) -> Background {
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        Background(child)
    }
}

/// A process group the test started.
pub struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        // The process group this test made.
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

impl Netns {
    /// What a `busybox nc` from this namespace to `addr:port` reads, asked
    /// again until something answers (60 s at most).
    pub fn read_from(&self, addr: &str, port: &str, who: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = Command::new("ip")
                .args(["netns", "exec", &self.0, "busybox", "nc", "-w", "5", addr, port])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if !text.is_empty() {
                return text;
            }
            assert!(Instant::now() < deadline, "{who} never answered");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
    }
}

pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip(8) (iproute2)");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
