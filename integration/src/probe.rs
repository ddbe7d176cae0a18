//! The CPUID probe guest: every vCPU executes CPUID for a list of (leaf, subleaf) queries the
//! VMM placed in guest memory and stores what it read in a per-vCPU table; the BSP then
//! serves a mailbox through which the VMM asks it to wake (INIT/SIPI) further APIC IDs, which
//! is how a hot-added vCPU comes online, as a guest kernel would do it on an upcall request.
//!
//! What `vcpuctl demo` and `vcpuctl cpuid` show is what guest code read here, never what the
//! VMM configured.
//!
//! # Guest memory
//!
//! | address | what |
//! | --- | --- |
//! | [`QUERIES_ADDR`] | `u32` count, `u32` 0, then `count` pairs of `u32` leaf, `u32` subleaf |
//! | [`results_addr`]`(apic_id)` | per APIC ID: `count` x (EAX, EBX, ECX, EDX), `u32` each |
//! | [`MAILBOX_ADDR`] | `u32` request sequence, `u32` APIC ID to wake, `u32` acknowledged sequence |
//! | [`crate::guest::counter_addr`] | per APIC ID progress counter (`u64`), as `smp_counter` |
//!
//! Each vCPU reports through the [`crate::guest::ports`] report ports after its table is
//! complete, so [`crate::guest::CpuidReports`] tells when the results can be read.

use std::time::{Duration, Instant};

use topology::hwloc::CpuidResult;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::loader::layout::{LAPIC_ADDR, SIPI_VECTOR};
use vmm_core::loader::Privilege;

use crate::guest::{ports, CpuidReports, GuestCode, COUNTERS_ADDR, COUNTER_STRIDE};
use crate::IntegrationError;

/// Where the VMM writes the query list.
pub const QUERIES_ADDR: u64 = 0x40_0000;
/// The most queries one run can ask (one 4 KiB result page per vCPU).
pub const MAX_QUERIES: usize = 256;
/// Where the per-vCPU result tables start.
pub const RESULTS_ADDR: u64 = 0x50_0000;
/// log2 of the bytes between two result tables.
const RESULTS_SHIFT: u32 = 12;
/// Where the BSP's wake-up mailbox is.
pub const MAILBOX_ADDR: u64 = 0x3f_0000;
const MAILBOX_SEQ: u64 = MAILBOX_ADDR;
const MAILBOX_APIC: u64 = MAILBOX_ADDR + 4;
const MAILBOX_ACK: u64 = MAILBOX_ADDR + 8;

/// The mailbox value that makes the BSP write the VM's shutdown port instead of waking a vCPU.
const SHUTDOWN_REQUEST: u32 = u32::MAX;

// The areas do not overlap: counters, mailbox, queries, result tables, in that order.
const _: () = {
    assert!(COUNTERS_ADDR + 256 * COUNTER_STRIDE <= MAILBOX_ADDR);
    assert!(MAILBOX_ADDR + 12 <= QUERIES_ADDR);
    assert!(QUERIES_ADDR + 8 + MAX_QUERIES as u64 * 8 <= RESULTS_ADDR);
    assert!(MAX_QUERIES as u64 * 16 <= 1 << RESULTS_SHIFT);
};

/// The guest address of the result table of the vCPU with APIC ID `apic_id` (below 256).
pub const fn results_addr(apic_id: u32) -> u64 {
    RESULTS_ADDR + ((apic_id as u64 % 256) << RESULTS_SHIFT)
}

const LAPIC_SVR: u64 = LAPIC_ADDR + 0xf0;
const LAPIC_ICR_LOW: u64 = LAPIC_ADDR + 0x300;
const LAPIC_ICR_HIGH: u64 = LAPIC_ADDR + 0x310;
/// SVR: APIC software-enabled, spurious vector 0xFF.
const SVR_ENABLE: u32 = 0x1ff;
/// ICR bits: level assert (14), delivery mode INIT (101) or STARTUP (110) in bits 10:8.
const ICR_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = ICR_ASSERT | (0b101 << 8);
const ICR_SIPI: u32 = ICR_ASSERT | (0b110 << 8) | SIPI_VECTOR as u32;
/// Shorthand "all excluding self" (bits 19:18 = 11), used once by the BSP at boot.
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
const COUNTER_SHIFT: u32 = COUNTER_STRIDE.trailing_zeros();

