//! Where things are in guest physical memory (x86_64), and the e820 map
//! that tells the guest.
//!
//! ```text
//! 0x0000_0500  boot GDT
//! 0x0000_6000  PVH hvm_start_info, then the module list (initramfs)
//! 0x0000_7000  PVH memory map, or the zero page (64-bit boot protocol)
//! 0x0000_9000  identity page tables (64-bit boot protocol)
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  end of base RAM (EBDA and MP table above, reserved)
//! 0x0010_0000  the kernel (its ELF physical addresses), then RAM
//!     …        the initramfs, at the top of RAM below the MMIO gap
//! 0xd000_0000  MMIO gap: virtio-mmio devices, one 4 KiB window each
//! 0x1_0000_0000 RAM beyond what fits below the gap
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// 64-bit boot protocol: the zero page (`boot_params`), the boot stack
/// below it, and identity page tables for the first GiB.
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux's x86 `COMMAND_LINE_SIZE`.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the RAM below 640 KiB the guest may use (the EBDA follows).
pub const EBDA_START: u64 = 0x9_fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where the first virtio-mmio device's registers are; each has
/// [`MMIO_DEVICE_SIZE`] bytes.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The KVM TSS needs three pages of guest address space that are not RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest RAM ranges (start, length in bytes) for `size` bytes of
/// memory: one range below the MMIO gap, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// One e820 entry: (start, length, type).
pub type E820Entry = (u64, u64, u32);

/// The memory map the guest gets for `size` bytes of RAM.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(size) {
        let end = start.0 + len;
        let start = start.0.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// The highest address below the MMIO gap that is RAM (exclusive).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_and_the_map_skips_the_legacy_hole() {
        let mib = 1 << 20;
        assert_eq!(ram_ranges(256 * mib), vec![(GuestAddress(0), 256 * mib)]);
        assert_eq!(
            e820_map(256 * mib),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, 256 * mib - HIMEM_START, E820_RAM),
            ]
        );
        assert_eq!(low_ram_end(256 * mib), 256 * mib);
    }

    #[test]
    fn large_memory_continues_above_4g() {
        let gib = 1u64 << 30;
        let size = 4 * gib;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(ranges[1], (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START));
        let map = e820_map(size);
        assert_eq!(map[2], (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM));
        assert_eq!(map[3], (MMIO_GAP_END, size - MMIO_GAP_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // All of the RAM but the legacy hole below 1 MiB.
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }
}
