//! The guest-program loader: runs small 64-bit programs (tests, demos, benchmarks) without
//! firmware or a kernel.
//!
//! [`load_program`] writes into guest memory:
//! - a GDT ([`layout::GDT_ADDR`], selectors in [`gdt`]) with 64-bit code and data segments at
//!   DPL 0 and DPL 3 and one 64-bit TSS descriptor per APIC ID;
//! - a TSS ([`layout::TSS_ADDR`]) whose I/O permission bitmap allows every port, so CPL-3
//!   code can use `in`/`out` (PVM hosts ignore `RFLAGS.IOPL` for guest user code);
//! - identity-mapped page tables for the first 4 GiB ([`layout::PML4_ADDR`]) with 2 MiB pages,
//!   the U bit at every level (so CPL-3 code can reach everything, including the local APIC
//!   page at `0xFEE0_0000`), and PCD|PWT on the MMIO gap above 3 GiB;
//! - the program's code and data at the addresses it asks for;
//! - if the program has an AP entry, a real-mode trampoline at [`layout::SIPI_PAGE`]
//!   (SIPI vector [`layout::SIPI_VECTOR`]) that takes a woken AP through protected mode to
//!   64-bit mode, loads its TSS, gives it its own stack, and enters the AP entry at the
//!   program's privilege level (CPL 3 through `sysexit`: KVM's instruction emulator, which
//!   runs CPL-0 code on PVM hosts, cannot `iretq` to CPL 3).
//!
//! The returned [`LoadedProgram`] is a [`BootEntry`]: it puts the BSP in 64-bit mode at the
//! BSP entry, at CPL 0 or CPL 3. Every entry has `RDI` = the vCPU's APIC ID (0 for the BSP),
//! `RSP` = the top of the vCPU's own stack ([`layout::stack_top`]), `RFLAGS.IOPL = 3`,
//! interrupts off, and `IA32_SYSENTER_CS` = [`gdt::KERNEL_CODE64`]: CPL-0 code drops to CPL 3
//! with `sysexit` (REX.W; `RDX` = user RIP, `RCX` = user RSP). There is no IDT: any exception
//! triple-faults.
//!
//! On PVM hosts with AMD CPUs `cpuid` at CPL 3 is not trapped: it returns the host CPU's
//! values. Programs that must see the vCPU's CPUID (APIC IDs, topology) execute it at CPL 0.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{BootError, KvmOp, VcpuSetupError};
use crate::segment::Descriptor;
use crate::BootEntry;

/// Guest physical addresses used by the loader. Everything below [`layout::PROGRAM_AREA_START`]
/// belongs to the loader.
pub mod layout {
    /// The GDT ([`super::gdt`]: fixed segments, then one TSS descriptor per APIC ID).
    pub const GDT_ADDR: u64 = 0x1000;
    /// The SIPI page where the AP trampoline runs (real mode, CS = 0x0800).
    pub const SIPI_PAGE: u64 = 0x8000;
    /// The SIPI vector that starts APs at [`SIPI_PAGE`] (`SIPI_PAGE >> 12`).
    pub const SIPI_VECTOR: u8 = (SIPI_PAGE >> 12) as u8;
    /// The trampoline's parameters (see [`super::TrampolineParams`]).
    pub const AP_PARAMS_ADDR: u64 = 0x9000;
    /// The 64-bit TSS all vCPUs share, followed by its I/O permission bitmap (all ports
    /// allowed) and the terminating 0xFF byte.
    pub const TSS_ADDR: u64 = 0xa000;
    /// The PML4 table.
    pub const PML4_ADDR: u64 = 0xd000;
    /// The page-directory-pointer table.
    pub const PDPT_ADDR: u64 = 0xe000;
    /// Four page directories (one per GiB), 2 MiB pages.
    pub const PD_ADDR: u64 = 0xf000;
    /// Small per-APIC-ID stacks the trampoline uses at CPL 0 (256 bytes each).
    pub const TRAMPOLINE_STACKS: u64 = 0x2_0000;
    /// Size of one trampoline stack.
    pub const TRAMPOLINE_STACK_SIZE: u64 = 0x100;
    /// Per-APIC-ID program stacks (4 KiB each, 256 of them).
    pub const STACKS_ADDR: u64 = 0x10_0000;
    /// Size of one program stack.
    pub const STACK_SIZE: u64 = 0x1000;
    /// The APIC IDs that have a stack and a TSS descriptor: 0..256 (xAPIC).
    pub const APIC_ID_SLOTS: u64 = 256;
    /// Programs and their data go at or above this address.
    pub const PROGRAM_AREA_START: u64 = 0x20_0000;
    /// The default load address of a program's code.
    pub const DEFAULT_LOAD_ADDR: u64 = PROGRAM_AREA_START;
    /// The local APIC's MMIO page.
    pub const LAPIC_ADDR: u64 = 0xfee0_0000;

