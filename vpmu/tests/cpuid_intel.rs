//! Intel CPUID per level, from a recorded host leaf set, decoded with raw-cpuid.

mod common;

use common::{assert_refused, decoder, load_fixture, regs, set_entry, without_leaves, INTEL_G4600};
use topology::{CpuVendor, CpuidEntry};
use vpmu::{check_host_support, HostPmuGap, VpmuError, VpmuFeatureLevel};

/// Leaves the vPMU may edit on Intel.
const PMU_LEAVES: [u32; 4] = [0x1, 0x7, 0xA, 0x23];

/// `host` after `apply_cpuid` for `level` on Intel.
fn transformed(level: VpmuFeatureLevel, host: &[CpuidEntry]) -> Vec<CpuidEntry> {
    common::transformed(level, CpuVendor::Intel, host)
}

/// Asserts that `guest` equals `host` outside the leaves the vPMU may edit.
fn assert_only_pmu_leaves_differ(guest: &[CpuidEntry], host: &[CpuidEntry]) {
    assert_eq!(
        without_leaves(guest, &PMU_LEAVES),
        without_leaves(host, &PMU_LEAVES)
    );
}

/// Asserts the fixture's own PMU: version 4, 4 general purpose and 3 fixed counters, PDCM.
fn assert_kaby_lake_pmu(entries: &[CpuidEntry]) {
    let cpuid = decoder(entries);
    let pm = cpuid.get_performance_monitoring_info().expect("leaf 0xA");
    assert_eq!(pm.version_id(), 4);
    assert_eq!(pm.number_of_counters(), 4);
    assert_eq!(pm.fixed_function_counters(), 3);
    assert!(cpuid.get_feature_info().expect("leaf 1").has_pdcm());
}

#[test]
fn fixture_is_an_intel_host_with_a_version_4_pmu() {
    let host = load_fixture(INTEL_G4600);
    assert_eq!(CpuVendor::from_entries(&host), Some(CpuVendor::Intel));
    assert_kaby_lake_pmu(&host);
}

#[test]
fn disabled_zeroes_leaf_0xa_and_clears_pdcm() {
    let host = load_fixture(INTEL_G4600);
    let guest = transformed(VpmuFeatureLevel::Disabled, &host);
    let cpuid = decoder(&guest);
    let pm = cpuid.get_performance_monitoring_info().expect("leaf 0xA");
    // Version, counters, their width, events, fixed counters, their width: all 0.
    let shown = (
        pm.version_id(),
        pm.number_of_counters(),
        pm.counter_bit_width(),
        pm.ebx_length(),
        pm.fixed_function_counters(),
        pm.fixed_function_counters_bit_width(),
    );
    assert_eq!(shown, (0, 0, 0, 0, 0, 0));
    assert_eq!(regs(&guest, 0xA, 0), (0, 0, 0, 0));
    let features = cpuid.get_feature_info().expect("leaf 1");
    assert!(!features.has_pdcm());
    // Only PDCM changed in leaf 1.
    let (_, _, host_ecx, _) = regs(&host, 1, 0);
    let (_, _, guest_ecx, _) = regs(&guest, 1, 0);
    assert_eq!(host_ecx ^ guest_ecx, 1 << 15);
    assert_only_pmu_leaves_differ(&guest, &host);
}

#[test]
fn limited_shows_version_2_with_two_counters_of_each_kind() {
    let host = load_fixture(INTEL_G4600);
    let guest = transformed(VpmuFeatureLevel::LimitedlyEnabled, &host);
    let host_pm = decoder(&host)
        .get_performance_monitoring_info()
        .expect("host leaf 0xA");
    let cpuid = decoder(&guest);
    let pm = cpuid
        .get_performance_monitoring_info()
        .expect("guest leaf 0xA");
    assert_eq!(pm.version_id(), 2);
    assert_eq!(pm.number_of_counters(), 2);
    assert_eq!(pm.counter_bit_width(), host_pm.counter_bit_width());
    assert_eq!(pm.counter_bit_width(), 48);
    assert_eq!(pm.ebx_length(), host_pm.ebx_length());
    assert_eq!(pm.fixed_function_counters(), 2);
    assert_eq!(pm.fixed_function_counters_bit_width(), 48);
    assert!(!pm.has_any_thread_deprecation());
    // Only core cycles and instructions retired are available.
    let unavailable = [
        pm.is_core_cyc_ev_unavailable(),
        pm.is_inst_ret_ev_unavailable(),
        pm.is_ref_cycle_ev_unavailable(),
        pm.is_cache_ref_ev_unavailable(),
        pm.is_ll_cache_miss_ev_unavailable(),
        pm.is_branch_inst_ret_ev_unavailable(),
        pm.is_branch_midpred_ev_unavailable(),
    ];
    assert_eq!(unavailable, [false, false, true, true, true, true, true]);
    // ECX (fixed counter bitmap, version 5+) is not used by a version 2 PMU.
    assert_eq!(regs(&guest, 0xA, 0).2, 0);
    assert!(!cpuid.get_feature_info().expect("leaf 1").has_pdcm());
    assert_only_pmu_leaves_differ(&guest, &host);
}

#[test]
fn full_passes_the_host_leaves_through() {
    let host = load_fixture(INTEL_G4600);
    let guest = transformed(VpmuFeatureLevel::FullyEnabled, &host);
    assert_eq!(guest, host);
    assert_kaby_lake_pmu(&guest);
}

