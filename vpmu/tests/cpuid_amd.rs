//! AMD and Hygon CPUID per level, from recorded host leaf sets, decoded with raw-cpuid.

mod common;

use common::{
    assert_refused, decoder, load_fixture, regs, set_entry, transformed, without_leaves, AMD_5600G,
    CI_HOST_NO_PMU,
};
use topology::{CpuVendor, CpuidEntry};
use vpmu::{check_host_support, host_has_pmu, HostPmuGap, VpmuError, VpmuFeatureLevel};

/// Leaves the vPMU may edit on AMD.
const PMU_LEAVES: [u32; 3] = [0x1, 0x8000_0001, 0x8000_0022];

/// A Zen 4 style host (synthetic, derived from the Zen 3 fixture): PerfMonV2 with 6 core
/// counters, a 16-entry LBR stack and 16 northbridge counters in leaf 0x8000_0022.
fn zen4_like() -> Vec<CpuidEntry> {
    let mut host = load_fixture(AMD_5600G);
    set_entry(
        &mut host,
        CpuidEntry::leaf(0x8000_0022, 0x7, 6 | 16 << 4 | 16 << 10, 0, 0),
    );
    host
}

/// Hygon's leaf 0 vendor string on an otherwise AMD leaf set (synthetic).
fn hygon_like() -> Vec<CpuidEntry> {
    let mut host = zen4_like();
    let (ebx, ecx, edx) = CpuVendor::Hygon.leaf0_registers();
    set_entry(&mut host, CpuidEntry::leaf(0, 0x10, ebx, ecx, edx));
    host
}

/// Leaf 0x8000_0001 ECX bit 23 read directly (raw-cpuid decodes it only for vendors it
/// calls AMD; used to cross-check the decoder on every fixture).
fn perfctr_ext_core_bit(entries: &[CpuidEntry]) -> bool {
    regs(entries, 0x8000_0001, 0).2 & (1 << 23) != 0
}

#[test]
fn fixtures_decode_as_expected() {
    let host = load_fixture(AMD_5600G);
    assert_eq!(CpuVendor::from_entries(&host), Some(CpuVendor::Amd));
    let ext = decoder(&host)
        .get_extended_processor_and_feature_identifiers()
        .expect("leaf 0x8000_0001");
    assert!(ext.has_perf_cntr_extensions());
    assert!(ext.has_nb_perf_cntr_extensions());
    assert!(ext.has_perf_cntr_llc_extensions());
    assert!(perfctr_ext_core_bit(&host));
    assert!(host_has_pmu(CpuVendor::Amd, &host));

    let ci = load_fixture(CI_HOST_NO_PMU);
    assert_eq!(CpuVendor::from_entries(&ci), Some(CpuVendor::Amd));
    let ext = decoder(&ci)
        .get_extended_processor_and_feature_identifiers()
        .expect("leaf 0x8000_0001");
    assert!(!ext.has_perf_cntr_extensions());
    assert!(!perfctr_ext_core_bit(&ci));
    assert!(!host_has_pmu(CpuVendor::Amd, &ci));
}

#[test]
fn disabled_clears_perfctr_ext_core_and_zeroes_leaf_0x8000_0022() {
    for (name, host) in [
        ("5600G", load_fixture(AMD_5600G)),
        ("Zen 4 like", zen4_like()),
    ] {
        let guest = transformed(VpmuFeatureLevel::Disabled, CpuVendor::Amd, &host);
        let cpuid = decoder(&guest);
        let ext = cpuid
            .get_extended_processor_and_feature_identifiers()
            .expect("leaf 0x8000_0001");
        assert!(!ext.has_perf_cntr_extensions(), "{name}");
        assert!(!ext.has_nb_perf_cntr_extensions(), "{name}");
        assert!(!ext.has_perf_cntr_llc_extensions(), "{name}");
        assert!(!perfctr_ext_core_bit(&guest), "{name}");
        // Nothing else in leaf 0x8000_0001 ECX changed.
        let (_, _, h, _) = regs(&host, 0x8000_0001, 0);
        let (_, _, g, _) = regs(&guest, 0x8000_0001, 0);
        assert_eq!(h & !((1 << 23) | (1 << 24) | (1 << 28)), g, "{name}");
        let pmd = cpuid
            .get_extended_performance_monitoring_and_debug()
            .expect("leaf 0x8000_0022");
        assert!(!pmd.has_perf_mon_v2(), "{name}");
        assert_eq!(pmd.num_perf_ctr_core(), 0, "{name}");
        assert_eq!(regs(&guest, 0x8000_0022, 0), (0, 0, 0, 0), "{name}");
        assert!(
            !cpuid.get_feature_info().expect("leaf 1").has_pdcm(),
            "{name}"
        );
        assert_eq!(
            without_leaves(&guest, &PMU_LEAVES),
            without_leaves(&host, &PMU_LEAVES),
            "{name}"
        );
    }
}

