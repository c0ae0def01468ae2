//! Tests of the device core, playing the guest driver: descriptor chains
//! are laid out in a `GuestMemoryMmap` with virtio-queue's mock split queue,
//! FUSE requests are written by hand as bytes, replies are read back from
//! guest memory.

use std::path::Path;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 16;
/// Requests are written here, replies land at REPLY_ADDR.
const REQ_ADDR: u64 = 0x10_0000;
const REPLY_ADDR: u64 = 0x20_0000;
const EXTRA_ADDR: u64 = 0x30_0000;
/// The used ring (the mock's own overlaps the avail ring's tail).
const USED_ADDR: u64 = 0x8000;

// FUSE opcodes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const MKDIR: u32 = 9;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const INIT: u32 = 26;
const CREATE: u32 = 35;

const ROOT: u64 = 1;

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

fn rd(addr: u64, len: usize) -> Desc {
    Desc {
        addr,
        len: len as u32,
        write: false,
    }
}

fn wr(addr: u64, len: usize) -> Desc {
    Desc {
        addr,
        len: len as u32,
        write: true,
    }
}

/// The guest side: memory, one virtqueue, and the device under test.
struct Guest {
    mem: &'static GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    queue: Queue,
    dev: FsDevice,
    unique: u64,
}

#[derive(Debug)]
struct Reply {
    used_len: u32,
    bytes: Vec<u8>,
}

impl Reply {
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap())
    }
    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes[off..off + 8].try_into().unwrap())
    }
    /// `fuse_out_header.error`: 0 or a negative errno.
    fn error(&self) -> i32 {
        assert!(self.bytes.len() >= 16, "no reply header: {self:?}");
        self.u32_at(4) as i32
    }
    fn unique(&self) -> u64 {
        self.u64_at(8)
    }
    fn ok(&self) -> &Self {
        assert_eq!(self.error(), 0, "FUSE error reply {}", self.error());
        assert_eq!(self.u32_at(0), self.used_len, "out header len vs used len");
        self
    }
}

fn fuse_req(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = (40 + body.len()) as u32;
    let mut v = Vec::with_capacity(len as usize);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&opcode.to_le_bytes());
    v.extend_from_slice(&unique.to_le_bytes());
    v.extend_from_slice(&nodeid.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // uid
    v.extend_from_slice(&0u32.to_le_bytes()); // gid
    v.extend_from_slice(&1u32.to_le_bytes()); // pid
    v.extend_from_slice(&0u32.to_le_bytes()); // total_extlen + padding
    v.extend_from_slice(body);
    v
}

fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn le32s(vals: &[u32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Guest {
    fn new(shared: &Path) -> Self {
        Self::with_xattr(shared, false)
    }

    fn with_xattr(shared: &Path, xattr: bool) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let vq = MockSplitQueue::new(mem, QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        // The mock places the used ring over the avail ring's used_event
        // field; keep the used ring apart.
        queue.set_used_ring_address(Some(USED_ADDR as u32), Some(0));
        let mut config = FsConfig::new(shared);
        config.cache = CachePolicy::Never;
        config.xattr = xattr;
        let dev = FsDevice::new(config).unwrap();
        Guest {
            mem,
            vq,
            queue,
            dev,
            unique: 100,
        }
    }

    /// A guest with FUSE_INIT done.
    fn ready(shared: &Path) -> Self {
        let mut g = Guest::new(shared);
        let body = le32s(&[7, 31, 0x20000, 0]);
        let r = g.call(INIT, 0, &body, 256);
        r.ok();
        g
    }

    fn next_unique(&mut self) -> u64 {
        self.unique += 1;
        self.unique
    }

    /// Make `descs` one available chain, run the device, and return the
    /// used length the device reported for it.
    fn submit(&mut self, descs: &[Desc]) -> u32 {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = if d.write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let next = if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    i as u16 + 1
                } else {
                    0
                };
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
            })
            .collect();
        let (len, notify) = self.submit_chain(&raw);
        assert!(notify, "a used chain must ask for an interrupt");
        len
    }

    /// Make `raw` one available chain, run the device; returns the used
    /// length and whether the device asked for an interrupt.
    fn submit_chain(&mut self, raw: &[RawDescriptor]) -> (u32, bool) {
        let before = self.used_idx();
        self.publish(raw);
        let notify = self.dev.process_queue(&mut self.queue, self.mem).unwrap();
        let after = self.used_idx();
        assert_eq!(after, before.wrapping_add(1), "exactly one chain used");
        // struct virtq_used_elem { le32 id; le32 len; } after flags and idx.
        let elem = USED_ADDR + 4 + 8 * u64::from(before % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        assert_eq!(id, 0, "used id is the chain head");
        (len, notify)
    }

    /// Write `raw` at the start of the descriptor table and make its head
    /// available, as a driver does (the mock's own helper does not wrap
    /// the avail ring).
    fn publish(&self, raw: &[RawDescriptor]) {
        for (i, d) in raw.iter().enumerate() {
            self.vq.desc_table().store(i as u16, *d).unwrap();
        }
        let avail = self.vq.avail_addr().0;
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    /// `used->idx` as the device last published it.
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_ADDR + 2)).unwrap()
    }

    /// Set `used_event` (the driver's interrupt threshold with EVENT_IDX).
    fn set_used_event(&self, value: u16) {
        let addr = self.vq.avail_addr().0 + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// Send raw request bytes with `cap` bytes of reply room.
    fn raw(&mut self, req: &[u8], cap: usize) -> Reply {
        self.mem.write_slice(req, GuestAddress(REQ_ADDR)).unwrap();
        self.mem
            .write_slice(&vec![0xa5; cap], GuestAddress(REPLY_ADDR))
            .unwrap();
        let mut descs = vec![rd(REQ_ADDR, req.len())];
        if cap > 0 {
            descs.push(wr(REPLY_ADDR, cap));
        }
        let used_len = self.submit(&descs);
        assert!(used_len as usize <= cap, "used len beyond the buffer");
        let mut bytes = vec![0; used_len as usize];
        self.mem.read_slice(&mut bytes, GuestAddress(REPLY_ADDR)).unwrap();
        Reply { used_len, bytes }
    }

    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], cap: usize) -> Reply {
        let unique = self.next_unique();
        let r = self.raw(&fuse_req(opcode, unique, nodeid, body), cap);
        if r.used_len > 0 {
            assert_eq!(r.unique(), unique, "reply to another request");
        }
        r
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(LOOKUP, parent, &cstr(name), 256)
    }

    /// LOOKUP that must succeed; returns (nodeid, size, mode).
    fn lookup_ok(&mut self, parent: u64, name: &str) -> (u64, u64, u32) {
        let r = self.lookup(parent, name);
        r.ok();
        // fuse_entry_out: nodeid @0, attr @40 (ino, size, ..., mode @60).
        (r.u64_at(16), r.u64_at(16 + 48), r.u32_at(16 + 40 + 60))
    }

    fn open(&mut self, nodeid: u64, flags: u32) -> u64 {
        let r = self.call(OPEN, nodeid, &le32s(&[flags, 0]), 64);
        r.ok();
        r.u64_at(16)
    }

    fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Reply {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&le32s(&[size, 0]));
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&le32s(&[0, 0]));
        self.call(READ, nodeid, &body, 16 + size as usize)
    }
}

fn share_with_hello() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello from the host\n").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    dir
}

#[test]
fn fs_init_handshake() {
    let dir = share_with_hello();
    let mut g = Guest::new(dir.path());
    let r = g.call(INIT, 0, &le32s(&[7, 31, 0x20000, 0]), 256);
    r.ok();
    // fuse_init_out after the 16-byte header: major, minor, ...
    assert_eq!(r.u32_at(16), 7, "major");
    assert!(r.u32_at(20) >= 31, "minor");
    assert_eq!(r.used_len, 16 + 64, "full fuse_init_out for minor 31");
    let s = g.dev.stats();
    assert_eq!((s.chains, s.replies, s.malformed_chains), (1, 1, 0));
}

#[test]
fn fs_init_negotiates_large_requests() {
    const BIG_WRITES: u32 = 0x20;
    const MAX_PAGES: u32 = 0x40_0000;
    let dir = share_with_hello();
    let mut g = Guest::new(dir.path());
    let r = g.call(INIT, 0, &le32s(&[7, 31, 0x20000, BIG_WRITES | MAX_PAGES]), 256);
    r.ok();
    let flags = r.u32_at(16 + 12);
    assert_eq!(flags & (BIG_WRITES | MAX_PAGES), BIG_WRITES | MAX_PAGES);
    assert_eq!(r.u32_at(16 + 20), 1 << 20, "max_write");
    // Nothing the driver did not offer is turned on.
    let r = g.call(INIT, 0, &le32s(&[7, 31, 0x20000, 0]), 256);
    assert_eq!(r.u32_at(16 + 12) & (BIG_WRITES | MAX_PAGES), 0);
}

