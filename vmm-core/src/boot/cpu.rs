//! The BSP's state at the kernel's 64-bit entry, as the Linux x86 boot protocol asks:
//! long mode, CPL 0, paging on with an identity map that covers the kernel, the zero page and
//! the command line, a GDT with the flat segments `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18)
//! loaded, interrupts off, and `RSI` pointing at the zero page. Built from [`crate::arch`]'s
//! GDT, page-table and register builders.

use kvm_bindings::kvm_regs;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::gdt::{Descriptor, Gdt};
use crate::arch::x86_64::layout::{BOOT_STACK_TOP, GDT_ADDR};
use crate::arch::x86_64::paging::IdentityMap;
use crate::arch::x86_64::regs::{cr0, cr4, rflags, LongModeEntry};
use crate::error::BootError;

/// GDT selectors of the boot protocol.
pub mod selector {
    /// `__BOOT_CS`: flat 64-bit code.
    pub const BOOT_CS: u16 = 0x10;
    /// `__BOOT_DS`: flat data.
    pub const BOOT_DS: u16 = 0x18;
    /// A 64-bit TSS (KVM wants a usable task register in long mode; Linux loads its own).
    pub const BOOT_TSS: u16 = 0x20;
}

/// The boot GDT: null, null, `__BOOT_CS`, `__BOOT_DS`, TSS (one 16-byte system descriptor).
pub fn gdt() -> Gdt {
    Gdt::new()
        .with(selector::BOOT_CS, Descriptor::CODE64)
        .with(selector::BOOT_DS, Descriptor::DATA)
        .with(selector::BOOT_TSS, Descriptor::TSS)
}

/// Writes the GDT and the identity page tables for the first 4 GiB (2 MiB pages).
pub fn write_cpu_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    gdt().write(mem, GDT_ADDR)?;
    IdentityMap::LINUX_BOOT.write(mem)
}

/// The special registers at the entry: CPL 0 on the boot GDT's segments, the boot page
/// tables, the least control registers of long mode.
pub fn entry() -> LongModeEntry {
    LongModeEntry {
        code: (selector::BOOT_CS, Descriptor::CODE64),
        data: (selector::BOOT_DS, Descriptor::DATA),
        task: (selector::BOOT_TSS, Descriptor::TSS),
        gdt_base: GDT_ADDR,
        gdt_limit: gdt().limit(),
        cr3: IdentityMap::LINUX_BOOT.pml4,
        cr0: cr0::LONG_MODE,
        cr4: cr4::LONG_MODE,
    }
}

/// The general registers at the entry: `RIP` = the entry, `RSI` = the zero page, interrupts
/// off.
pub fn entry_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: zero_page,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rflags: rflags::RESERVED,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cpu_tables(&mem).unwrap();
        let rd = |a: u64| -> u64 { mem.read_obj(GuestAddress(a)).unwrap() };
        let IdentityMap { pml4, pdpt, pd, .. } = IdentityMap::LINUX_BOOT;
        assert_eq!((pml4, pdpt, pd), (0x9000, 0xa000, 0xb000));
        assert_eq!(rd(pml4), pdpt | 3);
        for gib in 0..4 {
            let pd = rd(pdpt + gib * 8) & !0xfff;
            assert_eq!(pd, IdentityMap::LINUX_BOOT.pd + gib * 0x1000);
            // The last 2 MiB page of this GiB maps to itself.
            let last = (gib << 30) | (511 << 21);
            assert_eq!(rd(pd + 511 * 8), last | 0x83);
        }
        assert_eq!(rd(GDT_ADDR + 0x10), Descriptor::CODE64.encode());
        assert_eq!(rd(GDT_ADDR + 0x18), Descriptor::DATA.encode());
    }

    #[test]
    fn entry_registers_are_the_boot_protocols() {
        let s = entry().sregs(Default::default());
        assert_eq!((s.cs.selector, s.cs.l, s.ds.selector), (0x10, 1, 0x18));
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_ADDR, 47));
        assert_eq!((s.cr0, s.cr4, s.efer), (0x8000_0033, 0x20, 0x500));
    }
}
