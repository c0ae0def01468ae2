//! The virtio-fs device (FUSE through the confined passthrough file
//! system) on a scratch share, driven by a hostile guest's requests: every
//! opcode, lying lengths, names with `/` and `..`, node ids and handles it
//! learnt or made up, symlinks pointing out of the share. Afterwards the
//! files outside the share are exactly as before.
//!
//! The process first jails itself ([`init`]): a mount namespace of its
//! own with a fresh tmpfs as its root, so that even an escape the target
//! finds only ever reaches scratch files.

use std::path::Path;
use std::sync::OnceLock;

use tegmen_vmm::devices::fs::config::{CachePolicy, FsConfig};
use tegmen_vmm::devices::fs::FsDevice;
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{self, Ring};
use crate::input::Input;

static JAIL: OnceLock<()> = OnceLock::new();

/// Jails this process (once): a private mount namespace whose root is a
/// fresh tmpfs holding `/proc`, `/dev`, `/tmp`, `/usr` (read-only) and, at
/// its own path, the current directory (libFuzzer reads its corpus and
/// writes crash inputs relative to it). Must run while the process has one thread (libFuzzer's
/// init hook, or `main` of the corpus test). Needs root (CAP_SYS_ADMIN),
/// as the fs backend does.
pub fn init() {
    JAIL.get_or_init(|| {
        if let Err(e) = enter_jail() {
            panic!("the fs fuzz target needs root and a single thread to jail itself: {e}");
        }
    });
}

fn enter_jail() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let step = |what: &str| {
        let what = what.to_string();
        move |e: nix::errno::Errno| format!("{what}: {e}")
    };
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    let cwd = std::env::current_dir().map_err(io("the current directory"))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(step("unshare(CLONE_NEWNS)"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making / private"))?;
    // The new root is a tmpfs over a directory that does not hide the
    // current one (only in this namespace).
    let root = ["/mnt", "/srv", "/media"]
        .iter()
        .map(Path::new)
        .find(|r| !cwd.starts_with(r))
        .expect("one of them is not above the current directory");
    std::fs::create_dir_all(root).map_err(io("the jail's mount point"))?;
    mount(
        Some("tegmen-fuzz"),
        root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=256m,mode=0755"),
    )
    .map_err(step("a tmpfs for the jail"))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for d in ["/proc", "/dev", "/tmp"] {
        std::fs::create_dir(inside(Path::new(d))).map_err(io(d))?;
    }
    std::fs::create_dir_all(inside(&cwd)).map_err(io("the current directory's place"))?;
    let rec_bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(
        Some("/proc"),
        &inside(Path::new("/proc")),
        None::<&str>,
        rec_bind,
        None::<&str>,
    )
    .map_err(step("binding /proc"))?;
    mount(
        Some("/dev"),
        &inside(Path::new("/dev")),
        None::<&str>,
        rec_bind,
        None::<&str>,
    )
    .map_err(step("binding /dev"))?;
    mount(Some(&cwd), &inside(&cwd), None::<&str>, rec_bind, None::<&str>)
        .map_err(step("binding the current directory"))?;
    // The system's programs and libraries, read-only: libFuzzer's merge
    // and fork modes run `sh -c` children, and the sanitizers their
    // symbolizer.
    for d in ["/usr", "/bin", "/sbin", "/lib", "/lib64"] {
        let host = Path::new(d);
        match std::fs::symlink_metadata(host) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(host).map_err(io(d))?;
                std::os::unix::fs::symlink(target, inside(host)).map_err(io(d))?;
            }
            Ok(m) if m.is_dir() => {
                std::fs::create_dir(inside(host)).map_err(io(d))?;
                mount(Some(host), &inside(host), None::<&str>, rec_bind, None::<&str>).map_err(step(d))?;
                let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
                mount(None::<&str>, &inside(host), None::<&str>, ro, None::<&str>).map_err(step(d))?;
            }
            _ => {}
        }
    }
    nix::unistd::chroot(root).map_err(step("chroot"))?;
    nix::unistd::chdir(&cwd).map_err(step("chdir"))?;
    Ok(())
}

