//! The guest agent: a guest program that behaves like a small guest kernel for the vCPU
//! manager (it reads CPUID on every vCPU, wakes and parks APs through its local APIC, stops
//! the VM), and [`GuestAgent`], the VMM-side device it talks to. `vcpuctl demo`, `vcpuctl
//! cpuid`, the hotplug end-to-end tests and the hotplug benchmark run on it.
//!
//! # What the guest does
//!
//! Every vCPU, BSP and APs, enters at CPL 0 and executes CPUID for each (leaf, subleaf) of the
//! query list ([`GuestAgent::write_queries`], normally [`topology::hwloc::topology_queries`])
//! into its own result table ([`shared_memory::results_addr`]), then reports its x2APIC ID (CPUID
//! leaf 0xB EDX) through [`ports::ONLINE`]. Everything the VMM shows about a vCPU's CPUID is
//! read from these tables: what guest code read, not what the VMM configured.
//!
//! Then the BSP enables its LAPIC, wakes the boot APs with one broadcast INIT/SIPI and drops to
//! CPL 3, where it counts its progress counter ([`shared_memory::counter_addr`]) and polls the
//! mailbox ([`shared_memory::MAILBOX_ADDR`], in guest memory so that polling costs no exits). For
//! each new request it carries out the [`AgentCommand`] (INIT + SIPI to one APIC ID through
//! the ICR; INIT alone, which parks the AP in wait-for-SIPI as an offlined CPU; or a write to
//! the VM's shutdown port) and acknowledges the sequence number through [`ports::ACK`].
//!
//! The mode switch: the BSP reads `IA32_APIC_BASE` at CPL 0. In xAPIC mode it drives the MMIO
//! registers and polls at CPL 3. In x2APIC mode (the VMM's choice when an APIC ID is above
//! 254) it writes the x2APIC MSRs (the ICR, `0x830`, with the 32-bit destination in its high
//! half), which only CPL 0 may do, so its loop stays at CPL 0 (emulated on PVM hosts, a few
//! microseconds per poll). Every vCPU indexes its table and counter by its x2APIC ID (leaf
//! 0xB EDX) modulo [`shared_memory::APIC_ID_SLOTS`] (1024).
//!
//! An AP, once reported, either counts at CPL 3 ([`ApMode::Count`]) or halts at CPL 0 with
//! interrupts off ([`ApMode::Halt`]: it uses no host CPU, for benchmarks with many vCPUs).
//! Either way the VMM can pause it, and only INIT takes it out of its loop.
//!
//! For hotplug, [`attach_upcall`] puts the guest-side upcall server of `hotplug` (whose
//! callback is [`GuestAgent::cpu_callback`]) behind a vsock muxer stub and gives the VM's
//! manager a connected client, so that `resize_vcpus` runs end to end; [`attach_acpi`] does
//! the same over ACPI CPU hotplug, which the BSP drives itself from its loop (it polls the
//! GED: the agent takes no interrupts; see [`acpi`]);
//! [`crate::bench::hotplug::bench_resize`] times it.
//!
//! # Ports
//!
//! The agent device claims [`ports::AGENT_LEN`] ports from [`ports::AGENT_BASE`]:
//! [`ports::ONLINE`] and [`ports::ACK`]; every port is listed in [`crate::guest`].
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use integration::guest::agent::{AgentVm, AgentVmOptions};
//! use vmm_core::VcpuConfig;
//!
//! # fn main() -> Result<(), integration::IntegrationError> {
//! let kvm = kvm_ioctls::Kvm::new().map_err(vmm_core::VmError::KvmOpen)?;
//! let mut vm = AgentVm::create(kvm, VcpuConfig::with_counts(2, 4)?, AgentVmOptions::default())?;
//! vm.start(Duration::from_secs(30))?;
//! // Grow by hand (the hotplug path does the same through upcall):
//! vm.vcpus.create_vcpu(2)?;
//! vm.vcpus.start_vcpus(&[2])?;
//! vm.agent.online(2, Duration::from_secs(30))?;
//! assert_eq!(vm.agent.reported_apic_ids(), [0, 1, 2]);
//! vm.agent.request_shutdown()?;
//! # Ok(())
//! # }
//! ```

pub mod acpi;
mod device;
pub mod upcall;
mod vm;