    /// The top of the program stack of the vCPU with APIC ID `apic_id` (IDs are taken modulo
    /// 256; xAPIC IDs are below 255).
    pub const fn stack_top(apic_id: u32) -> u64 {
        STACKS_ADDR + ((apic_id as u64 % APIC_ID_SLOTS) + 1) * STACK_SIZE
    }
}

/// The GDT selectors. `sysexit` with `IA32_SYSENTER_CS = KERNEL_CODE64` requires the user code
/// and data segments at `KERNEL_CODE64 + 32` and `+ 40`.
pub mod gdt {
    /// 64-bit code, DPL 0.
    pub const KERNEL_CODE64: u16 = 0x08;
    /// Data, DPL 0.
    pub const KERNEL_DATA: u16 = 0x10;
    /// 32-bit code, DPL 0 (the AP trampoline's protected-mode step).
    pub const KERNEL_CODE32: u16 = 0x18;
    /// 64-bit code, DPL 3 (selector with RPL 3).
    pub const USER_CODE64: u16 = 0x28 | 3;
    /// Data, DPL 3 (selector with RPL 3).
    pub const USER_DATA: u16 = 0x30 | 3;
    /// The first TSS descriptor (16 bytes each, one per APIC ID: `ltr` marks a descriptor
    /// busy, so vCPUs cannot share one).
    pub const TSS_BASE: u16 = 0x40;
    /// Number of 8-byte slots: 8 fixed, then two per APIC ID.
    pub const ENTRIES: usize = 8 + 2 * super::layout::APIC_ID_SLOTS as usize;
    /// The GDT limit.
    pub const LIMIT: u16 = (ENTRIES * 8 - 1) as u16;

    /// The TSS selector of the vCPU with APIC ID `apic_id` (taken modulo 256).
    pub const fn tss_selector(apic_id: u32) -> u16 {
        TSS_BASE + 16 * (apic_id % super::layout::APIC_ID_SLOTS as u32) as u16
    }
}

/// The privilege level a program runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// CPL 0. On PVM hosts every instruction is emulated: keep such code short.
    Kernel,
    /// CPL 3 with `IOPL = 3`: runs natively everywhere.
    User,
}

/// A program to load.
#[derive(Clone, Debug)]
pub struct GuestProgram<'a> {
    /// A name for messages.
    pub name: &'a str,
    /// The code (position-independent or linked for `load_addr`).
    pub code: &'a [u8],
    /// Where the code goes (>= [`layout::PROGRAM_AREA_START`]).
    pub load_addr: u64,
    /// The BSP entry point, as an offset into `code`.
    pub bsp_entry: u64,
    /// The AP entry point, as an offset into `code`; `None` if the program has no AP code
    /// (then no trampoline is written).
    pub ap_entry: Option<u64>,
    /// The privilege level of the BSP and the APs.
    pub privilege: Privilege,
    /// Extra data to place: (guest address, bytes), each at or above
    /// [`layout::PROGRAM_AREA_START`].
    pub data: Vec<(u64, &'a [u8])>,
}

impl<'a> GuestProgram<'a> {
    /// A CPL-3 program at the default address, entered at offset `bsp_entry`.
    pub fn user(name: &'a str, code: &'a [u8], bsp_entry: u64) -> Self {
        Self {
            name,
            code,
            load_addr: layout::DEFAULT_LOAD_ADDR,
            bsp_entry,
            ap_entry: None,
            privilege: Privilege::User,
            data: Vec::new(),
        }
    }
}