const WORK: &str = "/fs-target";
const SECRET: &[u8] = b"the host's own file\n";

/// Lays out the share and the host files beside it.
fn scratch() -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(WORK);
    let share = Path::new(WORK).join("share");
    std::fs::create_dir_all(share.join("d"))?;
    std::fs::create_dir_all(Path::new(WORK).join("outside"))?;
    std::fs::write(Path::new(WORK).join("outside/secret"), SECRET)?;
    std::fs::write(share.join("f"), b"hello\n")?;
    std::fs::write(share.join("d/g"), b"")?;
    std::os::unix::fs::symlink(format!("{WORK}/outside/secret"), share.join("abs"))?;
    std::os::unix::fs::symlink("../outside/secret", share.join("rel"))?;
    std::os::unix::fs::symlink("../outside", share.join("up"))?;
    Ok(())
}

/// Everything outside the share, as (path, contents) sorted.
fn outside_state() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(WORK).to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p == Path::new(WORK).join("share") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).ok();
            let contents = match &meta {
                Some(m) if m.is_dir() => {
                    stack.push(p.clone());
                    Vec::new()
                }
                Some(m) if m.is_file() => std::fs::read(&p).unwrap_or_default(),
                _ => Vec::new(),
            };
            let mode = meta.map(|m| std::os::unix::fs::MetadataExt::mode(&m)).unwrap_or(0);
            out.push((format!("{} {mode:o}", p.display()), contents));
        }
    }
    out.sort();
    out
}

// FUSE opcodes (include/uapi/linux/fuse.h) and the fixed part of each
// request's body, in bytes.
const OPS: &[(u32, usize)] = &[
    (1, 0),   // LOOKUP name
    (2, 8),   // FORGET
    (3, 16),  // GETATTR
    (4, 88),  // SETATTR
    (5, 0),   // READLINK
    (6, 0),   // SYMLINK name target
    (8, 16),  // MKNOD name
    (9, 8),   // MKDIR name
    (10, 0),  // UNLINK name
    (11, 0),  // RMDIR name
    (12, 8),  // RENAME newdir, old new
    (13, 8),  // LINK oldnodeid, name
    (14, 8),  // OPEN
    (15, 40), // READ
    (16, 40), // WRITE + data
    (17, 0),  // STATFS
    (18, 24), // RELEASE
    (20, 16), // FSYNC
    (21, 8),  // SETXATTR name value
    (22, 8),  // GETXATTR name
    (23, 8),  // LISTXATTR
    (24, 0),  // REMOVEXATTR name
    (25, 24), // FLUSH
    (26, 16), // INIT (again)
    (27, 8),  // OPENDIR
    (28, 40), // READDIR
    (29, 24), // RELEASEDIR
    (30, 16), // FSYNCDIR
    (31, 48), // GETLK
    (32, 48), // SETLK
    (34, 8),  // ACCESS
    (35, 16), // CREATE name
    (36, 8),  // INTERRUPT
    (38, 0),  // DESTROY
    (39, 32), // IOCTL
    (40, 24), // POLL
    (42, 8),  // BATCH_FORGET + entries
    (43, 32), // FALLOCATE
    (44, 40), // READDIRPLUS
    (45, 16), // RENAME2 newdir flags, old new
    (46, 24), // LSEEK
    (47, 56), // COPY_FILE_RANGE
    (48, 40), // SETUPMAPPING
    (49, 16), // REMOVEMAPPING
    (50, 8),  // SYNCFS
    (51, 16), // TMPFILE name
];

/// Ops whose body starts with a file handle (GETATTR's is at 8).
const FH_FIRST: &[u32] = &[15, 16, 18, 20, 25, 28, 29, 30, 31, 32, 43, 44, 46, 47];
/// Ops that take one name after the fixed part, and those that take two.
const ONE_NAME: &[u32] = &[1, 8, 9, 10, 11, 13, 21, 22, 24, 35, 51];
const TWO_NAMES: &[u32] = &[6, 12, 45];