#[test]
fn fs_lookup_open_read() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let (ino, size, mode) = g.lookup_ok(ROOT, "hello.txt");
    assert!(ino > ROOT);
    assert_eq!(size, 20);
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);

    let fh = g.open(ino, libc::O_RDONLY as u32);
    let r = g.read(ino, fh, 0, 4096);
    r.ok();
    assert_eq!(&r.bytes[16..], b"hello from the host\n");

    // Offset read.
    let r = g.read(ino, fh, 6, 4);
    r.ok();
    assert_eq!(&r.bytes[16..], b"from");

    let (_, _, mode) = g.lookup_ok(ROOT, "sub");
    assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR);

    let r = g.lookup(ROOT, "missing");
    assert_eq!(r.error(), -libc::ENOENT);
}

/// OPEN with O_PATH, then a READ whose flags differ: fuse-backend-rs's
/// read would fcntl(F_SETFL) the O_PATH fd, fail, and close the handle's
/// fd on the way out while the handle still owned it (a double close when
/// the handle goes: the test process aborts in a debug build). The flags
/// are filtered, so the handle is a plain one and the read works.
#[test]
fn fs_open_flags_a_guest_may_not_set_are_dropped() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let (ino, _, _) = g.lookup_ok(ROOT, "hello.txt");
    let fh = g.open(ino, (libc::O_PATH | libc::O_NOATIME | libc::O_DIRECT) as u32);
    for _ in 0..2 {
        let r = g.read(ino, fh, 0, 4096);
        r.ok();
        assert_eq!(&r.bytes[16..], b"hello from the host\n");
    }
    // A second handle, whose fd would take a number closed under the first.
    let fh2 = g.open(ino, libc::O_RDONLY as u32);
    let r = g.read(ino, fh2, 6, 4);
    r.ok();
    assert_eq!(&r.bytes[16..], b"from");
    // O_TMPFILE on a directory makes no unnamed file in the share.
    let r = g.call(OPEN, ROOT, &le32s(&[(libc::O_TMPFILE | libc::O_RDWR) as u32, 0]), 64);
    let _ = r;
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(super::confined::guest_file_flags(libc::O_PATH as u32 | 1), 1);
    // O_EXCL stays: CREATE of a file that exists fails with it.
    let mut body = le32s(&[
        (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32,
        libc::S_IFREG | 0o644,
        0,
        0,
    ]);
    body.extend_from_slice(&cstr("hello.txt"));
    assert_eq!(g.call(CREATE, ROOT, &body, 256).error(), -libc::EEXIST);
}

#[test]
fn fs_request_split_over_descriptors() {
    // Header and body in separate readable descriptors, reply split over
    // two writable ones, as the Linux driver lays them out.
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let unique = g.next_unique();
    let req = fuse_req(LOOKUP, unique, ROOT, &cstr("hello.txt"));
    g.mem.write_slice(&req[..40], GuestAddress(REQ_ADDR)).unwrap();
    g.mem.write_slice(&req[40..], GuestAddress(EXTRA_ADDR)).unwrap();
    let used = g.submit(&[
        rd(REQ_ADDR, 40),
        rd(EXTRA_ADDR, req.len() - 40),
        wr(REPLY_ADDR, 16),
        wr(REPLY_ADDR + 0x1000, 128),
    ]);
    assert_eq!(used, 16 + 128);
    let mut out = [0u8; 16];
    g.mem.read_slice(&mut out, GuestAddress(REPLY_ADDR)).unwrap();
    assert_eq!(i32::from_le_bytes(out[4..8].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), unique);
    let mut entry = [0u8; 128];
    g.mem.read_slice(&mut entry, GuestAddress(REPLY_ADDR + 0x1000)).unwrap();
    assert_eq!(u64::from_le_bytes(entry[48..56].try_into().unwrap()), 20);
}

