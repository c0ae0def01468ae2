//! `tegmen-guest-probe`: what a hostile guest does to the host over vsock
//! and virtio-fs, as a static program the end-to-end tests copy into a
//! container's rootfs (busybox has no vsock client nor these system
//! calls). Each command prints one line of `key=value` words the test
//! reads back.
//!
//! - `unserved FIRST COUNT`: connects to the host (CID 2) on COUNT ports
//!   from FIRST on, where nobody listens, one after another; prints how
//!   each ended and the slowest answer.
//! - `hold PORT COUNT SECS`: opens up to COUNT connections to PORT at
//!   once and keeps them SECS seconds; prints how many opened and the
//!   first error.
//! - `noread PORT SECS`: connects to PORT and reads nothing for SECS
//!   seconds, however much the host sends.
//! - `race TARGET SECS`: on the share, swaps `/race/x` between a real
//!   directory and a symlink to TARGET (a host path outside the share),
//!   while two threads write and read `x/f` and `x/secret` through it;
//!   prints how often each side got through and how many reads returned
//!   the host's `secret`.
//! - `handles INODE FILE`: the shocker attack. Takes the file handle of
//!   FILE (on the share), then forges handles whose inode number is INODE
//!   (a host file's, outside the share) and every small number, opens each
//!   with `open_by_handle_at` (needs CAP_DAC_READ_SEARCH) and prints how
//!   many opened and how many read the host's `secret`.
//! - `xattrs FILE`: sets a huge `user.` attribute, a file capability and
//!   an overlay attribute on FILE; prints each errno (0: it was set).

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
        Some(libc::ESTALE) => "ESTALE".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP".into(),
        Some(libc::E2BIG) => "E2BIG".into(),
        Some(libc::ENOSPC) => "ENOSPC".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
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

/// The host's secret, as the test writes it outside the share.
const HOST_SECRET: &[u8] = b"host secret\n";

fn race(target: &str, secs: u64) -> Result<(), String> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    fn io(what: &str) -> impl Fn(io::Error) -> String + '_ {
        move |e| format!("{what}: {e}")
    }
    std::fs::create_dir_all("/race/x").map_err(io("mkdir /race/x"))?;
    std::fs::write("/race/x/secret", b"guest secret\n").map_err(io("/race/x/secret"))?;
    let _ = std::fs::remove_file("/race/link");
    std::os::unix::fs::symlink(target, "/race/link").map_err(io("symlink /race/link"))?;
    let stop = AtomicBool::new(false);
    let (swaps, writes, reads, leaked, failed) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            // x: directory -> symlink -> directory, by renames only.
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                let ok = std::fs::rename("/race/x", "/race/dir").is_ok()
                    && std::fs::rename("/race/link", "/race/x").is_ok()
                    && std::fs::rename("/race/x", "/race/link").is_ok()
                    && std::fs::rename("/race/dir", "/race/x").is_ok();
                if !ok {
                    eprintln!("a rename failed");
                    break;
                }
                swaps.fetch_add(1, Relaxed);
            }
            stop.store(true, Relaxed);
        });
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Relaxed) {
                    match std::fs::OpenOptions::new().create(true).append(true).open("/race/x/f") {
                        Ok(mut f) => {
                            let _ = std::io::Write::write_all(&mut f, b"from the guest\n");
                            writes.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Relaxed);
                        }
                    }
                    match std::fs::read("/race/x/secret") {
                        Ok(b) if b == HOST_SECRET => {
                            leaked.fetch_add(1, Relaxed);
                        }
                        Ok(_) => {
                            reads.fetch_add(1, Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Relaxed);
                        }
                    }
                }
            });
        }
    });
    println!(
        "race swaps={} writes={} reads={} failed={} leaked={}",
        swaps.into_inner(),
        writes.into_inner(),
        reads.into_inner(),
        failed.into_inner(),
        leaked.into_inner()
    );
    Ok(())
}

/// A `struct file_handle` with room for `MAX_HANDLE_SZ` bytes.
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    data: [u8; 128],
}

/// The handle of `path`, by `name_to_handle_at`.
fn handle_of(path: &str) -> io::Result<Handle> {
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let c = std::ffi::CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut mount_id = 0;
    // SAFETY: h is a file_handle with `bytes` bytes of room after its
    // header; c is a NUL-terminated path.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            (&mut h as *mut Handle).cast(),
            &mut mount_id,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(h)
}

