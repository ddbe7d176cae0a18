//! The agent guest program's assembly. It sits in its own read-only section between a start
//! and an end symbol; code refers to its own labels only PC-relatively and to guest addresses
//! as constants, so the bytes run wherever the loader puts them.
//!
//! Register use: `RBX` = this vCPU's progress counter, `R12` = its APIC ID (from CPUID),
//! `R13` = (BSP) the last mailbox sequence handled.

use super::layout::{
    CPU_LINES_ADDR, CPU_LINE_SHIFT, MAILBOX_ARG, MAILBOX_CMD, MAILBOX_MODE, MAILBOX_SEQ,
    MAX_QUERIES, QUERIES_ADDR, RESULTS_ADDR, RESULTS_SHIFT,
};
use super::{ports, AgentCommand, SHUTDOWN_VALUE};
use crate::guest::lapic::{
    ICR_ALL_BUT_SELF, ICR_HIGH as LAPIC_ICR_HIGH, ICR_INIT, ICR_LOW as LAPIC_ICR_LOW, ICR_SIPI,
    SVR as LAPIC_SVR, SVR_ENABLE,
};

// Entered at CPL 0, the BSP through the loader's registers and the APs through its
// trampoline. CPUID runs at CPL 0 (on PVM hosts with AMD CPUs, CPUID at CPL 3 returns the
// host's values); the query loop is a few hundred emulated instructions. Then:
// - the BSP enables its LAPIC, wakes the boot APs with one broadcast INIT/SIPI and drops to
//   CPL 3 (`sysexit`), where it counts and polls the mailbox: a new sequence number makes it
//   carry out the command (INIT/SIPI or INIT to one APIC ID through the ICR, or a write to the
//   shutdown port) and acknowledge the sequence through the ack port;
// - an AP either drops to CPL 3 and counts (mode 0) or halts at CPL 0 with interrupts off
//   (mode 1: it uses no host CPU and leaves only by INIT). Both stay pausable: the VMM kicks
//   the vCPU thread out of KVM_RUN whatever the guest does.
core::arch::global_asm!(
    ".pushsection .rodata.integration_agent,\"a\"",
    ".globl integration_agent_start",
    ".globl integration_agent_ap",
    ".globl integration_agent_end",
    ".code64",
    "integration_agent_start:",
    "call .Lagent_probe",
    // LAPIC addresses go through a register: an absolute 0xFEE0_0xxx would sign-extend.
    "movl ${svr}, %esi",
    "movl ${svr_enable}, (%rsi)",
    "movl ${icr_high}, %esi",
    "movl $0, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init_all}, (%rsi)",
    "movl ${icr_sipi_all}, (%rsi)",
    "xorl %r13d, %r13d",
    "leaq .Lagent_bsp_loop(%rip), %rdx",
    "movq %rsp, %rcx",
    ".byte 0x48, 0x0f, 0x35", // sysexit (REX.W): CPL 3 at RDX, stack RCX
    // The BSP's CPL-3 loop.
    ".Lagent_bsp_loop:",
    "incq (%rbx)",
    "movl {mb_seq}, %eax",
    "cmpl %eax, %r13d",
    "je .Lagent_bsp_loop",
    "movl %eax, %r13d",
    "movl {mb_cmd}, %ecx",
    "movl {mb_arg}, %eax",
    "shll $24, %eax",
    "movl ${icr_high}, %esi",
    "cmpl ${cmd_wake}, %ecx",
    "je .Lagent_wake",
    "cmpl ${cmd_park}, %ecx",
    "je .Lagent_park",
    "cmpl ${cmd_shutdown}, %ecx",
    "je .Lagent_shutdown",
    "jmp .Lagent_ack",
    ".Lagent_wake:",
    "movl %eax, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init}, (%rsi)",
    "movl ${icr_sipi}, (%rsi)",
    "jmp .Lagent_ack",
    ".Lagent_park:",
    "movl %eax, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init}, (%rsi)",
    "jmp .Lagent_ack",
    ".Lagent_shutdown:",
    "movw ${shutdown_port}, %dx",
    "movl ${shutdown_value}, %eax",
    "outl %eax, %dx",
    ".Lagent_ack:",
    "movl %r13d, %eax",
    "movw ${port_ack}, %dx",
    "outl %eax, %dx",
    "jmp .Lagent_bsp_loop",
    // APs arrive here from the loader's trampoline, at CPL 0 with their own stack.
    "integration_agent_ap:",
    "call .Lagent_probe",
    "cmpl $0, {mb_mode}",
    "jne .Lagent_halt",
    "leaq .Lagent_ap_loop(%rip), %rdx",
    "movq %rsp, %rcx",
    ".byte 0x48, 0x0f, 0x35",
    ".Lagent_ap_loop:",
    "incq (%rbx)",
    "jmp .Lagent_ap_loop",
    ".Lagent_halt:",
    "cli",
    "hlt",
    "jmp .Lagent_halt",
    // Executes the query list into this vCPU's result table, reports the x2APIC ID (leaf 0xB
    // EDX) through the online port once the table is complete, and returns RBX = this
    // vCPU's progress counter. The table and counter are indexed by leaf 0x1 EBX[31:24].
    ".Lagent_probe:",
    "movl $1, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "shrl $24, %ebx",
    "movl %ebx, %r12d",
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
    "movl $0xb, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "movl %edx, %eax",
    "movw ${port_online}, %dx",
    "outl %eax, %dx",
    "movl %r12d, %ebx",
    "shll ${line_shift}, %ebx",
    "addq ${lines}, %rbx",
    "ret",
    "integration_agent_end:",
    ".popsection",
    svr = const LAPIC_SVR,
    svr_enable = const SVR_ENABLE,
    icr_high = const LAPIC_ICR_HIGH,
    icr_low = const LAPIC_ICR_LOW,
    icr_init_all = const ICR_INIT | ICR_ALL_BUT_SELF,
    icr_sipi_all = const ICR_SIPI | ICR_ALL_BUT_SELF,
    icr_init = const ICR_INIT,
    icr_sipi = const ICR_SIPI,
    mb_seq = const MAILBOX_SEQ,
    mb_cmd = const MAILBOX_CMD,
    mb_arg = const MAILBOX_ARG,
    mb_mode = const MAILBOX_MODE,
    cmd_wake = const AgentCommand::Wake as u32,
    cmd_park = const AgentCommand::Park as u32,
    cmd_shutdown = const AgentCommand::Shutdown as u32,
    shutdown_port = const vmm_core::devices::SHUTDOWN_PORT,
    shutdown_value = const SHUTDOWN_VALUE,
    port_ack = const ports::ACK,
    port_online = const ports::ONLINE,
    results_shift = const RESULTS_SHIFT,
    results = const RESULTS_ADDR,
    queries = const QUERIES_ADDR,
    max_queries = const MAX_QUERIES,
    line_shift = const CPU_LINE_SHIFT,
    lines = const CPU_LINES_ADDR,
    options(att_syntax),
);

