//! The ACPI CPU hotplug channel of an [`AgentVm`]: the VMM's hotplug controller and GED
//! ([`vmm_core::acpi_hotplug`]) on the VM's bus, the ACPI tables (MADT, and the DSDT with the
//! hotplug AML) in guest memory, and the manager's backend set to
//! [`AcpiBackend`](vmm_core::AcpiBackend), so that
//! [`vmm_core::VcpuManager::resize_vcpus`] works end to end through ACPI.
//!
//! # What the guest does
//!
//! The agent has no AML interpreter and takes no interrupts (no IDT; its BSP loops at CPL 3
//! in xAPIC mode, where PVM hosts run it natively), so it does by hand what the AML and
//! Linux's ACPI processor driver do together, and **polls** the GED instead of taking its
//! interrupt (the VMM still raises it, for guests that take it): every
//! [`AgentAcpiOptions::poll_interval`] rounds of its mailbox loop the BSP reads the GED's
//! event register (one MMIO exit); when the CPU hotplug bit is set it writes it back to clear
//! it and scans the controller:
//! - `NEXT` names the lowest CPU with an event; the BSP selects it and reads `STAT`;
//! - insert: it looks the CPU's APIC ID up in the MADT by processor UID (= index), as
//!   Linux reads it from `_MAT`, sends INIT and SIPI there, and acknowledges the insert;
//! - remove: it looks the APIC ID up the same way, sends INIT (the CPU parks in
//!   wait-for-SIPI, as an offlined CPU), then acknowledges the removal and ejects in one
//!   write (Linux: offline, then `_EJ0`);
//! - until `NEXT` says none.
//!
//! The new APs then run the agent's AP code: they execute CPUID and report their APIC ID
//! through the online port, as with upcall.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_core::acpi_hotplug::{self, AcpiHotplug, HotplugAml};
use vmm_core::arch::x86_64::acpi::{setup_acpi_with, AcpiCpu, AcpiTables};
use vmm_core::boot::boot_cpus;
use vmm_core::{HotplugBackend, InterruptMode};

use super::{shared_memory, AgentVm};
use crate::IntegrationError;

/// How many loop rounds the BSP waits before it looks at the poll setting again while ACPI
/// polling is off (a memory read only, no exit).
pub const ACPI_RECHECK_ROUNDS: u32 = 1 << 16;
/// The default poll interval at CPL 3 (xAPIC mode, native speed): about a millisecond of
/// loop rounds between two GED reads.
pub const POLL_ROUNDS_NATIVE: u32 = 1 << 20;
/// The default poll interval at CPL 0 (x2APIC mode: every instruction emulated on PVM
/// hosts, a few microseconds per round).
pub const POLL_ROUNDS_EMULATED: u32 = 1 << 8;

/// How long [`AgentAcpi::set_polling`] waits for the BSP.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// How to attach the ACPI channel.
#[derive(Clone, Debug)]
pub struct AgentAcpiOptions {
    /// How long the backend waits for the guest per request.
    pub guest_timeout: Duration,
    /// Every how many rounds of its loop the BSP polls the GED; `None`: by interrupt mode
    /// ([`POLL_ROUNDS_NATIVE`] or [`POLL_ROUNDS_EMULATED`]).
    pub poll_interval: Option<u32>,
    /// `false`: the guest never looks at the GED (a guest without ACPI hotplug support): every
    /// hot-add and hot-remove times out.
    pub guest_answers: bool,
}

impl Default for AgentAcpiOptions {
    fn default() -> Self {
        Self {
            guest_timeout: acpi_hotplug::DEFAULT_GUEST_TIMEOUT,
            poll_interval: None,
            guest_answers: true,
        }
    }
}

/// The ACPI channel of an [`AgentVm`].
#[derive(Debug)]
pub struct AgentAcpi {
    /// The controller, the GED and the backend (also set on the manager).
    pub hotplug: AcpiHotplug,
    /// The ACPI tables written into guest memory.
    pub tables: AcpiTables,
}

impl AgentAcpi {
    /// Turns the guest's GED polling on (`Some(interval)`) or off (`None`) and waits until
    /// the BSP went once more through its loop ([`GuestAgent::sync`](super::GuestAgent::sync)):
    /// a poll that read the old setting has ended by then. The VM must be running.
    pub fn set_polling(&self, vm: &AgentVm, interval: Option<u32>) -> Result<(), IntegrationError> {
        write_u32(vm, shared_memory::MAILBOX_ACPI_POLL, interval.unwrap_or(0))?;
        vm.agent.sync(SYNC_TIMEOUT)
    }
}

fn write_u32(vm: &AgentVm, addr: u64, value: u32) -> Result<(), IntegrationError> {
    vm.vm
        .memory()
        .write_obj(value, GuestAddress(addr))
        .map_err(|e| IntegrationError::Guest(format!("writing guest memory at {addr:#x}: {e}")))
}

/// Writes the ACPI tables (with the hotplug AML) for `vm`'s topology, registers the hotplug
/// controller and the GED (its interrupt an irqfd), sets the manager's backend to ACPI and
/// tells the agent where the MADT is and how often to poll. Works before or after
/// [`AgentVm::start`].
pub fn attach_acpi(
    vm: &mut AgentVm,
    options: AgentAcpiOptions,
) -> Result<AgentAcpi, IntegrationError> {
    let config = vm.vcpus.config().clone();
    let cpus: Vec<AcpiCpu> = boot_cpus(&config)?
        .iter()
        .map(|c| c.to_acpi_cpu())
        .collect();
    let layout = acpi_hotplug::AcpiHotplugLayout::default();
    let aml = HotplugAml::new(&cpus, layout).map_err(|e| IntegrationError::Guest(e.to_string()))?;
    let tables = setup_acpi_with(vm.vm.memory(), &cpus, &[&aml])?;
    let madt = tables
        .get("APIC")
        .map(|t| t.addr)
        .ok_or_else(|| IntegrationError::Guest("the ACPI tables have no MADT".into()))?;
    let hotplug = acpi_hotplug::attach(
        vm.vm.io_bus(),
        Some(vm.vm.fd()),
        cpus.iter().map(|c| c.apic_id).collect(),
        config.boot_vcpu_count as usize,
        options.guest_timeout,
    )
    .map_err(|e| IntegrationError::Guest(e.to_string()))?;
    hotplug.backend.sync_present(&vm.present_apic_ids());
    write_u32(
        vm,
        shared_memory::MAILBOX_MADT,
        u32::try_from(madt).map_err(|_| IntegrationError::Guest("MADT above 4 GiB".into()))?,
    )?;
    let interval = options
        .poll_interval
        .unwrap_or(match vm.vcpus.interrupt_mode() {
            InterruptMode::X2Apic => POLL_ROUNDS_EMULATED,
            _ => POLL_ROUNDS_NATIVE,
        })
        .max(1);
    let acpi = AgentAcpi { hotplug, tables };
    // The VM may not run yet: no sync here (the BSP reads the setting at each poll).
    let poll = if options.guest_answers { interval } else { 0 };
    write_u32(vm, shared_memory::MAILBOX_ACPI_POLL, poll)?;
    vm.vcpus
        .set_hotplug_backend(Arc::clone(&acpi.hotplug.backend) as Arc<dyn HotplugBackend>);
    Ok(acpi)
}
