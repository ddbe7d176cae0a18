//! The CPUID builder: one vCPU's CPUID entries from the host's, with the topology leaves
//! rebuilt for a [`CpuTopology`].
//!
//! What [`build_vcpu_cpuid`] owns (everything else passes through untouched):
//!
//! | Leaf | What we set |
//! |------|-------------|
//! | 0x0 | EAX (highest basic leaf) raised to at least 0x1F |
//! | 0x1 | `EBX[31:24]` APIC ID (low 8 bits), `EBX[23:16]` `1 << package_shift` (saturated at 255), `EDX[28]` HTT when that is > 1 |
//! | 0x4 | all subleaves rebuilt (every vendor): host geometry, our sharing; `EAX[31:26]` core IDs per package - 1 (saturated at 63) |
//! | 0xB | rebuilt: SMT (shift = thread bits), Core (shift = package shift, count = logical CPUs per package), invalid |
//! | 0x1F | rebuilt: SMT, Core (shift to the die, count per die), Die (type 5, package shift, count per package), invalid |
//! | 0x8000_0000 | AMD/Hygon: EAX raised to at least 0x8000_001E |
//! | 0x8000_0001 | AMD/Hygon: `ECX[1]` CmpLegacy (when > 1 logical CPU per package), `ECX[22]` TopoExt |
//! | 0x8000_0008 | AMD/Hygon: `ECX[7:0]` logical CPUs per package - 1, `ECX[15:12]` package shift |
//! | 0x8000_001D | AMD/Hygon: rebuilt like 0x4 (no core count field) |
//! | 0x8000_001E | AMD/Hygon: EAX x2APIC ID, EBX core ID in package / threads per core - 1, ECX node (= die) ID / nodes per package - 1 |
//!
//! Caches: L1 and L2 are shared by the threads of a core, L3 (and beyond) by a die, the same
//! die that leaf 0x1F's die level and leaf 0x8000_001E's node describe. Counts are sized for
//! the whole topology (the maximum vCPU count), so hot-added vCPUs fit what was advertised,
//! and every vCPU gets identical shift widths. Legacy count fields that are too narrow
//! saturate (as on real CPUs); ID fields keep their low bits.

pub mod cache;
pub mod field;

use serde::{Deserialize, Serialize};

use self::cache::{caches_for, CacheLeafFlavor};
use self::field::*;
use crate::cpuid_entry::CpuidEntry;
use crate::error::TopologyError;
use crate::topology::{ApicIdLayout, CpuTopology};
use crate::vendor::CpuVendor;

/// CPUID leaf numbers this crate knows by name.
pub mod leaf {
    /// Highest basic leaf and vendor string.
    pub const VENDOR: u32 = 0x0;
    /// Version and feature information (APIC ID, HTT).
    pub const FEATURES: u32 = 0x1;
    /// Deterministic cache parameters (Intel).
    pub const CACHE_PARAMS: u32 = 0x4;
    /// Structured extended feature flags.
    pub const EXT_FEATURES: u32 = 0x7;
    /// Extended topology enumeration.
    pub const EXT_TOPOLOGY: u32 = 0xB;
    /// Hybrid information (Intel).
    pub const HYBRID: u32 = 0x1A;
    /// V2 extended topology enumeration (adds the die level).
    pub const EXT_TOPOLOGY_V2: u32 = 0x1F;
    /// Highest extended leaf (and, on AMD, the vendor string).
    pub const EXT_MAX: u32 = 0x8000_0000;
    /// Extended feature flags (AMD CmpLegacy, TopoExt).
    pub const EXT_FEATURES_AMD: u32 = 0x8000_0001;
    /// First of the three brand string leaves.
    pub const BRAND_STRING_FIRST: u32 = 0x8000_0002;
    /// Last of the three brand string leaves.
    pub const BRAND_STRING_LAST: u32 = 0x8000_0004;
    /// AMD legacy L1 cache information.
    pub const AMD_L1_CACHE: u32 = 0x8000_0005;
    /// AMD legacy L2/L3 cache information.
    pub const AMD_L2_L3_CACHE: u32 = 0x8000_0006;
    /// Address sizes and (AMD) logical processor count / APIC ID size.
    pub const ADDRESS_SIZES: u32 = 0x8000_0008;
    /// AMD cache topology (TopoExt).
    pub const AMD_CACHE_PARAMS: u32 = 0x8000_001D;
    /// AMD processor topology (TopoExt): extended APIC ID, core and node IDs.
    pub const AMD_TOPOLOGY: u32 = 0x8000_001E;
    /// AMD extended CPU topology (Zen 4+; not built here).
    pub const AMD_EXT_TOPOLOGY: u32 = 0x8000_0026;
}