pub use acpi::{attach_acpi, AgentAcpi, AgentAcpiOptions};
pub use device::{GuestAgent, OnlineReport};
pub use upcall::{attach_upcall, AgentUpcall, AgentUpcallOptions};
pub use vm::{AgentVm, AgentVmOptions};

use crate::loader::memory_map;
use serde::Serialize;

pub use super::ports;
use super::{asm, GuestCode};

/// The guest memory the agent program and the VMM-side [`GuestAgent`] share: the mailbox,
/// the CPUID query list, the per-CPU progress lines and result tables (all inside the first
/// [`MIN_MEMORY_SIZE`] bytes, above the loader's
/// [`PROGRAM_AREA_START`](crate::loader::memory_map::PROGRAM_AREA_START)).
pub mod shared_memory {
    /// The mailbox: the VMM's requests to the BSP.
    pub const MAILBOX_ADDR: u64 = 0x60_0000;
    /// `u32`: the request sequence number (written last).
    pub const MAILBOX_SEQ: u64 = MAILBOX_ADDR;
    /// `u32`: the [`super::AgentCommand`].
    pub const MAILBOX_CMD: u64 = MAILBOX_ADDR + 4;
    /// `u32`: the command's argument (an APIC ID).
    pub const MAILBOX_ARG: u64 = MAILBOX_ADDR + 8;
    /// `u32`: the [`super::ApMode`] (read by each AP once it reported).
    pub const MAILBOX_MODE: u64 = MAILBOX_ADDR + 12;
    /// `u32`: the MADT's guest address, where the BSP looks up the APIC ID of a CPU the ACPI
    /// hotplug controller reports (0: none).
    pub const MAILBOX_MADT: u64 = MAILBOX_ADDR + 16;
    /// `u32`: every how many loop rounds the BSP polls the GED (ACPI hotplug); 0: it does
    /// not (see [`super::acpi`]).
    pub const MAILBOX_ACPI_POLL: u64 = MAILBOX_ADDR + 20;
    /// The query list: `u32` count, `u32` 0, then `count` pairs of `u32` leaf, `u32` subleaf.
    pub const QUERIES_ADDR: u64 = 0x60_1000;
    /// The most queries the guest executes (one 4 KiB result table per vCPU).
    pub const MAX_QUERIES: u32 = 256;
    /// Per-APIC-ID lines of 64 bytes: the progress counter (`u64`) at offset 0.
    pub const CPU_LINES_ADDR: u64 = 0x61_0000;
    /// log2 of a line's size.
    pub const CPU_LINE_SHIFT: u32 = 6;
    /// Per-APIC-ID result tables: `count` x (EAX, EBX, ECX, EDX), `u32` each.
    pub const RESULTS_ADDR: u64 = 0x62_0000;
    /// log2 of the bytes between two result tables.
    pub const RESULTS_SHIFT: u32 = 12;
    /// The APIC IDs that have a line and a table: as many as the loader has slots (1024,
    /// x2APIC IDs included; a vCPU takes the slot of its x2APIC ID modulo this).
    pub const APIC_ID_SLOTS: u32 = crate::loader::memory_map::APIC_ID_SLOTS;
    /// The end of what the agent uses.
    pub const END: u64 = RESULTS_ADDR + ((APIC_ID_SLOTS as u64) << RESULTS_SHIFT);

    /// The progress counter of the vCPU with APIC ID `apic_id` (taken modulo
    /// [`APIC_ID_SLOTS`], as the guest indexes by CPUID leaf 0xB EDX).
    pub const fn counter_addr(apic_id: u32) -> u64 {
        CPU_LINES_ADDR + (((apic_id % APIC_ID_SLOTS) as u64) << CPU_LINE_SHIFT)
    }

    /// The result table of the vCPU with APIC ID `apic_id` (taken modulo [`APIC_ID_SLOTS`]).
    pub const fn results_addr(apic_id: u32) -> u64 {
        RESULTS_ADDR + (((apic_id % APIC_ID_SLOTS) as u64) << RESULTS_SHIFT)
    }
}

