//! The assembly of every guest program, in one `global_asm!` block so that the snippets the
//! programs share are written once (the `*_asm!` macros below) and the constants they use are
//! bound once.
//!
//! Each program sits between a `<name>_start` and a `<name>_end` symbol of its own read-only
//! section; [`asm_blob!`] turns such a pair into the program's bytes. Code refers to its own
//! labels only PC-relatively and to guest addresses as constants, so the bytes run wherever
//! the loader puts them. Local labels carry the program's name (`.Lsmp_`, `.Lagent_` ...):
//! they share one assembler scope.
//!
//! Two habits come from the PVM test hosts (see `docs/host-notes.md`): CPUID runs at
//! CPL 0 (an AMD PVM host answers CPUID at CPL 3 with its own values), everything that loops
//! runs at CPL 3 (CPL-0 code is emulated instruction by instruction), hence the `sysexit`
//! after the short CPL-0 part. And absolute addresses of the local APIC go through a register:
//! `movl $imm, disp32` would sign-extend 0xFEE0_0xxx.

use super::agent::acpi::ACPI_RECHECK_ROUNDS;
use super::agent::shared_memory::{
    APIC_ID_SLOTS, CPU_LINES_ADDR, CPU_LINE_SHIFT, MAILBOX_ACPI_POLL, MAILBOX_ARG, MAILBOX_CMD,
    MAILBOX_MADT, MAILBOX_MODE, MAILBOX_SEQ, MAX_QUERIES, QUERIES_ADDR, RESULTS_ADDR,
    RESULTS_SHIFT,
};
use vmm_core::acpi_hotplug::ged::events as ged_events;
use vmm_core::acpi_hotplug::{regs, CPU_HOTPLUG_MMIO_BASE, GED_MMIO_BASE};
use vmm_core::arch::x86_64::acpi::madt_type;

/// The MADT's header: the common 36 bytes, the local APIC address and the flags.
const MADT_HEADER_LEN: u32 = 44;
use super::agent::{AgentCommand, SHUTDOWN_VALUE as AGENT_SHUTDOWN_VALUE};
use super::lapic::{
    APIC_BASE_EXTD, ICR_ALL_BUT_SELF, ICR_HIGH, ICR_INIT, ICR_LOW, ICR_SIPI, LVT_TIMER,
    LVT_TIMER_PERIODIC, SVR, SVR_ENABLE, TDCR, TDCR_DIVIDE_BY_1, TMCCT, TMICT,
    X2APIC_APIC_BASE_MSR, X2APIC_ICR_MSR, X2APIC_SVR_MSR,
};
use super::ports;
use super::programs::{
    COUNTERS_ADDR, COUNTER_STRIDE, LAPIC_TIMER_ADDR, PIO_COUNT_ADDR, SHUTDOWN_VALUE,
    TIMER_INITIAL_COUNT, TIMER_VECTOR,
};

/// The bytes of a program that `global_asm!` placed between two symbols of one section:
/// `asm_blob!(start, end)` is a `&'static [u8]`; `asm_blob!(start, end; entry)` is the bytes
/// and the offset of the symbol `entry` (which lies between them) from `start`.
///
/// Only for symbols that delimit initialized, never-written bytes of one read-only section,
/// `start` before `end` (as every `.pushsection ...,"a"` block here emits them).
macro_rules! asm_blob {
    ($start:ident, $end:ident) => {{
        extern "C" {
            static $start: u8;
            static $end: u8;
        }
        let start = std::ptr::addr_of!($start);
        let len = std::ptr::addr_of!($end) as usize - start as usize;
        // SAFETY: the caller names symbols that delimit initialized, never-written bytes of
        // one read-only section, `start` first (see the macro's contract).
        let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(start, len) };
        bytes
    }};
    ($start:ident, $end:ident; $entry:ident) => {{
        extern "C" {
            static $entry: u8;
        }
        let bytes = $crate::guest::asm_blob!($start, $end);
        let entry = std::ptr::addr_of!($entry) as usize - bytes.as_ptr() as usize;
        (bytes, entry as u64)
    }};
}
pub(crate) use asm_blob;

