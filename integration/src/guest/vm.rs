//! A VM running one of the guest programs, as the tests and benchmarks use it, and the one
//! builder every guest VM of this crate goes through ([`build_with_program`]).

use std::sync::Arc;

use crate::loader::{load_program, LoadedProgram};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::{
    build_vm, BusSpace, VcpuConfig, VcpuManager, VcpuManagerOptions, VcpuState, Vm, VmOptions,
};

use super::{counter_addr, ports, CpuidReports, GuestCode};
use crate::IntegrationError;

/// Builds the VM and its vCPU manager for `config` and loads `code` into its memory; returns
/// them with the program's entry, ready for
/// [`create_boot_vcpus`](VcpuManager::create_boot_vcpus) once the caller registered its
/// devices.
pub fn build_with_program(
    kvm: kvm_ioctls::Kvm,
    code: &GuestCode,
    config: VcpuConfig,
    vm_options: VmOptions,
    options: VcpuManagerOptions,
) -> Result<(Arc<Vm>, VcpuManager, Arc<LoadedProgram>), IntegrationError> {
    let (vm, vcpus) = build_vm(kvm, vm_options, config, options)?;
    let entry = load_program(vm.memory(), &code.program())?;
    Ok((vm, vcpus, Arc::new(entry)))
}

/// A VM with a guest program loaded, the report ports registered and the boot vCPUs created
/// (not started).
pub struct GuestVm {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its vCPUs.
    pub vcpus: VcpuManager,
    /// What the vCPUs reported through the report ports.
    pub reports: Arc<CpuidReports>,
}

impl std::fmt::Debug for GuestVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestVm")
            .field("present_vcpus", &self.vcpus.present_vcpu_count())
            .field("reports", &self.reports)
            .finish_non_exhaustive()
    }
}

impl GuestVm {
    /// Builds the VM for `config`, loads `code`, registers the report ports and creates the
    /// boot vCPUs.
    pub fn create(
        kvm: kvm_ioctls::Kvm,
        code: GuestCode,
        config: VcpuConfig,
        vm_options: VmOptions,
        options: VcpuManagerOptions,
    ) -> Result<Self, IntegrationError> {
        let (vm, mut vcpus, entry) = build_with_program(kvm, &code, config, vm_options, options)?;
        let reports = Arc::new(CpuidReports::new());
        vm.io_bus().register(
            BusSpace::Pio,
            u64::from(ports::REPORT_BASE),
            u64::from(ports::REPORT_LEN),
            "cpuid-reports",
            reports.clone(),
        )?;
        vcpus.create_boot_vcpus(entry)?;
        Ok(Self { vm, vcpus, reports })
    }

    /// The counter of the vCPU with APIC ID `apic_id` (the smp_counter program).
    pub fn counter(&self, apic_id: u32) -> u64 {
        self.vm
            .memory()
            .read_obj::<u64>(GuestAddress(counter_addr(apic_id)))
            .unwrap_or(0)
    }

    /// The counters of the present vCPUs, in index order.
    pub fn counters(&self) -> Vec<u64> {
        self.vcpus
            .present_vcpus()
            .iter()
            .map(|v| self.counter(v.apic_id))
            .collect()
    }

    /// Whether every present vCPU is in `state`.
    pub fn all_vcpus_in(&self, state: VcpuState) -> bool {
        self.vcpus.present_vcpus().iter().all(|v| v.state == state)
    }
}