/// The shared memory's rules, checked when the crate compiles: the mailbox is above the program
/// area, the query list ends before the per-CPU lines, the lines end before the result tables,
/// a result table holds [`shared_memory::MAX_QUERIES`] results, and everything fits in
/// [`MIN_MEMORY_SIZE`].
const _: () = {
    assert!(shared_memory::MAILBOX_ADDR >= memory_map::PROGRAM_AREA_START + 0x10_0000);
    assert!(
        shared_memory::QUERIES_ADDR + 8 + 8 * (shared_memory::MAX_QUERIES as u64)
            <= shared_memory::CPU_LINES_ADDR
    );
    assert!(
        shared_memory::counter_addr(shared_memory::APIC_ID_SLOTS - 1) + 64
            <= shared_memory::RESULTS_ADDR
    );
    assert!(shared_memory::APIC_ID_SLOTS.is_power_of_two());
    assert!(16 * (shared_memory::MAX_QUERIES as u64) <= 1 << shared_memory::RESULTS_SHIFT);
    assert!(shared_memory::END <= MIN_MEMORY_SIZE);
};

/// The smallest guest memory the agent program fits in.
pub const MIN_MEMORY_SIZE: u64 = 16 << 20;

/// What the BSP writes to the VM's shutdown port for [`AgentCommand::Shutdown`].
pub const SHUTDOWN_VALUE: u32 = 0x5d;

/// A request the BSP carries out (the mailbox's command word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[repr(u32)]
pub enum AgentCommand {
    /// INIT then SIPI (vector [`memory_map::SIPI_VECTOR`]) to the APIC ID: the AP starts at
    /// the loader's trampoline, then the agent's AP entry.
    Wake = 1,
    /// INIT to the APIC ID: the AP stops and waits for SIPI (an offlined CPU).
    Park = 2,
    /// Write [`SHUTDOWN_VALUE`] to the VM's shutdown port.
    Shutdown = 3,
    /// Nothing but the acknowledgement: once it comes, the BSP has finished every round of
    /// its loop that began before the request (e.g. a GED poll with an older setting).
    Sync = 4,
}

/// How the VMM asks the agent guest to online and offline CPUs (`vcpuctl demo --hotplug`,
/// the hotplug benchmark).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HotplugChannel {
    /// Upcall: the VMM's requests over vsock to a patched guest kernel (Dragonball's way).
    #[default]
    Upcall,
    /// ACPI: the CPU hotplug controller, the GED and the DSDT's processor devices, which
    /// stock kernels understand.
    Acpi,
}

impl HotplugChannel {
    /// `upcall` or `ACPI`, for messages.
    pub fn label(self) -> &'static str {
        match self {
            HotplugChannel::Upcall => "upcall",
            HotplugChannel::Acpi => "ACPI",
        }
    }
}

/// What an AP does once it reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[repr(u32)]
pub enum ApMode {
    /// Count its progress counter at CPL 3 (native speed; competes for host CPUs).
    #[default]
    Count = 0,
    /// Halt at CPL 0 with interrupts off (no host CPU used; no progress shown).
    Halt = 1,
}

/// The agent program (BSP and AP entries at CPL 0; the loops run at CPL 3).
pub fn agent_program() -> GuestCode {
    GuestCode::kernel_smp("guest-agent", asm::agent())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::Privilege;

    #[test]
    fn program_entries_are_inside_the_code() {
        let p = agent_program();
        assert!(!p.code.is_empty());
        let ap = p.ap_entry.expect("AP entry");
        assert!(ap > 0 && ap < p.code.len() as u64);
        assert_eq!(p.privilege, Privilege::Kernel);
        let pio = crate::guest::pio_loop();
        assert!(!pio.code.is_empty());
    }

    #[test]
    fn shared_memory_fits_and_ports_do_not_overlap() {
        // The shared memory's own rules are checked at compile time (the `const _` after
        // `shared_memory`).
        assert_eq!(
            shared_memory::counter_addr(shared_memory::APIC_ID_SLOTS),
            shared_memory::counter_addr(0)
        );
        // The agent's ports are clear of the other guest programs' and the VM's.
        let agent = u32::from(ports::AGENT_BASE)..u32::from(ports::AGENT_BASE + ports::AGENT_LEN);
        for p in [
            ports::CPUID_LEAF1_EBX,
            ports::CPUID_LEAFB_EDX,
            vmm_core::devices::SHUTDOWN_PORT,
            vmm_core::devices::COM1_PORT,
        ] {
            assert!(!agent.contains(&u32::from(p)), "{p:#x}");
        }
        assert!(!agent.contains(&u32::from(ports::BENCH)));
    }
}