/// A loaded program: the [`BootEntry`] for the BSP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedProgram {
    /// Guest address of the BSP entry.
    pub bsp_rip: u64,
    /// Guest address of the AP entry, if any.
    pub ap_rip: Option<u64>,
    /// The privilege level.
    pub privilege: Privilege,
}

/// The trampoline's parameter block at [`layout::AP_PARAMS_ADDR`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrampolineParams {
    /// Where the AP continues in 64-bit mode.
    pub entry: u64,
    /// `RFLAGS` at the entry.
    pub rflags: u64,
    /// 1: enter at CPL 3 (`sysexit`); 0: CPL 0 (`jmp`).
    pub user_mode: u32,
    /// `CR3`.
    pub cr3: u32,
    /// The GDT limit for `lgdt`.
    pub gdt_limit: u16,
    /// The GDT base for `lgdt` (below 4 GiB).
    pub gdt_base: u32,
}

impl TrampolineParams {
    // Offsets inside the block; the trampoline's assembly uses the same numbers.
    const ENTRY: u64 = 0x00;
    const RFLAGS: u64 = 0x08;
    const USER_MODE: u64 = 0x10;
    const CR3: u64 = 0x14;
    const GDTR: u64 = 0x18;

    fn write(&self, mem: &GuestMemoryMmap) -> Result<(), BootError> {
        let base = layout::AP_PARAMS_ADDR;
        write_obj(mem, base + Self::ENTRY, self.entry)?;
        write_obj(mem, base + Self::RFLAGS, self.rflags)?;
        write_obj(mem, base + Self::USER_MODE, self.user_mode)?;
        write_obj(mem, base + Self::CR3, self.cr3)?;
        write_obj(mem, base + Self::GDTR, self.gdt_limit)?;
        write_obj(mem, base + Self::GDTR + 2, self.gdt_base)
    }
}

/// `IA32_SYSENTER_CS`: the loader sets it to [`gdt::KERNEL_CODE64`] on every vCPU.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `RFLAGS` bit 1 is always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// `RFLAGS.IOPL = 3`.
const RFLAGS_IOPL3: u64 = 3 << 12;
/// CR0: PE | MP | ET | NE | WP | PG.
const CR0_LONG_MODE: u64 = 0x8001_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
const CR4_LONG_MODE: u64 = 0x620;
/// EFER: LME | LMA.
const EFER_LONG_MODE: u64 = 0x500;

/// Page-table entry bits.
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const PWT: u64 = 1 << 3;
    pub const PCD: u64 = 1 << 4;
    pub const HUGE: u64 = 1 << 7;
}