/// The contents of the file `h` names, through the mount of `mount` (none
/// if it opened but does not read, as a directory).
fn read_by_handle(mount: &std::fs::File, h: &mut Handle) -> io::Result<Option<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    // SAFETY: h is a valid file_handle; the fd returned is owned below.
    let fd = unsafe { libc::open_by_handle_at(mount.as_raw_fd(), (h as *mut Handle).cast(), libc::O_RDONLY) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and belongs to nobody else.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut b = Vec::new();
    Ok(std::io::Read::read_to_end(&mut f, &mut b).ok().map(|_| b))
}

fn handles(inode: u64, file: &str) -> Result<(), String> {
    let mount = std::fs::File::open("/").map_err(|e| format!("open /: {e}"))?;
    // The handle the kernel gives for a file of the share: a FUSE handle
    // is the node id (8 bytes) and a generation (4 bytes).
    let (own, kind, len) = match handle_of(file) {
        Ok(mut h) => {
            let own = match read_by_handle(&mount, &mut h) {
                Ok(_) => "opened".to_string(),
                Err(e) => errno_name(&e),
            };
            (own, h.kind, h.bytes)
        }
        Err(e) => (format!("nohandle:{}", errno_name(&e)), 0x81, 12),
    };
    let (mut opened, mut leaked, mut refused) = (0, 0, 0);
    let mut errors = std::collections::BTreeMap::new();
    let candidates = std::iter::once(inode)
        .chain(0..4096)
        .chain([u64::MAX, u64::MAX - 1, 1 << 32]);
    for id in candidates {
        for generation in [0u32, 1] {
            let mut h = Handle {
                bytes: len.clamp(12, 128),
                kind,
                data: [0; 128],
            };
            h.data[..8].copy_from_slice(&id.to_ne_bytes());
            h.data[8..12].copy_from_slice(&generation.to_ne_bytes());
            match read_by_handle(&mount, &mut h) {
                Ok(Some(b)) if b == HOST_SECRET => leaked += 1,
                Ok(_) => opened += 1,
                Err(e) => {
                    refused += 1;
                    *errors.entry(errno_name(&e)).or_insert(0u32) += 1;
                }
            }
        }
    }
    let errors: Vec<String> = errors.iter().map(|(k, n)| format!("{k}:{n}")).collect();
    println!(
        "handles own={own} type={kind:#x} bytes={len} opened={opened} refused={refused} leaked={leaked} errors={}",
        errors.join(",")
    );
    Ok(())
}

fn xattrs(file: &str) -> Result<(), String> {
    let c = std::ffi::CString::new(file).map_err(|_| "FILE has a NUL")?;
    let set = |name: &str, value: &[u8]| -> String {
        let n = std::ffi::CString::new(name).expect("a constant name");
        // SAFETY: NUL-terminated path and name; value is valid for its length.
        let r = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if r == 0 {
            "0".into()
        } else {
            errno_name(&io::Error::last_os_error())
        }
    };
    // A file capability: version 2, every capability permitted and
    // inheritable, effective.
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    for i in 0..4 {
        cap[4 + i * 4..8 + i * 4].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    println!(
        "xattrs huge={} big={} cap={} overlay={}",
        set("user.huge", &vec![b'x'; 1 << 20]),
        set("user.big", &vec![b'x'; 65536]),
        set("security.capability", &cap),
        set("trusted.overlay.opaque", b"y"),
    );
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    match args.get(1).map(String::as_str) {
        Some("unserved") => unserved(num(args, 2, "FIRST")?, num(args, 3, "COUNT")?),
        Some("hold") => hold(num(args, 2, "PORT")?, num(args, 3, "COUNT")?, num(args, 4, "SECS")?),
        Some("noread") => noread(num(args, 2, "PORT")?, num(args, 3, "SECS")?),
        Some("race") => race(args.get(2).ok_or("missing TARGET")?, num(args, 3, "SECS")?)?,
        Some("handles") => handles(num(args, 2, "INODE")?, args.get(3).ok_or("missing FILE")?)?,
        Some("xattrs") => xattrs(args.get(2).ok_or("missing FILE")?)?,
        _ => {
            return Err(
                "usage: tegmen-guest-probe unserved FIRST COUNT | hold PORT COUNT SECS | noread PORT SECS | race TARGET SECS \
                 | handles INODE FILE | xattrs FILE"
                    .into(),
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
