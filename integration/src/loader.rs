//! The test-program loader: runs small 64-bit programs (tests, demos, benchmarks) without
//! firmware or a kernel, on top of `vmm-core`'s x86 builders ([`vmm_core::arch::x86_64`]).
//!
//! [`load_program`] writes into guest memory:
//! - a GDT ([`memory_map::GDT_ADDR`], selectors in [`gdt`]) with 64-bit code and data segments at
//!   DPL 0 and DPL 3 and one 64-bit TSS descriptor per APIC ID ([`system_gdt`]);
//! - a TSS ([`memory_map::TSS_ADDR`]) whose I/O permission bitmap allows every port;
//! - identity-mapped page tables for the first 4 GiB ([`memory_map::PML4_ADDR`], [`page_tables`])
//!   with 2 MiB pages, the U bit at every level (so CPL-3 code can reach everything,
//!   including the local APIC page at `0xFEE0_0000`), and PCD|PWT on the MMIO gap above
//!   3 GiB;
//! - the program's code and data at the addresses it asks for;
//! - if the program has an AP entry, a real-mode trampoline at [`memory_map::SIPI_PAGE`]
//!   (SIPI vector [`memory_map::SIPI_VECTOR`]) that takes a woken AP through protected mode to
//!   64-bit mode, loads its TSS, gives it its own stack, and enters the AP entry at the
//!   program's privilege level.
//!
//! The returned [`LoadedProgram`] is a [`BootEntry`]: it puts the BSP in 64-bit mode at the
//! BSP entry, at CPL 0 or CPL 3. Every entry has `RDI` = the vCPU's APIC ID (0 for the BSP),
//! `RSP` = the top of the vCPU's own stack ([`memory_map::stack_top`]), `RFLAGS.IOPL = 3`,
//! interrupts off, and `IA32_SYSENTER_CS` = [`gdt::KERNEL_CODE64`]: CPL-0 code drops to CPL 3
//! with `sysexit` (REX.W; `RDX` = user RIP, `RCX` = user RSP). There is no IDT: any exception
//! triple-faults.
//!
//! # What the test hosts need
//!
//! The project's development and CI machines run the PVM flavour of nested KVM (see
//! `docs/host-notes.md`): guest CPL-0 code is emulated instruction by instruction, CPL-3 code
//! runs natively. Three things in this loader exist because of these hosts, not because x86
//! or KVM in general needs them; on ordinary KVM hosts they are harmless:
//! - **The TSS I/O permission bitmap.** PVM runs guest user code with an effective IOPL of 0,
//!   whatever `RFLAGS.IOPL` says, and checks the TSS bitmap; an all-zero bitmap is what lets
//!   CPL-3 programs use `in`/`out`. Elsewhere `RFLAGS.IOPL = 3` alone would do.
//! - **`sysexit` to reach CPL 3 from the AP trampoline.** KVM's instruction emulator, which
//!   runs every CPL-0 instruction here, cannot `iretq` to CPL 3; `sysexit` it can. Hence
//!   `IA32_SYSENTER_CS` and the user selectors at the fixed offsets `sysexit` expects.
//! - **CPUID at CPL 0 on AMD hosts.** There `cpuid` at CPL 3 is not trapped and returns the
//!   host CPU's values; programs that must see the vCPU's CPUID (APIC IDs, topology) execute
//!   it at CPL 0, as the trampoline does for the APIC ID.

use std::mem::offset_of;

use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_core::arch::x86_64::gdt::{Descriptor, Gdt};
use vmm_core::arch::x86_64::msr;
use vmm_core::arch::x86_64::paging::IdentityMap;
use vmm_core::arch::x86_64::regs::{cr0, cr4, efer, rflags, LongModeEntry};
use vmm_core::vm::{write_guest, MMIO_GAP};
use vmm_core::{BootEntry, BootError, VcpuSetupError};

