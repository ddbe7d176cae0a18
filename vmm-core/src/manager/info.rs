//! What the manager reports about its vCPUs.

use topology::CpuidEntry;
use vcpu_actor::VcpuMetricsSnapshot;

use super::{VcpuInfo, VcpuManager};
use crate::arch::x86_64::cpuid;
use crate::error::{KvmOp, ManagerOp, VcpuSetupError};
use crate::exit::ExitMonitor;

impl VcpuManager {
    /// The present vCPUs (a live actor), by index.
    pub fn present_vcpus(&self) -> Vec<VcpuInfo> {
        self.vcpus
            .iter()
            .map(|(index, h)| VcpuInfo {
                index: *index,
                apic_id: h.id(),
                state: h.state(),
                tid: h.tid(),
                affinity: h
                    .tid()
                    .and_then(|tid| vcpu_actor::thread_affinity(tid).ok()),
            })
            .collect()
    }

    /// The number of present vCPUs.
    pub fn present_vcpu_count(&self) -> u32 {
        // Keyed by index below `max_vcpu_count`, a `u32`: the count fits.
        u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX)
    }

    /// The indices of the vCPUs that may be hot-removed: present vCPUs beyond the boot
    /// vCPUs, highest index first (the order to remove them in).
    pub fn removable_vcpus(&self) -> Vec<u32> {
        self.vcpus
            .keys()
            .rev()
            .copied()
            .filter(|i| *i >= self.config.boot_vcpu_count)
            .collect()
    }

    /// The APIC IDs whose KVM vCPU fd is kept for reuse (their thread has ended).
    pub fn kept_vcpu_fds(&self) -> Vec<u32> {
        self.kept_fds.keys().copied().collect()
    }

    /// What KVM holds as the CPUID of the vCPU with APIC ID `apic_id` (`KVM_GET_CPUID2`),
    /// read from its kept fd: call it after the vCPU exited (e.g. after
    /// [`exit_all`](Self::exit_all)), when its thread has handed the fd back.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::InvalidState`] if no fd of that APIC ID is kept,
    /// [`VcpuSetupError::Kvm`] if KVM does not answer.
    pub fn kept_vcpu_kvm_cpuid(&self, apic_id: u32) -> Result<Vec<CpuidEntry>, VcpuSetupError> {
        let fd = self
            .kept_fds
            .get(&apic_id)
            .ok_or_else(|| VcpuSetupError::InvalidState {
                op: ManagerOp::ExitVcpus,
                reason: format!(
                    "no kept KVM fd for APIC ID {apic_id}: read KVM's CPUID after the vCPU exited"
                ),
            })?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(crate::vcpu_kvm_error(apic_id, KvmOp::GetCpuid2))?;
        Ok(cpuid::entries_from_kvm(cpuid.as_slice()))
    }

    /// Linux thread ids of the present vCPUs: (index, tid).
    pub fn vcpu_tids(&self) -> Vec<(u32, Option<i32>)> {
        self.vcpus.iter().map(|(i, h)| (*i, h.tid())).collect()
    }

    /// Counters of every present vCPU, by index.
    pub fn vcpu_metrics(&self) -> Vec<(u32, VcpuMetricsSnapshot)> {
        self.vcpus.iter().map(|(i, h)| (*i, h.metrics())).collect()
    }

    /// A monitor to wait on (with a timeout) from any thread, and to request a stop with.
    pub fn exit_monitor(&self) -> ExitMonitor {
        self.exit_monitor.clone()
    }

    /// Whether the exit flag is set (a stop is under way or done).
    pub fn exit_requested(&self) -> bool {
        self.exit_flag_set()
    }
}
