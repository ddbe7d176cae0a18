//! The vPMU KVM actions on real KVM, checked against what this host's KVM reports: on the
//! PVM development hosts `KVM_CAP_PMU_CAPABILITY` is 0 (no vPMU) and
//! `KVM_CAP_PMU_EVENT_FILTER` is 1.

use std::sync::Arc;

use kvm_ioctls::Kvm;

use kvm_bindings::{KVM_CAP_PMU_CAPABILITY, KVM_CAP_PMU_EVENT_FILTER, KVM_PMU_CAP_DISABLE};
use slog::o;
use vcpu_actor::test_util::kvm_or_skip;
use vmm_core::pmu::{apply_pmu_actions, PmuDisableOutcome};
use vmm_core::{
    build_vm, ConfigError, CpuTopology, CpuVendor, KvmCapability, KvmLimits, KvmPmuActions,
    PmuError, PmuEventFilter, VcpuConfig, VcpuManager, VcpuManagerOptions, Vm, VmOptions, VmmError,
    VpmuFeatureLevel,
};

fn config(vpmu: VpmuFeatureLevel) -> VcpuConfig {
    VcpuConfig {
        boot_vcpu_count: 1,
        max_vcpu_count: 2,
        topology: CpuTopology::new(1, 1, 2, 1).unwrap(),
        vpmu,
        template: None,
        vcpu_affinity: Default::default(),
    }
}

/// Builds a VM whose vCPUs have vPMU `level`.
fn build(kvm: Kvm, level: VpmuFeatureLevel) -> Result<(Arc<Vm>, VcpuManager), VmmError> {
    build_vm(
        kvm,
        VmOptions::default(),
        config(level),
        VcpuManagerOptions::default(),
    )
}

/// KVM with its limits and CPU vendor, or `None` after `kvm_or_skip`'s SKIPPED line.
fn kvm_with_limits(test: &str) -> Option<(Kvm, KvmLimits, CpuVendor)> {
    let kvm = kvm_or_skip(test)?;
    let limits = KvmLimits::query(&kvm).unwrap();
    let vendor = limits.vendor().unwrap();
    Some((kvm, limits, vendor))
}

#[test]
fn disabled_level_disables_the_pmu_or_finds_none() {
    let Some(kvm) = kvm_or_skip("disabled_level_disables_the_pmu_or_finds_none") else {
        return;
    };
    let caps = kvm.check_extension_raw(KVM_CAP_PMU_CAPABILITY.into());
    let (_vm, manager) =
        build(kvm, VpmuFeatureLevel::Disabled).expect("a Disabled vPMU works on every host");
    let expected = if caps > 0 && caps as u32 & KVM_PMU_CAP_DISABLE != 0 {
        PmuDisableOutcome::DisabledWithCapability
    } else {
        PmuDisableOutcome::HostHasNoVpmu
    };
    assert_eq!(
        manager.pmu_report().disable,
        expected,
        "KVM_CAP_PMU_CAPABILITY = {caps}"
    );
    assert_eq!(manager.pmu_report().filter_events, None);
}

#[test]
fn limited_level_is_rejected_where_the_host_has_no_pmu() {
    let Some((kvm, limits, vendor)) =
        kvm_with_limits("limited_level_is_rejected_where_the_host_has_no_pmu")
    else {
        return;
    };
    let r = build(kvm, VpmuFeatureLevel::LimitedlyEnabled);
    if vpmu::host_has_pmu(vendor, &limits.supported_cpuid) {
        let (_vm, manager) = r.expect("the host has a PMU");
        assert!(manager.pmu_report().filter_events.is_some());
    } else {
        match r {
            Err(VmmError::Config(ConfigError::VpmuUnsupported {
                level: VpmuFeatureLevel::LimitedlyEnabled,
                ..
            })) => {}
            Err(e) => panic!("expected VpmuUnsupported, got {e}"),
            Ok(_) => panic!("expected VpmuUnsupported, got a VM"),
        }
    }
}

#[test]
fn event_filter_ioctl_follows_the_capability() {
    let Some((kvm, limits, vendor)) = kvm_with_limits("event_filter_ioctl_follows_the_capability")
    else {
        return;
    };
    let has_filter = kvm.check_extension_raw(KVM_CAP_PMU_EVENT_FILTER.into()) > 0;
    let vm = Vm::new(kvm, VmOptions::default()).unwrap();
    let filter = PmuEventFilter::limited(vendor);
    let actions = KvmPmuActions {
        disable_pmu: false,
        event_filter: Some(filter.clone()),
    };
    let logger = slog::Logger::root(slog::Discard, o!());
    let r = apply_pmu_actions(vm.fd(), &actions, vendor, &limits.supported_cpuid, &logger);
    if has_filter {
        let report = r.expect("KVM_SET_PMU_EVENT_FILTER");
        assert_eq!(report.filter_events, Some(filter.events.len()));
        assert_eq!(report.disable, PmuDisableOutcome::NotRequested);
    } else {
        assert!(matches!(
            r,
            Err(PmuError::MissingKvmCapability {
                capability: KvmCapability {
                    number: KVM_CAP_PMU_EVENT_FILTER,
                    ..
                },
                ..
            })
        ));
    }
}

#[test]
fn full_level_needs_no_kvm_action() {
    let Some((kvm, limits, vendor)) = kvm_with_limits("full_level_needs_no_kvm_action") else {
        return;
    };
    if !vpmu::host_has_pmu(vendor, &limits.supported_cpuid) {
        // The level itself is refused (no PMU to pass through), before any VM exists.
        let vm = Arc::new(Vm::new(kvm, VmOptions::default()).unwrap());
        assert!(matches!(
            VcpuManager::new(
                vm,
                config(VpmuFeatureLevel::FullyEnabled),
                limits,
                VcpuManagerOptions::default()
            ),
            Err(VmmError::Config(ConfigError::VpmuUnsupported { .. }))
        ));
        return;
    }
    let (_vm, manager) = build(kvm, VpmuFeatureLevel::FullyEnabled).unwrap();
    assert_eq!(
        manager.pmu_report().disable,
        PmuDisableOutcome::NotRequested
    );
    assert_eq!(manager.pmu_report().filter_events, None);
}