/// Guest physical addresses used by the loader, inside `vmm-core`'s memory map
/// ([`vmm_core::arch::x86_64::layout`]). Everything below [`memory_map::PROGRAM_AREA_START`]
/// belongs to the loader.
pub mod memory_map {
    /// The GDT ([`super::gdt`]: fixed segments, then one TSS descriptor per APIC ID).
    pub const GDT_ADDR: u64 = 0x1000;
    /// The SIPI vector that starts APs at [`SIPI_PAGE`].
    pub const SIPI_VECTOR: u8 = 0x08;
    /// The SIPI page where the AP trampoline runs (real mode, CS = 0x0800):
    /// `SIPI_VECTOR << 12`.
    pub const SIPI_PAGE: u64 = (SIPI_VECTOR as u64) << 12;
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
    /// Small per-APIC-ID stacks the trampoline uses at CPL 0 (256 bytes each, one per slot:
    /// `0x2_0000..0x6_0000`).
    pub const TRAMPOLINE_STACKS: u64 = 0x2_0000;
    /// Size of one trampoline stack.
    pub const TRAMPOLINE_STACK_SIZE: u64 = 0x100;
    /// Per-APIC-ID program stacks (1 KiB each, one per slot: `0x10_0000..0x20_0000`).
    pub const STACKS_ADDR: u64 = 0x10_0000;
    /// log2 of the size of one program stack.
    pub const STACK_SHIFT: u32 = 10;
    /// Size of one program stack.
    pub const STACK_SIZE: u64 = 1 << STACK_SHIFT;
    /// The APIC IDs that have a stack and a TSS descriptor: 0..1024 (KVM's vCPU count limit on
    /// this project's hosts; x2APIC IDs above 254 included). A vCPU takes the slot of its
    /// x2APIC ID (CPUID leaf 0xB EDX) modulo this: topologies whose APIC IDs reach 1024 would
    /// share slots, which SMP programs cannot run with.
    pub const APIC_ID_SLOTS: u32 = 1024;
    /// Programs and their data go at or above this address.
    pub const PROGRAM_AREA_START: u64 = 0x20_0000;
    /// The default load address of a program's code.
    pub const DEFAULT_LOAD_ADDR: u64 = PROGRAM_AREA_START;
    /// The local APIC's MMIO page (the VMM's, [`vmm_core::arch::x86_64::layout::LAPIC_ADDR`]).
    pub const LAPIC_ADDR: u64 = vmm_core::arch::x86_64::layout::LAPIC_ADDR as u64;

    /// The top of the program stack of the vCPU with APIC ID `apic_id` (IDs are taken modulo
    /// [`APIC_ID_SLOTS`]).
    pub const fn stack_top(apic_id: u32) -> u64 {
        STACKS_ADDR + ((apic_id % APIC_ID_SLOTS) as u64 + 1) * STACK_SIZE
    }
}

