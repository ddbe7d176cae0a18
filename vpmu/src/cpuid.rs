//! The CPUID side of a vPMU level: can the host provide it, and the edits that show it.

use topology::{find_entry, CpuVendor, CpuidEntry};

use crate::amd::{
    AmdExtPmuFeatures, AmdPerfMonDebugLeaf, LEAF_EXT_FEATURES, LEAF_EXT_PERFMON_DEBUG,
};
use crate::error::{HostPmuGap, VpmuError};
use crate::intel::{
    ArchEvent, ArchPerfmonLeaf, EXTENDED_FEATURES_1_EAX_ARCH_PERFMON_EXT, FEATURES_ECX_PDCM,
    LEAF_ARCH_PERFMON, LEAF_ARCH_PERFMON_EXT, LEAF_EXTENDED_FEATURES, LEAF_FEATURES,
};
use crate::level::VpmuFeatureLevel;

/// The PMU version a Limited Intel guest sees in leaf 0xA.
pub const LIMITED_INTEL_VERSION: u8 = 2;
/// The general purpose counters a Limited Intel guest sees. Linux loads no PMU driver with
/// fewer than 2, and two are enough to count both allowed events at once.
pub const LIMITED_INTEL_GP_COUNTERS: u8 = 2;
/// The fixed counters a Limited Intel guest sees: 0 (instructions retired) and 1 (unhalted
/// core cycles).
pub const LIMITED_INTEL_FIXED_COUNTERS: u8 = 2;
/// The architectural events a Limited Intel guest sees as available (leaf 0xA EBX bits).
pub const LIMITED_INTEL_EVENTS: u32 =
    ArchEvent::CoreCycles.ebx_bit() | ArchEvent::InstructionsRetired.ebx_bit();

/// Checks that the host can provide `level`, from the CPUID the VMM got from KVM
/// (`KVM_GET_SUPPORTED_CPUID`): what KVM can virtualize, not the bare CPU.
///
/// [`VpmuFeatureLevel::Disabled`] always works. For the others:
/// - Intel: leaf 0xA must report a PMU (version > 0; KVM with `enable_pmu=N` reports an
///   all-zero leaf). Limited also needs version 2 or later, 2 general purpose and 2 fixed
///   counters, and the core cycles and instructions retired events available.
/// - AMD and Hygon: leaf 0x8000_0001 ECX PerfCtrExtCore (bit 23) set, or leaf 0x8000_0022
///   EBX NumPerfCtrCore non-zero. The 4 legacy counters every AMD PMU has are not
///   enumerated by CPUID, so this is the rule: KVM with `enable_pmu=N` clears PerfCtrExtCore
///   and zeroes 0x8000_0022; KVM with a vPMU sets PerfCtrExtCore when the host has 6 core
///   counters, and (Linux 6.1 and later) reports NumPerfCtrCore = 4 for a legacy-only PMU.
///   A vPMU of a legacy-only host on an older kernel is therefore refused, never assumed.
///
/// # Errors
///
/// [`VpmuError::HostLacksPmu`] naming the level and what is missing ([`HostPmuGap`]); a
/// level is never silently downgraded.
pub fn check_host_support(
    level: VpmuFeatureLevel,
    vendor: CpuVendor,
    host: &[CpuidEntry],
) -> Result<(), VpmuError> {
    let gap = match (level, vendor) {
        (VpmuFeatureLevel::Disabled, _) => None,
        (_, CpuVendor::Intel) => intel_gap(level, host),
        (_, CpuVendor::Amd | CpuVendor::Hygon) => amd_gap(host),
    };
    match gap {
        Some(gap) => Err(VpmuError::HostLacksPmu { level, vendor, gap }),
        None => Ok(()),
    }
}

/// Whether the host's (KVM-supported) CPUID shows a PMU a guest could use at all, by the
/// rules of [`check_host_support`] for [`VpmuFeatureLevel::FullyEnabled`].
pub fn host_has_pmu(vendor: CpuVendor, host: &[CpuidEntry]) -> bool {
    check_host_support(VpmuFeatureLevel::FullyEnabled, vendor, host).is_ok()
}

