//! Putting the guest into memory: the uncompressed ELF `vmlinux` (loaded by
//! linux-loader at its physical addresses), the command line, the
//! initramfs at the top of low RAM, and the boot information: for a kernel
//! with a PVH entry point the `hvm_start_info` (memory map, the initramfs
//! as a module) its 32-bit entry reads from `%ebx`; for one without, the
//! 64-bit Linux boot protocol's zero page (`boot_params`: e820 map,
//! command line, initramfs) its 64-bit entry reads from `%rsi`, with the
//! vCPU already in long mode on identity page tables.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::layout::*;
use super::Error;

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Where the vCPU starts and what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// The PVH entry point (32-bit protected mode, paging off); `%ebx`
    /// points at the `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// The ELF entry in long mode (64-bit boot protocol); `%rsi` points at
    /// the zero page.
    Linux64 {
        entry: GuestAddress,
        zero_page: GuestAddress,
    },
}

/// `setup_header` values of the 64-bit boot protocol.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `boot_params.e820_table` holds this many entries.
const E820_MAX_ENTRIES: usize = 128;

/// The kernel command line, checked against Linux's size limit.
pub fn cmdline(text: &str) -> Result<Cmdline, Error> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Config(format!("command line: {e}")))?;
    c.insert_str(text)
        .map_err(|e| Error::Config(format!("command line {text:?}: {e}")))?;
    Ok(c)
}

/// Loads `kernel` (and `initramfs`) into `mem` and writes the boot
/// information for `cmdline`.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &Cmdline,
    mem_size: u64,
) -> Result<BootEntry, Error> {
    let mut file = File::open(kernel).map_err(|e| Error::Kernel(format!("{}: {e}", kernel.display())))?;
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        use linux_loader::loader::elf::Error as ElfError;
        use linux_loader::loader::Error as LoaderError;
        match e {
            LoaderError::Elf(ElfError::InvalidElfMagicNumber | ElfError::ReadElfHeader) => {
                Error::Kernel(format!("{}: not an ELF vmlinux (a bzImage is not supported)", kernel.display()))
            }
            LoaderError::Elf(ElfError::ReadKernelImage) => Error::Kernel(format!(
                "{}: a segment could not be loaded: it does not fit the guest's {} MiB of memory, or the file is cut short",
                kernel.display(),
                mem_size >> 20
            )),
            other => Error::Kernel(format!("{}: {other}", kernel.display())),
        }
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| Error::Config(format!("writing the command line: {e}")))?;
    let initramfs = match initramfs {
        Some(path) => Some(load_initramfs(mem, path, loaded.kernel_end, mem_size)?),
        None => None,
    };
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => write_pvh(mem, entry, initramfs, mem_size),
        _ => {
            let entry = elf_entry(kernel)?;
            write_zero_page(mem, cmdline, initramfs, mem_size)?;
            Ok(BootEntry::Linux64 {
                entry,
                zero_page: GuestAddress(ZERO_PAGE_START),
            })
        }
    }
}

/// The ELF header's entry point (the 64-bit one for a `vmlinux`).
fn elf_entry(kernel: &Path) -> Result<GuestAddress, Error> {
    use std::io::Read;
    let mut header = [0u8; 32];
    File::open(kernel)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| Error::Kernel(format!("{}: {e}", kernel.display())))?;
    let entry = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
    // Linux's ELF entry is a virtual address in the kernel map; with the
    // kernel loaded at its physical addresses the low bits are the place.
    Ok(GuestAddress(entry & 0x7fff_ffff))
}

/// The zero page of the 64-bit boot protocol.
pub fn zero_page(cmdline_len: usize, initramfs: Option<(u64, u64)>, mem_size: u64) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, type_)) in e820_map(mem_size).into_iter().take(E820_MAX_ENTRIES).enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, type_ };
        params.e820_entries = (i + 1) as u8;
    }
    params
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    initramfs: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<(), Error> {
    let len = cmdline
        .as_cstring()
        .map_err(|e| Error::Config(format!("command line: {e}")))?
        .as_bytes()
        .len();
    let params = zero_page(len, initramfs, mem_size);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| Error::Config(format!("writing the zero page: {e}")))
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
    initramfs: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<BootEntry, Error> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((addr, size)) = initramfs {
        modules.push(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
        start_info.modlist_paddr = PVH_MODLIST_START;
        start_info.nr_modules = 1;
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            ..Default::default()
        })
        .collect();
    start_info.memmap_entries = memmap.len() as u32;

    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Config(format!("writing the PVH boot information: {e}")))?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: GuestAddress(PVH_INFO_START),
    })
}

/// Puts the initramfs at the top of low RAM, page aligned, above the
/// kernel; returns (address, size).
fn load_initramfs(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, mem_size: u64) -> Result<(u64, u64), Error> {
    let data = std::fs::read(path).map_err(|e| Error::Initramfs(format!("{}: {e}", path.display())))?;
    let size = data.len() as u64;
    let top = low_ram_end(mem_size);
    let addr = top.checked_sub(size).map(|a| a & !0xfff).filter(|a| *a >= kernel_end);
    let Some(addr) = addr else {
        return Err(Error::Config(format!(
            "{} MiB of memory is too little for the kernel ({} KiB) and the initramfs {} ({} KiB)",
            mem_size >> 20,
            kernel_end.saturating_sub(HIMEM_START) >> 10,
            path.display(),
            size >> 10
        )));
    };
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| Error::Initramfs(format!("writing {} to guest memory: {e}", path.display())))?;
    debug_assert!(mem.address_in_range(GuestAddress(addr + size - 1)) || size == 0);
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_page_has_the_header_the_command_line_the_initramfs_and_the_map() {
        let p = zero_page(42, Some((0x0fd0_0000, 0x30_0000)), 256 << 20);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x0fd0_0000, 0x30_0000)
        );
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.type_ }),
            (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM)
        );
        let none = zero_page(1, None, 64 << 20);
        assert_eq!(({ none.hdr.ramdisk_image }, { none.hdr.ramdisk_size }), (0, 0));
    }
}
