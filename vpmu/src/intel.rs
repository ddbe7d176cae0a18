//! Intel's PMU CPUID leaves, as typed fields (Intel SDM Vol. 2A, CPUID; Vol. 3B ch. 20
//! "Performance Monitoring").

use std::fmt;

use serde::{Deserialize, Serialize};

/// The leaf that describes architectural performance monitoring.
pub const LEAF_ARCH_PERFMON: u32 = 0xA;
/// The leaf with the feature flags, among them PDCM.
pub const LEAF_FEATURES: u32 = 0x1;
/// The structured extended feature flags leaf (subleaf 1 has ArchPerfmonExt).
pub const LEAF_EXTENDED_FEATURES: u32 = 0x7;
/// The architectural performance monitoring extended leaf (enumerated by ArchPerfmonExt).
pub const LEAF_ARCH_PERFMON_EXT: u32 = 0x23;

/// Leaf 0x1 ECX bit 15, PDCM: the `IA32_PERF_CAPABILITIES` MSR exists (full-width counter
/// writes, PEBS and LBR formats).
pub const FEATURES_ECX_PDCM: u32 = 1 << 15;
/// Leaf 0x7 subleaf 1 EAX bit 8, ArchPerfmonExt: leaf 0x23 is valid.
pub const EXTENDED_FEATURES_1_EAX_ARCH_PERFMON_EXT: u32 = 1 << 8;

/// An architectural performance event, in the order of leaf 0xA's EBX bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArchEvent {
    /// UnHalted Core Cycles (EBX bit 0).
    CoreCycles,
    /// Instructions Retired (EBX bit 1).
    InstructionsRetired,
    /// UnHalted Reference Cycles (EBX bit 2).
    ReferenceCycles,
    /// Last Level Cache References (EBX bit 3).
    LlcReferences,
    /// Last Level Cache Misses (EBX bit 4).
    LlcMisses,
    /// Branch Instructions Retired (EBX bit 5).
    BranchInstructionsRetired,
    /// Branch Misses Retired (EBX bit 6).
    BranchMissesRetired,
}

impl ArchEvent {
    /// The bit in leaf 0xA EBX that, when set, marks this event unavailable.
    pub const fn ebx_bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for ArchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArchEvent::CoreCycles => "unhalted core cycles",
            ArchEvent::InstructionsRetired => "instructions retired",
            ArchEvent::ReferenceCycles => "unhalted reference cycles",
            ArchEvent::LlcReferences => "last level cache references",
            ArchEvent::LlcMisses => "last level cache misses",
            ArchEvent::BranchInstructionsRetired => "branch instructions retired",
            ArchEvent::BranchMissesRetired => "branch misses retired",
        })
    }
}

/// Intel CPUID leaf 0xA, field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchPerfmonLeaf {
    /// EAX\[7:0\]: architectural performance monitoring version (0: no PMU).
    pub version: u8,
    /// EAX\[15:8\]: general purpose counters per logical processor.
    pub gp_counters: u8,
    /// EAX\[23:16\]: bit width of the general purpose counters.
    pub gp_counter_width: u8,
    /// EAX\[31:24\]: number of valid bits in [`ArchPerfmonLeaf::unavailable_events`].
    pub event_mask_length: u8,
    /// EBX: bit `i` set means architectural event `i` is *not* available.
    pub unavailable_events: u32,
    /// ECX: supported fixed counters as a bit mask (version 5 and later; 0 before).
    pub fixed_counter_mask: u32,
    /// EDX\[4:0\]: number of contiguous fixed counters (version 2 and later).
    pub fixed_counters: u8,
    /// EDX\[12:5\]: bit width of the fixed counters (version 2 and later).
    pub fixed_counter_width: u8,
    /// EDX\[15\]: AnyThread deprecation.
    pub any_thread_deprecated: bool,
}

impl ArchPerfmonLeaf {
    /// Decodes the four registers of leaf 0xA. Reserved bits are dropped.
    pub const fn from_registers(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
        Self {
            version: (eax & 0xff) as u8,
            gp_counters: ((eax >> 8) & 0xff) as u8,
            gp_counter_width: ((eax >> 16) & 0xff) as u8,
            event_mask_length: (eax >> 24) as u8,
            unavailable_events: ebx,
            fixed_counter_mask: ecx,
            fixed_counters: (edx & 0x1f) as u8,
            fixed_counter_width: ((edx >> 5) & 0xff) as u8,
            any_thread_deprecated: edx & (1 << 15) != 0,
        }
    }

    /// Encodes the leaf as (EAX, EBX, ECX, EDX). `fixed_counters` above 31 is cut to 5 bits.
    pub const fn to_registers(&self) -> (u32, u32, u32, u32) {
        let eax = self.version as u32
            | (self.gp_counters as u32) << 8
            | (self.gp_counter_width as u32) << 16
            | (self.event_mask_length as u32) << 24;
        let edx = (self.fixed_counters as u32 & 0x1f)
            | (self.fixed_counter_width as u32) << 5
            | if self.any_thread_deprecated {
                1 << 15
            } else {
                0
            };
        (eax, self.unavailable_events, self.fixed_counter_mask, edx)
    }

    /// Whether the leaf says `event` can be counted: inside the enumerated length and its
    /// EBX bit clear.
    pub const fn is_event_available(&self, event: ArchEvent) -> bool {
        (event as u32) < self.event_mask_length as u32
            && self.unavailable_events & event.ebx_bit() == 0
    }

    /// An EBX value that marks every enumerated event (`event_mask_length` bits) unavailable
    /// except `keep`.
    pub const fn unavailable_mask_keeping(event_mask_length: u8, keep: u32) -> u32 {
        let all = if event_mask_length >= 32 {
            u32::MAX
        } else {
            (1u32 << event_mask_length) - 1
        };
        all & !keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        // Leaf 0xA of an Intel Pentium G4600 (Kaby Lake), see tests/fixtures.
        let leaf = ArchPerfmonLeaf::from_registers(0x0730_0404, 0, 0, 0x0000_0603);
        assert_eq!(leaf.version, 4);
        assert_eq!(leaf.gp_counters, 4);
        assert_eq!(leaf.gp_counter_width, 48);
        assert_eq!(leaf.event_mask_length, 7);
        assert_eq!(leaf.fixed_counters, 3);
        assert_eq!(leaf.fixed_counter_width, 48);
        assert_eq!(leaf.to_registers(), (0x0730_0404, 0, 0, 0x0000_0603));
    }

    #[test]
    fn events_outside_the_length_are_unavailable() {
        let leaf = ArchPerfmonLeaf::from_registers(0x0100_0002, 0, 0, 0);
        assert!(leaf.is_event_available(ArchEvent::CoreCycles));
        assert!(!leaf.is_event_available(ArchEvent::InstructionsRetired));
    }

    #[test]
    fn unavailable_mask() {
        assert_eq!(
            ArchPerfmonLeaf::unavailable_mask_keeping(7, 0b11),
            0b111_1100
        );
        assert_eq!(ArchPerfmonLeaf::unavailable_mask_keeping(40, 0b11), !0b11);
        assert_eq!(ArchPerfmonLeaf::unavailable_mask_keeping(0, 0b11), 0);
    }
}