/// What an Intel host lacks for `level` (Limited or Full).
fn intel_gap(level: VpmuFeatureLevel, host: &[CpuidEntry]) -> Option<HostPmuGap> {
    let Some(e) = find_entry(host, LEAF_ARCH_PERFMON, 0) else {
        return Some(HostPmuGap::LeafMissing {
            leaf: LEAF_ARCH_PERFMON,
        });
    };
    let leaf = ArchPerfmonLeaf::from_registers(e.eax, e.ebx, e.ecx, e.edx);
    if leaf.version == 0 {
        return Some(HostPmuGap::NoArchPerfmon);
    }
    if level != VpmuFeatureLevel::LimitedlyEnabled {
        return None;
    }
    if leaf.version < LIMITED_INTEL_VERSION {
        return Some(HostPmuGap::VersionTooOld {
            found: leaf.version,
            needed: LIMITED_INTEL_VERSION,
        });
    }
    if leaf.gp_counters < LIMITED_INTEL_GP_COUNTERS {
        return Some(HostPmuGap::TooFewGpCounters {
            found: leaf.gp_counters,
            needed: LIMITED_INTEL_GP_COUNTERS,
        });
    }
    if leaf.fixed_counters < LIMITED_INTEL_FIXED_COUNTERS {
        return Some(HostPmuGap::TooFewFixedCounters {
            found: leaf.fixed_counters,
            needed: LIMITED_INTEL_FIXED_COUNTERS,
        });
    }
    [ArchEvent::CoreCycles, ArchEvent::InstructionsRetired]
        .into_iter()
        .find(|&event| !leaf.is_event_available(event))
        .map(|event| HostPmuGap::EventUnavailable { event })
}

/// What an AMD or Hygon host lacks for a level with a PMU (see [`check_host_support`]).
fn amd_gap(host: &[CpuidEntry]) -> Option<HostPmuGap> {
    let ext = find_entry(host, LEAF_EXT_FEATURES, 0);
    let ext_core = ext.is_some_and(|e| AmdExtPmuFeatures::from_ecx(e.ecx).perfctr_ext_core);
    let v2_core = find_entry(host, LEAF_EXT_PERFMON_DEBUG, 0).is_some_and(|e| {
        AmdPerfMonDebugLeaf::from_registers(e.eax, e.ebx, e.ecx).core_counters > 0
    });
    if ext_core || v2_core {
        None
    } else if ext.is_none() {
        Some(HostPmuGap::LeafMissing {
            leaf: LEAF_EXT_FEATURES,
        })
    } else {
        Some(HostPmuGap::NoAmdCoreCounters)
    }
}

/// Edits one vCPU's CPUID set (built from the host's KVM-supported CPUID) in place so the
/// guest sees `level`. Checks [`check_host_support`] first, on the same entries.
///
/// On every vendor, leaf 0x1 ECX PDCM (bit 15) is cleared unless the level is Full.
/// - Intel, Disabled: leaf 0xA all zero; leaf 0x23 all zero and ArchPerfmonExt (leaf 0x7.1
///   EAX bit 8) cleared.
/// - Intel, Limited: leaf 0xA version 2, 2 general purpose and 2 fixed counters of the host's
///   widths, every enumerated architectural event but core cycles and instructions retired
///   marked unavailable in EBX, ECX 0; leaf 0x23 and ArchPerfmonExt as for Disabled. Host
///   KVM 6.9 and later no longer enforces EBX: the event filter of [`crate::kvm_actions`] is
///   what limits the guest.
/// - AMD/Hygon, Disabled: PerfCtrExtCore, PerfCtrExtNB, PerfCtrExtLLC (0x8000_0001 ECX bits
///   23, 24, 28) cleared and leaf 0x8000_0022 all zero.
/// - AMD/Hygon, Limited: the core counters are kept (PerfCtrExtCore, and of 0x8000_0022 only
///   PerfMonV2 and NumPerfCtrCore); northbridge/LLC/UMC counters and LBR are hidden.
/// - Full: the host's leaves pass through.
///
/// Entries that are absent stay absent (KVM answers an absent leaf inside the enumerated
/// range with zeros). No entry other than these is touched.
///
/// # Errors
///
/// As [`check_host_support`]; `entries` is then left as it was.
#[allow(clippy::ptr_arg)] // The agreed signature takes the Vec so a level may add entries.
pub fn apply_cpuid(
    level: VpmuFeatureLevel,
    vendor: CpuVendor,
    entries: &mut Vec<CpuidEntry>,
) -> Result<(), VpmuError> {
    check_host_support(level, vendor, entries)?;
    if level != VpmuFeatureLevel::FullyEnabled {
        for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
            e.ecx &= !FEATURES_ECX_PDCM;
        }
    }
    match vendor {
        CpuVendor::Intel => apply_intel(level, entries),
        CpuVendor::Amd | CpuVendor::Hygon => apply_amd(level, entries),
    }
    Ok(())
}

