//! A guard in front of fuse-backend-rs's passthrough file system.
//!
//! `PassthroughFs` resolves every name with `openat()` relative to the fd
//! of the parent inode, which keeps the guest inside the share only as long
//! as each name is a single path component: a name such as `../../etc` or
//! `a/b` would make `openat()` walk, and follow symlinks on the way (only
//! the last component is opened `O_NOFOLLOW`). The FUSE client is the guest
//! kernel, which we do not trust, so [`ConfinedFs`] checks every name before
//! it reaches the passthrough layer:
//!
//! * names that create, remove or rename entries must be one non-empty
//!   component without `/` and must not be `.` or `..`;
//! * LOOKUP may name `.` or `..` (NFS-style lookups), never a `/`; `..` of
//!   the root resolves to the root itself (the passthrough layer maps it),
//!   and in the chroot sandbox the kernel clamps `..` at the process root
//!   anyway.
//!
//! It also trims what a guest may plant on the host: no device nodes
//! (`mknod` of a char or block device is refused), no set-user-ID bits and
//! no set-group-ID bits on non-directories, so a guest cannot leave a
//! setuid-root program in a host directory. DAX mapping requests and ioctls
//! are refused; the device offers no DAX window.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{CreateIn, FsOptions, OpenOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use libc::{stat64, statvfs64};

type Inode = u64;
type Handle = u64;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Is `name` exactly one path component that is neither `.` nor `..`?
pub fn is_plain_component(name: &CStr) -> bool {
    let b = name.to_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/')
}

fn check_component(name: &CStr) -> io::Result<()> {
    if is_plain_component(name) {
        Ok(())
    } else {
        Err(einval())
    }
}

/// Clear set-user-ID always, and set-group-ID unless the mode is a
/// directory's (where it only steers group inheritance).
fn strip_suid(mode: u32) -> u32 {
    let mut mode = mode & !libc::S_ISUID;
    if mode & libc::S_IFMT != libc::S_IFDIR {
        mode &= !libc::S_ISGID;
    }
    mode
}

/// The file status flags a guest's OPEN, CREATE, OPENDIR, READ and WRITE
/// may carry to the host: the access mode and the flags that only shape
/// I/O, and `O_EXCL` (CREATE of an existing file must fail with it). The
/// rest is dropped: `O_PATH` and `O_TMPFILE` (an fd no I/O can be done on,
/// an unnamed file nobody asked for), `O_CREAT` and `O_NOCTTY` (CREATE adds
/// the first itself; the Linux client sends neither on OPEN), and the
/// flags `fcntl(F_SETFL)` may refuse (`O_DIRECT` on file systems without
/// it, `O_NOATIME` on files the process does not own, `O_ASYNC`).
///
/// This matters beyond tidiness: fuse-backend-rs 0.14's passthrough
/// `read`/`write` wrap the handle's fd in a `File` and call
/// `fcntl(F_SETFL, <the request's flags>)` when those differ from the
/// open flags, *before* making that `File` a `ManuallyDrop`; when the
/// fcntl fails, the early return closes the handle's fd while the handle
/// still owns it, and a later open reuses the number (found by the
/// `fuse_request` fuzz target: OPEN with `O_PATH`, then READ). With the
/// flags filtered the same way on open and on I/O, the two can only differ
/// in flags F_SETFL takes (`O_APPEND`, `O_NONBLOCK`) or ignores.
pub fn guest_file_flags(flags: u32) -> u32 {
    const KEPT: i32 = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_TRUNC
        | libc::O_EXCL
        | libc::O_LARGEFILE
        | libc::O_DIRECTORY
        | libc::O_NOFOLLOW
        | libc::O_CLOEXEC;
    // O_TMPFILE is O_DIRECTORY plus a bit of its own, which goes.
    flags & KEPT as u32
}

/// The passthrough layer allocates a buffer of the size a GETXATTR,
/// LISTXATTR or READDIR asks for before it looks at anything, so a guest
/// asking for 4 GiB made the backend try to allocate 4 GiB per request (an
/// abort where the allocation fails; found by the `fuse_request` fuzz
/// target). No value or list is longer than the kernel's limits
/// (`XATTR_SIZE_MAX`, `XATTR_LIST_MAX`), so asking for more changes no
/// answer; a directory listing may come back shorter than asked, as FUSE
/// allows.
pub const XATTR_SIZE_MAX: u32 = 65_536;
pub const XATTR_LIST_MAX: u32 = 65_536;
pub const MAX_READDIR: u32 = 1 << 20;

