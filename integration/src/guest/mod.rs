//! The guest-program framework of the end-to-end tests, the benchmarks and `vcpuctl`: guest
//! programs written as assembly in source (`global_asm!` into read-only data sections, never
//! run by the host, sliced out with one `asm_blob!` macro), loaded with
//! [`crate::loader`], and the VMM-side devices and VMs that run them.
//!
//! - [`agent`]: the guest agent, a program that behaves like a small guest kernel (CPUID at
//!   CPL 0 on every vCPU, a mailbox polled by the BSP, INIT/SIPI wake and INIT park of APs,
//!   shutdown), its device [`agent::GuestAgent`], [`agent::AgentVm`] and the upcall channel.
//!   `vcpuctl` and the hotplug tests run on it.
//! - The small programs ([`smp_counter`], [`triple_fault`], [`shutdown_port`], [`spin`],
//!   [`pio_loop`], [`pio_count`], [`lapic_timer`]) as [`GuestCode`], the report device [`CpuidReports`] and [`GuestVm`]: the
//!   VM tests and the benchmarks run on them.
//! - [`lapic`]: the xAPIC registers every program drives.
//!
//! # Port map (the one place that lists every port the guests and the VM use)
//!
//! | port | width | direction | who | meaning |
//! | --- | --- | --- | --- | --- |
//! | `0x3F8`-`0x3FF` | 1 | both | VM ([`ports::COM1`]) | 16550 console |
//! | `0x600` | any | write | VM ([`ports::SHUTDOWN`]) | stop the VM |
//! | `0x610` | 4 | write | [`ports::CPUID_LEAF1_EBX`] | the writer's CPUID leaf 0x1 EBX |
//! | `0x614` | 4 | write | [`ports::CPUID_LEAFB_EDX`] | the writer's CPUID leaf 0xB EDX (x2APIC ID) |
//! | `0x620` | 4 | write | agent ([`ports::ONLINE`]) | the writer's CPUID leaf 0xB EDX; its result table is complete |
//! | `0x624` | 4 | write | agent ([`ports::ACK`]) | (BSP) the mailbox sequence number just carried out |
//! | `0x628` | 4 | write | [`ports::BENCH`] | the port-I/O benchmark loop ([`pio_loop`]) |
//! | `0x630` | 4 | both | [`ports::COUNT`] | [`pio_count`]: reads a value, writes its iteration count |
//!
//! Ports 0x20/0x21, 0xA0/0xA1 (PIC), 0x40-0x43 (PIT) and 0x4D0/0x4D1 are taken by KVM's
//! in-kernel devices and never reach the VMM.
//!
//! # Memory
//!
//! Programs load at [`crate::loader::memory_map::DEFAULT_LOAD_ADDR`]; the [`smp_counter`]
//! counters are at [`counter_addr`] (one 64-byte line per APIC ID from [`COUNTERS_ADDR`]),
//! [`pio_count`]'s state at [`PIO_COUNT_ADDR`], [`lapic_timer`]'s at [`LAPIC_TIMER_ADDR`]; the
//! agent's mailbox, query list, progress lines and result tables are in [`agent::shared_memory`].

pub mod agent;
mod asm;
pub mod lapic;
mod programs;
mod report;
mod vm;

pub(crate) use asm::asm_blob;
pub use programs::{
    counter_addr, lapic_timer, pio_count, pio_loop, shutdown_port, smp_counter, spin, triple_fault,
    GuestCode, COUNTERS_ADDR, COUNTER_STRIDE, LAPIC_TIMER_ADDR, PIO_COUNT_ADDR, SHUTDOWN_MESSAGE,
    SHUTDOWN_VALUE, TIMER_INITIAL_COUNT, TIMER_VECTOR,
};
pub use report::{CpuidReport, CpuidReports};
pub use vm::{build_with_program, GuestVm};

/// Every port the guest programs and the VM use (see the table above).
pub mod ports {
    /// The VM's serial console (COM1), 8 ports.
    pub const COM1: u16 = vmm_core::devices::COM1_PORT;
    /// The VM's shutdown port.
    pub const SHUTDOWN: u16 = vmm_core::devices::SHUTDOWN_PORT;
    /// The writer's CPUID leaf 0x1 EBX (APIC ID in bits 31:24), 4 bytes.
    pub const CPUID_LEAF1_EBX: u16 = 0x610;
    /// The writer's CPUID leaf 0xB subleaf 0 EDX (x2APIC ID), 4 bytes.
    pub const CPUID_LEAFB_EDX: u16 = 0x614;
    /// The first port of the report range ([`super::CpuidReports`]).
    pub const REPORT_BASE: u16 = CPUID_LEAF1_EBX;
    /// The number of ports of the report range.
    pub const REPORT_LEN: u16 = 8;
    /// The first port of the agent device ([`super::agent::GuestAgent`]).
    pub const AGENT_BASE: u16 = 0x620;
    /// The number of ports the agent device claims.
    pub const AGENT_LEN: u16 = 8;
    /// A vCPU's CPUID leaf 0xB EDX, written once its agent result table is complete.
    pub const ONLINE: u16 = AGENT_BASE;
    /// The mailbox sequence number the agent's BSP just carried out.
    pub const ACK: u16 = AGENT_BASE + 4;
    /// The port the [`super::pio_loop`] benchmark guest writes (claimed by no device).
    pub const BENCH: u16 = 0x628;
    /// The port [`super::pio_count`] reads and writes, 4 bytes (its device is the test's).
    pub const COUNT: u16 = 0x630;

    /// The ranges of the devices above, none overlapping (checked when the crate compiles).
    const RANGES: [(u16, u16); 6] = [
        (COM1, 8),
        (SHUTDOWN, 1),
        (REPORT_BASE, REPORT_LEN),
        (AGENT_BASE, AGENT_LEN),
        (BENCH, 4),
        (COUNT, 4),
    ];
    const _: () = {
        let mut i = 0;
        while i < RANGES.len() {
            let mut j = i + 1;
            while j < RANGES.len() {
                let (a, alen) = RANGES[i];
                let (b, blen) = RANGES[j];
                assert!(a + alen <= b || b + blen <= a, "two port ranges overlap");
                j += 1;
            }
            i += 1;
        }
    };
}