// A CPL-3 loop doing one `out` to the bench port per iteration (the exit-path benchmark).
core::arch::global_asm!(
    ".pushsection .rodata.integration_agent_pio_loop,\"a\"",
    ".globl integration_agent_pio_loop_start",
    ".globl integration_agent_pio_loop_end",
    ".code64",
    "integration_agent_pio_loop_start:",
    "movw ${port}, %dx",
    "xorl %eax, %eax",
    ".Lagent_pio:",
    "incl %eax",
    "outl %eax, %dx",
    "jmp .Lagent_pio",
    "integration_agent_pio_loop_end:",
    ".popsection",
    port = const ports::BENCH,
    options(att_syntax),
);

extern "C" {
    static integration_agent_start: u8;
    static integration_agent_ap: u8;
    static integration_agent_end: u8;
    static integration_agent_pio_loop_start: u8;
    static integration_agent_pio_loop_end: u8;
}

/// The agent program's bytes and its AP entry offset.
pub(super) fn agent() -> (&'static [u8], u64) {
    // SAFETY: the symbols delimit the initialized, never-written read-only section emitted
    // above, in order; `ap` lies inside it.
    unsafe {
        let start = std::ptr::addr_of!(integration_agent_start);
        let ap = std::ptr::addr_of!(integration_agent_ap);
        let end = std::ptr::addr_of!(integration_agent_end);
        (
            std::slice::from_raw_parts(start, end as usize - start as usize),
            (ap as usize - start as usize) as u64,
        )
    }
}

/// The port-I/O loop's bytes.
pub(super) fn pio_loop() -> &'static [u8] {
    // SAFETY: as for `agent`.
    unsafe {
        let start = std::ptr::addr_of!(integration_agent_pio_loop_start);
        let end = std::ptr::addr_of!(integration_agent_pio_loop_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}
