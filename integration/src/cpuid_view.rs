//! What a vCPU's CPUID says about where it sits, decoded with the `raw-cpuid` crate (an
//! independent decoder, not this workspace's `topology` crate) from the results guest code
//! read ([`crate::guest::agent`]).
//!
//! ```
//! use integration::cpuid_view::decode_location;
//! use topology::hwloc::CpuidResult;
//!
//! // Leaf 0 (max leaf 0xB, "GenuineIntel"), leaf 1, and leaf 0xB for x2APIC ID 9:
//! // 1 thread bit, 2 core bits (2 threads per core, 3 cores per socket).
//! let r = |leaf, subleaf, eax, ebx, ecx, edx| CpuidResult { leaf, subleaf, eax, ebx, ecx, edx };
//! let results = [
//!     r(0, 0, 0xb, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
//!     r(1, 0, 0, 9 << 24, 0, 0),
//!     r(0xb, 0, 1, 2, 0x100, 9),
//!     r(0xb, 1, 3, 6, 0x201, 9),
//!     r(0xb, 2, 0, 0, 2, 9),
//! ];
//! let loc = decode_location(&results).unwrap();
//! assert_eq!((loc.socket, loc.die, loc.core, loc.thread), (1, 0, 0, 1));
//! assert_eq!(loc.x2apic_id, 9);
//! ```

use std::sync::Arc;

use raw_cpuid::{CpuId, CpuIdReader, CpuIdResult, TopologyType};
use serde::Serialize;
use topology::hwloc::CpuidResult;

use crate::IntegrationError;

/// A `raw-cpuid` source that answers from what guest code read: the result of the exact
/// (leaf, subleaf) query, or zeros for a query that was not executed (as KVM answers a leaf
/// it has no entry for).
#[derive(Clone, Debug)]
pub struct GuestCpuidReader(Arc<Vec<CpuidResult>>);

impl GuestCpuidReader {
    /// A reader over these results.
    pub fn new(results: &[CpuidResult]) -> Self {
        Self(Arc::new(results.to_vec()))
    }
}

impl CpuIdReader for GuestCpuidReader {
    fn cpuid2(&self, eax: u32, ecx: u32) -> CpuIdResult {
        let hit = self
            .0
            .iter()
            .find(|r| r.leaf == eax && r.subleaf == ecx)
            .copied()
            .unwrap_or_default();
        CpuIdResult {
            eax: hit.eax,
            ebx: hit.ebx,
            ecx: hit.ecx,
            edx: hit.edx,
        }
    }
}

/// One vCPU's place, as its CPUID says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DecodedLocation {
    /// Leaf 0x1 EBX\[31:24\]: the initial (8-bit) APIC ID.
    pub initial_apic_id: u8,
    /// The x2APIC ID of the topology leaf.
    pub x2apic_id: u32,
    /// The package: the x2APIC ID shifted right by the last level's shift.
    pub socket: u32,
    /// The die within the package (0 without a die level).
    pub die: u32,
    /// The core field (within the die).
    pub core: u32,
    /// The thread (SMT) field (within the core).
    pub thread: u32,
    /// Which leaf it came from: `0x1f` (with dies) or `0xb`.
    pub leaf: u32,
}

fn field(id: u32, shift: u32, width: u32) -> u32 {
    let v = id.checked_shr(shift).unwrap_or(0);
    if width >= 32 {
        v
    } else {
        v & ((1u32 << width) - 1)
    }
}

/// Decodes the socket, die, core and thread of a vCPU from what it read from CPUID, with
/// `raw-cpuid`: the levels of leaf 0x1F if it has any, else those of leaf 0xB.
pub fn decode_location(results: &[CpuidResult]) -> Result<DecodedLocation, IntegrationError> {
    let cpuid = CpuId::with_cpuid_reader(GuestCpuidReader::new(results));
    let initial_apic_id = cpuid
        .get_feature_info()
        .map(|f| f.initial_local_apic_id())
        .ok_or_else(|| IntegrationError::Guest("the guest read no CPUID leaf 0x1".into()))?;
    let (leaf, levels) = match cpuid.get_extended_topology_info_v2() {
        Some(levels) => {
            let levels: Vec<_> = levels.collect();
            if levels.is_empty() {
                (0xb, Vec::new())
            } else {
                (0x1f, levels)
            }
        }
        None => (0xb, Vec::new()),
    };
    let levels = if levels.is_empty() {
        cpuid
            .get_extended_topology_info()
            .map(|l| l.collect::<Vec<_>>())
            .unwrap_or_default()
    } else {
        levels
    };
    let Some(last) = levels.last() else {
        return Err(IntegrationError::Guest(
            "the guest read no topology levels from CPUID leaf 0xB or 0x1F".into(),
        ));
    };
    let x2apic_id = last.x2apic_id();
    let mut loc = DecodedLocation {
        initial_apic_id,
        x2apic_id,
        socket: x2apic_id
            .checked_shr(last.shift_right_for_next_apic_id())
            .unwrap_or(0),
        die: 0,
        core: 0,
        thread: 0,
        leaf,
    };
    let mut below = 0u32;
    for l in &levels {
        let shift = l.shift_right_for_next_apic_id();
        let value = field(x2apic_id, below, shift.saturating_sub(below));
        match l.level_type() {
            TopologyType::SMT => loc.thread = value,
            TopologyType::Core => loc.core = value,
            TopologyType::Die => loc.die = value,
            // Module and tile levels (between core and die) are not produced by this VMM.
            _ => {}
        }
        below = shift;
    }
    Ok(loc)
}

/// CPUID leaf 0xB subleaf 0 EDX as the guest read it (its x2APIC ID), if it was queried.
pub fn leaf_b_edx(results: &[CpuidResult]) -> Option<u32> {
    results
        .iter()
        .find(|r| r.leaf == 0xb && r.subleaf == 0)
        .map(|r| r.edx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use topology::{build_vcpu_cpuid, host, hwloc, CpuTopology, CpuVendor};

    #[test]
    fn decodes_what_topology_generates_for_sparse_shapes() {
        for (vendor, base) in [
            (CpuVendor::Intel, host::synthetic_intel()),
            (CpuVendor::Amd, host::synthetic_amd()),
        ] {
            for (s, d, c, t) in [(2, 1, 3, 2), (1, 3, 3, 1), (3, 1, 5, 1), (2, 2, 3, 2)] {
                let topo = CpuTopology::new(s, d, c, t).unwrap();
                for i in 0..topo.max_vcpus() {
                    let e = build_vcpu_cpuid(&base, vendor, &topo, i).unwrap();
                    let results = hwloc::answer_queries(&e, &hwloc::topology_queries(&e));
                    let got = decode_location(&results).unwrap();
                    let want = topo.location(i).unwrap();
                    assert_eq!(
                        (got.socket, got.die, got.core, got.thread),
                        (want.socket, want.die, want.core, want.thread),
                        "{vendor:?} {topo} vCPU {i}"
                    );
                    assert_eq!(got.x2apic_id, topo.apic_id(i).unwrap());
                    assert_eq!(leaf_b_edx(&results), Some(got.x2apic_id));
                    assert_eq!(got.leaf, 0x1f);
                }
            }
        }
    }

    #[test]
    fn missing_leaves_are_errors() {
        assert!(decode_location(&[]).is_err());
        let leaf0 = CpuidResult {
            leaf: 0,
            eax: 1,
            ..Default::default()
        };
        let leaf1 = CpuidResult {
            leaf: 1,
            ..Default::default()
        };
        assert!(decode_location(&[leaf0, leaf1]).is_err());
    }
}
