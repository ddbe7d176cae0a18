//! The assembly of the guest programs. Each program sits in its own read-only section between
//! a start and an end symbol; code refers to its own labels only PC-relatively and to guest
//! addresses as constants, so the bytes run wherever the loader puts them.

use super::lapic::{
    ICR_ALL_BUT_SELF, ICR_HIGH, ICR_INIT, ICR_LOW, ICR_SIPI, SVR as LAPIC_SVR, SVR_ENABLE,
};
use super::{ports, COUNTERS_ADDR, COUNTER_STRIDE, SHUTDOWN_VALUE};

const COUNTER_SHIFT: u32 = COUNTER_STRIDE.trailing_zeros();

// The SMP counter. Entered at CPL 0 (BSP through the loader's registers, APs through its
// trampoline): CPUID must run at CPL 0 to be the vCPU's (at CPL 3 an AMD PVM host answers with
// its own). The reports and the wake-up are a few dozen emulated instructions; then `sysexit`
// to CPL 3, where the counting loop runs natively.
core::arch::global_asm!(
    ".pushsection .rodata.integration_guest_smp_counter,\"a\"",
    ".globl integration_guest_smp_counter_start",
    ".globl integration_guest_smp_counter_ap",
    ".globl integration_guest_smp_counter_end",
    ".code64",
    "integration_guest_smp_counter_start:",
    // BSP.
    "call .Lsmp_report",
    // The addresses go through a register: `movl $imm, disp32` would sign-extend 0xFEE0_0xxx.
    "movl ${svr}, %esi",
    "movl ${svr_enable}, (%rsi)",
    "movl ${icr_high}, %esi",
    "movl $0, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init}, (%rsi)",
    "movl ${icr_sipi}, (%rsi)",
    "jmp .Lsmp_to_user",
    // APs arrive here from the loader's trampoline, at CPL 0 with their own stack.
    "integration_guest_smp_counter_ap:",
    "call .Lsmp_report",
    ".Lsmp_to_user:",
    // sysexit (REX.W): CPL 3 at RDX with stack RCX; RBX (the counter) survives.
    "leaq .Lsmp_loop(%rip), %rdx",
    "movq %rsp, %rcx",
    ".byte 0x48, 0x0f, 0x35",
    ".Lsmp_loop:",
    "incq (%rbx)",
    "jmp .Lsmp_loop",
    // Reports leaf 0x1 EBX and leaf 0xB EDX; leaves RBX = this vCPU's counter address.
    ".Lsmp_report:",
    "movl $0xb, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "movl %edx, %eax",
    "movw ${port_leafb}, %dx",
    "outl %eax, %dx",
    "movl $1, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "movl %ebx, %eax",
    "movw ${port_leaf1}, %dx",
    "outl %eax, %dx",
    "shrl $24, %ebx",
    "shll ${counter_shift}, %ebx",
    "addq ${counters}, %rbx",
    "ret",
    "integration_guest_smp_counter_end:",
    ".popsection",
    svr = const LAPIC_SVR,
    svr_enable = const SVR_ENABLE,
    icr_high = const ICR_HIGH,
    icr_low = const ICR_LOW,
    icr_init = const ICR_INIT | ICR_ALL_BUT_SELF,
    icr_sipi = const ICR_SIPI | ICR_ALL_BUT_SELF,
    counter_shift = const COUNTER_SHIFT,
    counters = const COUNTERS_ADDR,
    port_leaf1 = const ports::CPUID_LEAF1_EBX,
    port_leafb = const ports::CPUID_LEAFB_EDX,
    options(att_syntax),
);

core::arch::global_asm!(
    ".pushsection .rodata.integration_guest_triple_fault,\"a\"",
    ".globl integration_guest_triple_fault_start",
    ".globl integration_guest_triple_fault_end",
    ".code64",
    "integration_guest_triple_fault_start:",
    "ud2",
    "integration_guest_triple_fault_end:",
    ".popsection",
    options(att_syntax),
);

core::arch::global_asm!(
    ".pushsection .rodata.integration_guest_shutdown_port,\"a\"",
    ".globl integration_guest_shutdown_port_start",
    ".globl integration_guest_shutdown_port_end",
    ".code64",
    "integration_guest_shutdown_port_start:",
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
    "movw ${port}, %dx",
    "movl ${value}, %eax",
    "outl %eax, %dx",
    ".Lshutdown_spin:",
    "jmp .Lshutdown_spin",
    ".Lshutdown_msg:",
    // Keep in sync with super::SHUTDOWN_MESSAGE (a unit test checks).
    ".asciz \"shutting down\\n\"",
    "integration_guest_shutdown_port_end:",
    ".popsection",
    com1 = const vmm_core::devices::COM1_PORT,
    port = const ports::SHUTDOWN,
    value = const SHUTDOWN_VALUE,
    options(att_syntax),
);

core::arch::global_asm!(
    ".pushsection .rodata.integration_guest_spin,\"a\"",
    ".globl integration_guest_spin_start",
    ".globl integration_guest_spin_end",
    ".code64",
    "integration_guest_spin_start:",
    ".Lspin:",
    "pause",
    "jmp .Lspin",
    "integration_guest_spin_end:",
    ".popsection",
    options(att_syntax),
);

extern "C" {
    static integration_guest_spin_start: u8;
    static integration_guest_spin_end: u8;
    static integration_guest_smp_counter_start: u8;
    static integration_guest_smp_counter_ap: u8;
    static integration_guest_smp_counter_end: u8;
    static integration_guest_triple_fault_start: u8;
    static integration_guest_triple_fault_end: u8;
    static integration_guest_shutdown_port_start: u8;
    static integration_guest_shutdown_port_end: u8;
}

/// The bytes between two symbols of one section.
///
/// # Safety
/// `start` and `end` must delimit initialized, never-written bytes of one section, in order.
unsafe fn bytes_between(start: *const u8, end: *const u8) -> &'static [u8] {
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts(start, end as usize - start as usize) }
}

/// The SMP counter program and its AP entry offset.
pub(super) fn smp_counter() -> (&'static [u8], u64) {
    // SAFETY: the symbols delimit the read-only section emitted above; `ap` lies inside it.
    unsafe {
        let start = std::ptr::addr_of!(integration_guest_smp_counter_start);
        let ap = std::ptr::addr_of!(integration_guest_smp_counter_ap);
        let end = std::ptr::addr_of!(integration_guest_smp_counter_end);
        (
            bytes_between(start, end),
            (ap as usize - start as usize) as u64,
        )
    }
}

/// The triple-fault program.
pub(super) fn triple_fault() -> &'static [u8] {
    // SAFETY: the symbols delimit the read-only section emitted above.
    unsafe {
        bytes_between(
            std::ptr::addr_of!(integration_guest_triple_fault_start),
            std::ptr::addr_of!(integration_guest_triple_fault_end),
        )
    }
}

/// The shutdown-port program.
pub(super) fn shutdown_port() -> &'static [u8] {
    // SAFETY: the symbols delimit the read-only section emitted above.
    unsafe {
        bytes_between(
            std::ptr::addr_of!(integration_guest_shutdown_port_start),
            std::ptr::addr_of!(integration_guest_shutdown_port_end),
        )
    }
}

/// The spin program.
pub(super) fn spin() -> &'static [u8] {
    // SAFETY: the symbols delimit the read-only section emitted above.
    unsafe {
        bytes_between(
            std::ptr::addr_of!(integration_guest_spin_start),
            std::ptr::addr_of!(integration_guest_spin_end),
        )
    }
}