// The AP trampoline. It is data for the guest, assembled with the host binary: every address
// in it is a constant or a difference of labels in this section, never a relocation.
core::arch::global_asm!(
    ".pushsection .rodata.vmm_core_ap_trampoline,\"a\"",
    ".globl vmm_core_ap_trampoline_start",
    ".globl vmm_core_ap_trampoline_end",
    "vmm_core_ap_trampoline_start:",
    ".code16",
    "cli",
    "xorl %eax, %eax",
    "movw %ax, %ds",
    "lgdtl {params}+{gdtr}",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl ${code32}, ${sipi} + (.Lvmm_core_ap32 - vmm_core_ap_trampoline_start)",
    ".code32",
    ".Lvmm_core_ap32:",
    "movw ${data0}, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl ${cr4}, %eax",
    "movl %eax, %cr4",
    "movl {params}+{cr3_off}, %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax",
    "wrmsr",
    "movl ${cr0}, %eax",
    "movl %eax, %cr0",
    "ljmpl ${code64}, ${sipi} + (.Lvmm_core_ap64 - vmm_core_ap_trampoline_start)",
    ".code64",
    ".Lvmm_core_ap64:",
    // EBX[31:24] of leaf 1: this AP's APIC ID.
    "movl $1, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "shrl $24, %ebx",
    // This APIC ID's TSS descriptor: mark it available (a re-woken AP marked it busy), then
    // load it: the TSS holds the I/O permission bitmap CPL-3 code needs for port I/O.
    "movl %ebx, %eax",
    "shll $4, %eax",
    "addl ${tss_base}, %eax",
    "andb $0xfd, {gdt_addr}+5(%eax)",
    "ltr %ax",
    // A CPL-0 stack of its own, for pushfq/popfq.
    "leal 1(%ebx), %esp",
    "shll $8, %esp",
    "addl ${tstacks}, %esp",
    "pushq {params}+{rflags_off}",
    "popfq",
    // IA32_SYSENTER_CS = KERNEL_CODE64: sysexit loads USER_CODE64 / USER_DATA (for us here,
    // and for CPL-0 programs that drop to CPL 3 themselves).
    "movl $0x174, %ecx",
    "movl ${code64}, %eax",
    "xorl %edx, %edx",
    "wrmsr",
    // RCX: the program stack of this APIC ID; RDX: the entry; RDI: the APIC ID.
    "leal 1(%ebx), %ecx",
    "shll $12, %ecx",
    "addl ${stacks}, %ecx",
    "movq {params}+{entry_off}, %rdx",
    "movl %ebx, %edi",
    "cmpl $0, {params}+{user_off}",
    "jne .Lvmm_core_ap_user",
    "movq %rcx, %rsp",
    "jmpq *%rdx",
    ".Lvmm_core_ap_user:",
    // sysexit with REX.W: CPL 3, 64-bit, RIP = RDX, RSP = RCX.
    ".byte 0x48, 0x0f, 0x35",
    "vmm_core_ap_trampoline_end:",
    ".popsection",
    params = const layout::AP_PARAMS_ADDR,
    gdtr = const TrampolineParams::GDTR,
    cr3_off = const TrampolineParams::CR3,
    rflags_off = const TrampolineParams::RFLAGS,
    entry_off = const TrampolineParams::ENTRY,
    user_off = const TrampolineParams::USER_MODE,
    sipi = const layout::SIPI_PAGE,
    code32 = const gdt::KERNEL_CODE32,
    code64 = const gdt::KERNEL_CODE64,
    data0 = const gdt::KERNEL_DATA,
    cr4 = const CR4_LONG_MODE,
    cr0 = const CR0_LONG_MODE,
    tstacks = const layout::TRAMPOLINE_STACKS,
    tss_base = const gdt::TSS_BASE,
    gdt_addr = const layout::GDT_ADDR,
    stacks = const layout::STACKS_ADDR,
    options(att_syntax),
);

extern "C" {
    static vmm_core_ap_trampoline_start: u8;
    static vmm_core_ap_trampoline_end: u8;
}

/// The AP trampoline's machine code (real mode at [`layout::SIPI_PAGE`]).
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: both symbols are in the same read-only section emitted by the global_asm!
    // above, `end` after `start`; the bytes between them are initialized and never written.
    unsafe {
        let start = std::ptr::addr_of!(vmm_core_ap_trampoline_start);
        let end = std::ptr::addr_of!(vmm_core_ap_trampoline_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// The TSS proper (104 bytes), then the I/O permission bitmap for all 65536 ports, then the
/// 0xFF byte the CPU may read past the bitmap.
const TSS_SIZE: u64 = 0x68;
const IO_BITMAP_SIZE: u64 = 0x2000;
/// TSS limit: the TSS, the bitmap and the terminating byte.
const TSS_LIMIT: u32 = (TSS_SIZE + IO_BITMAP_SIZE) as u32;

/// The GDT the loader writes, slot by slot.
pub fn gdt_entries() -> Vec<u64> {
    let code32 = Descriptor {
        long: false,
        db: true,
        ..Descriptor::CODE64
    };
    let user = |d: Descriptor| Descriptor { dpl: 3, ..d };
    let mut g = vec![
        0,
        Descriptor::CODE64.encode(),
        Descriptor::DATA.encode(),
        code32.encode(),
        0,
        user(Descriptor::CODE64).encode(),
        user(Descriptor::DATA).encode(),
        0,
    ];
    for _ in 0..layout::APIC_ID_SLOTS {
        g.push(tss_descriptor(TSS_TYPE_AVAILABLE).encode());
        g.push(layout::TSS_ADDR >> 32);
    }
    g
}

/// 64-bit TSS descriptor types: available (in the GDT) and busy (in TR once loaded).
const TSS_TYPE_AVAILABLE: u8 = 0x9;
const TSS_TYPE_BUSY: u8 = 0xb;

/// The shared TSS with its I/O permission bitmap.
fn tss_descriptor(type_: u8) -> Descriptor {
    Descriptor {
        base: layout::TSS_ADDR as u32,
        limit: TSS_LIMIT,
        type_,
        system: true,
        dpl: 0,
        long: false,
        db: false,
        granularity: false,
    }
}

/// The PD entry that maps the 2 MiB page at `addr` (identity, U bit, PCD|PWT on MMIO).
pub fn pd_entry(addr: u64) -> u64 {
    let mut e = addr | pte::PRESENT | pte::WRITABLE | pte::USER | pte::HUGE;
    if addr >= crate::vm::MMIO_GAP_START {
        e |= pte::PCD | pte::PWT;
    }
    e
}

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    addr: u64,
    value: T,
) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemory {
            addr,
            len: std::mem::size_of::<T>(),
            source,
        })
}