#[test]
fn fs_getattr() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let (ino, _, _) = g.lookup_ok(ROOT, "hello.txt");
    // fuse_getattr_in: getattr_flags, dummy, fh.
    let r = g.call(GETATTR, ino, &[0u8; 16], 256);
    r.ok();
    // fuse_attr_out: attr_valid u64, attr_valid_nsec u32, dummy u32, attr.
    assert_eq!(r.used_len, 16 + 104);
    assert_eq!(r.u64_at(16 + 16 + 8), 20, "size");
    assert_eq!(r.u32_at(16 + 16 + 60) & libc::S_IFMT, libc::S_IFREG);

    let r = g.call(GETATTR, ROOT, &[0u8; 16], 256);
    r.ok();
    assert_eq!(r.u32_at(16 + 16 + 60) & libc::S_IFMT, libc::S_IFDIR);
}

#[test]
fn fs_create_write_appears_on_host() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    // fuse_create_in: flags, mode, umask, open_flags; then the name.
    let mut body = le32s(&[
        (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32,
        libc::S_IFREG | 0o4755, // the set-user-ID bit must not reach the host
        0o022,
        0,
    ]);
    body.extend_from_slice(&cstr("from-guest.txt"));
    let r = g.call(CREATE, ROOT, &body, 256);
    r.ok();
    assert_eq!(r.used_len, 16 + 128 + 16, "entry_out + open_out");
    let ino = r.u64_at(16);
    let fh = r.u64_at(16 + 128);

    let data = b"written by the guest";
    let mut body = Vec::new();
    body.extend_from_slice(&fh.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&le32s(&[data.len() as u32, 0]));
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&le32s(&[0, 0]));
    body.extend_from_slice(data);
    let r = g.call(WRITE, ino, &body, 64);
    r.ok();
    assert_eq!(r.u32_at(16) as usize, data.len(), "fuse_write_out.size");

    // fuse_release_in: fh, flags, release_flags, lock_owner.
    let mut body = fh.to_le_bytes().to_vec();
    body.extend_from_slice(&le32s(&[0, 0]));
    body.extend_from_slice(&0u64.to_le_bytes());
    g.call(RELEASE, ino, &body, 64).ok();

    let host = dir.path().join("from-guest.txt");
    assert_eq!(std::fs::read(&host).unwrap(), data);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&host).unwrap().permissions());
    assert_eq!(mode & 0o7777, 0o755, "set-user-ID stripped, umask applied");
}

#[test]
fn fs_dotdot_from_root_stays_at_root() {
    let parent = tempfile::tempdir().unwrap();
    std::fs::write(parent.path().join("outside.txt"), b"secret").unwrap();
    let share = parent.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("inside.txt"), b"ok").unwrap();
    let mut g = Guest::ready(&share);

    // ".." of the root is the root (or an error), never the parent.
    let r = g.lookup(ROOT, "..");
    if r.error() == 0 {
        assert_eq!(r.u64_at(16), ROOT, "'..' of the root must be the root");
        use std::os::unix::fs::MetadataExt;
        let root_ino = std::fs::metadata(&share).unwrap().ino();
        assert_eq!(r.u64_at(16 + 40), root_ino, "attr of the share root");
    }
    assert_ne!(g.lookup(ROOT, "outside.txt").error(), 0);

    // Names that would walk are refused outright.
    for name in ["../outside.txt", "../share/inside.txt", "sub/../..", "/etc/passwd", ""] {
        assert_eq!(g.lookup(ROOT, name).error(), -libc::EINVAL, "lookup {name:?}");
    }
    // Creating names must be plain components.
    let mut body = le32s(&[0o755, 0o022]);
    body.extend_from_slice(&cstr(".."));
    assert_eq!(g.call(MKDIR, ROOT, &body, 256).error(), -libc::EINVAL);
    let mut body = le32s(&[0o755, 0o022]);
    body.extend_from_slice(&cstr("../escaped"));
    assert_eq!(g.call(MKDIR, ROOT, &body, 256).error(), -libc::EINVAL);
    assert!(!parent.path().join("escaped").exists());
    let mut body = le32s(&[libc::O_WRONLY as u32 | libc::O_CREAT as u32, 0o644, 0, 0]);
    body.extend_from_slice(&cstr("../created"));
    assert_eq!(g.call(CREATE, ROOT, &body, 256).error(), -libc::EINVAL);
    assert!(!parent.path().join("created").exists());
}

#[test]
fn fs_symlink_is_not_followed_by_lookup() {
    let dir = share_with_hello();
    std::os::unix::fs::symlink("/etc", dir.path().join("etc-link")).unwrap();
    let mut g = Guest::ready(dir.path());
    let (link, _, mode) = g.lookup_ok(ROOT, "etc-link");
    assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK);
    // Walking "through" the symlink from the host side must fail.
    assert_ne!(g.lookup(link, "passwd").error(), 0);
}

