//! The KVM side of a vPMU level: disabling the PMU (`KVM_CAP_PMU_CAPABILITY`) and installing
//! an event filter (`KVM_SET_PMU_EVENT_FILTER`), each checked with `KVM_CHECK_EXTENSION`
//! first. Both must happen before the first vCPU is created.

use kvm_bindings::{kvm_enable_cap, kvm_pmu_event_filter, KVMIO};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use slog::{info, Logger};
use topology::{CpuVendor, CpuidEntry};
use vmm_sys_util::ioctl::ioctl_with_ptr;
use vmm_sys_util::ioctl_iow_nr;
use vpmu::{KvmCapability, KvmPmuActions, PmuEventFilter, KVM_PMU_CAP_DISABLE};

use crate::error::{KvmOp, PmuError};

/// The ioctl number, kept private: the macro makes a public function without docs.
mod ioctl {
    use super::{ioctl_iow_nr, kvm_pmu_event_filter, KVMIO};
    ioctl_iow_nr!(KVM_SET_PMU_EVENT_FILTER, KVMIO, 0xb2, kvm_pmu_event_filter);
}
use ioctl::KVM_SET_PMU_EVENT_FILTER;

// The vpmu crate's idea of the ABI is the kernel's, as kvm-bindings has it.
const _: () = assert!(PmuEventFilter::HEADER_SIZE == std::mem::size_of::<kvm_pmu_event_filter>());
const _: () = assert!(KvmCapability::PMU_CAPABILITY.number == kvm_bindings::KVM_CAP_PMU_CAPABILITY);
const _: () =
    assert!(KvmCapability::PMU_EVENT_FILTER.number == kvm_bindings::KVM_CAP_PMU_EVENT_FILTER);
const _: () = assert!(KVM_PMU_CAP_DISABLE == kvm_bindings::KVM_PMU_CAP_DISABLE);

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

/// What `KVM_CHECK_EXTENSION` on the VM says about `cap`.
fn check_extension(vm: &VmFd, cap: KvmCapability) -> i32 {
    vm.check_extension_raw(u64::from(cap.number))
}

/// Applies `actions` (from `vpmu::kvm_actions`) to the VM. Call before the first vCPU is
/// created. The decisions are the vpmu crate's ([`KvmPmuActions::should_enable_pmu_disable`],
/// [`PmuEventFilter::validate`]); this function only asks KVM and issues the ioctls.
///
/// # Errors
///
/// [`PmuError::MissingKvmCapability`] if KVM cannot disable a PMU it has, or has no event
/// filter; [`PmuError::InvalidFilter`] for a filter KVM would reject; [`PmuError::Kvm`] if an
/// ioctl fails.
pub fn apply_pmu_actions(
    vm: &VmFd,
    actions: &KvmPmuActions,
    vendor: CpuVendor,
    supported: &[CpuidEntry],
    logger: &Logger,
) -> Result<PmuActionsReport, PmuError> {
    let mut report = PmuActionsReport {
        disable: PmuDisableOutcome::NotRequested,
        filter_events: None,
    };
    if actions.disable_pmu {
        let caps = check_extension(vm, KvmCapability::PMU_CAPABILITY);
        if actions.should_enable_pmu_disable(caps) {
            let cap = kvm_enable_cap {
                cap: KvmCapability::PMU_CAPABILITY.number,
                args: [u64::from(KVM_PMU_CAP_DISABLE), 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).map_err(|source| PmuError::Kvm {
                op: KvmOp::EnableCapPmuDisable,
                source,
            })?;
            report.disable = PmuDisableOutcome::DisabledWithCapability;
        } else if !vpmu::host_has_pmu(vendor, supported) {
            report.disable = PmuDisableOutcome::HostHasNoVpmu;
        } else {
            return Err(PmuError::MissingKvmCapability {
                capability: KvmCapability::PMU_CAPABILITY,
                needed_for: "disabling the vPMU (KVM_PMU_CAP_DISABLE)",
            });
        }
        info!(logger, "vPMU disable"; "outcome" => ?report.disable);
    }
    if let Some(filter) = &actions.event_filter {
        if check_extension(vm, KvmCapability::PMU_EVENT_FILTER) <= 0 {
            return Err(PmuError::MissingKvmCapability {
                capability: KvmCapability::PMU_EVENT_FILTER,
                needed_for: "the vPMU event filter",
            });
        }
        filter.validate(vendor).map_err(PmuError::InvalidFilter)?;
        report.filter_events = Some(set_pmu_event_filter(vm, filter)?);
        info!(logger, "vPMU event filter installed"; "events" => filter.events.len(),
              "action" => ?filter.action);
    }
    Ok(report)
}

/// `KVM_SET_PMU_EVENT_FILTER` with the filter's ABI words. Returns the number of events.
/// Check the filter first ([`PmuEventFilter::validate`]).
///
/// # Errors
///
/// [`PmuError::Kvm`] with [`KvmOp::SetPmuEventFilter`] if KVM refuses the filter.
pub fn set_pmu_event_filter(vm: &VmFd, filter: &PmuEventFilter) -> Result<usize, PmuError> {
    // 8-byte words, so the kernel reads an aligned struct: the header, then one per event.
    let words = filter.to_kvm_abi_words();
    // SAFETY: `words` holds a complete `struct kvm_pmu_event_filter` (HEADER_SIZE bytes, the
    // same size as the kernel's, checked at compile time above) followed by `nevents` events,
    // and outlives the call; KVM only reads it.
    let ret = unsafe { ioctl_with_ptr(vm, KVM_SET_PMU_EVENT_FILTER(), words.as_ptr()) };
    if ret < 0 {
        return Err(PmuError::Kvm {
            op: KvmOp::SetPmuEventFilter,
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(filter.events.len())
}
