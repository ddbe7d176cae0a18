//! The BSP's state at the kernel's 64-bit entry, as the Linux x86 boot protocol asks:
//! long mode, CPL 0, paging on with an identity map that covers the kernel, the zero page and
//! the command line, a GDT with the flat segments `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18)
//! loaded, interrupts off, and `RSI` pointing at the zero page.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_STACK_TOP, GDT_ADDR, IDENTITY_MAPPED, PDPT_ADDR, PD_ADDR, PML4_ADDR};
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

/// Control register and EFER bits used at the entry.
pub mod bits {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0.MP: monitor coprocessor.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0.ET: extension type (always 1).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.NE: native x87 errors.
    pub const CR0_NE: u64 = 1 << 5;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PAE: physical address extension (required for long mode).
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER.LME: long mode enable.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA: long mode active.
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS bit 1, always set; IF (bit 9) stays clear.
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
}

/// Page table entry bits.
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const HUGE: u64 = 1 << 7;
}

pub use crate::segment::Descriptor;

/// The boot GDT: null, null, `__BOOT_CS`, `__BOOT_DS`, TSS (one 16-byte system descriptor).
pub fn gdt() -> [u64; 6] {
    [
        0,
        0,
        Descriptor::CODE64.encode(),
        Descriptor::DATA.encode(),
        Descriptor::TSS.encode(),
        0, // upper half of the TSS descriptor: base bits 63:32 = 0
    ]
}

fn write_u64(mem: &GuestMemoryMmap, addr: u64, value: u64) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemory {
            addr,
            len: 8,
            source,
        })
}

/// Writes the GDT and the identity page tables for the first 4 GiB (2 MiB pages).
///
/// # Errors
///
/// [`BootError::GuestMemory`] if `mem` does not cover the tables' low memory.
pub fn write_cpu_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, d) in gdt().iter().enumerate() {
        write_u64(mem, GDT_ADDR + 8 * i as u64, *d)?;
    }
    let table = pte::PRESENT | pte::WRITABLE;
    write_u64(mem, PML4_ADDR, PDPT_ADDR | table)?;
    let gibs = IDENTITY_MAPPED >> 30;
    for gib in 0..gibs {
        let pd = PD_ADDR + gib * 0x1000;
        write_u64(mem, PDPT_ADDR + gib * 8, pd | table)?;
        for i in 0..512u64 {
            let page = (gib << 30) | (i << 21);
            write_u64(mem, pd + i * 8, page | table | pte::HUGE)?;
        }
    }
    Ok(())
}

/// The special registers at the entry, starting from the vCPU's current ones (which keep
/// what this does not set, e.g. the LDT and APIC base).
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = Descriptor::CODE64.to_kvm_segment(selector::BOOT_CS);
    let data = Descriptor::DATA.to_kvm_segment(selector::BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = Descriptor::TSS.to_kvm_segment(selector::BOOT_TSS);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of::<[u64; 6]>() - 1) as u16;
    // No IDT: interrupts are off and the kernel installs its own before enabling them.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = bits::CR0_PE | bits::CR0_MP | bits::CR0_ET | bits::CR0_NE | bits::CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = bits::CR4_PAE;
    sregs.efer = bits::EFER_LME | bits::EFER_LMA;
    sregs
}

/// The general registers at the entry: `RIP` = the entry, `RSI` = the zero page, interrupts
/// off.
pub fn entry_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsi: zero_page,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rflags: bits::RFLAGS_RESERVED,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_the_usual_flat_segments() {
        // The values every x86-64 boot loader uses for these segments.
        assert_eq!(Descriptor::CODE64.encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(Descriptor::DATA.encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(Descriptor::TSS.encode(), 0x0000_8b00_0000_0067);
        let cs = Descriptor::CODE64.to_kvm_segment(selector::BOOT_CS);
        assert_eq!(
            (cs.selector, cs.limit, cs.l, cs.db, cs.s),
            (0x10, 0xffff_ffff, 1, 0, 1)
        );
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cpu_tables(&mem).unwrap();
        let rd = |a: u64| -> u64 { mem.read_obj(GuestAddress(a)).unwrap() };
        assert_eq!(rd(PML4_ADDR), PDPT_ADDR | 3);
        for gib in 0..4 {
            let pd = rd(PDPT_ADDR + gib * 8) & !0xfff;
            assert_eq!(pd, PD_ADDR + gib * 0x1000);
            // The last 2 MiB page of this GiB maps to itself.
            let last = (gib << 30) | (511 << 21);
            assert_eq!(rd(pd + 511 * 8), last | 0x83);
        }
        assert_eq!(rd(GDT_ADDR + 0x10), Descriptor::CODE64.encode());
        assert_eq!(rd(GDT_ADDR + 0x18), Descriptor::DATA.encode());
    }
}