#[test]
fn fs_malformed_short_header_is_dropped() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let before = g.dev.stats();
    let req = fuse_req(LOOKUP, 7, ROOT, &cstr("hello.txt"));
    let r = g.raw(&req[..20], 256);
    assert_eq!(r.used_len, 0);
    let s = g.dev.stats();
    assert_eq!(s.malformed_chains, before.malformed_chains + 1);
    assert_eq!(s.dropped, before.dropped + 1);
}

#[test]
fn fs_malformed_len_larger_than_chain() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let mut req = fuse_req(LOOKUP, 4242, ROOT, &cstr("hello.txt"));
    req[..4].copy_from_slice(&4096u32.to_le_bytes());
    let r = g.raw(&req, 256);
    assert_eq!(r.used_len, 16);
    assert_eq!(r.error(), -libc::EINVAL);
    assert_eq!(r.unique(), 4242);
    assert_eq!(g.dev.stats().bad_headers, 1);

    // A len smaller than the header is refused the same way.
    req[..4].copy_from_slice(&8u32.to_le_bytes());
    assert_eq!(g.raw(&req, 256).error(), -libc::EINVAL);
    assert_eq!(g.dev.stats().bad_headers, 2);
}

#[test]
fn fs_unknown_opcode_gets_enosys() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let r = g.call(9999, ROOT, &[0u8; 8], 64);
    assert_eq!(r.used_len, 16);
    assert_eq!(r.error(), -libc::ENOSYS);
}

#[test]
fn fs_truncated_body_gets_an_error_reply() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let (ino, _, _) = g.lookup_ok(ROOT, "hello.txt");
    // READ needs a 40-byte fuse_read_in; send 8.
    let r = g.call(READ, ino, &[0u8; 8], 4096);
    assert_eq!(r.used_len, 16);
    assert_eq!(r.error(), -libc::EINVAL);
    // LOOKUP whose name has no NUL terminator.
    let r = g.call(LOOKUP, ROOT, b"hello.txt", 256);
    assert_eq!(r.error(), -libc::EINVAL);
    assert!(g.dev.stats().server_errors >= 2);
}

#[test]
fn fs_bogus_inode_and_handle() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    assert_ne!(g.call(GETATTR, 0xdead_beef, &[0u8; 16], 256).error(), 0);
    assert_ne!(g.lookup(0xdead_beef, "x").error(), 0);
    assert_ne!(g.lookup(0, "hello.txt").error(), 0);
    let (ino, _, _) = g.lookup_ok(ROOT, "hello.txt");
    let r = g.read(ino, 0x1234_5678, 0, 64);
    assert_eq!(r.error(), -libc::EBADF);
    // A huge read on a bogus handle with little reply room.
    let mut body = u64::MAX.to_le_bytes().to_vec();
    body.extend_from_slice(&u64::MAX.to_le_bytes());
    body.extend_from_slice(&le32s(&[u32::MAX, 0, 0, 0, 0, 0]));
    let r = g.call(READ, ino, &body, 64);
    assert!(r.error() < 0);
    // FORGET of an unknown inode: no reply, no harm.
    let r = g.call(FORGET, 0xdead_beef, &1u64.to_le_bytes(), 64);
    assert_eq!(r.used_len, 0);
    // Still serving.
    g.lookup_ok(ROOT, "hello.txt");
}

#[test]
fn fs_descriptor_outside_guest_memory() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let base = g.dev.stats().malformed_chains;
    // Entirely outside.
    assert_eq!(g.submit(&[rd(0xffff_0000_0000, 64), wr(REPLY_ADDR, 256)]), 0);
    // Request fine, reply buffer outside.
    let req = fuse_req(LOOKUP, 9, ROOT, &cstr("hello.txt"));
    g.mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
    assert_eq!(
        g.submit(&[rd(REQ_ADDR, req.len()), wr(MEM_SIZE as u64 + 0x1000, 256)]),
        0
    );
    // Straddling the end of memory.
    assert_eq!(g.submit(&[rd(MEM_SIZE as u64 - 16, 64), wr(REPLY_ADDR, 256)]), 0);
    // Absurd length.
    assert_eq!(g.submit(&[rd(REQ_ADDR, u32::MAX as usize), wr(REPLY_ADDR, 256)]), 0);
    assert_eq!(g.dev.stats().malformed_chains, base + 4);
    g.lookup_ok(ROOT, "hello.txt");
}