/// [`PassthroughFs`] behind name and mode checks; see the module docs.
pub struct ConfinedFs {
    inner: PassthroughFs<()>,
}

impl ConfinedFs {
    /// Wrap a passthrough file system.
    pub fn new(inner: PassthroughFs<()>) -> Self {
        ConfinedFs { inner }
    }
}

impl FileSystem for ConfinedFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // The passthrough layer asks for readdirplus only; large requests
        // (1 MiB instead of 4 KiB writes), parallel lookups and
        // mtime-driven cache invalidation are safe with it and much faster.
        let extra = FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::AUTO_INVAL_DATA;
        Ok(self.inner.init(capable)? | (capable & extra))
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        let b = name.to_bytes();
        if b.is_empty() || b.contains(&b'/') {
            return Err(einval());
        }
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: Inode, handle: Option<Handle>) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        mut attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if valid.contains(SetattrValid::MODE) {
            // The guest sends permission bits only; judge S_ISGID by what
            // the inode is on the host.
            let (st, _) = self.inner.getattr(ctx, inode, handle)?;
            let ftype = st.st_mode & libc::S_IFMT;
            attr.st_mode = strip_suid(ftype | (attr.st_mode & !libc::S_IFMT)) & !libc::S_IFMT;
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: Inode, name: &CStr) -> io::Result<Entry> {
        check_component(name)?;
        if linkname.to_bytes().is_empty() {
            return Err(einval());
        }
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(&self, ctx: &Context, inode: Inode, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        check_component(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
        self.inner.mknod(ctx, inode, name, strip_suid(mode), rdev, umask)
    }

    fn mkdir(&self, ctx: &Context, parent: Inode, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        check_component(name)?;
        self.inner.mkdir(ctx, parent, name, mode & !libc::S_ISUID, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_component(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_component(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_component(oldname)?;
        check_component(newname)?;
        self.inner.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: Inode, newparent: Inode, newname: &CStr) -> io::Result<Entry> {
        check_component(newname)?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        self.inner.open(ctx, inode, guest_file_flags(flags), fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        check_component(name)?;
        args.mode = strip_suid(args.mode);
        args.flags = guest_file_flags(args.flags);
        self.inner.create(ctx, parent, name, args)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, guest_file_flags(flags))
    }

    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            guest_file_flags(flags),
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: Inode, handle: Handle, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner.fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(&self, ctx: &Context, inode: Inode, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: &Context, inode: Inode, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_SIZE_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_LIST_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(&self, ctx: &Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, guest_file_flags(flags))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size.min(MAX_READDIR), offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size.min(MAX_READDIR), offset, add_entry)
    }

    fn fsyncdir(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: Inode, flags: u32, handle: Handle) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(&self, ctx: &Context, inode: Inode, handle: Handle, offset: u64, whence: u32) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    // setupmapping / removemapping (DAX), ioctl, getlk/setlk, bmap and poll
    // keep the trait's refusals (ENOSYS / ENOTTY).
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &[u8]) -> &CStr {
        CStr::from_bytes_with_nul(s).unwrap()
    }

    #[test]
    fn fs_plain_components() {
        assert!(is_plain_component(c(b"file\0")));
        assert!(is_plain_component(c(b"..hidden\0")));
        assert!(!is_plain_component(c(b"\0")));
        assert!(!is_plain_component(c(b".\0")));
        assert!(!is_plain_component(c(b"..\0")));
        assert!(!is_plain_component(c(b"a/b\0")));
        assert!(!is_plain_component(c(b"../etc\0")));
        assert!(!is_plain_component(c(b"/\0")));
    }

    #[test]
    fn fs_strip_suid_bits() {
        assert_eq!(strip_suid(libc::S_IFREG | 0o4755), libc::S_IFREG | 0o755);
        assert_eq!(strip_suid(libc::S_IFREG | 0o2755), libc::S_IFREG | 0o755);
        assert_eq!(strip_suid(libc::S_IFDIR | 0o2775), libc::S_IFDIR | 0o2775);
        assert_eq!(strip_suid(libc::S_IFDIR | 0o6775), libc::S_IFDIR | 0o2775);
    }
}