// Entered at CPL 0: on PVM hosts CPUID at CPL 3 answers with the outer host's values, so the
// queries run at CPL 0 (emulated, a few hundred instructions); then `sysexit` to CPL 3. The BSP
// wakes the boot APs with one broadcast INIT/SIPI, then loops at CPL 3 counting and watching the
// mailbox: a new sequence number makes it send INIT and SIPI to the APIC ID in the mailbox
// through the xAPIC ICR (the LAPIC page is mapped for CPL 3) and acknowledge the sequence.
core::arch::global_asm!(
    ".pushsection .rodata.integration_guest_cpuid_probe,\"a\"",
    ".globl integration_guest_cpuid_probe_start",
    ".globl integration_guest_cpuid_probe_ap",
    ".globl integration_guest_cpuid_probe_end",
    ".code64",
    "integration_guest_cpuid_probe_start:",
    "call .Lprobe_run",
    // LAPIC addresses go through a register: an absolute 0xFEE0_0xxx would sign-extend.
    "movl ${svr}, %esi",
    "movl ${svr_enable}, (%rsi)",
    "movl ${icr_high}, %esi",
    "movl $0, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init_all}, (%rsi)",
    "movl ${icr_sipi_all}, (%rsi)",
    "xorl %r13d, %r13d",
    "leaq .Lprobe_bsp_loop(%rip), %rdx",
    "movq %rsp, %rcx",
    ".byte 0x48, 0x0f, 0x35", // sysexit (REX.W)
    ".Lprobe_bsp_loop:",
    "incq (%rbx)",
    "movl {mb_seq}, %eax",
    "cmpl %eax, %r13d",
    "je .Lprobe_bsp_loop",
    "movl %eax, %r13d",
    "movl {mb_apic}, %eax",
    "cmpl ${shutdown_request}, %eax",
    "je .Lprobe_shutdown",
    "shll $24, %eax",
    "movl ${icr_high}, %esi",
    "movl %eax, (%rsi)",
    "movl ${icr_low}, %esi",
    "movl ${icr_init}, (%rsi)",
    "movl ${icr_sipi}, (%rsi)",
    "movl %r13d, {mb_ack}",
    "jmp .Lprobe_bsp_loop",
    ".Lprobe_shutdown:",
    "movl %r13d, {mb_ack}",
    "movw ${shutdown_port}, %dx",
    "outl %eax, %dx",
    "jmp .Lprobe_bsp_loop",
    // APs arrive here from the loader's trampoline, at CPL 0 with their own stack.
    "integration_guest_cpuid_probe_ap:",
    "call .Lprobe_run",
    "leaq .Lprobe_ap_loop(%rip), %rdx",
    "movq %rsp, %rcx",
    ".byte 0x48, 0x0f, 0x35",
    ".Lprobe_ap_loop:",
    "incq (%rbx)",
    "jmp .Lprobe_ap_loop",
    // Runs the queries into this vCPU's table, reports leaf 0xB EDX and leaf 0x1 EBX, and
    // returns RBX = this vCPU's counter address.
    ".Lprobe_run:",
    "movl $1, %eax",
    "xorl %ecx, %ecx",
    "cpuid",
    "shrl $24, %ebx",
    "movl %ebx, %r12d",
    "movq %r12, %rdi",
    "shlq ${results_shift}, %rdi",
    "addq ${results}, %rdi",
    "movq ${queries}, %rsi",
    "movl (%rsi), %r8d",
    "addq $8, %rsi",
    ".Lprobe_next:",
    "testl %r8d, %r8d",
    "jz .Lprobe_done",
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
    "jmp .Lprobe_next",
    ".Lprobe_done:",
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
    "movl %r12d, %ebx",
    "shll ${counter_shift}, %ebx",
    "addq ${counters}, %rbx",
    "ret",
    "integration_guest_cpuid_probe_end:",
    ".popsection",
    svr = const LAPIC_SVR,
    svr_enable = const SVR_ENABLE,
    icr_high = const LAPIC_ICR_HIGH,
    icr_low = const LAPIC_ICR_LOW,
    icr_init_all = const ICR_INIT | ICR_ALL_BUT_SELF,
    icr_sipi_all = const ICR_SIPI | ICR_ALL_BUT_SELF,
    icr_init = const ICR_INIT,
    icr_sipi = const ICR_SIPI,
    shutdown_request = const SHUTDOWN_REQUEST,
    shutdown_port = const ports::SHUTDOWN,
    mb_seq = const MAILBOX_SEQ,
    mb_apic = const MAILBOX_APIC,
    mb_ack = const MAILBOX_ACK,
    results_shift = const RESULTS_SHIFT,
    results = const RESULTS_ADDR,
    queries = const QUERIES_ADDR,
    counter_shift = const COUNTER_SHIFT,
    counters = const COUNTERS_ADDR,
    port_leaf1 = const ports::CPUID_LEAF1_EBX,
    port_leafb = const ports::CPUID_LEAFB_EDX,
    options(att_syntax),
);

extern "C" {
    static integration_guest_cpuid_probe_start: u8;
    static integration_guest_cpuid_probe_ap: u8;
    static integration_guest_cpuid_probe_end: u8;
}