/// Whether CPUID `leaf`'s output depends on the subleaf (ECX), so that a query must match
/// ECX too. Used for hwloc dumps' input masks and when reading a host's CPUID.
pub fn leaf_has_subleaves(leaf: u32) -> bool {
    matches!(
        leaf,
        0x4 | 0x7
            | 0xB
            | 0xD
            | 0xF
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1B
            | 0x1D
            | 0x1E
            | 0x1F
            | 0x20
            | 0x23
            | 0x24
            | 0x8000_001D
            | 0x8000_0020
            | 0x8000_0026
    )
}

/// Level types of leaves 0xB and 0x1F (`ECX[15:8]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LevelType {
    /// 0: invalid; terminates the list.
    Invalid,
    /// 1: SMT (threads of a core).
    Smt,
    /// 2: core.
    Core,
    /// 5: die.
    Die,
}

impl LevelType {
    /// The encoding in `ECX[15:8]`.
    pub fn code(self) -> u32 {
        match self {
            LevelType::Invalid => 0,
            LevelType::Smt => 1,
            LevelType::Core => 2,
            LevelType::Die => 5,
        }
    }
}

/// One level of leaf 0xB / 0x1F.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopologyLevel {
    /// The level's type.
    pub kind: LevelType,
    /// Shift right of the x2APIC ID to get the next level's ID.
    pub shift: u32,
    /// Logical processors at this level (within one instance of the next level up).
    pub logical_count: u32,
}

/// The SMT level, the first of both topology leaves: the threads of a core.
fn smt_level(t: &CpuTopology) -> TopologyLevel {
    TopologyLevel {
        kind: LevelType::Smt,
        shift: t.apic_id_layout().core_shift(),
        logical_count: t.threads(),
    }
}

/// The levels of leaf 0xB for `t` (without the terminating invalid level): SMT, then Core
/// with the package shift (leaf 0xB has no die level, so the die bits fold into the core).
pub fn leaf_0xb_levels(t: &CpuTopology) -> Vec<TopologyLevel> {
    vec![
        smt_level(t),
        TopologyLevel {
            kind: LevelType::Core,
            shift: t.apic_id_layout().package_shift(),
            logical_count: t.threads_per_socket(),
        },
    ]
}

/// The levels of leaf 0x1F for `t` (without the terminating invalid level): SMT, Core, Die.
/// The die level is always present (also with one die per socket), so every vCPU and every
/// shape reports the same level list.
pub fn leaf_0x1f_levels(t: &CpuTopology) -> Vec<TopologyLevel> {
    let l = t.apic_id_layout();
    vec![
        smt_level(t),
        TopologyLevel {
            kind: LevelType::Core,
            shift: l.die_shift(),
            logical_count: t.threads_per_die(),
        },
        TopologyLevel {
            kind: LevelType::Die,
            shift: l.package_shift(),
            logical_count: t.threads_per_socket(),
        },
    ]
}

