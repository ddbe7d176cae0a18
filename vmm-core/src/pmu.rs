//! The KVM side of a vPMU level: disabling the PMU (`KVM_CAP_PMU_CAPABILITY`) and installing
//! an event filter (`KVM_SET_PMU_EVENT_FILTER`), each checked with `KVM_CHECK_EXTENSION`
//! first. Both must happen before the first vCPU is created.

use kvm_bindings::{
    kvm_enable_cap, kvm_pmu_event_filter, KVMIO, KVM_CAP_PMU_CAPABILITY, KVM_CAP_PMU_EVENT_FILTER,
    KVM_PMU_CAP_DISABLE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use slog::{info, Logger};
use topology::{CpuVendor, CpuidEntry};
use vmm_sys_util::ioctl::ioctl_with_ptr;
use vmm_sys_util::ioctl_iow_nr;
use vpmu::{KvmPmuActions, PmuEventFilter};

use crate::VmmError;

ioctl_iow_nr!(KVM_SET_PMU_EVENT_FILTER, KVMIO, 0xb2, kvm_pmu_event_filter);

/// Size of the fixed part of `struct kvm_pmu_event_filter` (the events follow).
const FILTER_HEADER_SIZE: usize = std::mem::size_of::<kvm_pmu_event_filter>();

/// What [`apply_pmu_actions`] did about disabling the PMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PmuDisableOutcome {
    /// The level did not ask for it.
    NotRequested,
    /// `KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY, KVM_PMU_CAP_DISABLE)` succeeded.
    DisabledWithCapability,
    /// KVM offers no vPMU at all (e.g. `kvm.enable_pmu=N`: the capability reports 0 and the
    /// supported CPUID has no architectural PMU), so there is nothing to disable.
    HostHasNoVpmu,
}

/// What [`apply_pmu_actions`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmuActionsReport {
    /// The PMU-disable step.
    pub disable: PmuDisableOutcome,
    /// The number of events of the filter installed, if one was.
    pub filter_events: Option<usize>,
}

/// Applies `actions` to the VM. Call before the first vCPU is created.
pub fn apply_pmu_actions(
    vm: &VmFd,
    actions: &KvmPmuActions,
    vendor: CpuVendor,
    supported: &[CpuidEntry],
    logger: &Logger,
) -> Result<PmuActionsReport, VmmError> {
    let mut report = PmuActionsReport {
        disable: PmuDisableOutcome::NotRequested,
        filter_events: None,
    };
    if actions.disable_pmu {
        let caps = vm.check_extension_raw(KVM_CAP_PMU_CAPABILITY.into());
        if caps > 0 && (caps as u32) & KVM_PMU_CAP_DISABLE != 0 {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_PMU_CAPABILITY,
                args: [u64::from(KVM_PMU_CAP_DISABLE), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(|source| VmmError::Kvm {
                op: "KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY, KVM_PMU_CAP_DISABLE)",
                source,
            })?;
            report.disable = PmuDisableOutcome::DisabledWithCapability;
        } else if !vpmu::host_has_pmu(vendor, supported) {
            report.disable = PmuDisableOutcome::HostHasNoVpmu;
        } else {
            return Err(VmmError::MissingKvmCapability {
                name: "KVM_CAP_PMU_CAPABILITY (KVM_PMU_CAP_DISABLE)",
                number: KVM_CAP_PMU_CAPABILITY,
                needed_for: "disabling the vPMU",
            });
        }
        info!(logger, "vPMU disable"; "outcome" => ?report.disable);
    }
    if let Some(filter) = &actions.event_filter {
        if vm.check_extension_raw(KVM_CAP_PMU_EVENT_FILTER.into()) <= 0 {
            return Err(VmmError::MissingKvmCapability {
                name: "KVM_CAP_PMU_EVENT_FILTER",
                number: KVM_CAP_PMU_EVENT_FILTER,
                needed_for: "the vPMU event filter",
            });
        }
        report.filter_events = Some(set_pmu_event_filter(vm, filter)?);
        info!(logger, "vPMU event filter installed"; "events" => filter.events.len(),
              "action" => ?filter.action);
    }
    Ok(report)
}

/// `KVM_SET_PMU_EVENT_FILTER` with the filter's ABI bytes. Returns the number of events.
pub fn set_pmu_event_filter(vm: &VmFd, filter: &PmuEventFilter) -> Result<usize, VmmError> {
    let bytes = filter.to_kvm_abi_bytes();
    let events = bytes.len().saturating_sub(FILTER_HEADER_SIZE) / 8;
    if bytes.len() != FILTER_HEADER_SIZE + events * 8 {
        return Err(VmmError::InvalidPmuFilter { len: bytes.len() });
    }
    // Copy into u64 words so the kernel reads an 8-byte aligned struct.
    let mut words = vec![0u64; bytes.len() / 8];
    for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_ne_bytes(b);
    }
    // SAFETY: `words` holds a complete `struct kvm_pmu_event_filter` followed by its events
    // (length checked above) and outlives the call; KVM only reads it.
    let ret = unsafe { ioctl_with_ptr(vm, KVM_SET_PMU_EVENT_FILTER(), words.as_ptr()) };
    if ret < 0 {
        return Err(VmmError::Kvm {
            op: "KVM_SET_PMU_EVENT_FILTER",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(events)
}