#[test]
fn limited_keeps_the_core_counters_only() {
    let host = zen4_like();
    let guest = transformed(VpmuFeatureLevel::LimitedlyEnabled, CpuVendor::Amd, &host);
    let cpuid = decoder(&guest);
    let ext = cpuid
        .get_extended_processor_and_feature_identifiers()
        .expect("leaf 0x8000_0001");
    assert!(ext.has_perf_cntr_extensions());
    assert!(perfctr_ext_core_bit(&guest));
    assert!(!ext.has_nb_perf_cntr_extensions());
    assert!(!ext.has_perf_cntr_llc_extensions());
    let pmd = cpuid
        .get_extended_performance_monitoring_and_debug()
        .expect("leaf 0x8000_0022");
    assert!(pmd.has_perf_mon_v2());
    assert_eq!(pmd.num_perf_ctr_core(), 6);
    assert!(!pmd.has_lbr_stack());
    assert!(!pmd.has_lbr_and_pmc_freeze());
    assert_eq!(pmd.num_lbr_stack_size(), 0);
    assert_eq!(pmd.num_perf_ctr_nb(), 0);
    // Leaf 0xA stays reserved (all zero) on AMD.
    assert_eq!(regs(&guest, 0xA, 0), (0, 0, 0, 0));
    assert_eq!(
        without_leaves(&guest, &PMU_LEAVES),
        without_leaves(&host, &PMU_LEAVES)
    );

    // The Zen 3 host has no PerfMonV2: the leaf stays zero, the core counters stay.
    let zen3 = load_fixture(AMD_5600G);
    let guest = transformed(VpmuFeatureLevel::LimitedlyEnabled, CpuVendor::Amd, &zen3);
    assert!(perfctr_ext_core_bit(&guest));
    assert_eq!(regs(&guest, 0x8000_0022, 0), (0, 0, 0, 0));
}

#[test]
fn full_passes_the_host_leaves_through() {
    for host in [load_fixture(AMD_5600G), zen4_like()] {
        let guest = transformed(VpmuFeatureLevel::FullyEnabled, CpuVendor::Amd, &host);
        assert_eq!(guest, host);
        let pmd = decoder(&guest).get_extended_performance_monitoring_and_debug();
        let host_pmd = decoder(&host).get_extended_performance_monitoring_and_debug();
        assert_eq!(pmd, host_pmd);
    }
}

#[test]
fn hygon_is_handled_like_amd() {
    let host = hygon_like();
    assert_eq!(CpuVendor::from_entries(&host), Some(CpuVendor::Hygon));
    let off = transformed(VpmuFeatureLevel::Disabled, CpuVendor::Hygon, &host);
    assert!(!perfctr_ext_core_bit(&off));
    assert_eq!(regs(&off, 0x8000_0022, 0), (0, 0, 0, 0));
    let limited = transformed(VpmuFeatureLevel::LimitedlyEnabled, CpuVendor::Hygon, &host);
    assert!(perfctr_ext_core_bit(&limited));
    let pmd = decoder(&limited)
        .get_extended_performance_monitoring_and_debug()
        .expect("leaf 0x8000_0022");
    assert_eq!(pmd.num_perf_ctr_core(), 6);
}

#[test]
fn the_ci_host_without_pmu_refuses_limited_and_full_but_not_disabled() {
    let host = load_fixture(CI_HOST_NO_PMU);
    for level in [
        VpmuFeatureLevel::LimitedlyEnabled,
        VpmuFeatureLevel::FullyEnabled,
    ] {
        match check_host_support(level, CpuVendor::Amd, &host) {
            Err(VpmuError::HostLacksPmu {
                level: l,
                vendor: CpuVendor::Amd,
                gap: HostPmuGap::NoAmdCoreCounters,
            }) => assert_eq!(l, level),
            other => panic!("{level}: expected HostLacksPmu/NoAmdCoreCounters, got {other:?}"),
        }
        let parts = ["PerfCtrExtCore", "AuthenticAMD"];
        assert_refused(level, CpuVendor::Amd, &host, &parts);
    }
    let guest = transformed(VpmuFeatureLevel::Disabled, CpuVendor::Amd, &host);
    assert!(!perfctr_ext_core_bit(&guest));
    assert_eq!(regs(&guest, 0x8000_0022, 0), (0, 0, 0, 0));
}

#[test]
fn legacy_counters_reported_in_leaf_0x8000_0022_count_as_a_pmu() {
    // KVM with a vPMU on a host without PerfCtrExtCore reports NumPerfCtrCore = 4 (synthetic).
    let mut host = load_fixture(CI_HOST_NO_PMU);
    set_entry(&mut host, CpuidEntry::leaf(0x8000_0022, 0, 4, 0, 0));
    assert!(check_host_support(VpmuFeatureLevel::LimitedlyEnabled, CpuVendor::Amd, &host).is_ok());
    let guest = transformed(VpmuFeatureLevel::LimitedlyEnabled, CpuVendor::Amd, &host);
    let pmd = decoder(&guest)
        .get_extended_performance_monitoring_and_debug()
        .expect("leaf 0x8000_0022");
    assert_eq!(pmd.num_perf_ctr_core(), 4);
    assert!(!perfctr_ext_core_bit(&guest));
}

#[test]
fn missing_extended_leaf_is_named() {
    let host: Vec<_> = load_fixture(CI_HOST_NO_PMU)
        .into_iter()
        .filter(|e| e.function < 0x8000_0000)
        .collect();
    match check_host_support(VpmuFeatureLevel::FullyEnabled, CpuVendor::Amd, &host) {
        Err(VpmuError::HostLacksPmu { gap, .. }) => {
            assert_eq!(gap, HostPmuGap::LeafMissing { leaf: 0x8000_0001 });
            assert!(gap.to_string().contains("0x80000001"), "{gap}");
        }
        other => panic!("expected HostLacksPmu, got {other:?}"),
    }
}
