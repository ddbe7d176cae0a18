//! AMD's (and Hygon's) PMU CPUID bits, as typed fields (AMD64 APM Vol. 3, appendix E
//! "Obtaining Processor Information Via the CPUID Instruction").

use serde::{Deserialize, Serialize};

/// Extended feature identifiers.
pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Extended performance monitoring and debug.
pub const LEAF_EXT_PERFMON_DEBUG: u32 = 0x8000_0022;

/// Leaf 0x8000_0001 ECX bit 23, PerfCtrExtCore: six core counters at `MSR C001_0200..020B`.
pub const EXT_FEATURES_ECX_PERFCTR_EXT_CORE: u32 = 1 << 23;
/// Leaf 0x8000_0001 ECX bit 24, PerfCtrExtNB: northbridge (data fabric) counters.
pub const EXT_FEATURES_ECX_PERFCTR_EXT_NB: u32 = 1 << 24;
/// Leaf 0x8000_0001 ECX bit 28, PerfCtrExtLLC: last level cache (L3) counters.
pub const EXT_FEATURES_ECX_PERFCTR_EXT_LLC: u32 = 1 << 28;

/// Leaf 0x8000_0001 ECX, as the few PMU bits this crate edits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmdExtPmuFeatures {
    /// PerfCtrExtCore (bit 23).
    pub perfctr_ext_core: bool,
    /// PerfCtrExtNB (bit 24).
    pub perfctr_ext_nb: bool,
    /// PerfCtrExtLLC (bit 28).
    pub perfctr_ext_llc: bool,
}

impl AmdExtPmuFeatures {
    /// Reads the PMU bits of leaf 0x8000_0001 ECX.
    pub const fn from_ecx(ecx: u32) -> Self {
        Self {
            perfctr_ext_core: ecx & EXT_FEATURES_ECX_PERFCTR_EXT_CORE != 0,
            perfctr_ext_nb: ecx & EXT_FEATURES_ECX_PERFCTR_EXT_NB != 0,
            perfctr_ext_llc: ecx & EXT_FEATURES_ECX_PERFCTR_EXT_LLC != 0,
        }
    }

    /// Writes these bits into `ecx`, leaving every other bit as it is.
    pub const fn apply_to_ecx(&self, ecx: u32) -> u32 {
        let mask = EXT_FEATURES_ECX_PERFCTR_EXT_CORE
            | EXT_FEATURES_ECX_PERFCTR_EXT_NB
            | EXT_FEATURES_ECX_PERFCTR_EXT_LLC;
        let mut bits = 0;
        if self.perfctr_ext_core {
            bits |= EXT_FEATURES_ECX_PERFCTR_EXT_CORE;
        }
        if self.perfctr_ext_nb {
            bits |= EXT_FEATURES_ECX_PERFCTR_EXT_NB;
        }
        if self.perfctr_ext_llc {
            bits |= EXT_FEATURES_ECX_PERFCTR_EXT_LLC;
        }
        (ecx & !mask) | bits
    }
}

/// Leaf 0x8000_0022 (extended performance monitoring and debug), field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmdPerfMonDebugLeaf {
    /// EAX\[0\] PerfMonV2: global control and status MSRs.
    pub perfmon_v2: bool,
    /// EAX\[1\] LbrStack: last branch record stack.
    pub lbr_stack: bool,
    /// EAX\[2\] LbrAndPmcFreeze: freeze LBR and counters on counter overflow.
    pub lbr_and_pmc_freeze: bool,
    /// EBX\[3:0\] NumPerfCtrCore: number of core counters.
    pub core_counters: u8,
    /// EBX\[9:4\] NumLbrStackSize: LBR stack entries.
    pub lbr_stack_size: u8,
    /// EBX\[15:10\] NumPerfCtrNB: northbridge (data fabric) counters.
    pub nb_counters: u8,
    /// EBX\[21:16\] NumPerfCtrUmc: memory controller counters.
    pub umc_counters: u8,
    /// ECX: active memory controller mask.
    pub active_umc_mask: u32,
}

impl AmdPerfMonDebugLeaf {
    /// Decodes the registers of leaf 0x8000_0022 (EDX is reserved and ignored).
    pub const fn from_registers(eax: u32, ebx: u32, ecx: u32) -> Self {
        Self {
            perfmon_v2: eax & 1 != 0,
            lbr_stack: eax & (1 << 1) != 0,
            lbr_and_pmc_freeze: eax & (1 << 2) != 0,
            core_counters: (ebx & 0xf) as u8,
            lbr_stack_size: ((ebx >> 4) & 0x3f) as u8,
            nb_counters: ((ebx >> 10) & 0x3f) as u8,
            umc_counters: ((ebx >> 16) & 0x3f) as u8,
            active_umc_mask: ecx,
        }
    }

    /// Encodes the leaf as (EAX, EBX, ECX, EDX); fields wider than their bits are cut.
    pub const fn to_registers(&self) -> (u32, u32, u32, u32) {
        let eax = (self.perfmon_v2 as u32)
            | (self.lbr_stack as u32) << 1
            | (self.lbr_and_pmc_freeze as u32) << 2;
        let ebx = (self.core_counters as u32 & 0xf)
            | (self.lbr_stack_size as u32 & 0x3f) << 4
            | (self.nb_counters as u32 & 0x3f) << 10
            | (self.umc_counters as u32 & 0x3f) << 16;
        (eax, ebx, self.active_umc_mask, 0)
    }

    /// Only the core counters (PerfMonV2 and their number); LBR and uncore counters dropped.
    pub const fn core_counters_only(&self) -> Self {
        Self {
            perfmon_v2: self.perfmon_v2,
            lbr_stack: false,
            lbr_and_pmc_freeze: false,
            core_counters: self.core_counters,
            lbr_stack_size: 0,
            nb_counters: 0,
            umc_counters: 0,
            active_umc_mask: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_features_only_touch_pmu_bits() {
        // Leaf 0x8000_0001 ECX of an AMD Ryzen 5 5600G, see tests/fixtures.
        let ecx = 0x75C2_37FF;
        let f = AmdExtPmuFeatures::from_ecx(ecx);
        assert!(f.perfctr_ext_core && f.perfctr_ext_nb && f.perfctr_ext_llc);
        assert_eq!(f.apply_to_ecx(ecx), ecx);
        let none = AmdExtPmuFeatures::default().apply_to_ecx(ecx);
        assert_eq!(none, ecx & !((1 << 23) | (1 << 24) | (1 << 28)));
    }

    #[test]
    fn perfmon_debug_round_trip() {
        let leaf = AmdPerfMonDebugLeaf::from_registers(0x7, 0x0003_4106, 0xf);
        assert!(leaf.perfmon_v2 && leaf.lbr_stack && leaf.lbr_and_pmc_freeze);
        assert_eq!(leaf.core_counters, 6);
        assert_eq!(leaf.lbr_stack_size, 16);
        assert_eq!(leaf.nb_counters, 16);
        assert_eq!(leaf.umc_counters, 3);
        assert_eq!(leaf.to_registers(), (0x7, 0x0003_4106, 0xf, 0));
        assert_eq!(leaf.core_counters_only().to_registers(), (0x1, 0x6, 0, 0));
    }
}
