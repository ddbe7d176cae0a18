//! The e820 memory map the kernel gets in its zero page.
//!
//! Built from the guest memory regions: RAM everywhere there is guest memory, except the
//! legacy hole `EBDA.start..1 MiB`; the EBDA (which holds the MP table) and the ACPI tables'
//! area `ACPI_START..ACPI_END` (the BIOS area, RSDP first) are `reserved`. The map
//! is sorted, and adjacent entries of one type are merged, so it is exactly what Linux prints
//! as `BIOS-e820: [mem ...]` after its own sanitizing.

use std::fmt;

use linux_loader::loader::bootparam::{boot_e820_entry, E820_MAX_ENTRIES_ZEROPAGE};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{ACPI_END, ACPI_START, EBDA, HIGH_MEMORY_START};
use crate::error::BootError;

/// The type of an e820 range (the values of the ACPI address range types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum E820Type {
    /// Usable RAM (type 1).
    Ram,
    /// Reserved, not for the OS to use (type 2).
    Reserved,
}

impl E820Type {
    /// The number the zero page carries.
    pub fn raw(self) -> u32 {
        match self {
            E820Type::Ram => 1,
            E820Type::Reserved => 2,
        }
    }
}

impl fmt::Display for E820Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            E820Type::Ram => "usable",
            E820Type::Reserved => "reserved",
        })
    }
}

/// One range of the e820 map: `addr..addr + size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct E820Entry {
    /// The first address.
    pub addr: u64,
    /// The length in bytes (never 0).
    pub size: u64,
    /// The type.
    pub kind: E820Type,
}

impl E820Entry {
    /// The address after the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }

    /// The zero-page form.
    pub fn to_boot_entry(&self) -> boot_e820_entry {
        boot_e820_entry {
            addr: self.addr,
            size: self.size,
            r#type: self.kind.raw(),
        }
    }
}

impl fmt::Display for E820Entry {
    /// `[mem 0x...-0x...] type`, with an inclusive end, like Linux's boot log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[mem {:#018x}-{:#018x}] {}",
            self.addr,
            self.end() - 1,
            self.kind
        )
    }
}

/// Adds `addr..end` of `kind` to `map` if it is not empty, merging it with the previous entry
/// when they touch and have the same type. Entries must be pushed in address order.
fn push(map: &mut Vec<E820Entry>, addr: u64, end: u64, kind: E820Type) {
    if end <= addr {
        return;
    }
    if let Some(last) = map.last_mut() {
        if last.kind == kind && last.end() == addr {
            last.size = end - last.addr;
            return;
        }
    }
    map.push(E820Entry {
        addr,
        size: end - addr,
        kind,
    });
}

/// The e820 map of `mem`: its regions as RAM without the legacy hole
/// `EBDA.start..HIGH_MEMORY_START`, and the EBDA and the ACPI area as reserved. Fails if there are more than
/// the zero page's 128 entries, or if guest memory does not reach the end of the EBDA.
///
/// # Errors
///
/// [`BootError::TooManyE820Entries`], [`BootError::MemoryTooSmall`].
pub fn build_e820(mem: &GuestMemoryMmap) -> Result<Vec<E820Entry>, BootError> {
    let mut regions: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| {
            (
                r.start_addr().raw_value(),
                r.start_addr().raw_value() + r.len(),
            )
        })
        .collect();
    regions.sort_unstable();
    let covers_ebda = regions
        .iter()
        .any(|(start, end)| *start <= EBDA.start && *end >= EBDA.end());
    if !covers_ebda {
        return Err(BootError::MemoryTooSmall {
            what: "the EBDA (MP table)",
            needed: EBDA.end(),
            available: regions
                .iter()
                .find(|(s, _)| *s == 0)
                .map_or(0, |(_, end)| *end),
        });
    }
    let mut map = Vec::new();
    for (start, end) in regions {
        // The part below the hole, the EBDA, the ACPI tables, then the part above 1 MiB.
        push(&mut map, start, end.min(EBDA.start), E820Type::Ram);
        if start <= EBDA.start && end >= EBDA.end() {
            push(&mut map, EBDA.start, EBDA.end(), E820Type::Reserved);
        }
        if start <= ACPI_START && end >= ACPI_END {
            push(&mut map, ACPI_START, ACPI_END, E820Type::Reserved);
        }
        push(&mut map, start.max(HIGH_MEMORY_START), end, E820Type::Ram);
    }
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::TooManyE820Entries {
            count: map.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
        });
    }
    Ok(map)
}

/// The end of the RAM that starts at `HIGH_MEMORY_START` (where the kernel and the initrd go),
/// or `None` if there is none.
pub fn low_ram_end(map: &[E820Entry]) -> Option<u64> {
    map.iter()
        .find(|e| {
            e.kind == E820Type::Ram && e.addr <= HIGH_MEMORY_START && e.end() > HIGH_MEMORY_START
        })
        .map(E820Entry::end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
        let r: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|(a, l)| (GuestAddress(*a), *l)).collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    fn entry(addr: u64, end: u64, kind: E820Type) -> E820Entry {
        E820Entry {
            addr,
            size: end - addr,
            kind,
        }
    }

    /// The entries below 1 MiB every map starts with (low RAM, EBDA, BIOS area), then `rest`.
    fn below_1m_and<const N: usize>(rest: [E820Entry; N]) -> Vec<E820Entry> {
        let mut map = vec![
            entry(0, 0x9_e000, E820Type::Ram),
            entry(0x9_e000, 0xa_0000, E820Type::Reserved),
            entry(0xe_0000, 0x10_0000, E820Type::Reserved),
        ];
        map.extend(rest);
        map
    }

    #[test]
    fn low_memory_only() {
        let map = build_e820(&mem(&[(0, 256 << 20)])).unwrap();
        assert_eq!(
            map,
            below_1m_and([entry(0x10_0000, 256 << 20, E820Type::Ram)])
        );
        assert_eq!(low_ram_end(&map), Some(256 << 20));
        // Linux's own wording, inclusive end.
        assert_eq!(
            map[0].to_string(),
            "[mem 0x0000000000000000-0x000000000009dfff] usable"
        );
        assert_eq!(
            map[1].to_string(),
            "[mem 0x000000000009e000-0x000000000009ffff] reserved"
        );
    }

    #[test]
    fn memory_above_the_mmio_gap() {
        // What Vm::new makes for 4 GiB: 3 GiB low, 1 GiB from 4 GiB.
        let map = build_e820(&mem(&[(0, 3 << 30), (4 << 30, 1 << 30)])).unwrap();
        assert_eq!(
            map,
            below_1m_and([
                entry(0x10_0000, 3 << 30, E820Type::Ram),
                entry(4 << 30, 5 << 30, E820Type::Ram),
            ])
        );
        assert_eq!(low_ram_end(&map), Some(3 << 30));
        let raw = map[4].to_boot_entry();
        let (addr, size, ty) = (raw.addr, raw.size, raw.r#type);
        assert_eq!((addr, size, ty), (4 << 30, 1 << 30, 1));
    }

    #[test]
    fn memory_that_does_not_reach_the_ebda_end_is_refused() {
        let e = build_e820(&mem(&[(0, 0x9_f000)])).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::MemoryTooSmall {
                    needed: 0xa_0000,
                    available: 0x9_f000,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn exactly_one_mib_has_no_high_ram() {
        let map = build_e820(&mem(&[(0, 1 << 20)])).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(low_ram_end(&map), None);
    }
}
