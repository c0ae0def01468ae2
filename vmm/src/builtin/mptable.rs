//! The Intel MultiProcessor table (MP spec 1.4) in the EBDA: how a guest
//! without ACPI finds its vCPUs, the IOAPIC and how the ISA interrupts
//! reach it. One floating pointer structure, then the configuration table:
//! a processor entry per vCPU, the ISA bus, the IOAPIC, an I/O interrupt
//! entry per IOAPIC pin, and the local interrupts (ExtINT on LINT0, NMI on
//! LINT1).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::EBDA_START;
use super::Error;

pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// The EBDA from [`EBDA_START`] to 640 KiB holds the table.
const MAX_SIZE: usize = 0xa_0000 - EBDA_START as usize;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// The table's bytes, to be placed at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if vcpus == 0 {
        return Err(Error::Config("the MP table needs at least one vCPU".into()));
    }
    let ioapic_id = vcpus; // after the local APIC ids 0..vcpus
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // INT, conforming polarity/trigger, ISA bus, IRQ = pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // ExtINT to LINT0 and NMI to LINT1 of every local APIC (0xff).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    if FLOATING_LEN + table_len > MAX_SIZE {
        return Err(Error::Config(format!(
            "{vcpus} vCPUs do not fit the MP table ({} bytes, {MAX_SIZE} available)",
            FLOATING_LEN + table_len
        )));
    }
    let table_addr = base + FLOATING_LEN as u64;

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);
    // The floating pointer structure.
    let mut fp = Vec::with_capacity(FLOATING_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16 bytes, spec 1.4
    fp[10] = checksum(&fp);
    out.extend_from_slice(&fp);

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec 1.4, checksum below
    header.extend_from_slice(b"TEGMEN  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table for `vcpus` at the start of the EBDA.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), Error> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| Error::Memory(format!("writing the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn structures_checksum_to_zero_and_count_their_entries() {
        for vcpus in [1u8, 2, 8, 32] {
            let t = build(vcpus, EBDA_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum, {vcpus} vCPUs");
            let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(table_addr, EBDA_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum, {vcpus} vCPUs");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
            assert_eq!(count as usize, vcpus as usize + 1 + 1 + 24 + 2);
            assert_eq!(u32::from_le_bytes(table[36..40].try_into().unwrap()), APIC_DEFAULT_BASE);
            // The first processor is the bootstrap one, the others only enabled.
            assert_eq!(table[44 + 3], 3);
            if vcpus > 1 {
                assert_eq!((table[44 + 20], table[44 + 20 + 1], table[44 + 20 + 3]), (0, 1, 1));
            }
        }
    }

    #[test]
    fn too_many_vcpus_or_none_are_refused() {
        assert!(build(0, EBDA_START).is_err());
        let e = build(200, EBDA_START).unwrap_err().to_string();
        assert!(e.contains("200 vCPUs do not fit"), "{e}");
    }
}