/// The subleaves of an extended topology leaf: one per level, then the invalid terminator.
/// EDX is the full x2APIC ID in each, `ECX[7:0]` the subleaf number.
fn topology_leaf(function: u32, levels: &[TopologyLevel], apic_id: u32) -> Vec<CpuidEntry> {
    let invalid = TopologyLevel {
        kind: LevelType::Invalid,
        shift: 0,
        logical_count: 0,
    };
    levels
        .iter()
        .chain(std::iter::once(&invalid))
        .zip(0u32..)
        .map(|(level, subleaf)| {
            let eax = TOPO_EAX_SHIFT.with(0, level.shift);
            let ebx = TOPO_EBX_LOGICAL_COUNT.with(0, level.logical_count);
            let ecx = TOPO_ECX_LEVEL_NUMBER.with(0, subleaf);
            let ecx = TOPO_ECX_LEVEL_TYPE.with(ecx, level.kind.code());
            CpuidEntry::subleaf(function, subleaf, eax, ebx, ecx, apic_id)
        })
        .collect()
}

/// The subleaves of a cache leaf: one per cache, then a zero terminator.
pub(crate) fn cache_leaf(
    function: u32,
    flavor: CacheLeafFlavor,
    caches: &[cache::CacheDescriptor],
    layout: &ApicIdLayout,
) -> Vec<CpuidEntry> {
    let terminator = [0u32; 4];
    caches
        .iter()
        .map(|c| c.encode(flavor, layout))
        .chain(std::iter::once(terminator))
        .zip(0u32..)
        .map(|([eax, ebx, ecx, edx], subleaf)| {
            CpuidEntry::subleaf(function, subleaf, eax, ebx, ecx, edx)
        })
        .collect()
}

/// The entry answering `function` (subleaf 0), inserted from `make` when missing.
fn entry_or_insert(
    entries: &mut Vec<CpuidEntry>,
    function: u32,
    make: impl FnOnce() -> CpuidEntry,
) -> &mut CpuidEntry {
    let idx = match entries.iter().position(|e| e.matches(function, 0)) {
        Some(i) => i,
        None => {
            entries.push(make());
            entries.len() - 1
        }
    };
    &mut entries[idx]
}

/// Whether the builder replaces every subleaf of `function` for `vendor`.
fn is_rebuilt_leaf(function: u32, vendor: CpuVendor) -> bool {
    match function {
        leaf::CACHE_PARAMS | leaf::EXT_TOPOLOGY | leaf::EXT_TOPOLOGY_V2 => true,
        leaf::AMD_CACHE_PARAMS | leaf::AMD_TOPOLOGY => vendor.is_amd_compatible(),
        _ => false,
    }
}

