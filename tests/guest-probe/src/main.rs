//! `tegmen-guest-probe`: what a hostile guest does to the host over vsock,
//! as a static program the end-to-end tests copy into a container's
//! rootfs (busybox has no vsock client). Each command prints one line of
//! `key=value` words the test reads back.
//!
//! - `unserved FIRST COUNT`: connects to the host (CID 2) on COUNT ports
//!   from FIRST on, where nobody listens, one after another; prints how
//!   each ended and the slowest answer.
//! - `hold PORT COUNT SECS`: opens up to COUNT connections to PORT at
//!   once and keeps them SECS seconds; prints how many opened and the
//!   first error.
//! - `noread PORT SECS`: connects to PORT and reads nothing for SECS
//!   seconds, however much the host sends.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const VMADDR_CID_HOST: u32 = 2;

/// A stream socket connected to the host's `port`.
fn connect(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just made and belongs to nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_vm is valid; the fields are set next.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = VMADDR_CID_HOST;
    addr.svm_port = port;
    // SAFETY: addr is a sockaddr_vm of the length given.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EMFILE) => "EMFILE".into(),
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(n) => format!("errno{n}"),
        None => "unknown".into(),
    }
}

fn num<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("{what}: not a number: {}", args[i]))
}

fn unserved(first: u32, count: u32) {
    let (mut refused, mut connected, mut other) = (0, 0, 0);
    let mut slowest = Duration::ZERO;
    for port in first..first.saturating_add(count) {
        let t = Instant::now();
        match connect(port) {
            Ok(_) => connected += 1,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::ECONNREFUSED)) => refused += 1,
            Err(e) => {
                other += 1;
                eprintln!("port {port}: {e}");
            }
        }
        slowest = slowest.max(t.elapsed());
    }
    println!(
        "unserved refused={refused} connected={connected} other={other} slowest_ms={}",
        slowest.as_millis()
    );
}

fn hold(port: u32, count: u32, secs: u64) {
    let mut open = Vec::new();
    let mut first_error = String::from("none");
    let mut failed = 0;
    for _ in 0..count {
        match connect(port) {
            Ok(fd) => open.push(fd),
            Err(e) => {
                if failed == 0 {
                    first_error = errno_name(&e);
                }
                failed += 1;
            }
        }
    }
    println!("hold open={} failed={failed} first_error={first_error}", open.len());
    std::thread::sleep(Duration::from_secs(secs));
    drop(open);
    println!("hold closed");
}

fn noread(port: u32, secs: u64) {
    match connect(port) {
        Ok(fd) => {
            println!("noread connected");
            std::thread::sleep(Duration::from_secs(secs));
            drop(fd);
            println!("noread closed");
        }
        Err(e) => println!("noread error={}", errno_name(&e)),
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args.get(1).map(String::as_str) {
        Some("unserved") => unserved(num(args, 2, "FIRST")?, num(args, 3, "COUNT")?),
        Some("hold") => hold(num(args, 2, "PORT")?, num(args, 3, "COUNT")?, num(args, 4, "SECS")?),
        Some("noread") => noread(num(args, 2, "PORT")?, num(args, 3, "SECS")?),
        _ => {
            return Err(
                "usage: tegmen-guest-probe unserved FIRST COUNT | hold PORT COUNT SECS | noread PORT SECS".into(),
            )
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = run(&args) {
        eprintln!("tegmen-guest-probe: {e}");
        std::process::exit(2);
    }
}
