//! The small guest programs: [`smp_counter`], [`triple_fault`], [`shutdown_port`], [`spin`],
//! [`pio_loop`], [`pio_count`] and [`lapic_timer`] (the agent is [`super::agent`]). Their
//! assembly is in `asm.rs`.

use crate::loader::{memory_map, GuestProgram, Privilege};

use super::asm;

/// Where the per-vCPU counters of [`smp_counter`] start.
pub const COUNTERS_ADDR: u64 = 0x30_0000;
/// Bytes between two counters (a cache line each, so vCPUs do not share lines).
pub const COUNTER_STRIDE: u64 = 64;

/// The guest address of the [`smp_counter`] counter of the vCPU with APIC ID `apic_id`
/// (taken modulo 256, as the guest indexes by CPUID leaf 0x1 EBX\[31:24\]).
pub const fn counter_addr(apic_id: u32) -> u64 {
    COUNTERS_ADDR + (apic_id as u64 % 256) * COUNTER_STRIDE
}

/// What [`shutdown_port`] prints on the serial console first.
pub const SHUTDOWN_MESSAGE: &str = "shutting down\n";

/// The value [`shutdown_port`] writes.
pub const SHUTDOWN_VALUE: u32 = 42;

/// Where [`pio_count`] keeps its state: the sum of every value read (u64), then the
/// iteration count (u64) at `+ 8`.
pub const PIO_COUNT_ADDR: u64 = 0x31_0000;

/// Where [`lapic_timer`] keeps its state: reloads of the timer seen (u64), the last current
/// count read (u64) at `+ 8`, the reads (u64) at `+ 16`.
pub const LAPIC_TIMER_ADDR: u64 = 0x31_1000;
/// The vector [`lapic_timer`] puts in the LVT timer register (interrupts stay off: it only
/// pends in the IRR).
pub const TIMER_VECTOR: u32 = 0x40;
/// The initial count [`lapic_timer`] arms the timer with (divide by 1: at KVM's 1 GHz LAPIC
/// bus clock, a period of 2 ms).
pub const TIMER_INITIAL_COUNT: u32 = 2_000_000;

/// A guest program's code and entry points.
#[derive(Clone, Copy, Debug)]
pub struct GuestCode {
    /// Name, for messages.
    pub name: &'static str,
    /// The machine code (position-independent).
    pub code: &'static [u8],
    /// BSP entry offset.
    pub bsp_entry: u64,
    /// AP entry offset, for programs that start APs.
    pub ap_entry: Option<u64>,
    /// The privilege level of the entries.
    pub privilege: Privilege,
}

impl GuestCode {
    /// A CPL-3 program entered at its first byte, with no AP code.
    const fn user(name: &'static str, code: &'static [u8]) -> Self {
        Self {
            name,
            code,
            bsp_entry: 0,
            ap_entry: None,
            privilege: Privilege::User,
        }
    }

    /// A CPL-0 program whose BSP enters at its first byte and whose APs enter at `ap_entry`.
    pub(super) const fn kernel_smp(
        name: &'static str,
        (code, ap_entry): (&'static [u8], u64),
    ) -> Self {
        Self {
            name,
            code,
            bsp_entry: 0,
            ap_entry: Some(ap_entry),
            privilege: Privilege::Kernel,
        }
    }

    /// The program at the default load address.
    pub fn program(&self) -> GuestProgram<'static> {
        GuestProgram {
            name: self.name,
            code: self.code,
            load_addr: memory_map::DEFAULT_LOAD_ADDR,
            bsp_entry: self.bsp_entry,
            ap_entry: self.ap_entry,
            privilege: self.privilege,
            data: Vec::new(),
        }
    }
}

/// Every vCPU reports its CPUID leaf 0x1 EBX and leaf 0xB EDX through
/// [`super::ports::CPUID_LEAF1_EBX`] / [`super::ports::CPUID_LEAFB_EDX`], then increments its
/// counter ([`counter_addr`] of its APIC ID) forever. The BSP enables its local APIC and wakes
/// every other vCPU with INIT and SIPI (vector [`memory_map::SIPI_VECTOR`], shorthand "all
/// excluding self") before it counts. Entered at CPL 0 (CPUID, reports and wake-up: a few
/// dozen instructions, emulated on PVM hosts); counts at CPL 3 (native).
pub fn smp_counter() -> GuestCode {
    GuestCode::kernel_smp("smp_counter", asm::smp_counter())
}

/// Executes `ud2` at once at CPL 3: with no IDT the #UD triple-faults.
pub fn triple_fault() -> GuestCode {
    GuestCode::user("triple_fault", asm::triple_fault())
}

/// Prints [`SHUTDOWN_MESSAGE`] on COM1, writes [`SHUTDOWN_VALUE`] (4 bytes) to the VM's
/// shutdown port, then spins; at CPL 3.
pub fn shutdown_port() -> GuestCode {
    GuestCode::user("shutdown_port", asm::shutdown_port())
}

/// Spins at CPL 3 (`pause; jmp`) without touching memory or ports: any number of vCPUs can
/// run it from the same registers (the bare-KVM side of the benchmarks).
pub fn spin() -> GuestCode {
    GuestCode::user("spin", asm::spin())
}

/// A CPL-3 loop doing one 4-byte `out` to [`super::ports::BENCH`] per iteration, using no
/// memory, so that any number of vCPUs can run it from the same registers (the exit-path
/// benchmark).
pub fn pio_loop() -> GuestCode {
    GuestCode::user("pio-loop", asm::pio_loop())
}

/// A CPL-3 loop on one vCPU: a 4-byte `in` from [`super::ports::COUNT`], the value added to
/// the sum at [`PIO_COUNT_ADDR`], the iteration count at `PIO_COUNT_ADDR + 8` incremented,
/// then a 4-byte `out` of that count to the same port. Every `in` and `out` shows in guest
/// memory, so a snapshot test can check that an instruction ran exactly once. The second
/// value is the offset of the instruction after the `in`.
pub fn pio_count() -> (GuestCode, u64) {
    let (code, after_in) = asm::pio_count();
    (GuestCode::user("pio-count", code), after_in)
}

/// A CPL-3 program on one vCPU that arms its local APIC timer through the xAPIC page:
/// software-enables the APIC, divide by 1, LVT timer periodic with [`TIMER_VECTOR`], initial
/// count [`TIMER_INITIAL_COUNT`]; then reads the current count forever, counting the reloads
/// (a read above the previous one) at [`LAPIC_TIMER_ADDR`]. Interrupts stay off.
pub fn lapic_timer() -> GuestCode {
    GuestCode::user("lapic-timer", asm::lapic_timer())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_non_empty_and_entries_inside() {
        for p in [
            smp_counter(),
            triple_fault(),
            shutdown_port(),
            spin(),
            pio_loop(),
            pio_count().0,
            lapic_timer(),
        ] {
            assert!(!p.code.is_empty(), "{}", p.name);
            assert!(p.bsp_entry < p.code.len() as u64, "{}", p.name);
            if let Some(ap) = p.ap_entry {
                assert!(ap < p.code.len() as u64, "{}", p.name);
            }
        }
        // ud2
        assert_eq!(triple_fault().code, [0x0f, 0x0b]);
    }

    #[test]
    fn shutdown_program_carries_its_message() {
        let code = shutdown_port().code;
        let mut msg = SHUTDOWN_MESSAGE.as_bytes().to_vec();
        msg.push(0);
        assert!(code.ends_with(&msg), "{code:x?}");
    }
}
