//! Putting the guest into memory: the uncompressed ELF `vmlinux` (loaded by
//! linux-loader at its physical addresses), the command line, the
//! initramfs at the top of low RAM, and the PVH boot information
//! (`hvm_start_info`, the memory map, the initramfs as a module) that the
//! kernel's PVH entry point reads from `%ebx`.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
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
pub struct BootEntry {
    /// The PVH entry point (32-bit protected mode, paging off).
    pub entry: GuestAddress,
    /// `%ebx` at entry: the `hvm_start_info`.
    pub start_info: GuestAddress,
}

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
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(Error::Kernel(format!(
            "{}: no PVH entry point (ELF note XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH",
            kernel.display()
        )));
    };

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| Error::Config(format!("writing the command line: {e}")))?;

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(initramfs) = initramfs {
        let (addr, size) = load_initramfs(mem, initramfs, loaded.kernel_end, mem_size)?;
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
    Ok(BootEntry {
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
