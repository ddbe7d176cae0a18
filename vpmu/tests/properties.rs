//! Properties over arbitrary CPUID sets: never a panic, only the PMU leaves change, and a
//! refused level changes nothing.

use proptest::prelude::*;
use topology::{CpuVendor, CpuidEntry};
use vpmu::{apply_cpuid, check_host_support, VpmuFeatureLevel};

const PMU_LEAVES: [u32; 6] = [0x1, 0x7, 0xA, 0x23, 0x8000_0001, 0x8000_0022];

fn leaf_number() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            0x0,
            0x1,
            0x4,
            0x7,
            0xA,
            0xB,
            0x23,
            0x8000_0001,
            0x8000_0022
        ]),
        any::<u32>(),
    ]
}

fn entry() -> impl Strategy<Value = CpuidEntry> {
    (
        leaf_number(),
        0u32..3,
        0u32..2,
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(function, index, flags, eax, ebx, ecx, edx)| CpuidEntry {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
        })
}

fn level() -> impl Strategy<Value = VpmuFeatureLevel> {
    prop::sample::select(VpmuFeatureLevel::ALL.to_vec())
}

fn vendor() -> impl Strategy<Value = CpuVendor> {
    prop::sample::select(vec![CpuVendor::Intel, CpuVendor::Amd, CpuVendor::Hygon])
}

/// An arbitrary host CPUID set, a level and a vendor.
fn case() -> impl Strategy<Value = (Vec<CpuidEntry>, VpmuFeatureLevel, CpuVendor)> {
    (prop::collection::vec(entry(), 0..24), level(), vendor())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn apply_only_touches_pmu_leaves((entries, level, vendor) in case()) {
        let mut out = entries.clone();
        match apply_cpuid(level, vendor, &mut out) {
            Ok(()) => {
                prop_assert!(check_host_support(level, vendor, &entries).is_ok());
                prop_assert_eq!(out.len(), entries.len());
                for (before, after) in entries.iter().zip(&out) {
                    prop_assert_eq!(
                        (before.function, before.index, before.flags),
                        (after.function, after.index, after.flags)
                    );
                    if !PMU_LEAVES.contains(&before.function) {
                        prop_assert_eq!(before, after);
                    }
                }
                if level == VpmuFeatureLevel::FullyEnabled {
                    prop_assert_eq!(&out, &entries);
                }
            }
            Err(_) => {
                prop_assert!(level != VpmuFeatureLevel::Disabled);
                prop_assert_eq!(&out, &entries);
            }
        }
    }

    #[test]
    fn applying_twice_is_applying_once((entries, level, vendor) in case()) {
        let mut once = entries.clone();
        if apply_cpuid(level, vendor, &mut once).is_ok() {
            let mut twice = once.clone();
            prop_assert!(apply_cpuid(level, vendor, &mut twice).is_ok());
            prop_assert_eq!(once, twice);
        }
    }
}