fn write_bytes(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemory {
            addr,
            len: bytes.len(),
            source,
        })
}

/// Writes the GDT, the TSS and the page tables (the parts every program shares).
///
/// # Errors
///
/// [`BootError::GuestMemory`] if `mem` does not cover the loader's low memory.
pub fn write_system_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in gdt_entries().iter().enumerate() {
        write_obj(mem, layout::GDT_ADDR + 8 * i as u64, *e)?;
    }
    // A zero bitmap allows every port at CPL 3. IOPL = 3 would too, but PVM hosts run guest
    // user code with IOPL 0 whatever RFLAGS says, and check the bitmap.
    write_bytes(
        mem,
        layout::TSS_ADDR,
        &[0u8; (TSS_SIZE + IO_BITMAP_SIZE) as usize],
    )?;
    write_obj(mem, layout::TSS_ADDR + 0x66, TSS_SIZE as u16)?;
    write_obj(mem, layout::TSS_ADDR + TSS_SIZE + IO_BITMAP_SIZE, 0xffu8)?;
    write_obj(
        mem,
        layout::PML4_ADDR,
        layout::PDPT_ADDR | pte::PRESENT | pte::WRITABLE | pte::USER,
    )?;
    for gib in 0..4u64 {
        let pd = layout::PD_ADDR + gib * 0x1000;
        write_obj(
            mem,
            layout::PDPT_ADDR + gib * 8,
            pd | pte::PRESENT | pte::WRITABLE | pte::USER,
        )?;
        for i in 0..512u64 {
            write_obj(mem, pd + i * 8, pd_entry((gib << 30) | (i << 21)))?;
        }
    }
    Ok(())
}

fn check_placement(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), BootError> {
    let err = |reason| BootError::ProgramLayout {
        what,
        addr,
        len,
        reason,
    };
    if addr < layout::PROGRAM_AREA_START {
        return Err(err("below 0x200000, which the loader uses"));
    }
    let end = addr.checked_add(len).ok_or_else(|| err("wraps around"))?;
    if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
        return Err(err("outside guest RAM"));
    }
    if end > crate::vm::MMIO_GAP_START {
        return Err(err("above 3 GiB (the MMIO gap)"));
    }
    Ok(())
}