#[test]
fn limited_and_disabled_hide_the_extended_perfmon_leaf() {
    let mut host = load_fixture(INTEL_G4600);
    // A newer host (synthetic, for this check): ArchPerfmonExt set, leaf 0x23 present.
    set_entry(
        &mut host,
        CpuidEntry::subleaf(0x7, 1, 1 << 8 | 1 << 4, 0, 0, 0),
    );
    set_entry(&mut host, CpuidEntry::subleaf(0x23, 0, 0xF, 0, 0, 0));
    set_entry(&mut host, CpuidEntry::subleaf(0x23, 1, 0xFF, 0x7, 0, 0));
    for level in [
        VpmuFeatureLevel::Disabled,
        VpmuFeatureLevel::LimitedlyEnabled,
    ] {
        let guest = transformed(level, &host);
        assert_eq!(
            regs(&guest, 0x7, 1).0,
            1 << 4,
            "{level}: only bit 8 cleared"
        );
        assert_eq!(regs(&guest, 0x23, 0), (0, 0, 0, 0), "{level}");
        assert_eq!(regs(&guest, 0x23, 1), (0, 0, 0, 0), "{level}");
        assert_eq!(regs(&guest, 0x7, 0), regs(&host, 0x7, 0), "{level}");
    }
    let guest = transformed(VpmuFeatureLevel::FullyEnabled, &host);
    assert_eq!(guest, host);
}

#[test]
fn limited_masks_every_enumerated_event_of_a_newer_host() {
    let mut host = load_fixture(INTEL_G4600);
    // Synthetic version 5 leaf with 8 enumerated events and a fixed counter bitmap in ECX.
    set_entry(
        &mut host,
        CpuidEntry::leaf(0xA, 0x0830_0805, 0, 0xF, 0x0000_8604),
    );
    let guest = transformed(VpmuFeatureLevel::LimitedlyEnabled, &host);
    let pm = decoder(&guest)
        .get_performance_monitoring_info()
        .expect("leaf 0xA");
    assert_eq!(pm.version_id(), 2);
    assert_eq!(pm.number_of_counters(), 2);
    assert_eq!(pm.ebx_length(), 8);
    assert_eq!(pm.fixed_function_counters(), 2);
    assert!(!pm.has_any_thread_deprecation());
    assert_eq!(regs(&guest, 0xA, 0).1, 0b1111_1100);
    assert_eq!(regs(&guest, 0xA, 0).2, 0);
}

fn expect_gap(level: VpmuFeatureLevel, host: &[CpuidEntry]) -> HostPmuGap {
    match check_host_support(level, CpuVendor::Intel, host) {
        Err(VpmuError::HostLacksPmu {
            level: l,
            vendor,
            gap,
        }) => {
            assert_eq!(l, level);
            assert_eq!(vendor, CpuVendor::Intel);
            gap
        }
        other => panic!("{level}: expected HostLacksPmu, got {other:?}"),
    }
}

#[test]
fn a_host_without_pmu_refuses_limited_and_full_but_not_disabled() {
    let mut host = load_fixture(INTEL_G4600);
    // What KVM_GET_SUPPORTED_CPUID reports with enable_pmu=N.
    set_entry(&mut host, CpuidEntry::leaf(0xA, 0, 0, 0, 0));
    for level in [
        VpmuFeatureLevel::LimitedlyEnabled,
        VpmuFeatureLevel::FullyEnabled,
    ] {
        assert_eq!(expect_gap(level, &host), HostPmuGap::NoArchPerfmon);
        let parts = ["leaf 0xA", "version 0", "GenuineIntel", "off"];
        assert_refused(level, CpuVendor::Intel, &host, &parts);
    }
    let guest = transformed(VpmuFeatureLevel::Disabled, &host);
    assert_eq!(regs(&guest, 0xA, 0), (0, 0, 0, 0));

    // Leaf 0xA missing altogether.
    let no_leaf: Vec<_> = host.iter().filter(|e| e.function != 0xA).copied().collect();
    assert_eq!(
        expect_gap(VpmuFeatureLevel::FullyEnabled, &no_leaf),
        HostPmuGap::LeafMissing { leaf: 0xA }
    );
    assert!(check_host_support(VpmuFeatureLevel::Disabled, CpuVendor::Intel, &no_leaf).is_ok());
}

#[test]
fn limited_names_what_a_small_pmu_lacks() {
    let base = load_fixture(INTEL_G4600);
    let with = |eax: u32, ebx: u32, edx: u32| {
        let mut h = base.clone();
        set_entry(&mut h, CpuidEntry::leaf(0xA, eax, ebx, 0, edx));
        h
    };
    let limited = VpmuFeatureLevel::LimitedlyEnabled;
    // Version 1 (no fixed counters): Full is fine, Limited is not.
    let v1 = with(0x0728_0201, 0, 0);
    assert!(check_host_support(VpmuFeatureLevel::FullyEnabled, CpuVendor::Intel, &v1).is_ok());
    assert_eq!(
        expect_gap(limited, &v1),
        HostPmuGap::VersionTooOld {
            found: 1,
            needed: 2
        }
    );
    assert_eq!(
        expect_gap(limited, &with(0x0730_0102, 0, 0x603)),
        HostPmuGap::TooFewGpCounters {
            found: 1,
            needed: 2
        }
    );
    assert_eq!(
        expect_gap(limited, &with(0x0730_0402, 0, 0x601)),
        HostPmuGap::TooFewFixedCounters {
            found: 1,
            needed: 2
        }
    );
    let gap = expect_gap(limited, &with(0x0730_0402, 0b10, 0x603));
    assert_eq!(
        gap,
        HostPmuGap::EventUnavailable {
            event: vpmu::intel::ArchEvent::InstructionsRetired
        }
    );
    assert!(gap.to_string().contains("instructions retired"), "{gap}");
}