/// The memory map's rules, checked when the crate compiles: the slots are a power of two (the
/// trampoline masks the APIC ID), the GDT ends before the SIPI page, the trampoline stacks
/// before the program stacks, the program stacks before the program area.
const _: () = {
    use memory_map::*;
    assert!(APIC_ID_SLOTS.is_power_of_two());
    assert!(GDT_ADDR + 8 * gdt::ENTRIES as u64 <= SIPI_PAGE);
    assert!(TRAMPOLINE_STACKS + TRAMPOLINE_STACK_SIZE * APIC_ID_SLOTS as u64 <= STACKS_ADDR);
    assert!(TRAMPOLINE_STACK_SIZE == 1 << 8);
    assert!(STACKS_ADDR + STACK_SIZE * APIC_ID_SLOTS as u64 <= PROGRAM_AREA_START);
};

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
    pub const ENTRIES: usize = 8 + 2 * super::memory_map::APIC_ID_SLOTS as usize;
    /// The GDT limit.
    pub const LIMIT: u16 = {
        assert!(ENTRIES * 8 - 1 <= u16::MAX as usize);
        #[allow(clippy::cast_possible_truncation)] // checked by the assert above
        let limit = (ENTRIES * 8 - 1) as u16;
        limit
    };

    /// The TSS selector of the vCPU with APIC ID `apic_id` (taken modulo
    /// [`APIC_ID_SLOTS`](super::memory_map::APIC_ID_SLOTS)).
    pub const fn tss_selector(apic_id: u32) -> u16 {
        // The slot is below APIC_ID_SLOTS = 1024, so TSS_BASE + 16 * slot fits.
        #[allow(clippy::cast_possible_truncation)]
        let slot = (apic_id % super::memory_map::APIC_ID_SLOTS) as u16;
        TSS_BASE + 16 * slot
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
    /// Where the code goes (>= [`memory_map::PROGRAM_AREA_START`]).
    pub load_addr: u64,
    /// The BSP entry point, as an offset into `code`.
    pub bsp_entry: u64,
    /// The AP entry point, as an offset into `code`; `None` if the program has no AP code
    /// (then no trampoline is written).
    pub ap_entry: Option<u64>,
    /// The privilege level of the BSP and the APs.
    pub privilege: Privilege,
    /// Extra data to place: (guest address, bytes), each at or above
    /// [`memory_map::PROGRAM_AREA_START`].
    pub data: Vec<(u64, &'a [u8])>,
}

impl<'a> GuestProgram<'a> {
    /// A CPL-3 program at the default address, entered at offset `bsp_entry`.
    pub fn user(name: &'a str, code: &'a [u8], bsp_entry: u64) -> Self {
        Self {
            name,
            code,
            load_addr: memory_map::DEFAULT_LOAD_ADDR,
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

/// The trampoline's parameter block at [`memory_map::AP_PARAMS_ADDR`], byte for byte (packed:
/// the trampoline reads each field at its offset).
#[repr(C, packed)]
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
    /// The GDT limit for `lgdt` (followed by the base: the operand of `lgdt`).
    pub gdt_limit: u16,
    /// The GDT base for `lgdt` (below 4 GiB).
    pub gdt_base: u32,
}

// SAFETY: `repr(C, packed)` and made only of integers: no padding, and every bit pattern is a
// valid value.
unsafe impl ByteValued for TrampolineParams {}

impl TrampolineParams {
    // Offsets inside the block, for the trampoline's assembly.
    const ENTRY: usize = offset_of!(TrampolineParams, entry);
    const RFLAGS: usize = offset_of!(TrampolineParams, rflags);
    const USER_MODE: usize = offset_of!(TrampolineParams, user_mode);
    const CR3: usize = offset_of!(TrampolineParams, cr3);
    const GDTR: usize = offset_of!(TrampolineParams, gdt_limit);

    fn write(&self, mem: &GuestMemoryMmap) -> Result<(), BootError> {
        write_guest(mem, memory_map::AP_PARAMS_ADDR, self.as_slice())
    }
}

/// CR0 at every entry: long mode with write protection.
const CR0: u64 = cr0::LONG_MODE | cr0::WP;
/// CR4 at every entry: long mode with SSE enabled (programs may use SSE instructions).
const CR4: u64 = cr4::LONG_MODE | cr4::OSFXSR | cr4::OSXMMEXCPT;

// The AP trampoline. It is data for the guest, assembled with the host binary: every address
// in it is a constant or a difference of labels in this section, never a relocation.
core::arch::global_asm!(
    ".pushsection .rodata.integration_loader_ap_trampoline,\"a\"",
    ".globl integration_loader_ap_trampoline_start",
    ".globl integration_loader_ap_trampoline_end",
    "integration_loader_ap_trampoline_start:",
    ".code16",
    "cli",
    "xorl %eax, %eax",
    "movw %ax, %ds",
    "lgdtl {params}+{gdtr}",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl ${code32}, ${sipi} + (.Lintegration_loader_ap32 - integration_loader_ap_trampoline_start)",
    ".code32",
    ".Lintegration_loader_ap32:",
    "movw ${data0}, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl ${cr4}, %eax",
    "movl %eax, %cr4",
    "movl {params}+{cr3_off}, %eax",
    "movl %eax, %cr3",
    "movl ${efer_msr}, %ecx",
    "rdmsr",
    "orl ${efer_lme}, %eax",
    "wrmsr",
    "movl ${cr0}, %eax",
    "movl %eax, %cr0",
    "ljmpl ${code64}, ${sipi} + (.Lintegration_loader_ap64 - integration_loader_ap_trampoline_start)",
    ".code64",
    ".Lintegration_loader_ap64:",
    // EDX of leaf 0xB: this AP's x2APIC ID (all 32 bits: leaf 1 EBX[31:24] has only the low
    // 8), taken modulo the slots.
    "movl $0xb, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "movl %edx, %ebx",
    "andl ${slot_mask}, %ebx",
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
    "movl ${sysenter_cs}, %ecx",
    "movl ${code64}, %eax",
    "xorl %edx, %edx",
    "wrmsr",
    // RCX: the program stack of this APIC ID; RDX: the entry; RDI: the APIC ID.
    "leal 1(%ebx), %ecx",
    "shll ${stack_shift}, %ecx",
    "addl ${stacks}, %ecx",
    "movq {params}+{entry_off}, %rdx",
    "movl %ebx, %edi",
    "cmpl $0, {params}+{user_off}",
    "jne .Lintegration_loader_ap_user",
    "movq %rcx, %rsp",
    "jmpq *%rdx",
    ".Lintegration_loader_ap_user:",
    // sysexit with REX.W: CPL 3, 64-bit, RIP = RDX, RSP = RCX.
    ".byte 0x48, 0x0f, 0x35",
    "integration_loader_ap_trampoline_end:",
    ".popsection",
    // The parameter block and the offsets of its fields.
    params = const memory_map::AP_PARAMS_ADDR, gdtr = const TrampolineParams::GDTR,
    cr3_off = const TrampolineParams::CR3, rflags_off = const TrampolineParams::RFLAGS,
    entry_off = const TrampolineParams::ENTRY, user_off = const TrampolineParams::USER_MODE,
    // The loader's other places in guest memory.
    sipi = const memory_map::SIPI_PAGE, gdt_addr = const memory_map::GDT_ADDR,
    tstacks = const memory_map::TRAMPOLINE_STACKS, stacks = const memory_map::STACKS_ADDR,
    stack_shift = const memory_map::STACK_SHIFT,
    slot_mask = const memory_map::APIC_ID_SLOTS - 1,
    // GDT selectors.
    code32 = const gdt::KERNEL_CODE32, code64 = const gdt::KERNEL_CODE64,
    data0 = const gdt::KERNEL_DATA, tss_base = const gdt::TSS_BASE,
    // Control registers and MSRs.
    cr4 = const CR4, cr0 = const CR0, efer_lme = const efer::LME,
    efer_msr = const msr::EFER, sysenter_cs = const msr::IA32_SYSENTER_CS,
    options(att_syntax),
);

/// The AP trampoline's machine code (real mode at [`memory_map::SIPI_PAGE`]).
pub fn ap_trampoline() -> &'static [u8] {
    crate::guest::asm_blob!(
        integration_loader_ap_trampoline_start,
        integration_loader_ap_trampoline_end
    )
}

/// The TSS proper (104 bytes), then the I/O permission bitmap for all 65536 ports, then the
/// 0xFF byte the CPU may read past the bitmap.
const TSS_SIZE: u16 = 0x68;
const IO_BITMAP_SIZE: u16 = 0x2000;
/// TSS limit: the TSS, the bitmap and the terminating byte.
const TSS_LIMIT: u32 = TSS_SIZE as u32 + IO_BITMAP_SIZE as u32;
/// The TSS field holding the I/O permission bitmap's offset.
const TSS_IO_MAP_BASE: usize = 0x66;

/// `value` as a `u32`, for the addresses that 32-bit code or a 32-bit descriptor field holds.
/// Used only in `const` items, so an address above 4 GiB fails the build.
const fn below_4_gib(value: u64) -> u32 {
    assert!(value <= u32::MAX as u64, "the address must be below 4 GiB");
    #[allow(clippy::cast_possible_truncation)] // checked by the assert above
    let low = value as u32;
    low
}

/// The 32-bit forms of the addresses the trampoline and the TSS descriptor use.
const TSS_ADDR_32: u32 = below_4_gib(memory_map::TSS_ADDR);
const PML4_ADDR_32: u32 = below_4_gib(memory_map::PML4_ADDR);
const GDT_ADDR_32: u32 = below_4_gib(memory_map::GDT_ADDR);

/// The shared TSS with its I/O permission bitmap, available (in the GDT) or busy (in TR).
fn tss_descriptor(busy: bool) -> Descriptor {
    Descriptor::tss64(TSS_ADDR_32, TSS_LIMIT, busy)
}

/// The GDT the loader writes (see [`gdt`] for the selectors).
pub fn system_gdt() -> Gdt {
    let code32 = Descriptor {
        long: false,
        db: true,
        ..Descriptor::CODE64
    };
    let mut g = Gdt::new()
        .with(gdt::KERNEL_CODE64, Descriptor::CODE64)
        .with(gdt::KERNEL_DATA, Descriptor::DATA)
        .with(gdt::KERNEL_CODE32, code32)
        .with(gdt::USER_CODE64, Descriptor::CODE64.with_dpl(3))
        .with(gdt::USER_DATA, Descriptor::DATA.with_dpl(3));
    for apic_id in 0..memory_map::APIC_ID_SLOTS {
        g = g.with(gdt::tss_selector(apic_id), tss_descriptor(false));
    }
    g
}

/// The identity map the loader writes: 4 GiB, reachable from CPL 3, MMIO uncached.
pub fn page_tables() -> IdentityMap {
    IdentityMap::user_with_mmio(
        memory_map::PML4_ADDR,
        memory_map::PDPT_ADDR,
        memory_map::PD_ADDR,
    )
}

/// Writes the GDT, the TSS and the page tables (the parts every program shares).
pub fn write_system_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    system_gdt().write(mem, memory_map::GDT_ADDR)?;
    // A zero bitmap allows every port at CPL 3 (see the module documentation: these hosts
    // ignore IOPL = 3 for guest user code and check the bitmap).
    let end = usize::from(TSS_SIZE) + usize::from(IO_BITMAP_SIZE);
    let mut tss = vec![0u8; end + 1];
    tss[TSS_IO_MAP_BASE..TSS_IO_MAP_BASE + 2].copy_from_slice(&TSS_SIZE.to_le_bytes());
    tss[end] = 0xff;
    write_guest(mem, memory_map::TSS_ADDR, &tss)?;
    page_tables().write(mem)
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
    if addr < memory_map::PROGRAM_AREA_START {
        return Err(err("below 0x200000, which the loader uses"));
    }
    let end = addr.checked_add(len).ok_or_else(|| err("wraps around"))?;
    let len_bytes =
        usize::try_from(len).map_err(|_| err("larger than this host's address space"))?;
    if len > 0 && !mem.check_range(GuestAddress(addr), len_bytes) {
        return Err(err("outside guest RAM"));
    }
    if end > MMIO_GAP.start {
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
    write_guest(mem, program.load_addr, program.code)?;
    for (addr, bytes) in &program.data {
        write_guest(mem, *addr, bytes)?;
    }
    if let Some(entry) = ap_rip {
        write_guest(mem, memory_map::SIPI_PAGE, ap_trampoline())?;
        TrampolineParams {
            entry,
            rflags: entry_rflags(),
            user_mode: u32::from(program.privilege == Privilege::User),
            cr3: PML4_ADDR_32,
            gdt_limit: gdt::LIMIT,
            gdt_base: GDT_ADDR_32,
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
    rflags::RESERVED | rflags::IOPL3
}

/// The special registers of a vCPU entering 64-bit mode at `privilege`: the loader's GDT,
/// page tables and the BSP's TSS.
pub fn long_mode_entry(privilege: Privilege) -> LongModeEntry {
    let (code, data, dpl) = match privilege {
        Privilege::Kernel => (gdt::KERNEL_CODE64, gdt::KERNEL_DATA, 0),
        Privilege::User => (gdt::USER_CODE64, gdt::USER_DATA, 3),
    };
    LongModeEntry {
        code: (code, Descriptor::CODE64.with_dpl(dpl)),
        data: (data, Descriptor::DATA.with_dpl(dpl)),
        task: (gdt::tss_selector(0), tss_descriptor(true)),
        gdt_base: memory_map::GDT_ADDR,
        gdt_limit: gdt::LIMIT,
        cr3: memory_map::PML4_ADDR,
        cr0: CR0,
        cr4: CR4,
    }
}

impl BootEntry for LoadedProgram {
    fn setup_bsp(&self, vcpu: &VcpuFd, _mem: &GuestMemoryMmap) -> Result<(), VcpuSetupError> {
        let regs = kvm_regs {
            rip: self.bsp_rip,
            rsp: memory_map::stack_top(0),
            rflags: entry_rflags(),
            rdi: 0,
            ..Default::default()
        };
        long_mode_entry(self.privilege).apply(vcpu, 0, &regs)?;
        let sysenter_cs = msr::entry(msr::IA32_SYSENTER_CS, u64::from(gdt::KERNEL_CODE64));
        msr::set_msrs(vcpu, 0, &[sysenter_cs])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    /// Walks the loader's page tables like the CPU: (physical address, U at every level,
    /// PCD of the leaf).
    fn walk(mem: &GuestMemoryMmap, va: u64) -> Option<(u64, bool, bool)> {
        let t = page_tables().translate(mem, va)?;
        Some((t.phys, t.user, t.uncached))
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
        let gdt_table = system_gdt();
        let g = gdt_table.entries();
        assert_eq!((g.len(), gdt_table.limit()), (gdt::ENTRIES, gdt::LIMIT));
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
            m.read_obj::<u8>(GuestAddress(memory_map::SIPI_PAGE))
                .unwrap(),
            0xfa
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(memory_map::AP_PARAMS_ADDR))
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
