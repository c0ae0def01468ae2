//! A vCPU as Linux's entry wants it: for PVH, 32-bit protected mode with
//! flat segments from a GDT in guest memory, paging off, `%ebx` pointing at
//! the `hvm_start_info`; for the 64-bit boot protocol, long mode on
//! identity page tables for the first GiB, `%rsi` pointing at the zero
//! page. CPUID from `KVM_GET_SUPPORTED_CPUID` adjusted per vCPU; the MSRs,
//! FPU state and local APIC set as Linux expects them.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::BootEntry;
use super::layout::{BOOT_GDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START};
use super::Error;

/// A GDT entry from its parts (flags are the access byte and the
/// granularity nibble as in the descriptor: `0xc09b` is a 32-bit code
/// segment with 4 KiB granularity).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM segment register for GDT entry `index` with `entry` in it.
pub fn segment(index: u16, entry: u64) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    let g = ((flags >> 15) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let present = ((flags >> 7) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g,
        avl: ((flags >> 12) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 32-bit flat code, flat data, a TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xc09b, 0, 0xf_ffff),
        gdt_entry(0xc093, 0, 0xf_ffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// The GDT of the 64-bit boot protocol: null, 64-bit code, data, a TSS.
pub fn long_mode_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xf_ffff),
        gdt_entry(0xc093, 0, 0xf_ffff),
        gdt_entry(0x808b, 0, 0xf_ffff),
    ]
}

/// Identity page tables for the first GiB (2 MiB pages): PML4 entry 0 →
/// the PDPT, its entry 0 → the page directory of 512 large pages.
pub fn identity_page_tables() -> Vec<(u64, u64)> {
    let mut writes = vec![(PML4_START, PDPTE_START | 0x3), (PDPTE_START, PDE_START | 0x3)];
    for i in 0..512u64 {
        writes.push((PDE_START + i * 8, (i << 21) | 0x83));
    }
    writes
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// The MSRs a booting Linux expects set, and their values.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
}

/// The host's supported CPUID, adjusted for vCPU `id` of `count`: its APIC
/// id, the logical processor count, the hypervisor bit, and the
/// TSC-deadline timer when KVM emulates it (`tsc_deadline`: it has
/// `KVM_CAP_TSC_DEADLINE_TIMER`, and leaves the bit to the VMM). Without
/// that bit the guest calibrates its APIC timer at boot (~0.2–0.3 s).
pub fn cpuid_for(supported: &CpuId, id: u8, count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(count) << 16) | (u32::from(id) << 24);
                // Hypervisor present.
                e.ecx |= 1 << 31;
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                // HTT: more than one logical processor per package.
                if count > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
    move |e| Error::Vcpu(format!("{what}: {e}"))
}

/// Sets vCPU `id` (of `count`) up to enter the guest at `boot`.
pub fn setup(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    boot: &BootEntry,
    id: u8,
    count: u8,
) -> Result<(), Error> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    vcpu.set_cpuid2(&cpuid_for(&supported, id, count, tsc_deadline))
        .map_err(kvm_err("KVM_SET_CPUID2"))?;

    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu(format!("MSR list: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::warn!("vCPU {id}: KVM set {set} of {} MSRs", entries.len());
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

    let long_mode = matches!(boot, BootEntry::Linux64 { .. });
    let gdt = if long_mode { long_mode_gdt() } else { boot_gdt() };
    let write = |addr: u64, value: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|e| Error::Vcpu(format!("writing the boot GDT and page tables: {e}")))
    };
    for (i, e) in gdt.iter().enumerate() {
        write(BOOT_GDT_START + 8 * i as u64, *e)?;
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = segment(1, gdt[1]);
    let data = segment(2, gdt[2]);
    let tss = segment(3, gdt[3]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    let regs = match *boot {
        BootEntry::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            kvm_regs {
                rip: entry.0,
                rbx: start_info.0,
                rflags: 0x2,
                ..Default::default()
            }
        }
        BootEntry::Linux64 { entry, zero_page } => {
            for (addr, value) in identity_page_tables() {
                write(addr, value)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            kvm_regs {
                rip: entry.0,
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: zero_page.0,
                rflags: 0x2,
                ..Default::default()
            }
        }
    };
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    // LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    set_lapic_reg(&mut lapic.regs, 0x350, 0x700);
    set_lapic_reg(&mut lapic.regs, 0x360, 0x400);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}

fn set_lapic_reg(regs: &mut [libc::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_and_segments_agree() {
        let gdt = boot_gdt();
        assert_eq!(gdt[1], 0x00cf_9b00_0000_ffff, "flat 32-bit code");
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff, "flat data");
        assert_eq!(gdt[3], 0x0000_8b00_0000_0067, "TSS");
        let cs = segment(1, gdt[1]);
        assert_eq!((cs.selector, cs.base, cs.limit), (0x08, 0, 0xffff_ffff));
        assert_eq!((cs.type_, cs.present, cs.s, cs.db, cs.g, cs.l), (0xb, 1, 1, 1, 1, 0));
        let ds = segment(2, gdt[2]);
        assert_eq!((ds.selector, ds.type_, ds.db), (0x10, 0x3, 1));
        let tr = segment(3, gdt[3]);
        assert_eq!((tr.selector, tr.limit, tr.s, tr.g, tr.unusable), (0x18, 0x67, 0, 0, 0));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_gdt_and_identity_tables() {
        let gdt = long_mode_gdt();
        let cs = segment(1, gdt[1]);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present), (1, 0, 0xb, 1), "64-bit code");
        let tables = identity_page_tables();
        assert_eq!(tables[0], (PML4_START, PDPTE_START | 3));
        assert_eq!(tables[1], (PDPTE_START, PDE_START | 3));
        assert_eq!(tables.len(), 2 + 512);
        // Present, writable, 2 MiB: the last one maps 1 GiB - 2 MiB.
        assert_eq!(tables[2], (PDE_START, 0x83));
        assert_eq!(tables[513], (PDE_START + 511 * 8, (511 << 21) | 0x83));
    }

    #[test]
    fn cpuid_carries_the_apic_id_and_the_hypervisor_bit() {
        let supported = CpuId::from_entries(&[
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = cpuid_for(&supported, 3, 4, true);
        let e = c.as_slice();
        assert_ne!(e[0].ecx & (1 << 24), 0, "TSC-deadline timer");
        let without = cpuid_for(&supported, 3, 4, false);
        assert_eq!(without.as_slice()[0].ecx & (1 << 24), 0);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn msrs_include_fast_strings_and_write_back_mtrrs() {
        let m = boot_msrs();
        assert!(m.contains(&(MSR_IA32_MISC_ENABLE, 1)));
        assert!(m.contains(&(MSR_MTRR_DEF_TYPE, 0x806)));
    }
}
