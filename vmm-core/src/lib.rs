//! The VM and its vCPU manager, from configuration to a clean stop.
//!
//! This crate owns:
//! - [`VcpuConfig`] and its validation against this host's KVM ([`KvmLimits`]), before any KVM
//!   object exists;
//! - [`Vm`]: a KVM VM with in-kernel irqchip and PIT, guest memory (`GuestMemoryMmap`), the
//!   port-I/O/MMIO [`IoBus`] (the vCPU actors' exit handler), a 16550 console and the
//!   shutdown port ([`devices`]);
//! - [`VcpuManager`]: creates the vCPUs (KVM vCPU id = the topology's APIC ID), configures
//!   them (CPUID from `topology` + `vpmu`, then the x86 setup of [`arch`]; BSP registers
//!   through a [`BootEntry`]), starts, pauses, resumes and exits them, and turns a vCPU's
//!   `waiting_exit` into a stop of the whole VM ([`exit`]);
//! - the manager's state machine ([`state`]: created, running, paused, stopping, stopped, and
//!   a resize in flight);
//! - vCPU hot-add and hot-remove ([`resize`]: [`VcpuManager::resize_vcpus`],
//!   [`VcpuManager::resize_shared`], which does not hold the manager during the guest round
//!   trip, and [`AsyncResizer`] for a background resize waited on with a timeout), through a
//!   [`HotplugBackend`] ([`hotplug_backend`]: upcall, or ACPI CPU hotplug for stock guest
//!   kernels, [`acpi_hotplug`]: the hotplug controller, the GED, the DSDT objects);
//! - the vPMU KVM actions ([`pmu`]);
//! - the x86 setup ([`arch::x86_64`]): memory layout, CPUID, MSRs, LAPIC, FPU, GDT, page
//!   tables, long-mode registers, MP table, e820;
//! - Linux boot ([`boot`]), a [`BootEntry`] built on [`arch`];
//! - snapshots ([`snapshot`]): the files that hold a paused VM's vCPU and VM state (saved and
//!   restored by [`arch::x86_64::state`] and [`arch::x86_64::vm_state`]) and guest memory.
//!
//! Guest software other than Linux (the small test programs of the `integration` crate) is
//! loaded outside this crate, through its own [`BootEntry`].
//!
//! Each operation has its own error enum ([`ConfigError`], [`VmError`], [`VcpuSetupError`],
//! [`VcpuControlError`], [`BootError`], [`ResizeError`], ...; see [`error`]); [`VmmError`]
//! wraps them all for code that spans several. The types of the `topology`, `vpmu`,
//! `vcpu-actor` and `hotplug` crates that this API uses are re-exported here (e.g.
//! [`SmpConfig`], [`VpmuFeatureLevel`], [`VcpuState`]), so an embedder needs only this crate
//! and `kvm-ioctls`.
//!
//! # Example
//!
//! A [`BootEntry`] that starts the BSP in real mode at `0x1000`, where it writes to the
//! shutdown port, which stops the VM:
//!
//! ```no_run
//! use std::sync::Arc;
//! use kvm_ioctls::VcpuFd;
//! use vm_memory::GuestMemoryMmap;
//! use vmm_core::error::KvmOp;
//! use vmm_core::{
//!     build_vm, BootEntry, SmpConfig, VcpuConfig, VcpuManagerOptions, VcpuSetupError, VmError,
//!     VmOptions, VpmuFeatureLevel,
//! };
//!
//! /// Real mode, CS:IP = 0000:1000.
//! struct RealMode;
//!
//! impl BootEntry for RealMode {
//!     fn setup_bsp(&self, vcpu: &VcpuFd, _mem: &GuestMemoryMmap) -> Result<(), VcpuSetupError> {
//!         let err = |op| move |source| VcpuSetupError::Kvm { vcpu_id: 0, op, source };
//!         let mut sregs = vcpu.get_sregs().map_err(err(KvmOp::GetSregs))?;
//!         sregs.cs.base = 0;
//!         sregs.cs.selector = 0;
//!         vcpu.set_sregs(&sregs).map_err(err(KvmOp::SetSregs))?;
//!         let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
//!         vcpu.set_regs(&regs).map_err(err(KvmOp::SetRegs))
//!     }
//! }
//!
//! # fn main() -> Result<(), vmm_core::VmmError> {
//! let kvm = kvm_ioctls::Kvm::new().map_err(VmError::KvmOpen)?;
//! // 2 boot vCPUs of at most 4 (1 socket x 2 cores x 2 threads), no vPMU.
//! let smp: SmpConfig = "2,maxcpus=4,cores=2,threads=2".parse()?;
//! let config = VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled);
//! let (vm, mut vcpus) =
//!     build_vm(kvm, VmOptions::default(), config, VcpuManagerOptions::default())?;
//! // mov $0x600, %dx; out %al, (%dx)
//! vmm_core::vm::write_guest(vm.memory(), 0x1000, &[0xba, 0x00, 0x06, 0xee])?;
//! vcpus.create_boot_vcpus(Arc::new(RealMode))?;
//! vcpus.start_boot_vcpus()?;
//! let stop = vcpus.run_until_exit()?;
//! println!("{stop}"); // the VM stopped: vCPU 0 ... device requested stop
//! # Ok(())
//! # }
//! ```

