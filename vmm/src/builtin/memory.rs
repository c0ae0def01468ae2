//! Guest RAM: one memfd, mapped shared, cut into the ranges of
//! [`super::layout::ram_ranges`]. Being a file, the same RAM could also be
//! handed to a vhost-user backend.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestMemoryMmap};

use super::layout::ram_ranges;
use super::Error;

/// `mib` MiB of guest memory backed by one memfd.
pub fn create(mib: u32) -> Result<GuestMemoryMmap, Error> {
    let size = u64::from(mib) << 20;
    if size == 0 {
        return Err(Error::Config("memory must be at least 1 MiB".into()));
    }
    let name = CString::new("tegmen-guest-ram").expect("no NUL");
    // SAFETY: memfd_create reads a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::Memory(format!("sizing the memfd to {mib} MiB: {e}")))?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (start, len) in ram_ranges(size) {
        let f = file.try_clone().map_err(|e| Error::Memory(format!("memfd: {e}")))?;
        ranges.push((start, len as usize, Some(FileOffset::new(f, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::Memory(format!("mapping {mib} MiB: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

    #[test]
    fn memory_is_shared_file_backed_and_readable() {
        let mem = create(16).unwrap();
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().unwrap();
        assert_eq!(region.len(), 16 << 20);
        assert!(region.file_offset().is_some(), "backed by the memfd");
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert!(create(0).is_err());
    }
}
