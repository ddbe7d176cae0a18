//! Guest programs for the end-to-end tests and benchmarks, written as assembly in source
//! (`global_asm!` into read-only data sections, never run by the host) and loaded with
//! [`vmm_core::loader`].
//!
//! # Port map (the one place that lists every port the guests and the VM use)
//!
//! | port | width | direction | who | meaning |
//! | --- | --- | --- | --- | --- |
//! | `0x3F8`-`0x3FF` | 1 | both | VM ([`vmm_core::devices::COM1_PORT`]) | 16550 console |
//! | `0x600` | any | write | VM ([`vmm_core::devices::SHUTDOWN_PORT`]) | stop the VM |
//! | `0x610` | 4 | write | [`ports::CPUID_LEAF1_EBX`] | the writer's CPUID leaf 0x1 EBX |
//! | `0x614` | 4 | write | [`ports::CPUID_LEAFB_EDX`] | the writer's CPUID leaf 0xB EDX (x2APIC ID) |
//!
//! Ports 0x20/0x21, 0xA0/0xA1 (PIC), 0x40-0x43 (PIT) and 0x4D0/0x4D1 are taken by KVM's
//! in-kernel devices and never reach the VMM.
//!
//! # Memory
//!
//! Programs load at [`vmm_core::loader::layout::DEFAULT_LOAD_ADDR`]; the per-vCPU counters
//! are at [`counter_addr`] (one 64-byte line per APIC ID from [`COUNTERS_ADDR`]).

mod asm;
mod report;
mod vm;

use vmm_core::loader::{layout, GuestProgram, Privilege};

pub use report::{CpuidReport, CpuidReports};
pub use vm::GuestVm;

/// Ports the guest programs write.
pub mod ports {
    /// The writer's CPUID leaf 0x1 EBX (APIC ID in bits 31:24), 4 bytes.
    pub const CPUID_LEAF1_EBX: u16 = 0x610;
    /// The writer's CPUID leaf 0xB subleaf 0 EDX (x2APIC ID), 4 bytes.
    pub const CPUID_LEAFB_EDX: u16 = 0x614;
    /// The first port of the report range.
    pub const REPORT_BASE: u16 = CPUID_LEAF1_EBX;
    /// The number of ports of the report range.
    pub const REPORT_LEN: u16 = 8;
    /// The VM's shutdown port.
    pub const SHUTDOWN: u16 = vmm_core::devices::SHUTDOWN_PORT;
}

/// The xAPIC registers and ICR values the guest programs use (MMIO at
/// [`layout::LAPIC_ADDR`], mapped for CPL 3 by the loader).
pub(crate) mod lapic {
    use vmm_core::loader::layout::{LAPIC_ADDR, SIPI_VECTOR};

    /// Spurious-interrupt vector register.
    pub const SVR: u64 = LAPIC_ADDR + 0xf0;
    /// Interrupt command register, low half (writing it sends the IPI).
    pub const ICR_LOW: u64 = LAPIC_ADDR + 0x300;
    /// Interrupt command register, high half (destination APIC ID in bits 31:24).
    pub const ICR_HIGH: u64 = LAPIC_ADDR + 0x310;
    /// SVR: APIC software-enabled, spurious vector 0xFF.
    pub const SVR_ENABLE: u32 = 0x1ff;
    /// ICR: level assert (bit 14).
    const ICR_ASSERT: u32 = 1 << 14;
    /// ICR: delivery mode INIT (101 in bits 10:8).
    pub const ICR_INIT: u32 = ICR_ASSERT | (0b101 << 8);
    /// ICR: delivery mode STARTUP (110) with the loader's SIPI vector.
    pub const ICR_SIPI: u32 = ICR_ASSERT | (0b110 << 8) | SIPI_VECTOR as u32;
    /// ICR destination shorthand "all excluding self" (bits 19:18 = 11).
    pub const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
}

/// Where the per-vCPU counters start.
pub const COUNTERS_ADDR: u64 = 0x30_0000;
/// Bytes between two counters (a cache line each, so vCPUs do not share lines).
pub const COUNTER_STRIDE: u64 = 64;

/// The guest address of the counter of the vCPU with APIC ID `apic_id` (IDs below 256).
pub const fn counter_addr(apic_id: u32) -> u64 {
    COUNTERS_ADDR + (apic_id as u64 % 256) * COUNTER_STRIDE
}

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
    /// The program at the default load address.
    pub fn program(&self) -> GuestProgram<'static> {
        GuestProgram {
            name: self.name,
            code: self.code,
            load_addr: layout::DEFAULT_LOAD_ADDR,
            bsp_entry: self.bsp_entry,
            ap_entry: self.ap_entry,
            privilege: self.privilege,
            data: Vec::new(),
        }
    }
}

/// Every vCPU reports its CPUID leaf 0x1 EBX and leaf 0xB EDX through
/// [`ports::CPUID_LEAF1_EBX`] / [`ports::CPUID_LEAFB_EDX`], then increments its counter
/// ([`counter_addr`] of its APIC ID) forever. The BSP enables its local APIC and wakes every
/// other vCPU with INIT and SIPI (vector [`layout::SIPI_VECTOR`], shorthand "all excluding
/// self") before it counts. Entered at CPL 0 (CPUID, reports and wake-up: a few dozen
/// instructions, emulated on PVM hosts); counts at CPL 3 (native).
pub fn smp_counter() -> GuestCode {
    let (code, ap) = asm::smp_counter();
    GuestCode {
        name: "smp_counter",
        code,
        bsp_entry: 0,
        ap_entry: Some(ap),
        privilege: Privilege::Kernel,
    }
}

/// Executes `ud2` at once at CPL 3: with no IDT the #UD triple-faults.
pub fn triple_fault() -> GuestCode {
    GuestCode {
        name: "triple_fault",
        code: asm::triple_fault(),
        bsp_entry: 0,
        ap_entry: None,
        privilege: Privilege::User,
    }
}

/// Prints [`SHUTDOWN_MESSAGE`] on COM1, writes [`SHUTDOWN_VALUE`] (4 bytes) to the VM's
/// shutdown port, then spins; at CPL 3.
pub fn shutdown_port() -> GuestCode {
    GuestCode {
        name: "shutdown_port",
        code: asm::shutdown_port(),
        bsp_entry: 0,
        ap_entry: None,
        privilege: Privilege::User,
    }
}

/// Spins at CPL 3 (`pause; jmp`) without touching memory or ports: any number of vCPUs can
/// run it from the same registers (the bare-KVM side of the benchmarks).
pub fn spin() -> GuestCode {
    GuestCode {
        name: "spin",
        code: asm::spin(),
        bsp_entry: 0,
        ap_entry: None,
        privilege: Privilege::User,
    }
}

/// What [`shutdown_port`] prints on the serial console first.
pub const SHUTDOWN_MESSAGE: &str = "shutting down\n";

/// The value [`shutdown_port`] writes.
pub const SHUTDOWN_VALUE: u32 = 42;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_non_empty_and_entries_inside() {
        for p in [smp_counter(), triple_fault(), shutdown_port(), spin()] {
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