#[macro_use]
mod macros;

pub mod acpi_hotplug;
pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod error;
pub mod exit;
pub mod hotplug_backend;
pub mod manager;
pub mod openmetrics;
pub mod pmu;
pub mod resize;
pub mod snapshot;
pub mod state;
pub mod template;
pub mod vm;

// The CPUID conversions' old place, for the modules that still use it.
pub(crate) use arch::x86_64::cpuid;

use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

pub use acpi_hotplug::{AcpiBackend, AcpiHotplug};
pub use bus::{BusAccess, BusDevice, BusSpace, IoBus};
pub use config::{parse_vcpu_affinity, InterruptMode, KvmLimits, VcpuAffinity, VcpuConfig};
pub use error::{
    BootError, BusError, ConfigError, HotplugOp, KvmOp, ManagerOp, OsError, OsOp, PmuError,
    ResizeError, SnapshotError, StateError, VcpuControlError, VcpuSetupError, VmError, VmmError,
};
pub use exit::{ExitMonitor, ExitSignal, StopCause, VmStopReason};
pub use hotplug_backend::{
    BackendError, HotplugAck, HotplugBackend, HotplugFailure, UpcallBackend, UPCALL_MAX_APIC_ID,
};
pub use manager::{build_vm, VcpuInfo, VcpuManager, VcpuManagerOptions};
pub use resize::{AsyncResizer, ResizeHandle, ResizeOutcome, VcpuSlot};
pub use state::{ResizeInFlight, VmRunState};
pub use template::{CpuTemplate, TemplateError};
pub use vm::{Vm, VmOptions};

// The types of other workspace crates that this crate's public API takes or returns, so that
// an embedder needs only this crate (and kvm-ioctls for `Kvm`).
// The crates themselves too, for what goes beyond (e.g. `hotplug::UpcallConfig` to connect
// an upcall client, `topology::host` to read a host CPUID).
pub use hotplug::{HotplugError, UpcallClient};
pub use topology::{CpuTopology, CpuVendor, CpuidEntry, SmpConfig, TopologyError};
pub use vcpu_actor::{
    DeviceError, ExitCounts, ExitHandler, IoOutcome, SeccompMode, VcpuError, VcpuExitReason,
    VcpuMetricsSnapshot, VcpuOptions, VcpuRequest, VcpuState, ViolationAction,
};
pub use vpmu::{KvmCapability, KvmPmuActions, PmuEventFilter, VpmuError, VpmuFeatureLevel};
pub use {hotplug, topology, vcpu_actor, vpmu};

/// How the BSP is set up for what was loaded into guest memory: registers, segments, paging.
/// Implemented by the Linux boot code in [`boot`] ([`boot::LinuxBootEntry`]) and by loaders
/// outside this crate (the `integration` crate's test-program loader), which build the state
/// with [`arch::x86_64`]'s GDT, page-table and register builders.
pub trait BootEntry: Send + Sync {
    /// Sets the BSP's registers (and anything else it needs) so that it starts at the entry.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError`] (usually [`VcpuSetupError::Kvm`]) if a KVM call on the BSP fails.
    fn setup_bsp(&self, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<(), VcpuSetupError>;
}

/// Maps a failed KVM call `op` on the vCPU with KVM id `vcpu_id` to its error.
pub(crate) fn vcpu_kvm_error(
    vcpu_id: u32,
    op: KvmOp,
) -> impl Fn(kvm_ioctls::Error) -> VcpuSetupError {
    move |source| VcpuSetupError::Kvm {
        vcpu_id,
        op,
        source,
    }
}

/// A [`vcpu_actor::DeviceError`] with this message.
pub(crate) fn device_error(msg: String) -> vcpu_actor::DeviceError {
    vcpu_actor::DeviceError(msg)
}

/// The README's embedding example, compiled (not run) as a doc test so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
