//! The guest physical memory map of every VM this crate builds.
//!
//! RAM starts at 0 and runs up to the start of [`MMIO_GAP`] (3 GiB); what does not fit below
//! the gap continues at its end (4 GiB). The gap holds the I/O APIC ([`IOAPIC_ADDR`]), the
//! local APICs ([`LAPIC_ADDR`]) and KVM's own pages.
//!
//! For a Linux guest ([`crate::boot`]) the VMM writes everything in the first MiB, except the
//! kernel itself (from 1 MiB, or where an ELF vmlinux asks) and the initrd (as high as it may
//! go):
//!
//! | address | what |
//! | --- | --- |
//! | `0x0400..0x0500` | BIOS data area: only the EBDA segment (`0x40e`) and base memory size (`0x413`) |
//! | [`GDT_ADDR`] | the boot GDT (null, null, `__BOOT_CS` 0x10, `__BOOT_DS` 0x18, TSS 0x20) |
//! | [`ZERO_PAGE_ADDR`] | `struct boot_params` (the "zero page"), 4 KiB |
//! | [`BOOT_STACK_TOP`] | top of a small stack (the 64-bit entry does not need one; set anyway) |
//! | [`BOOT_PAGE_TABLES`] | identity page tables for the first 4 GiB (2 MiB pages): [`IdentityMap::LINUX_BOOT`] |
//! | [`CMDLINE_ADDR`] | the command line, at most [`CMDLINE_AREA_SIZE`] bytes with its NUL |
//! | [`EBDA`] | extended BIOS data area: the MP table; e820 `reserved` |
//! | [`ACPI_START`]..[`ACPI_END`] | the ACPI tables, RSDP first; e820 `reserved` |
//! | [`HIGH_MEMORY_START`] | the protected-mode kernel of a bzImage (its `code32_start`) |
//! | [`MMIO_GAP`] | no RAM: [`IOAPIC_ADDR`], [`LAPIC_ADDR`], KVM's pages |
//!
//! Other guest software loaders (such as the test-program loader of the `integration` crate)
//! keep to the same RAM and MMIO gap and place their own structures as they need.

#[cfg(doc)]
use super::paging::IdentityMap;

/// A range of guest physical addresses: `start..start + size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// The first address.
    pub start: u64,
    /// The size in bytes.
    pub size: u64,
}

impl Region {
    /// The region of `size` bytes from `start`.
    pub const fn new(start: u64, size: u64) -> Region {
        Region { start, size }
    }

    /// The end (exclusive).
    pub const fn end(&self) -> u64 {
        self.start + self.size
    }
}

consts! {
    MMIO_GAP: Region = Region::new(0xc000_0000, 1 << 30), "The MMIO gap below 4 GiB (3 GiB to 4 GiB): it holds the LAPIC, IOAPIC and other MMIO. Guest RAM stops at its start; RAM beyond that continues at its end.";
    BDA_EBDA_SEGMENT: u64 = 0x40e, "The BIOS data area field holding the EBDA's real-mode segment (`u16`).";
    BDA_BASE_MEMORY_KB: u64 = 0x413, "The BIOS data area field holding the base memory size in KiB (`u16`).";
    GDT_ADDR: u64 = 0x500, "The boot GDT.";
    ZERO_PAGE_ADDR: u64 = 0x7000, "The zero page (`struct boot_params`), whose address goes to the kernel in `RSI`.";
    BOOT_STACK_TOP: u64 = 0x8ff0, "The initial stack pointer.";
    BOOT_PAGE_TABLES: Region = Region::new(0x9000, 0x6000), "The boot page tables ([`IdentityMap::LINUX_BOOT`]), one 4 KiB table after the other: the PML4, the page-directory-pointer table, four page directories (one per GiB, 2 MiB pages).";
    CMDLINE_ADDR: u64 = 0x2_0000, "The command line.";
    CMDLINE_AREA_SIZE: u64 = 0x1_0000, "The room for the command line, with its terminating NUL.";
    EBDA: Region = Region::new(0x9_e000, 0x2000), "The extended BIOS data area, which holds the MP table. Its end is the end of conventional memory.";
    EBDA_SEGMENT: u16 = 0x9e00, "The EBDA's real-mode segment, as the BIOS data area holds it ([`BDA_EBDA_SEGMENT`]).";
}
const _: () = assert!(MMIO_GAP.end() == 0x1_0000_0000);
const _: () = assert!(EBDA_SEGMENT as u64 == EBDA.start >> 4);
/// The base memory below the EBDA in KiB, as the BIOS data area holds it
/// ([`BDA_BASE_MEMORY_KB`]).
pub const BASE_MEMORY_KB: u16 = 632;
const _: () = assert!(BASE_MEMORY_KB as u64 == EBDA.start >> 10);
consts! {
    ACPI_START: u64 = 0xe_0000, "The start of the ACPI tables: the RSDP (16-byte aligned, in the BIOS area `0xE0000..0x100000` where a guest scans for it), then the other tables. e820 `reserved`.";
    ACPI_END: u64 = HIGH_MEMORY_START, "The end (exclusive) of the ACPI tables' area.";
    HIGH_MEMORY_START: u64 = 0x10_0000, "The first address above the legacy VGA/BIOS hole: where RAM resumes in the e820 map.";
    MPTABLE_START: u64 = EBDA.start, "The MP floating pointer structure, at the start of the EBDA.";
    LAPIC_ADDR: u32 = 0xfee0_0000, "The local APIC's MMIO address (also in the MP table header).";
    IOAPIC_ADDR: u32 = 0xfec0_0000, "The I/O APIC's MMIO address.";
}

/// `value` as a 32-bit field of a boot or firmware structure. Meant for constants: evaluated
/// at compile time, a value that does not fit fails the build.
pub const fn const_u32(value: u64) -> u32 {
    assert!(
        value <= u32::MAX as u64,
        "the value does not fit a 32-bit field"
    );
    #[allow(clippy::cast_possible_truncation)] // Checked by the assert above.
    let narrowed = value as u32;
    narrowed
}