/// Opens the read-only section of program `name` and places its start symbol,
/// `integration_guest_<name>_start` (its end symbol is declared global here too).
macro_rules! program_start_asm {
    ($name:literal) => {
        concat!(
            ".pushsection .rodata.integration_guest_",
            $name,
            ",\"a\"\n",
            ".globl integration_guest_",
            $name,
            "_start\n",
            ".globl integration_guest_",
            $name,
            "_end\n",
            "integration_guest_",
            $name,
            "_start:",
        )
    };
}

/// A second entry point of program `name`: the global symbol `integration_guest_<name>_<entry>`.
macro_rules! program_entry_asm {
    ($name:literal, $entry:literal) => {
        concat!(
            ".globl integration_guest_",
            $name,
            "_",
            $entry,
            "\n",
            "integration_guest_",
            $name,
            "_",
            $entry,
            ":",
        )
    };
}

/// Places the end symbol of program `name` and closes its section.
macro_rules! program_end_asm {
    ($name:literal) => {
        concat!("integration_guest_", $name, "_end:\n", ".popsection")
    };
}

/// `sysexit` (REX.W) to CPL 3 at `label`, keeping the stack (RCX = RSP); RBX and the other
/// registers survive.
macro_rules! to_cpl3_asm {
    ($label:literal) => {
        concat!(
            "leaq ",
            $label,
            "(%rip), %rdx\n",
            "movq %rsp, %rcx\n",
            ".byte 0x48, 0x0f, 0x35",
        )
    };
}

/// CPUID leaf `leaf` subleaf 0, then a 4-byte `out` of register `reg` to the port bound to
/// the operand named `port`. Clobbers RAX, RBX, RCX, RDX.
macro_rules! cpuid_out_asm {
    ($leaf:literal, $reg:literal, $port:literal) => {
        concat!(
            "movl $",
            $leaf,
            ", %eax\n",
            "xorl %ecx, %ecx\n",
            "cpuid\n",
            "movl %",
            $reg,
            ", %eax\n",
            "movw ${",
            $port,
            "}, %dx\n",
            "outl %eax, %dx",
        )
    };
}

/// The BSP software-enables its local APIC and sends INIT, then SIPI, to every other vCPU
/// (shorthand "all excluding self"), through the MMIO registers in xAPIC mode or the MSRs in
/// x2APIC mode (`IA32_APIC_BASE.EXTD`, set by the VMM when an APIC ID is above 254). At CPL 0.
/// Leaves R14D = 1 in x2APIC mode, 0 in xAPIC mode; clobbers RAX, RCX, RDX, RSI. `$p` makes
/// the local labels unique.
macro_rules! wake_all_aps_asm {
    ($p:literal) => {
        concat!(
            "movl ${apic_base_msr}, %ecx\n",
            "rdmsr\n",
            "xorl %r14d, %r14d\n",
            "testl ${apic_base_extd}, %eax\n",
            "jz .L",
            $p,
            "_wake_xapic\n",
            "movl $1, %r14d\n",
            "xorl %edx, %edx\n",
            "movl ${x2apic_svr}, %ecx\n",
            "movl ${svr_enable}, %eax\n",
            "wrmsr\n",
            "movl ${x2apic_icr}, %ecx\n",
            "movl ${icr_init_all}, %eax\n",
            "wrmsr\n",
            "movl ${icr_sipi_all}, %eax\n",
            "wrmsr\n",
            "jmp .L",
            $p,
            "_wake_done\n",
            ".L",
            $p,
            "_wake_xapic:\n",
            "movl ${svr}, %esi\n",
            "movl ${svr_enable}, (%rsi)\n",
            "movl ${icr_high}, %esi\n",
            "movl $0, (%rsi)\n",
            "movl ${icr_low}, %esi\n",
            "movl ${icr_init_all}, (%rsi)\n",
            "movl ${icr_sipi_all}, (%rsi)\n",
            ".L",
            $p,
            "_wake_done:",
        )
    };
}

/// `RBX` = `base + (RBX << shift)`: a per-vCPU address from an index in `EBX`.
macro_rules! per_cpu_addr_asm {
    ($shift:literal, $base:literal) => {
        concat!("shll ${", $shift, "}, %ebx\n", "addq ${", $base, "}, %rbx",)
    };
}