/// Loads `program` into `mem` (see the module documentation).
///
/// # Errors
///
/// [`BootError::ProgramLayout`] if a piece of the program does not fit where it should go
/// (nothing is written then), [`BootError::GuestMemory`] if a write fails.
pub fn load_program(
    mem: &GuestMemoryMmap,
    program: &GuestProgram<'_>,
) -> Result<LoadedProgram, BootError> {
    let code_len = program.code.len() as u64;
    check_placement(mem, "code", program.load_addr, code_len)?;
    for (addr, bytes) in &program.data {
        check_placement(mem, "data", *addr, bytes.len() as u64)?;
    }
    let entry_check = |what, offset: u64| {
        if offset < code_len {
            Ok(program.load_addr + offset)
        } else {
            Err(BootError::ProgramLayout {
                what,
                addr: program.load_addr.saturating_add(offset),
                len: 0,
                reason: "the entry offset is past the end of the code",
            })
        }
    };
    let bsp_rip = entry_check("BSP entry", program.bsp_entry)?;
    let ap_rip = program
        .ap_entry
        .map(|o| entry_check("AP entry", o))
        .transpose()?;

    write_system_tables(mem)?;
    write_bytes(mem, program.load_addr, program.code)?;
    for (addr, bytes) in &program.data {
        write_bytes(mem, *addr, bytes)?;
    }
    if let Some(entry) = ap_rip {
        write_bytes(mem, layout::SIPI_PAGE, ap_trampoline())?;
        TrampolineParams {
            entry,
            rflags: entry_rflags(),
            user_mode: u32::from(program.privilege == Privilege::User),
            cr3: layout::PML4_ADDR as u32,
            gdt_limit: gdt::LIMIT,
            gdt_base: layout::GDT_ADDR as u32,
        }
        .write(mem)?;
    }
    Ok(LoadedProgram {
        bsp_rip,
        ap_rip,
        privilege: program.privilege,
    })
}

/// `RFLAGS` at every entry: reserved bit, `IOPL = 3`, interrupts off.
pub fn entry_rflags() -> u64 {
    RFLAGS_RESERVED | RFLAGS_IOPL3
}

/// The special registers of a vCPU entering 64-bit mode at `privilege`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, privilege: Privilege) -> kvm_sregs {
    let (code, data, dpl) = match privilege {
        Privilege::Kernel => (gdt::KERNEL_CODE64, gdt::KERNEL_DATA, 0),
        Privilege::User => (gdt::USER_CODE64, gdt::USER_DATA, 3),
    };
    sregs.cs = Descriptor {
        dpl,
        ..Descriptor::CODE64
    }
    .to_kvm_segment(code);
    let d = Descriptor {
        dpl,
        ..Descriptor::DATA
    }
    .to_kvm_segment(data);
    sregs.ds = d;
    sregs.es = d;
    sregs.fs = d;
    sregs.gs = d;
    sregs.ss = d;
    sregs.tr = tss_descriptor(TSS_TYPE_BUSY).to_kvm_segment(gdt::tss_selector(0));
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = gdt::LIMIT;
    // No IDT: any exception triple-faults, which the VMM reports as the guest stopping.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_LONG_MODE;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 = CR4_LONG_MODE;
    sregs.efer = EFER_LONG_MODE;
    sregs
}