/// The CPUID probe program (BSP and AP entries at CPL 0; the loops run at CPL 3).
pub fn cpuid_probe() -> GuestCode {
    // SAFETY: the symbols delimit the read-only section emitted above, `ap` inside it.
    let (code, ap) = unsafe {
        let start = std::ptr::addr_of!(integration_guest_cpuid_probe_start);
        let ap = std::ptr::addr_of!(integration_guest_cpuid_probe_ap);
        let end = std::ptr::addr_of!(integration_guest_cpuid_probe_end);
        (
            std::slice::from_raw_parts(start, end as usize - start as usize),
            (ap as usize - start as usize) as u64,
        )
    };
    GuestCode {
        name: "cpuid_probe",
        code,
        bsp_entry: 0,
        ap_entry: Some(ap),
        privilege: Privilege::Kernel,
    }
}

/// Writes the query list the probe executes. At most [`MAX_QUERIES`].
pub fn write_queries(
    mem: &GuestMemoryMmap,
    queries: &[(u32, u32)],
) -> Result<(), IntegrationError> {
    if queries.len() > MAX_QUERIES {
        return Err(IntegrationError::Guest(format!(
            "{} CPUID queries asked, the probe takes at most {MAX_QUERIES}",
            queries.len()
        )));
    }
    let mut bytes = Vec::with_capacity(8 + queries.len() * 8);
    bytes.extend_from_slice(&(queries.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    for (leaf, subleaf) in queries {
        bytes.extend_from_slice(&leaf.to_le_bytes());
        bytes.extend_from_slice(&subleaf.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(QUERIES_ADDR))
        .map_err(|e| IntegrationError::Guest(format!("writing the CPUID queries: {e}")))
}

/// Reads what the vCPU with APIC ID `apic_id` read for `queries` (call once its report is in).
pub fn read_results(
    mem: &GuestMemoryMmap,
    apic_id: u32,
    queries: &[(u32, u32)],
) -> Result<Vec<CpuidResult>, IntegrationError> {
    let mut raw = vec![0u8; queries.len() * 16];
    mem.read_slice(&mut raw, GuestAddress(results_addr(apic_id)))
        .map_err(|e| IntegrationError::Guest(format!("reading CPUID results: {e}")))?;
    let word = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Ok(queries
        .iter()
        .zip(raw.chunks_exact(16))
        .map(|(&(leaf, subleaf), r)| CpuidResult {
            leaf,
            subleaf,
            eax: word(r, 0),
            ebx: word(r, 4),
            ecx: word(r, 8),
            edx: word(r, 12),
        })
        .collect())
}

/// Posts `value` in the BSP's mailbox under a new sequence number; returns the number.
fn post(mem: &GuestMemoryMmap, value: u32) -> Result<u32, IntegrationError> {
    let seq = mem
        .read_obj::<u32>(GuestAddress(MAILBOX_SEQ))
        .unwrap_or(0)
        .wrapping_add(1);
    let write = |addr: u64, v: u32| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|e| IntegrationError::Guest(format!("writing the BSP's mailbox: {e}")))
    };
    // The value first: the BSP reads it after it sees the new sequence number.
    write(MAILBOX_APIC, value)?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    write(MAILBOX_SEQ, seq)?;
    Ok(seq)
}

/// Asks the probe's BSP, from guest code at CPL 3, to write the VM's shutdown port: a
/// guest-initiated stop that reaches the VMM through the exit event.
pub fn request_guest_shutdown(mem: &GuestMemoryMmap) -> Result<(), IntegrationError> {
    post(mem, SHUTDOWN_REQUEST).map(|_| ())
}

/// Asks the probe's BSP to wake the vCPU with APIC ID `apic_id` (INIT then SIPI), then waits
/// until that vCPU has reported through the report ports, or `timeout`.
pub fn wake_ap(
    mem: &GuestMemoryMmap,
    reports: &CpuidReports,
    apic_id: u32,
    timeout: Duration,
) -> Result<(), IntegrationError> {
    let read = |addr: u64| mem.read_obj::<u32>(GuestAddress(addr)).unwrap_or(0);
    let seq = post(mem, apic_id)?;
    let deadline = Instant::now() + timeout;
    loop {
        let reported = reports
            .reports()
            .iter()
            .any(|r| r.vcpu_id == apic_id && r.leafb_edx.is_some() && r.leaf1_ebx.is_some());
        if reported {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(IntegrationError::Guest(format!(
                "APIC ID {apic_id} did not report within {timeout:?} after the wake-up request \
                 (mailbox acknowledged: {})",
                read(MAILBOX_ACK) == seq
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_program_has_both_entries() {
        let p = cpuid_probe();
        assert!(!p.code.is_empty());
        let ap = p.ap_entry.expect("AP entry");
        assert!(ap > 0 && ap < p.code.len() as u64);
    }
}
