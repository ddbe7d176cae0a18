//! Guest programs, assembled into `.rodata` and copied into guest memory by the tests.
//!
//! Long-mode programs run at CPL 3 (native speed on the PVM test hosts, see docs/host-notes.md) and
//! take their parameters in registers set by `TestVm::new_cpl3_vcpu`: `rdi` = a data address,
//! `rdx` = an I/O port, `rsi` = a program-specific value.

use std::arch::global_asm;

global_asm!(
    r#"
    .pushsection .rodata.vcpu_actor_test_guests,"a"

    /* Counts in rax and at [rdi]; every 2^20 counts writes the count to port dx. */
    .globl vat_counter_start
    .globl vat_counter_end
vat_counter_start:
    xor eax, eax
.Lcounter_loop:
    inc rax
    mov qword ptr [rdi], rax
    test eax, 0xFFFFF
    jnz .Lcounter_loop
    out dx, eax
    jmp .Lcounter_loop
vat_counter_end:

    /* One port write per iteration: counts at [rdi], then writes the low byte to port dx. */
    .globl vat_pio_start
    .globl vat_pio_end
vat_pio_start:
.Lpio_loop:
    inc qword ptr [rdi]
    mov rax, qword ptr [rdi]
    out dx, eax
    jmp .Lpio_loop
vat_pio_end:

    /* Counts in rbx; per iteration writes the count to port dx, then reads port dx into
       eax. */
    .globl vat_inout_start
    .globl vat_inout_after_out
    .globl vat_inout_after_in
    .globl vat_inout_end
vat_inout_start:
    xor ebx, ebx
.Linout_loop:
    inc rbx
    mov eax, ebx
    out dx, eax
vat_inout_after_out:
    in eax, dx
vat_inout_after_in:
    jmp .Linout_loop
vat_inout_end:

    /* No IDT: ud2 raises #UD, its delivery faults, then #DF faults: a triple fault. */
    .globl vat_fault_start
    .globl vat_fault_ud2
    .globl vat_fault_end
vat_fault_start:
    mov eax, 7
    out dx, eax
vat_fault_ud2:
    ud2
vat_fault_end:

    /* BSP: enables its LAPIC, sends INIT then SIPI (vector 8: code at 0x8000) to the APIC
       ID in esi[31:24], then reports 1 on port dx. */
    .globl vat_bsp_sipi_start
    .globl vat_bsp_sipi_end
vat_bsp_sipi_start:
    mov ebx, 0xFEE00000
    mov dword ptr [rbx + 0xF0], 0x1FF
    mov dword ptr [rbx + 0x310], esi
    mov dword ptr [rbx + 0x300], 0x4500
    mov dword ptr [rbx + 0x310], esi
    mov dword ptr [rbx + 0x300], 0x4608
    mov eax, 1
    out dx, eax
.Lbsp_spin:
    out dx, eax
    jmp .Lbsp_spin
vat_bsp_sipi_end:

    /* AP, real mode at 0x8000 (after SIPI vector 8): reports 0x5A on port 0x520, then
       halts with interrupts off (it blocks inside KVM_RUN). */
    .globl vat_ap_start
    .globl vat_ap_end
    .code16
vat_ap_start:
    mov dx, 0x520
    mov ax, 0x5A
    out dx, ax
    cli
.Lap_halt:
    hlt
    jmp .Lap_halt
    .code64
vat_ap_end:

    .popsection
"#
);

extern "C" {
    static vat_counter_start: u8;
    static vat_counter_end: u8;
    static vat_pio_start: u8;
    static vat_pio_end: u8;
    static vat_inout_start: u8;
    static vat_inout_after_out: u8;
    static vat_inout_after_in: u8;
    static vat_inout_end: u8;
    static vat_fault_start: u8;
    static vat_fault_ud2: u8;
    static vat_fault_end: u8;
    static vat_bsp_sipi_start: u8;
    static vat_bsp_sipi_end: u8;
    static vat_ap_start: u8;
    static vat_ap_end: u8;
}

/// The bytes between two symbols.
fn between(start: *const u8, end: *const u8) -> &'static [u8] {
    let len = (end as usize).saturating_sub(start as usize);
    // SAFETY: both symbols delimit one assembled block in .rodata of this binary.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// Spins at CPL 3 counting at `[rdi]`; reports the count on port `dx` every 2^20 counts.
pub fn counter() -> &'static [u8] {
    between(&raw const vat_counter_start, &raw const vat_counter_end)
}

/// One `out dx, eax` per loop (a port-I/O exit each), counting at `[rdi]`.
pub fn pio() -> &'static [u8] {
    between(&raw const vat_pio_start, &raw const vat_pio_end)
}

/// Counts in `rbx`; each loop writes the count to port `dx` (`out dx, eax`), then reads that
/// port into `eax` (`in eax, dx`).
pub fn inout() -> &'static [u8] {
    between(&raw const vat_inout_start, &raw const vat_inout_end)
}

/// Offsets inside [`inout`] of the instructions right after its `out` and its `in`.
pub fn inout_after_out_and_in() -> (u64, u64) {
    let start = &raw const vat_inout_start as usize;
    (
        (&raw const vat_inout_after_out as usize - start) as u64,
        (&raw const vat_inout_after_in as usize - start) as u64,
    )
}

/// Writes 7 to port `dx`, then triple-faults on a `ud2` (no IDT).
pub fn fault() -> &'static [u8] {
    between(&raw const vat_fault_start, &raw const vat_fault_end)
}

/// Offset of the faulting `ud2` inside [`fault`].
pub fn fault_ud2_offset() -> u64 {
    (&raw const vat_fault_ud2 as usize - &raw const vat_fault_start as usize) as u64
}

/// BSP program of the INIT/SIPI test.
pub fn bsp_sipi() -> &'static [u8] {
    between(&raw const vat_bsp_sipi_start, &raw const vat_bsp_sipi_end)
}

/// Real-mode AP program (load at 0x8000).
pub fn ap() -> &'static [u8] {
    between(&raw const vat_ap_start, &raw const vat_ap_end)
}
