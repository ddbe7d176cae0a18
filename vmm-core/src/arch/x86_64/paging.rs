//! 4-level page tables that identity-map the low part of guest physical memory with 2 MiB
//! pages: what a vCPU needs to enter 64-bit mode directly.
//!
//! An [`IdentityMap`] says where its tables go (one PML4, one PDPT, one page directory per GiB,
//! contiguous) and how the pages are mapped: for the kernel only, or reachable from CPL 3 too
//! (the U bit at every level), and uncached (PCD|PWT) from an address on, for MMIO.

use vm_memory::GuestMemoryMmap;

use super::layout::{BOOT_PAGE_TABLES, MMIO_GAP};
use super::write_guest;
use crate::error::BootError;

/// Page-table entry bits.
pub mod pte {
    consts! {
        PRESENT: u64 = 1 << 0, "The entry is present.";
        WRITABLE: u64 = 1 << 1, "Writes are allowed.";
        USER: u64 = 1 << 2, "CPL-3 accesses are allowed (needed at every level of a walk).";
        PWT: u64 = 1 << 3, "Page-level write-through.";
        PCD: u64 = 1 << 4, "Page-level cache disable.";
        HUGE: u64 = 1 << 7, "In a page directory entry: maps a 2 MiB page rather than pointing to a page table.";
        TABLE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000, "The physical address bits of an entry that points to a 4 KiB table.";
        HUGE_ADDR_MASK: u64 = 0x000f_ffff_ffe0_0000, "The physical address bits of a 2 MiB page entry.";
    }
}

/// Bytes mapped by one page directory.
const GIB: u64 = 1 << 30;
/// Bytes mapped by one page directory entry.
const HUGE_PAGE: u64 = 2 << 20;
/// How much is identity-mapped at entry: everything below 4 GiB.
const IDENTITY_MAPPED: u64 = 4 << 30;
/// Entries in one table.
const ENTRIES: u64 = 512;
/// Bytes of one table.
const TABLE_SIZE: u64 = 0x1000;
// The tables of `IdentityMap::LINUX_BOOT` fill `BOOT_PAGE_TABLES`: one page directory per GiB.
const _: () = assert!(
    IdentityMap::LINUX_BOOT.pd + IDENTITY_MAPPED / GIB * TABLE_SIZE == BOOT_PAGE_TABLES.end()
);

/// Identity page tables for `0..size`, with 2 MiB pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityMap {
    /// The PML4 table (what `CR3` points to).
    pub pml4: u64,
    /// The page-directory-pointer table.
    pub pdpt: u64,
    /// The first page directory; one per GiB follow contiguously.
    pub pd: u64,
    /// How much is mapped from address 0: whole GiBs, at most 512 GiB.
    pub size: u64,
    /// Set the U bit at every level, so that CPL-3 code reaches every page.
    pub user: bool,
    /// Map pages from this address on with PCD|PWT (uncached, for MMIO).
    pub uncached_from: Option<u64>,
}

impl IdentityMap {
    /// The map for a Linux kernel's 64-bit entry ([`super::layout`]): the first 4 GiB,
    /// kernel only, cacheable everywhere (the kernel sets up its own tables early).
    pub const LINUX_BOOT: IdentityMap = IdentityMap {
        pml4: BOOT_PAGE_TABLES.start,
        pdpt: BOOT_PAGE_TABLES.start + TABLE_SIZE,
        pd: BOOT_PAGE_TABLES.start + 2 * TABLE_SIZE,
        size: IDENTITY_MAPPED,
        user: false,
        uncached_from: None,
    };

    /// This map at other table addresses, reachable from CPL 3, and uncached in the MMIO gap
    /// (from the start of [`MMIO_GAP`] on): what a guest program at CPL 3 that touches its local
    /// APIC needs.
    pub const fn user_with_mmio(pml4: u64, pdpt: u64, pd: u64) -> IdentityMap {
        IdentityMap {
            pml4,
            pdpt,
            pd,
            size: IDENTITY_MAPPED,
            user: true,
            uncached_from: Some(MMIO_GAP.start),
        }
    }

