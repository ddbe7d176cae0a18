//! The small guest programs: [`smp_counter`], [`triple_fault`], [`shutdown_port`], [`spin`]
//! and [`pio_loop`] (the agent is [`super::agent`]). Their assembly is in `asm.rs`.

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