core::arch::global_asm!(
    // --- smp_counter --------------------------------------------------------------------
    // BSP and APs (through the loader's trampoline) enter at CPL 0: report leaf 0xB EDX and
    // leaf 0x1 EBX, the BSP wakes the APs, then everyone counts at CPL 3.
    ".code64",
    program_start_asm!("smp_counter"),
    "call .Lsmp_report",
    wake_all_aps_asm!("smp"),
    "jmp .Lsmp_to_user",
    program_entry_asm!("smp_counter", "ap"),
    "call .Lsmp_report",
    ".Lsmp_to_user:",
    to_cpl3_asm!(".Lsmp_loop"),
    ".Lsmp_loop:",
    "incq (%rbx)",
    "jmp .Lsmp_loop",
    // Reports leaf 0xB EDX and leaf 0x1 EBX; leaves RBX = this vCPU's counter address.
    ".Lsmp_report:",
    cpuid_out_asm!("0xb", "edx", "port_leafb"),
    cpuid_out_asm!("1", "ebx", "port_leaf1"),
    "shrl $24, %ebx",
    per_cpu_addr_asm!("counter_shift", "counters"),
    "ret",
    program_end_asm!("smp_counter"),
    // --- triple_fault: ud2 with no IDT ----------------------------------------------------
    program_start_asm!("triple_fault"),
    "ud2",
    program_end_asm!("triple_fault"),
    // --- shutdown_port: print a message on COM1, write the shutdown port, spin -------------
    program_start_asm!("shutdown_port"),
    "leaq .Lshutdown_msg(%rip), %rsi",
    "movw ${com1}, %dx",
    ".Lshutdown_print:",
    "movb (%rsi), %al",
    "testb %al, %al",
    "jz .Lshutdown_stop",
    "outb %al, %dx",
    "incq %rsi",
    "jmp .Lshutdown_print",
    ".Lshutdown_stop:",
    "movw ${shutdown_port}, %dx",
    "movl ${shutdown_value}, %eax",
    "outl %eax, %dx",
    ".Lshutdown_spin:",
    "jmp .Lshutdown_spin",
    ".Lshutdown_msg:",
    // Keep in sync with programs::SHUTDOWN_MESSAGE (a unit test checks).
    ".asciz \"shutting down\\n\"",
    program_end_asm!("shutdown_port"),
    // --- spin: pause; jmp, touching nothing -----------------------------------------------
    program_start_asm!("spin"),
    ".Lspin:",
    "pause",
    "jmp .Lspin",
    program_end_asm!("spin"),
    // --- pio_loop: one `out` to the bench port per iteration ------------------------------
    program_start_asm!("pio_loop"),
    "movw ${port_bench}, %dx",
    "xorl %eax, %eax",
    ".Lpio_loop:",
    "incl %eax",
    "outl %eax, %dx",
    "jmp .Lpio_loop",
    program_end_asm!("pio_loop"),
    // --- pio_count: `in`, add to a memory sum, count, `out` the count (CPL 3) ---------------
    // RSI = the state: +0 the sum of every value read, +8 the iteration count.
    program_start_asm!("pio_count"),
    "movw ${port_count}, %dx",
    "movl ${pio_count_state}, %esi",
    ".Lpio_count_loop:",
    "inl %dx, %eax",
    program_entry_asm!("pio_count", "after_in"),
    "addq %rax, (%rsi)",
    "incq 8(%rsi)",
    "movq 8(%rsi), %rax",
    "outl %eax, %dx",
    "jmp .Lpio_count_loop",
    program_end_asm!("pio_count"),
    // --- lapic_timer: arm the xAPIC timer (periodic), watch TMCCT reload (CPL 3) -----------
    // RDI = the state: +0 reloads seen, +8 the last TMCCT read, +16 TMCCT reads. R8D = the
    // previous TMCCT. Interrupts stay off (RFLAGS.IF = 0): the vector only pends in the IRR.
    program_start_asm!("lapic_timer"),
    "movl ${svr}, %esi",
    "movl ${svr_enable}, (%rsi)",
    "movl ${lapic_tdcr}, %esi",
    "movl ${tdcr_div1}, (%rsi)",
    "movl ${lapic_lvtt}, %esi",
    "movl ${lvtt_periodic}, (%rsi)",
    "movl ${lapic_tmict}, %esi",
    "movl ${timer_initial}, (%rsi)",
    "movl ${lapic_tmcct}, %esi",
    "movl ${timer_state}, %edi",
    "movl (%rsi), %r8d",
    ".Llapic_timer_loop:",
    "movl (%rsi), %eax",
    "movq %rax, 8(%rdi)",
    "incq 16(%rdi)",
    "cmpl %r8d, %eax",
    "movl %eax, %r8d",
    // Not above the previous read: still counting down.
    "jbe .Llapic_timer_loop",
    "incq (%rdi)",
    "jmp .Llapic_timer_loop",
    program_end_asm!("lapic_timer"),
    // --- the guest agent (see agent/mod.rs) -------------------------------------------------
    // Registers: RBX = this vCPU's progress counter, R12 = its slot (its x2APIC ID from CPUID
    // leaf 0xB, modulo the slots), R13 = (BSP) the last mailbox sequence handled, R14 = (BSP)
    // 1 in x2APIC mode.
    program_start_asm!("agent"),
    "call .Lagent_probe",
    wake_all_aps_asm!("agent"),
    "xorl %r13d, %r13d",
    // R15 counts down to the next look at the GED (ACPI hotplug): the first round looks.
    "movl $1, %r15d",
    // x2APIC mode: the ICR is an MSR, which only CPL 0 may write: the BSP stays there.
    "testl %r14d, %r14d",
    "jnz .Lagent_bsp_loop",
    to_cpl3_asm!(".Lagent_bsp_loop"),
    // The BSP's loop (CPL 3, or CPL 0 in x2APIC mode): count, every R15 rounds poll the GED
    // (no interrupts here: no IDT, and CPL 3), and carry out each new mailbox request.
    ".Lagent_bsp_loop:",
    "incq (%rbx)",
    "decl %r15d",
    "jz .Lagent_acpi_poll",
    ".Lagent_bsp_mailbox:",
    "movl {mb_seq}, %eax",
    "cmpl %eax, %r13d",
    "je .Lagent_bsp_loop",
    "movl %eax, %r13d",
    "movl {mb_cmd}, %ecx",
    "cmpl ${cmd_shutdown}, %ecx",
    "je .Lagent_shutdown",
    "cmpl ${cmd_wake}, %ecx",
    "je .Lagent_ipi",
    "cmpl ${cmd_park}, %ecx",
    "jne .Lagent_ack",
    // Wake and park: INIT to the APIC ID in the argument; a wake adds SIPI.
    ".Lagent_ipi:",
    "testl %r14d, %r14d",
    "jnz .Lagent_ipi_x2apic",
    "movl {mb_arg}, %eax",
    "shll $24, %eax",
    "movl ${icr_high}, %esi",
    "movl %eax, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init}, (%rsi)",
    "cmpl ${cmd_wake}, %ecx",
    "jne .Lagent_ack",
    "movl ${icr_sipi}, (%rsi)",
    "jmp .Lagent_ack",
    // x2APIC: one 64-bit ICR write each, the 32-bit destination in EDX.
    ".Lagent_ipi_x2apic:",
    "movl %ecx, %r8d",
    "movl {mb_arg}, %edx",
    "movl ${x2apic_icr}, %ecx",
    "movl ${icr_init}, %eax",
    "wrmsr",
    "cmpl ${cmd_wake}, %r8d",
    "jne .Lagent_ack",
    "movl ${icr_sipi}, %eax",
    "wrmsr",
    "jmp .Lagent_ack",
    ".Lagent_shutdown:",
    "movw ${shutdown_port}, %dx",
    "movl ${agent_shutdown_value}, %eax",
    "outl %eax, %dx",
    ".Lagent_ack:",
    "movl %r13d, %eax",
    "movw ${port_ack}, %dx",
    "outl %eax, %dx",
    "jmp .Lagent_bsp_loop",
    // ACPI hotplug, polled: the mailbox's poll interval (0: off, look again later); a GED
    // event clears what it saw (write 1 to clear) and scans the controller.
    ".Lagent_acpi_poll:",
    "movl {mb_acpi_poll}, %r15d",
    "testl %r15d, %r15d",
    "jnz .Lagent_acpi_on",
    "movl ${acpi_recheck}, %r15d",
    "jmp .Lagent_bsp_mailbox",
    ".Lagent_acpi_on:",
    "movl ${ged_base}, %esi",
    "movl (%rsi), %eax",
    "testl ${ged_cpu}, %eax",
    "jz .Lagent_bsp_mailbox",
    "movl %eax, (%rsi)",
    "call .Lagent_acpi_scan",
    "jmp .Lagent_bsp_mailbox",
    // The scan, as Linux's ACPI processor driver would act on the AML's notifications: for the
    // lowest CPU with an event (NEXT), select it and read STAT. Insert: look up its APIC ID in
    // the MADT by UID (= index), INIT + SIPI, acknowledge. Remove: INIT (park), acknowledge
    // and eject in one write. Until NEXT says none. Clobbers RAX, RCX, RDX, RSI, RDI, R9, R11.
    ".Lagent_acpi_scan:",
    "movl ${ctl_base}, %esi",
    "movl {reg_next}(%rsi), %eax",
    "cmpl ${next_none}, %eax",
    "je .Lagent_acpi_done",
    "movl %eax, {reg_sel}(%rsi)",
    "movl %eax, %r9d",
    "movzbl {reg_stat}(%rsi), %ecx",
    "testl ${stat_insert}, %ecx",
    "jnz .Lagent_acpi_insert",
    "testl ${stat_remove}, %ecx",
    "jnz .Lagent_acpi_remove",
    ".Lagent_acpi_done:",
    "ret",
    ".Lagent_acpi_insert:",
    "call .Lagent_madt_apic_id",
    "cmpl ${next_none}, %eax",
    // No MADT entry: acknowledged without a wake (the VMM sees the vCPU did not start).
    "je .Lagent_acpi_ack_insert",
    "movl ${cmd_wake}, %r11d",
    "call .Lagent_ipi_to",
    ".Lagent_acpi_ack_insert:",
    "movl ${ctl_base}, %esi",
    "movb ${cmd_ack_insert}, {reg_stat}(%rsi)",
    "jmp .Lagent_acpi_scan",
    ".Lagent_acpi_remove:",
    "call .Lagent_madt_apic_id",
    "cmpl ${next_none}, %eax",
    "je .Lagent_acpi_ack_remove",
    "movl ${cmd_park}, %r11d",
    "call .Lagent_ipi_to",
    "movl ${ctl_base}, %esi",
    "movb ${cmd_ack_remove_eject}, {reg_stat}(%rsi)",
    "jmp .Lagent_acpi_scan",
    // No MADT entry: acknowledged, not ejected (the VMM keeps the vCPU).
    ".Lagent_acpi_ack_remove:",
    "movl ${ctl_base}, %esi",
    "movb ${cmd_ack_remove}, {reg_stat}(%rsi)",
    "jmp .Lagent_acpi_scan",
    // EAX = the APIC ID of the MADT processor entry whose UID is R9D (type 0 or 9), or
    // 0xFFFF_FFFF. The MADT's address is in the mailbox. Clobbers RCX, RSI, RDI.
    ".Lagent_madt_apic_id:",
    "movl {mb_madt}, %esi",
    "testl %esi, %esi",
    "jz .Lagent_madt_none",
    "movl 4(%rsi), %edi",
    "addq %rsi, %rdi",
    "addq ${madt_header}, %rsi",
    ".Lagent_madt_next:",
    "cmpq %rdi, %rsi",
    "jae .Lagent_madt_none",
    "movzbl 1(%rsi), %ecx",
    "testl %ecx, %ecx",
    "jz .Lagent_madt_none",
    "movzbl (%rsi), %eax",
    "cmpl ${madt_lapic}, %eax",
    "je .Lagent_madt_lapic",
    "cmpl ${madt_x2apic}, %eax",
    "je .Lagent_madt_x2apic",
    ".Lagent_madt_skip:",
    "addq %rcx, %rsi",
    "jmp .Lagent_madt_next",
    ".Lagent_madt_lapic:",
    "movzbl 2(%rsi), %eax",
    "cmpl %r9d, %eax",
    "jne .Lagent_madt_skip",
    "movzbl 3(%rsi), %eax",
    "ret",
    ".Lagent_madt_x2apic:",
    "movl 12(%rsi), %eax",
    "cmpl %r9d, %eax",
    "jne .Lagent_madt_skip",
    "movl 4(%rsi), %eax",
    "ret",
    ".Lagent_madt_none:",
    "movl ${next_none}, %eax",
    "ret",
    // INIT (R11D = park) or INIT + SIPI (R11D = wake) to the APIC ID in EAX, through the MMIO
    // ICR (xAPIC) or the ICR MSR (x2APIC, R14D = 1). Clobbers RAX, RCX, RDX, RSI.
    ".Lagent_ipi_to:",
    "testl %r14d, %r14d",
    "jnz .Lagent_ipi_to_x2apic",
    "shll $24, %eax",
    "movl ${icr_high}, %esi",
    "movl %eax, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init}, (%rsi)",
    "cmpl ${cmd_wake}, %r11d",
    "jne .Lagent_ipi_to_done",
    "movl ${icr_sipi}, (%rsi)",
    "jmp .Lagent_ipi_to_done",
    ".Lagent_ipi_to_x2apic:",
    "movl %eax, %edx",
    "movl ${x2apic_icr}, %ecx",
    "movl ${icr_init}, %eax",
    "wrmsr",
    "cmpl ${cmd_wake}, %r11d",
    "jne .Lagent_ipi_to_done",
    "movl ${icr_sipi}, %eax",
    "wrmsr",
    ".Lagent_ipi_to_done:",
    "ret",
    // APs: probe, then count at CPL 3 (mode 0) or halt at CPL 0 with interrupts off (mode 1).
    program_entry_asm!("agent", "ap"),
    "call .Lagent_probe",
    "cmpl $0, {mb_mode}",
    "jne .Lagent_halt",
    to_cpl3_asm!(".Lagent_ap_loop"),
    ".Lagent_ap_loop:",
    "incq (%rbx)",
    "jmp .Lagent_ap_loop",
    ".Lagent_halt:",
    "cli",
    "hlt",
    "jmp .Lagent_halt",
    // Executes the query list into this vCPU's result table, reports the x2APIC ID (leaf 0xB
    // EDX) through the online port once the table is complete, and returns RBX = this
    // vCPU's progress counter. The table and counter are indexed by the x2APIC ID (all 32
    // bits, leaf 0xB EDX; leaf 1 EBX[31:24] has only the low 8) modulo the slots.
    ".Lagent_probe:",
    "movl $0xb, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "andl ${agent_slot_mask}, %edx",
    "movl %edx, %r12d",
    "movq %r12, %rdi",
    "shlq ${results_shift}, %rdi",
    "addq ${results}, %rdi",
    "movl ${queries}, %esi",
    "movl (%rsi), %r8d",
    "cmpl ${max_queries}, %r8d",
    "jbe .Lagent_count_ok",
    "movl ${max_queries}, %r8d",
    ".Lagent_count_ok:",
    "addq $8, %rsi",
    ".Lagent_next:",
    "testl %r8d, %r8d",
    "jz .Lagent_done",
    "movl (%rsi), %eax",
    "movl 4(%rsi), %ecx",
    "cpuid",
    "movl %eax, (%rdi)",
    "movl %ebx, 4(%rdi)",
    "movl %ecx, 8(%rdi)",
    "movl %edx, 12(%rdi)",
    "addq $8, %rsi",
    "addq $16, %rdi",
    "decl %r8d",
    "jmp .Lagent_next",
    ".Lagent_done:",
    cpuid_out_asm!("0xb", "edx", "port_online"),
    "movl %r12d, %ebx",
    per_cpu_addr_asm!("line_shift", "lines"),
    "ret",
    program_end_asm!("agent"),
    // Shared constants.
    svr = const SVR,
    svr_enable = const SVR_ENABLE,
    icr_high = const ICR_HIGH,
    icr_low = const ICR_LOW,
    icr_init_all = const ICR_INIT | ICR_ALL_BUT_SELF,
    icr_sipi_all = const ICR_SIPI | ICR_ALL_BUT_SELF,
    icr_init = const ICR_INIT,
    icr_sipi = const ICR_SIPI,
    apic_base_msr = const X2APIC_APIC_BASE_MSR,
    apic_base_extd = const APIC_BASE_EXTD,
    x2apic_svr = const X2APIC_SVR_MSR,
    x2apic_icr = const X2APIC_ICR_MSR,
    com1 = const ports::COM1,
    shutdown_port = const ports::SHUTDOWN,
    // smp_counter and shutdown_port.
    counter_shift = const COUNTER_STRIDE.trailing_zeros(),
    counters = const COUNTERS_ADDR,
    port_leaf1 = const ports::CPUID_LEAF1_EBX,
    port_leafb = const ports::CPUID_LEAFB_EDX,
    shutdown_value = const SHUTDOWN_VALUE,
    port_bench = const ports::BENCH,
    // pio_count and lapic_timer.
    port_count = const ports::COUNT,
    pio_count_state = const PIO_COUNT_ADDR,
    lapic_tdcr = const TDCR,
    tdcr_div1 = const TDCR_DIVIDE_BY_1,
    lapic_lvtt = const LVT_TIMER,
    lvtt_periodic = const LVT_TIMER_PERIODIC | TIMER_VECTOR,
    lapic_tmict = const TMICT,
    lapic_tmcct = const TMCCT,
    timer_initial = const TIMER_INITIAL_COUNT,
    timer_state = const LAPIC_TIMER_ADDR,
    // The agent.
    mb_seq = const MAILBOX_SEQ,
    mb_cmd = const MAILBOX_CMD,
    mb_arg = const MAILBOX_ARG,
    mb_mode = const MAILBOX_MODE,
    cmd_wake = const AgentCommand::Wake as u32,
    cmd_park = const AgentCommand::Park as u32,
    cmd_shutdown = const AgentCommand::Shutdown as u32,
    agent_shutdown_value = const AGENT_SHUTDOWN_VALUE,
    port_ack = const ports::ACK,
    port_online = const ports::ONLINE,
    results_shift = const RESULTS_SHIFT,
    results = const RESULTS_ADDR,
    queries = const QUERIES_ADDR,
    max_queries = const MAX_QUERIES,
    line_shift = const CPU_LINE_SHIFT,
    lines = const CPU_LINES_ADDR,
    agent_slot_mask = const APIC_ID_SLOTS - 1,
    // The agent's ACPI hotplug.
    mb_acpi_poll = const MAILBOX_ACPI_POLL,
    mb_madt = const MAILBOX_MADT,
    acpi_recheck = const ACPI_RECHECK_ROUNDS,
    ged_base = const GED_MMIO_BASE,
    ged_cpu = const ged_events::CPU_HOTPLUG,
    ctl_base = const CPU_HOTPLUG_MMIO_BASE,
    reg_sel = const regs::SEL,
    reg_stat = const regs::STAT,
    reg_next = const regs::NEXT,
    next_none = const regs::NEXT_NONE,
    stat_insert = const regs::status::INSERT,
    stat_remove = const regs::status::REMOVE,
    cmd_ack_insert = const regs::command::ACK_INSERT,
    cmd_ack_remove = const regs::command::ACK_REMOVE,
    cmd_ack_remove_eject = const regs::command::ACK_REMOVE | regs::command::EJECT,
    madt_header = const MADT_HEADER_LEN,
    madt_lapic = const madt_type::LOCAL_APIC,
    madt_x2apic = const madt_type::LOCAL_X2APIC,
    options(att_syntax),
);