impl BootEntry for LoadedProgram {
    fn setup_bsp(&self, vcpu: &VcpuFd, _mem: &GuestMemoryMmap) -> Result<(), VcpuSetupError> {
        let err = crate::bsp_kvm_error;
        let sregs = vcpu.get_sregs().map_err(err(KvmOp::GetSregs))?;
        vcpu.set_sregs(&long_mode_sregs(sregs, self.privilege))
            .map_err(err(KvmOp::SetSregs))?;
        let regs = kvm_regs {
            rip: self.bsp_rip,
            rsp: layout::stack_top(0),
            rflags: entry_rflags(),
            rdi: 0,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(err(KvmOp::SetRegs))?;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_SYSENTER_CS,
            data: u64::from(gdt::KERNEL_CODE64),
            ..Default::default()
        }])
        .map_err(|_| VcpuSetupError::MsrRejected {
            vcpu_id: 0,
            msr: MSR_IA32_SYSENTER_CS,
            set: 0,
            total: 1,
        })?;
        match vcpu.set_msrs(&msrs) {
            Ok(1) => Ok(()),
            Ok(set) => Err(VcpuSetupError::MsrRejected {
                vcpu_id: 0,
                msr: MSR_IA32_SYSENTER_CS,
                set,
                total: 1,
            }),
            Err(source) => Err(err(KvmOp::SetMsrs)(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// Walks the 4-level page tables like the CPU: (physical address, U at every level,
    /// PCD of the leaf).
    fn walk(mem: &GuestMemoryMmap, va: u64) -> Option<(u64, bool, bool)> {
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let mut table = layout::PML4_ADDR;
        let mut user = true;
        for (level, shift) in [(4, 39), (3, 30), (2, 21)] {
            let e = rd(table + ((va >> shift) & 0x1ff) * 8);
            if e & pte::PRESENT == 0 {
                return None;
            }
            user &= e & pte::USER != 0;
            if level == 2 {
                assert_ne!(e & pte::HUGE, 0, "PD entries map 2 MiB pages");
                let pa = (e & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff);
                return Some((pa, user, e & pte::PCD != 0));
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        None
    }

    #[test]
    fn page_tables_identity_map_4_gib_with_user_access_and_an_uncached_lapic() {
        let m = mem();
        write_system_tables(&m).unwrap();
        for va in [
            0u64,
            0x8000,
            0x20_1234,
            0x3fff_ffff,
            0xbfff_f000,
            0xfee0_00f0,
        ] {
            let (pa, user, pcd) = walk(&m, va).unwrap();
            assert_eq!(pa, va, "identity mapping of {va:#x}");
            assert!(user, "U bit at every level for {va:#x}");
            assert_eq!(pcd, va >= 0xc000_0000, "PCD for {va:#x}");
        }
        assert!(walk(&m, 0x1_0000_0000).is_none());
    }

    #[test]
    fn gdt_matches_the_selectors() {
        let g = gdt_entries();
        let dpl = |e: u64| (e >> 45) & 3;
        let long = |e: u64| (e >> 53) & 1;
        assert_eq!((dpl(g[1]), long(g[1])), (0, 1));
        assert_eq!(dpl(g[usize::from(gdt::USER_CODE64 >> 3)]), 3);
        assert_eq!(long(g[usize::from(gdt::USER_CODE64 >> 3)]), 1);
        assert_eq!(dpl(g[usize::from(gdt::USER_DATA >> 3)]), 3);
        // sysexit's fixed layout.
        assert_eq!(gdt::USER_CODE64 & !3, gdt::KERNEL_CODE64 + 32);
        assert_eq!(gdt::USER_DATA & !3, gdt::KERNEL_CODE64 + 40);
        assert_eq!(Descriptor::CODE64.encode(), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn trampoline_is_position_independent_real_mode_code() {
        let t = ap_trampoline();
        assert!(!t.is_empty() && t.len() < 0x1000, "{} bytes", t.len());
        assert_eq!(t[0], 0xfa, "starts with cli");
        // ends with sysexit (REX.W 0F 35)
        assert_eq!(&t[t.len() - 3..], &[0x48, 0x0f, 0x35]);
    }

    #[test]
    fn programs_are_placed_and_checked() {
        let m = mem();
        let code = [0x90u8, 0x90, 0xeb, 0xfe];
        let mut p = GuestProgram::user("t", &code, 2);
        p.ap_entry = Some(0);
        let data = [1u8, 2, 3];
        p.data.push((0x30_0000, &data));
        let loaded = load_program(&m, &p).unwrap();
        assert_eq!(loaded.bsp_rip, 0x20_0002);
        assert_eq!(loaded.ap_rip, Some(0x20_0000));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0002)).unwrap(), 3);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(layout::SIPI_PAGE)).unwrap(),
            0xfa
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(layout::AP_PARAMS_ADDR))
                .unwrap(),
            0x20_0000
        );

        p.bsp_entry = 4;
        assert!(matches!(
            load_program(&m, &p),
            Err(BootError::ProgramLayout { .. })
        ));
        p.bsp_entry = 0;
        p.load_addr = 0x1000;
        assert!(matches!(
            load_program(&m, &p),
            Err(BootError::ProgramLayout { .. })
        ));
        p.load_addr = (8 << 20) - 2;
        assert!(matches!(
            load_program(&m, &p),
            Err(BootError::ProgramLayout { .. })
        ));
    }
}