#[test]
fn fs_only_readable_descriptors_is_dropped() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let before = g.dev.stats();
    let r = g.raw(&fuse_req(LOOKUP, 11, ROOT, &cstr("hello.txt")), 0);
    assert_eq!(r.used_len, 0);
    let s = g.dev.stats();
    assert_eq!(s.dropped, before.dropped + 1);
    // Reply room smaller than an out header: dropped as well.
    let r = g.raw(&fuse_req(LOOKUP, 12, ROOT, &cstr("hello.txt")), 8);
    assert_eq!(r.used_len, 0);
    // Room for the header but not the entry: an error reply.
    let r = g.raw(&fuse_req(LOOKUP, 13, ROOT, &cstr("hello.txt")), 32);
    assert_eq!(r.used_len, 16);
    assert!(r.error() < 0);
}

#[test]
fn fs_wrong_direction_order_is_dropped() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    let req = fuse_req(LOOKUP, 14, ROOT, &cstr("hello.txt"));
    g.mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
    // Writable first, readable after: refused.
    let used = g.submit(&[wr(REPLY_ADDR, 256), rd(REQ_ADDR, req.len())]);
    assert_eq!(used, 0);
    // Only writable descriptors: no request to read.
    let used = g.submit(&[wr(REPLY_ADDR, 256)]);
    assert_eq!(used, 0);
    assert_eq!(g.dev.stats().malformed_chains, 2);
}