const NAMES: &[&[u8]] = &[
    b"f",
    b"d",
    b"g",
    b"abs",
    b"rel",
    b"up",
    b"new",
    b"x",
    b"..",
    b".",
    b"",
    b"d/../..",
    b"/etc",
    b"up/secret",
    b"../outside/secret",
    b"user.x",
    b"trusted.x",
    b"security.capability",
];

fn name(input: &mut Input, body: &mut Vec<u8>) {
    match input.u8() {
        0..=220 => body.extend_from_slice(input.pick(NAMES)),
        221..=250 => body.extend_from_slice(input.chunk()),
        // A long one.
        _ => body.resize(body.len() + 255 + usize::from(input.u8()) * 16, b'n'),
    }
    if input.u8() != 0xff {
        body.push(0);
    }
}

struct Guest {
    mem: vm_memory::GuestMemoryMmap,
    ring: Ring,
    dev: FsDevice,
    unique: u64,
    nodes: Vec<u64>,
    handles: Vec<u64>,
}

const REQ_AT: u64 = guest::DATA_BASE;
const REPLY_AT: u64 = guest::DATA_BASE + 0x8_0000;

impl Guest {
    /// Sends one request with `cap` bytes of reply room; returns the reply
    /// (empty when the device wrote none).
    fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        cap: u32,
        split: Option<usize>,
        len_lie: Option<u32>,
    ) -> Vec<u8> {
        self.unique += 1;
        let mut req = Vec::with_capacity(40 + body.len());
        let len = len_lie.unwrap_or((40 + body.len()) as u32);
        req.extend_from_slice(&len.to_le_bytes());
        req.extend_from_slice(&opcode.to_le_bytes());
        req.extend_from_slice(&self.unique.to_le_bytes());
        req.extend_from_slice(&nodeid.to_le_bytes());
        req.extend_from_slice(&[0u8; 8]); // uid, gid
        req.extend_from_slice(&1u32.to_le_bytes()); // pid
        req.extend_from_slice(&[0u8; 4]); // total_extlen, padding
        req.extend_from_slice(body);
        let _ = self.mem.write_slice(&req, GuestAddress(REQ_AT));
        let cap = cap.min(0x8_0000);
        let _ = self.mem.write_slice(&vec![0u8; cap as usize], GuestAddress(REPLY_AT));
        let mut descs = match split {
            Some(at) if at < req.len() => vec![
                (REQ_AT, at as u32, false),
                (REQ_AT + at as u64, (req.len() - at) as u32, false),
            ],
            _ => vec![(REQ_AT, req.len() as u32, false)],
        };
        if cap > 0 {
            descs.push((REPLY_AT, cap, true));
        }
        self.ring.add_chain(&self.mem, &descs);
        self.dev
            .process_queue(&mut self.ring.queue, &self.mem)
            .expect("the queue itself is sound");
        let used = self.ring.take_used(&self.mem);
        assert_eq!(used.len(), 1, "one chain offered, {} used", used.len());
        let used_len = used[0].1;
        assert!(
            used_len <= cap,
            "the device claims {used_len} bytes of a {cap}-byte buffer"
        );
        let mut reply = vec![0u8; used_len as usize];
        let _ = self.mem.read_slice(&mut reply, GuestAddress(REPLY_AT));
        if reply.len() >= 16 {
            let out_len = u32::from_le_bytes(reply[0..4].try_into().unwrap());
            assert_eq!(out_len, used_len, "fuse_out_header.len vs used length");
            let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
            assert!(error <= 0 && error > -4096, "error {error} is not a negative errno");
        } else {
            assert_eq!(used_len, 0, "a reply shorter than its header");
        }
        reply
    }

    fn node(&mut self, input: &mut Input) -> u64 {
        match input.u8() {
            0..=99 => 1,
            100..=229 if !self.nodes.is_empty() => self.nodes[input.u8() as usize % self.nodes.len()],
            230..=254 => u64::from(input.u8()),
            _ => input.u64(),
        }
    }

    fn handle(&mut self, input: &mut Input) -> u64 {
        if input.u8() < 220 && !self.handles.is_empty() {
            self.handles[input.u8() as usize % self.handles.len()]
        } else {
            input.u64() % 16
        }
    }
}