/// The SMP counter's bytes and AP entry offset.
pub(super) fn smp_counter() -> (&'static [u8], u64) {
    asm_blob!(
        integration_guest_smp_counter_start,
        integration_guest_smp_counter_end;
        integration_guest_smp_counter_ap
    )
}

/// The triple-fault program's bytes.
pub(super) fn triple_fault() -> &'static [u8] {
    asm_blob!(
        integration_guest_triple_fault_start,
        integration_guest_triple_fault_end
    )
}

/// The shutdown-port program's bytes.
pub(super) fn shutdown_port() -> &'static [u8] {
    asm_blob!(
        integration_guest_shutdown_port_start,
        integration_guest_shutdown_port_end
    )
}

/// The spin program's bytes.
pub(super) fn spin() -> &'static [u8] {
    asm_blob!(integration_guest_spin_start, integration_guest_spin_end)
}

/// The port-I/O loop's bytes.
pub(super) fn pio_loop() -> &'static [u8] {
    asm_blob!(
        integration_guest_pio_loop_start,
        integration_guest_pio_loop_end
    )
}

/// The I/O-count program's bytes and the offset of the instruction after its `in`.
pub(super) fn pio_count() -> (&'static [u8], u64) {
    asm_blob!(
        integration_guest_pio_count_start,
        integration_guest_pio_count_end;
        integration_guest_pio_count_after_in
    )
}

/// The LAPIC-timer program's bytes.
pub(super) fn lapic_timer() -> &'static [u8] {
    asm_blob!(
        integration_guest_lapic_timer_start,
        integration_guest_lapic_timer_end
    )
}

/// The agent's bytes and AP entry offset.
pub(super) fn agent() -> (&'static [u8], u64) {
    asm_blob!(
        integration_guest_agent_start,
        integration_guest_agent_end;
        integration_guest_agent_ap
    )
}
