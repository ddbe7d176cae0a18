//! Intel CPUID per level, from a recorded host leaf set, decoded with raw-cpuid.

mod common;

use common::{decoder, load_fixture, regs, set_entry, without_leaves, INTEL_G4600};
use topology::{CpuVendor, CpuidEntry};
use vpmu::{apply_cpuid, check_host_support, HostPmuGap, VpmuError, VpmuFeatureLevel};

/// Leaves the vPMU may edit on Intel.
const PMU_LEAVES: [u32; 4] = [0x1, 0x7, 0xA, 0x23];

fn transformed(level: VpmuFeatureLevel, host: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut entries = host.to_vec();
    apply_cpuid(level, CpuVendor::Intel, &mut entries)
        .unwrap_or_else(|e| panic!("apply_cpuid({level}) on the Intel fixture: {e}"));
    entries
}

#[test]
fn fixture_is_an_intel_host_with_a_version_4_pmu() {
    let host = load_fixture(INTEL_G4600);
    assert_eq!(CpuVendor::from_entries(&host), Some(CpuVendor::Intel));
    let pm = decoder(&host)
        .get_performance_monitoring_info()
        .expect("leaf 0xA");
    assert_eq!(pm.version_id(), 4);
    assert_eq!(pm.number_of_counters(), 4);
    assert_eq!(pm.fixed_function_counters(), 3);
    assert!(decoder(&host)
        .get_feature_info()
        .expect("leaf 1")
        .has_pdcm());
}

#[test]
fn disabled_zeroes_leaf_0xa_and_clears_pdcm() {
    let host = load_fixture(INTEL_G4600);
    let guest = transformed(VpmuFeatureLevel::Disabled, &host);
    let cpuid = decoder(&guest);
    let pm = cpuid.get_performance_monitoring_info().expect("leaf 0xA");
    assert_eq!(pm.version_id(), 0);
    assert_eq!(pm.number_of_counters(), 0);
    assert_eq!(pm.counter_bit_width(), 0);
    assert_eq!(pm.ebx_length(), 0);
    assert_eq!(pm.fixed_function_counters(), 0);
    assert_eq!(pm.fixed_function_counters_bit_width(), 0);
    assert_eq!(regs(&guest, 0xA, 0), (0, 0, 0, 0));
    let features = cpuid.get_feature_info().expect("leaf 1");
    assert!(!features.has_pdcm());
    // Only PDCM changed in leaf 1.
    let (_, _, host_ecx, _) = regs(&host, 1, 0);
    let (_, _, guest_ecx, _) = regs(&guest, 1, 0);
    assert_eq!(host_ecx ^ guest_ecx, 1 << 15);
    assert_eq!(
        without_leaves(&guest, &PMU_LEAVES),
        without_leaves(&host, &PMU_LEAVES)
    );
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
    assert!(!pm.is_core_cyc_ev_unavailable());
    assert!(!pm.is_inst_ret_ev_unavailable());
    assert!(pm.is_ref_cycle_ev_unavailable());
    assert!(pm.is_cache_ref_ev_unavailable());
    assert!(pm.is_ll_cache_miss_ev_unavailable());
    assert!(pm.is_branch_inst_ret_ev_unavailable());
    assert!(pm.is_branch_midpred_ev_unavailable());
    // ECX (fixed counter bitmap, version 5+) is not used by a version 2 PMU.
    assert_eq!(regs(&guest, 0xA, 0).2, 0);
    assert!(!cpuid.get_feature_info().expect("leaf 1").has_pdcm());
    assert_eq!(
        without_leaves(&guest, &PMU_LEAVES),
        without_leaves(&host, &PMU_LEAVES)
    );
}

#[test]
fn full_passes_the_host_leaves_through() {
    let host = load_fixture(INTEL_G4600);
    let guest = transformed(VpmuFeatureLevel::FullyEnabled, &host);
    assert_eq!(guest, host);
    let pm = decoder(&guest)
        .get_performance_monitoring_info()
        .expect("leaf 0xA");
    assert_eq!(pm.version_id(), 4);
    assert_eq!(pm.number_of_counters(), 4);
    assert_eq!(pm.fixed_function_counters(), 3);
    assert!(decoder(&guest)
        .get_feature_info()
        .expect("leaf 1")
        .has_pdcm());
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
        let msg = check_host_support(level, CpuVendor::Intel, &host)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&format!("`{level}`")), "{msg}");
        assert!(
            msg.contains("leaf 0xA") && msg.contains("version 0"),
            "{msg}"
        );
        assert!(msg.contains("GenuineIntel") && msg.contains("off"), "{msg}");
        let mut entries = host.clone();
        assert!(apply_cpuid(level, CpuVendor::Intel, &mut entries).is_err());
        assert_eq!(entries, host, "{level}: a refused level edits nothing");
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