/// Zeroes all four output registers.
fn zero(e: &mut CpuidEntry) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

/// Stores (EAX, EBX, ECX, EDX).
fn store(e: &mut CpuidEntry, (eax, ebx, ecx, edx): (u32, u32, u32, u32)) {
    e.eax = eax;
    e.ebx = ebx;
    e.ecx = ecx;
    e.edx = edx;
}

/// The leaf 0xA a Limited guest sees, from the host's.
fn limited_intel_leaf(host: &ArchPerfmonLeaf) -> ArchPerfmonLeaf {
    ArchPerfmonLeaf {
        version: LIMITED_INTEL_VERSION,
        gp_counters: LIMITED_INTEL_GP_COUNTERS,
        gp_counter_width: host.gp_counter_width,
        event_mask_length: host.event_mask_length,
        unavailable_events: ArchPerfmonLeaf::unavailable_mask_keeping(
            host.event_mask_length,
            LIMITED_INTEL_EVENTS,
        ),
        fixed_counter_mask: 0,
        fixed_counters: LIMITED_INTEL_FIXED_COUNTERS,
        fixed_counter_width: host.fixed_counter_width,
        any_thread_deprecated: false,
    }
}

/// The Intel part of [`apply_cpuid`] (host support already checked).
fn apply_intel(level: VpmuFeatureLevel, entries: &mut [CpuidEntry]) {
    if level == VpmuFeatureLevel::FullyEnabled {
        return;
    }
    for e in entries.iter_mut() {
        match e.function {
            LEAF_ARCH_PERFMON if level == VpmuFeatureLevel::Disabled => zero(e),
            LEAF_ARCH_PERFMON => {
                let host = ArchPerfmonLeaf::from_registers(e.eax, e.ebx, e.ecx, e.edx);
                store(e, limited_intel_leaf(&host).to_registers());
            }
            LEAF_ARCH_PERFMON_EXT => zero(e),
            LEAF_EXTENDED_FEATURES if e.index == 1 => {
                e.eax &= !EXTENDED_FEATURES_1_EAX_ARCH_PERFMON_EXT;
            }
            _ => {}
        }
    }
}

/// The AMD/Hygon part of [`apply_cpuid`] (host support already checked).
fn apply_amd(level: VpmuFeatureLevel, entries: &mut [CpuidEntry]) {
    if level == VpmuFeatureLevel::FullyEnabled {
        return;
    }
    for e in entries.iter_mut() {
        match e.function {
            LEAF_EXT_FEATURES => {
                let host = AmdExtPmuFeatures::from_ecx(e.ecx);
                let guest = AmdExtPmuFeatures {
                    perfctr_ext_core: level == VpmuFeatureLevel::LimitedlyEnabled
                        && host.perfctr_ext_core,
                    perfctr_ext_nb: false,
                    perfctr_ext_llc: false,
                };
                e.ecx = guest.apply_to_ecx(e.ecx);
            }
            LEAF_EXT_PERFMON_DEBUG if level == VpmuFeatureLevel::Disabled => zero(e),
            LEAF_EXT_PERFMON_DEBUG => {
                let host = AmdPerfMonDebugLeaf::from_registers(e.eax, e.ebx, e.ecx);
                store(e, host.core_counters_only().to_registers());
            }
            _ => {}
        }
    }
}