#[test]
fn fs_event_idx_queue() {
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    g.queue.set_event_idx(true);
    let unique = g.next_unique();
    let req = fuse_req(LOOKUP, unique, ROOT, &cstr("hello.txt"));
    g.mem.write_slice(&req, GuestAddress(REQ_ADDR)).unwrap();
    let chain = [
        RawDescriptor::from(SplitDescriptor::new(
            REQ_ADDR,
            req.len() as u32,
            VRING_DESC_F_NEXT as u16,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(REPLY_ADDR, 256, VRING_DESC_F_WRITE as u16, 0)),
    ];
    // The driver wants an interrupt once the used index passes its current
    // value: it gets one.
    let idx = g.used_idx();
    g.set_used_event(idx);
    let (len, notify) = g.submit_chain(&chain);
    assert_eq!(len, 16 + 128);
    assert!(notify);
    // The driver asks to be told only much later: no interrupt now.
    let idx = g.used_idx();
    g.set_used_event(idx.wrapping_add(5));
    let (len, notify) = g.submit_chain(&chain);
    assert_eq!(len, 16 + 128);
    assert!(!notify);
}

#[test]
fn fs_empty_queue_needs_no_interrupt() {
    let dir = share_with_hello();
    let mut g = Guest::new(dir.path());
    assert!(!g.dev.process_queue(&mut g.queue, g.mem).unwrap());
}

#[test]
fn fs_mknod_device_is_refused() {
    const MKNOD: u32 = 8;
    let dir = share_with_hello();
    let mut g = Guest::ready(dir.path());
    // fuse_mknod_in: mode, rdev, umask, padding; then the name.
    let mut body = le32s(&[libc::S_IFCHR | 0o600, (1 << 8) | 3, 0, 0]);
    body.extend_from_slice(&cstr("null"));
    assert_eq!(g.call(MKNOD, ROOT, &body, 256).error(), -libc::EPERM);
    assert!(!dir.path().join("null").exists());
    let mut body = le32s(&[libc::S_IFIFO | 0o600, 0, 0, 0]);
    body.extend_from_slice(&cstr("fifo"));
    g.call(MKNOD, ROOT, &body, 256).ok();
    assert!(dir.path().join("fifo").exists());
}

/// Deterministic garbage: random opcodes, node ids, handles, lengths and
/// chain shapes. Nothing may panic, every chain must be used with a length
/// inside its reply buffer, and the device must still serve afterwards.
/// GETXATTR, LISTXATTR and READDIR asking for 4 GiB: the passthrough
/// layer would allocate that much up front (for READDIR the server
/// already refuses with ENOMEM). Under an address-space limit (in a
/// forked child) the requests are answered and nothing aborts.
#[test]
fn fs_huge_xattr_and_readdir_sizes_allocate_nothing_huge() {
    const GETXATTR: u32 = 22;
    const LISTXATTR: u32 = 23;
    const OPENDIR: u32 = 27;
    const READDIR: u32 = 28;
    let dir = share_with_hello();
    let mut g = Guest::with_xattr(dir.path(), true);
    g.call(INIT, 0, &le32s(&[7, 31, 0x20000, 0]), 256).ok();
    let (ino, _, _) = g.lookup_ok(ROOT, "hello.txt");
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // SAFETY: the child only runs the requests and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let limit = (vm_kib << 10) + (1 << 30);
        let r = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: setrlimit reads the struct it is given.
        unsafe { libc::setrlimit(libc::RLIMIT_AS, &r) };
        let mut body = le32s(&[u32::MAX, 0]);
        body.extend_from_slice(&cstr("user.none"));
        let e1 = g.call(GETXATTR, ino, &body, 256).error();
        let e2 = g.call(LISTXATTR, ino, &le32s(&[u32::MAX, 0]), 256).error();
        let r = g.call(OPENDIR, ROOT, &le32s(&[0, 0]), 64);
        let fh = r.u64_at(16);
        let mut rd = fh.to_le_bytes().to_vec();
        rd.extend_from_slice(&0u64.to_le_bytes());
        rd.extend_from_slice(&le32s(&[u32::MAX, 0]));
        rd.extend_from_slice(&0u64.to_le_bytes());
        rd.extend_from_slice(&le32s(&[0, 0]));
        let e3 = g.call(READDIR, ROOT, &rd, 4096).error();
        // Answers, whatever they are (xattrs may be off): what matters is
        // that the device is alive to give them.
        let ok = e1 == -libc::ENODATA && e2 <= 0 && e3 <= 0;
        eprintln!("getxattr {e1}, listxattr {e2}, readdir {e3}");
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child died or got wrong answers: status {status:#x}"
    );
}

#[test]
fn fs_random_requests_never_panic() {
    let parent = tempfile::tempdir().unwrap();
    let share = parent.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), b"hello").unwrap();
    std::fs::write(parent.path().join("outside.txt"), b"outside").unwrap();
    let mut g = Guest::ready(&share);

    let mut state: u64 = std::env::var("TEGMEN_FS_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s != 0)
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // TEGMEN_FS_FUZZ_ITERS / _SEED vary the run locally.
    let iters: usize = std::env::var("TEGMEN_FS_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for _ in 0..iters {
        let opcode = match next() % 4 {
            0 => (next() % 64) as u32,
            _ => [
                1u32, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 27, 28, 29, 35, 38, 44, 45, 46,
            ][(next() % 23) as usize],
        };
        let nodeid = match next() % 4 {
            0 => next(),
            _ => next() % 8,
        };
        let body_len = (next() % 200) as usize;
        let mut body: Vec<u8> = (0..body_len).map(|_| next() as u8).collect();
        if next() % 3 == 0 && body.len() > 4 {
            // Plausible names in the tail.
            let names: [&[u8]; 6] = [
                b"..\0",
                b"../outside.txt\0",
                b"hello.txt\0",
                b"a/b\0",
                b".\0",
                b"x\0y\0",
            ];
            let n = names[(next() % 6) as usize];
            let at = body.len().saturating_sub(n.len());
            let take = n.len().min(body.len() - at);
            body[at..].copy_from_slice(&n[..take]);
        }
        let mut req = fuse_req(opcode, next(), nodeid, &body);
        if next() % 5 == 0 {
            let bogus = (next() % 400) as u32;
            req[..4].copy_from_slice(&bogus.to_le_bytes());
        }
        if next() % 10 == 0 {
            req.truncate((next() % 40) as usize);
        }
        let cap = match next() % 4 {
            0 => 0,
            1 => (next() % 64) as usize,
            _ => 4096,
        };
        let r = g.raw(&req, cap);
        assert!(r.used_len as usize <= cap);
    }
    let s = g.dev.stats();
    assert_eq!(s.panics, 0);
    assert!(s.replies > 100 && s.malformed_chains > 0 && s.bad_headers > 0);
    assert_eq!(std::fs::read(parent.path().join("outside.txt")).unwrap(), b"outside");
    // Whatever happened to the share, the device still answers.
    g.call(INIT, 0, &le32s(&[7, 31, 0x20000, 0]), 256).ok();
    assert_eq!(g.call(GETATTR, ROOT, &[0u8; 16], 256).error(), 0);
}
