//! The KVM data: filter byte layout against the kernel ABI, events and fixed bitmap per
//! vendor, capability numbers.

use std::mem::{align_of, offset_of, size_of};

use kvm_bindings::kvm_pmu_event_filter;
use topology::CpuVendor;
use vpmu::{
    kvm_actions, optional_kvm_caps, required_kvm_caps, FilterAction, KvmCapability, PmuEventFilter,
    VpmuFeatureLevel,
};

/// Offsets written by hand from the kernel header (arch/x86/include/uapi/asm/kvm.h):
/// `struct kvm_pmu_event_filter { __u32 action; __u32 nevents; __u32 fixed_counter_bitmap;
/// __u32 flags; __u32 pad[4]; __u64 events[]; }`: four u32 at 0, 4, 8, 12, `pad` 16..32,
/// `events` at 32 (8-aligned), each 8 bytes.
const OFF_ACTION: usize = 0;
const OFF_NEVENTS: usize = 4;
const OFF_FIXED_COUNTER_BITMAP: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_PAD: usize = 16;
const PAD_LEN: usize = 16;
const OFF_EVENTS: usize = 32;

fn u32_at(bytes: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(bytes[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(bytes[off..off + 8].try_into().expect("8 bytes"))
}

#[test]
fn hand_written_offsets_match_kvm_bindings() {
    assert_eq!(offset_of!(kvm_pmu_event_filter, action), OFF_ACTION);
    assert_eq!(offset_of!(kvm_pmu_event_filter, nevents), OFF_NEVENTS);
    assert_eq!(
        offset_of!(kvm_pmu_event_filter, fixed_counter_bitmap),
        OFF_FIXED_COUNTER_BITMAP
    );
    assert_eq!(offset_of!(kvm_pmu_event_filter, flags), OFF_FLAGS);
    assert_eq!(offset_of!(kvm_pmu_event_filter, pad), OFF_PAD);
    assert_eq!(offset_of!(kvm_pmu_event_filter, events), OFF_EVENTS);
    assert_eq!(size_of::<kvm_pmu_event_filter>(), OFF_EVENTS);
    assert_eq!(
        size_of::<kvm_pmu_event_filter>(),
        PmuEventFilter::HEADER_SIZE
    );
    assert_eq!(align_of::<kvm_pmu_event_filter>(), 8);
}

#[test]
fn abi_bytes_have_the_kernel_layout() {
    let filter = PmuEventFilter {
        action: FilterAction::Deny,
        events: vec![0x0000_0000_0000_003C, 0x0000_000F_0000_FFFF, 0x1_0000_00C0],
        fixed_counter_bitmap: 0b101,
        flags: 1,
    };
    let b = filter.to_kvm_abi_bytes();
    assert_eq!(b.len(), OFF_EVENTS + 3 * 8);
    assert_eq!(u32_at(&b, OFF_ACTION), kvm_bindings::KVM_PMU_EVENT_DENY);
    assert_eq!(u32_at(&b, OFF_NEVENTS), 3);
    assert_eq!(u32_at(&b, OFF_FIXED_COUNTER_BITMAP), 0b101);
    assert_eq!(u32_at(&b, OFF_FLAGS), 1);
    assert!(b[OFF_PAD..OFF_PAD + PAD_LEN].iter().all(|&x| x == 0));
    for (i, e) in filter.events.iter().enumerate() {
        assert_eq!(u64_at(&b, OFF_EVENTS + 8 * i), *e);
    }
    // The word form is the same bytes.
    let words = filter.to_kvm_abi_words();
    let from_words: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(from_words, b);
}

#[test]
fn abi_bytes_read_back_through_the_kvm_bindings_struct() {
    for vendor in [CpuVendor::Intel, CpuVendor::Amd] {
        let filter = PmuEventFilter::limited(vendor);
        let words = filter.to_kvm_abi_words();
        assert!(words.len() * 8 >= size_of::<kvm_pmu_event_filter>());
        // SAFETY: `words` is 8-byte aligned and holds the 32-byte header plus
        // `filter.events.len()` u64 events, exactly what `kvm_pmu_event_filter` and its
        // flexible array `events` describe; it outlives `k`.
        let k = unsafe { &*(words.as_ptr().cast::<kvm_pmu_event_filter>()) };
        assert_eq!(k.action, kvm_bindings::KVM_PMU_EVENT_ALLOW);
        assert_eq!(k.nevents as usize, filter.events.len());
        assert_eq!(k.fixed_counter_bitmap, filter.fixed_counter_bitmap);
        assert_eq!(k.flags, 0);
        assert_eq!(k.pad, [0; 4]);
        assert_eq!(words.len(), 4 + k.nevents as usize);
        // SAFETY: `nevents` u64s follow the header inside `words` (checked just above).
        let events = unsafe { k.events.as_slice(k.nevents as usize) };
        assert_eq!(events, filter.events.as_slice(), "{vendor:?}");
    }
}

#[test]
fn limited_filter_per_vendor() {
    let intel = kvm_actions(VpmuFeatureLevel::LimitedlyEnabled, CpuVendor::Intel);
    assert!(!intel.disable_pmu);
    let f = intel.event_filter.expect("Intel limited filter");
    assert_eq!(f.action, FilterAction::Allow);
    // Event select in bits 7:0, unit mask 0 in bits 15:8.
    assert_eq!(f.events, vec![0x3C, 0xC0]);
    assert_eq!(f.fixed_counter_bitmap, 0b011);
    assert_eq!(f.flags, 0);
    assert!(f.validate(CpuVendor::Intel).is_ok());

    for vendor in [CpuVendor::Amd, CpuVendor::Hygon] {
        let amd = kvm_actions(VpmuFeatureLevel::LimitedlyEnabled, vendor);
        assert!(!amd.disable_pmu);
        let f = amd.event_filter.expect("AMD limited filter");
        assert_eq!(f.action, FilterAction::Allow);
        assert_eq!(f.events, vec![0x76, 0xC0], "{vendor:?}");
        assert_eq!(
            f.fixed_counter_bitmap, 0,
            "{vendor:?}: KVM's AMD PMU has no fixed counters"
        );
        assert_eq!(f.flags, 0);
        assert!(f.validate(vendor).is_ok());
    }
}

#[test]
fn disabled_and_full_actions() {
    for vendor in [CpuVendor::Intel, CpuVendor::Amd, CpuVendor::Hygon] {
        let off = kvm_actions(VpmuFeatureLevel::Disabled, vendor);
        assert!(off.disable_pmu);
        assert_eq!(off.event_filter, None);
        let full = kvm_actions(VpmuFeatureLevel::FullyEnabled, vendor);
        assert!(!full.disable_pmu);
        assert_eq!(full.event_filter, None);
    }
}

#[test]
fn capability_numbers_match_kvm_bindings() {
    assert_eq!(
        KvmCapability::PMU_CAPABILITY.number,
        kvm_bindings::KVM_CAP_PMU_CAPABILITY
    );
    assert_eq!(KvmCapability::PMU_CAPABILITY.number, 212);
    assert_eq!(
        KvmCapability::PMU_EVENT_FILTER.number,
        kvm_bindings::KVM_CAP_PMU_EVENT_FILTER
    );
    assert_eq!(KvmCapability::PMU_EVENT_FILTER.number, 173);
    assert_eq!(vpmu::KVM_PMU_CAP_DISABLE, kvm_bindings::KVM_PMU_CAP_DISABLE);
    assert_eq!(vpmu::KVM_PMU_CAP_DISABLE, 1);
    assert_eq!(vpmu::KVM_PMU_EVENT_ALLOW, kvm_bindings::KVM_PMU_EVENT_ALLOW);
    assert_eq!(vpmu::KVM_PMU_EVENT_DENY, kvm_bindings::KVM_PMU_EVENT_DENY);
    assert_eq!(FilterAction::Allow.kvm_value(), 0);
    assert_eq!(FilterAction::Deny.kvm_value(), 1);
}

#[test]
fn required_and_optional_caps_per_level() {
    assert!(required_kvm_caps(VpmuFeatureLevel::Disabled).is_empty());
    assert_eq!(
        required_kvm_caps(VpmuFeatureLevel::LimitedlyEnabled),
        vec![KvmCapability::PMU_EVENT_FILTER]
    );
    assert!(required_kvm_caps(VpmuFeatureLevel::FullyEnabled).is_empty());
    assert_eq!(
        optional_kvm_caps(VpmuFeatureLevel::Disabled),
        vec![KvmCapability::PMU_CAPABILITY]
    );
    assert!(optional_kvm_caps(VpmuFeatureLevel::LimitedlyEnabled).is_empty());
}