pub fn request(data: &[u8]) {
    init();
    scratch().expect("scratch share");
    let before = outside_state();
    {
        let mut config = FsConfig::new(Path::new(WORK).join("share"));
        config.cache = CachePolicy::Never;
        config.xattr = true;
        let dev = FsDevice::new(config).expect("fs device");
        let mem = guest::memory();
        let ring = Ring::new(&mem, 0, false);
        let mut g = Guest {
            mem,
            ring,
            dev,
            unique: 0,
            nodes: Vec::new(),
            handles: Vec::new(),
        };
        let mut input = Input::new(data);
        // FUSE_INIT first, as the guest kernel sends it (7.31, flags from
        // the input); a guest that skips it is exercised too.
        if input.u8() != 0xff {
            let flags = input.u32();
            let mut body = Vec::new();
            for v in [7u32, 31, 0x2_0000, flags] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            g.call(26, 0, &body, 256, None, None);
        }
        let mut steps = 0;
        while !input.is_empty() && steps < 64 {
            steps += 1;
            let (opcode, fixed) = if input.u8() == 0xff {
                (input.u32(), usize::from(input.u8()))
            } else {
                input.pick(OPS)
            };
            let nodeid = g.node(&mut input);
            let mut body = input.bytes(fixed).to_vec();
            body.resize(fixed, 0);
            // The fields patched below are there only when the fixed part
            // is as long as the opcode's (a raw opcode may come with any).
            if FH_FIRST.contains(&opcode) && body.len() >= 8 {
                let fh = g.handle(&mut input);
                body[..8].copy_from_slice(&fh.to_le_bytes());
            }
            if opcode == 3 && body.len() >= 16 && input.bool() {
                let fh = g.handle(&mut input);
                body[8..16].copy_from_slice(&fh.to_le_bytes());
            }
            // READ/WRITE/READDIR sizes a guest really asks for, mostly.
            if matches!(opcode, 15 | 16 | 28 | 44) && body.len() >= 20 && input.u8() < 200 {
                let size = u32::from(input.u16()) % 0x2_0000;
                body[16..20].copy_from_slice(&size.to_le_bytes());
            }
            if matches!(opcode, 12 | 13 | 45) && body.len() >= 8 && input.u8() < 200 {
                let other = g.node(&mut input);
                body[..8].copy_from_slice(&other.to_le_bytes());
            }
            if ONE_NAME.contains(&opcode) {
                name(&mut input, &mut body);
            }
            if TWO_NAMES.contains(&opcode) {
                name(&mut input, &mut body);
                name(&mut input, &mut body);
            }
            if opcode == 16 {
                let data = input.chunk();
                if body.len() >= 20 {
                    body[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
                }
                body.extend_from_slice(data);
            }
            if opcode == 21 || opcode == 42 {
                body.extend_from_slice(input.chunk());
            }
            let cap = match input.u8() % 8 {
                0 => 0,
                1 => 16,
                2 => u32::from(input.u16()),
                3 => input.u32(),
                _ => 4096,
            };
            let split = (input.u8() == 0).then(|| usize::from(input.u8()));
            let len_lie = (input.u8() == 0).then(|| input.u32());
            let reply = g.call(opcode, nodeid, &body, cap, split, len_lie);
            if reply.len() >= 24 && reply[4..8] == [0; 4] {
                let first = u64::from_le_bytes(reply[16..24].try_into().unwrap());
                match opcode {
                    1 | 6 | 8 | 9 | 13 => g.nodes.push(first),
                    14 | 27 => g.handles.push(first),
                    35 => {
                        g.nodes.push(first);
                        if reply.len() >= 16 + 128 + 8 {
                            let fh = u64::from_le_bytes(reply[144..152].try_into().unwrap());
                            g.handles.push(fh);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let after = outside_state();
    assert_eq!(before, after, "a file outside the share changed");
}