    /// The bits of a table entry (PML4 or PDPT) that points to the next level.
    fn table_flags(&self) -> u64 {
        let user = if self.user { pte::USER } else { 0 };
        pte::PRESENT | pte::WRITABLE | user
    }

    /// The page directory entry that maps the 2 MiB page at `addr` to itself.
    pub fn pd_entry(&self, addr: u64) -> u64 {
        let mut e = addr | self.table_flags() | pte::HUGE;
        if self.uncached_from.is_some_and(|from| addr >= from) {
            e |= pte::PCD | pte::PWT;
        }
        e
    }

    /// Every table entry as (guest address, value): the PML4 entry, one PDPT entry per GiB,
    /// then the page directories.
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let gibs = (self.size / GIB).min(ENTRIES);
        let flags = self.table_flags();
        let pml4 = std::iter::once((self.pml4, self.pdpt | flags));
        let pdpt = (0..gibs).map(move |gib| {
            let pd = self.pd + gib * TABLE_SIZE;
            (self.pdpt + gib * 8, pd | flags)
        });
        let pds = (0..gibs * ENTRIES).map(move |i| (self.pd + i * 8, self.pd_entry(i * HUGE_PAGE)));
        pml4.chain(pdpt).chain(pds)
    }

    /// Writes the tables into guest memory.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), BootError> {
        for (addr, value) in self.entries() {
            write_guest(mem, addr, &value.to_le_bytes())?;
        }
        Ok(())
    }

    /// Walks the tables in `mem` like the CPU does for the virtual address `va`: the physical
    /// address, whether every level has the U bit, and whether the page is uncached (PCD).
    /// `None` if a level is not present or memory cannot be read. For tests and debugging.
    pub fn translate(&self, mem: &GuestMemoryMmap, va: u64) -> Option<Translation> {
        use vm_memory::{Bytes, GuestAddress};
        let mut table = self.pml4;
        let mut user = true;
        for shift in [39u32, 30] {
            let e: u64 = mem
                .read_obj(GuestAddress(table + ((va >> shift) & 0x1ff) * 8))
                .ok()?;
            if e & pte::PRESENT == 0 {
                return None;
            }
            user &= e & pte::USER != 0;
            table = e & pte::TABLE_ADDR_MASK;
        }
        let e: u64 = mem
            .read_obj(GuestAddress(table + ((va >> 21) & 0x1ff) * 8))
            .ok()?;
        if e & pte::PRESENT == 0 || e & pte::HUGE == 0 {
            return None;
        }
        Some(Translation {
            phys: (e & pte::HUGE_ADDR_MASK) | (va & (HUGE_PAGE - 1)),
            user: user && e & pte::USER != 0,
            uncached: e & pte::PCD != 0,
        })
    }
}

/// Where a virtual address leads ([`IdentityMap::translate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address.
    pub phys: u64,
    /// The U bit is set at every level: CPL-3 code may access it.
    pub user: bool,
    /// The page is uncached (PCD).
    pub uncached: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn user_tables_reach_everything_and_leave_mmio_uncached() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let map = IdentityMap::user_with_mmio(0xd000, 0xe000, 0xf000);
        map.write(&mem).unwrap();
        let rd = |a: u64| -> u64 { mem.read_obj(GuestAddress(a)).unwrap() };
        assert_eq!(rd(0xd000), 0xe000 | 7);
        assert_eq!(rd(0xe000 + 3 * 8), 0x1_2000 | 7);
        assert_eq!(rd(0x1_2000 + 511 * 8), 0xffe0_0000 | 0x9f);
        let t = map.translate(&mem, 0xfee0_00f0).unwrap();
        assert_eq!(
            t,
            Translation {
                phys: 0xfee0_00f0,
                user: true,
                uncached: true
            }
        );
        assert!(!map.translate(&mem, 0xbfff_f000).unwrap().uncached);
        assert!(map.translate(&mem, 0x1_0000_0000).is_none());
        // Kernel-only tables: no U bit anywhere.
        IdentityMap::LINUX_BOOT.write(&mem).unwrap();
        assert!(!IdentityMap::LINUX_BOOT.translate(&mem, 0).unwrap().user);
    }
}