/// The whole CPUID set for vCPU `vcpu_index` of `topology`, built from the `host`'s supported
/// entries (e.g. `KVM_GET_SUPPORTED_CPUID`) for `vendor`. See the [module
/// documentation](self) for the leaves it owns; all others pass through untouched. The
/// result is sorted by (leaf, subleaf).
///
/// # Errors
///
/// [`TopologyError::IndexOutOfRange`] for a `vcpu_index` beyond the topology,
/// [`TopologyError::VendorMismatch`] for a `vendor` that differs from the one in the host's
/// leaf 0.
pub fn build_vcpu_cpuid(
    host: &[CpuidEntry],
    vendor: CpuVendor,
    topology: &CpuTopology,
    vcpu_index: u32,
) -> Result<Vec<CpuidEntry>, TopologyError> {
    let apic_id = topology.apic_id(vcpu_index)?;
    let loc = topology.location(vcpu_index)?;
    if let Some(host_vendor) = CpuVendor::from_entries(host) {
        if host_vendor != vendor {
            return Err(TopologyError::VendorMismatch {
                requested: vendor,
                host: host_vendor,
            });
        }
    }
    let layout = topology.apic_id_layout();
    let caches = caches_for(host, vendor);
    let (vendor_ebx, vendor_ecx, vendor_edx) = vendor.leaf0_registers();

    let mut out: Vec<CpuidEntry> = host
        .iter()
        .filter(|e| !is_rebuilt_leaf(e.function, vendor))
        .copied()
        .collect();

    // Leaf 0: make room for leaf 0x1F.
    let e = entry_or_insert(&mut out, leaf::VENDOR, || {
        CpuidEntry::leaf(leaf::VENDOR, 0, vendor_ebx, vendor_ecx, vendor_edx)
    });
    e.eax = e.eax.max(leaf::EXT_TOPOLOGY_V2);

    // Leaf 1: APIC ID, addressable IDs per package, HTT.
    let e = entry_or_insert(&mut out, leaf::FEATURES, || {
        CpuidEntry::leaf(leaf::FEATURES, 0, 0, 0, 0)
    });
    e.ebx = LEAF1_EBX_INITIAL_APIC_ID.with_low_bits(e.ebx, apic_id);
    e.ebx = LEAF1_EBX_LOGICAL_PER_PACKAGE.with(e.ebx, layout.ids_per_package());
    e.edx = LEAF1_EDX_HTT.with_flag(e.edx, layout.ids_per_package() > 1);

    out.extend(cache_leaf(
        leaf::CACHE_PARAMS,
        CacheLeafFlavor::Intel,
        &caches,
        &layout,
    ));
    out.extend(topology_leaf(
        leaf::EXT_TOPOLOGY,
        &leaf_0xb_levels(topology),
        apic_id,
    ));
    out.extend(topology_leaf(
        leaf::EXT_TOPOLOGY_V2,
        &leaf_0x1f_levels(topology),
        apic_id,
    ));

    if vendor.is_amd_compatible() {
        let e = entry_or_insert(&mut out, leaf::EXT_MAX, || {
            CpuidEntry::leaf(leaf::EXT_MAX, 0, vendor_ebx, vendor_ecx, vendor_edx)
        });
        e.eax = e.eax.max(leaf::AMD_TOPOLOGY);

        let e = entry_or_insert(&mut out, leaf::EXT_FEATURES_AMD, || {
            CpuidEntry::leaf(leaf::EXT_FEATURES_AMD, 0, 0, 0, 0)
        });
        e.ecx = AMD_EXT1_ECX_CMP_LEGACY.with_flag(e.ecx, topology.threads_per_socket() > 1);
        e.ecx = AMD_EXT1_ECX_TOPOEXT.with_flag(e.ecx, true);

        let e = entry_or_insert(&mut out, leaf::ADDRESS_SIZES, || {
            CpuidEntry::leaf(leaf::ADDRESS_SIZES, 0, 0, 0, 0)
        });
        e.ecx = AMD_SIZE_ECX_NC.with(e.ecx, topology.threads_per_socket() - 1);
        e.ecx = AMD_SIZE_ECX_APIC_ID_SIZE.with(e.ecx, layout.package_shift());

        out.extend(cache_leaf(
            leaf::AMD_CACHE_PARAMS,
            CacheLeafFlavor::Amd,
            &caches,
            &layout,
        ));

        let package_mask = layout.ids_per_package() - 1;
        let core_in_package = (apic_id & package_mask) >> layout.core_shift();
        let node_id = loc.socket * topology.dies() + loc.die;
        let ebx = AMD_TOPO_EBX_CORE_ID.with_low_bits(0, core_in_package);
        let ebx = AMD_TOPO_EBX_THREADS_MINUS_1.with(ebx, topology.threads() - 1);
        let ecx = AMD_TOPO_ECX_NODE_ID.with_low_bits(0, node_id);
        let ecx = AMD_TOPO_ECX_NODES_MINUS_1.with(ecx, topology.dies() - 1);
        out.push(CpuidEntry::leaf(leaf::AMD_TOPOLOGY, apic_id, ebx, ecx, 0));
    }

    out.sort_by_key(|e| (e.function, e.index));
    Ok(out)
}
