//! Cache descriptors for the deterministic cache leaves (0x4 and AMD's 0x8000_001D).
//!
//! The geometry (line size, ways, sets, ...) comes from the host when the host has sane
//! cache leaves, else from [`default_caches`]. The *sharing* is ours, and consistent with
//! the topology leaves: L1 and L2 are private to a core (shared by its threads), L3 and any
//! larger level are shared by a die (one L3 per die; also the AMD node of leaf 0x8000_001E).

use serde::{Deserialize, Serialize};

use super::field::*;
use crate::cpuid_entry::{find_entry, CpuidEntry};
use crate::topology::ApicIdLayout;
use crate::vendor::CpuVendor;

/// The most subleaves read from a host cache leaf before calling it insane.
pub const MAX_CACHE_SUBLEAVES: u32 = 16;

/// The type of a cache (the cache leaves' `EAX[4:0]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheKind {
    /// Data cache (1).
    Data,
    /// Instruction cache (2).
    Instruction,
    /// Unified cache (3).
    Unified,
}

impl CacheKind {
    /// The encoding in `EAX[4:0]`.
    pub fn code(self) -> u32 {
        match self {
            CacheKind::Data => 1,
            CacheKind::Instruction => 2,
            CacheKind::Unified => 3,
        }
    }

    /// Decodes `EAX[4:0]`; `None` for 0 (no more caches) and reserved values.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(CacheKind::Data),
            2 => Some(CacheKind::Instruction),
            3 => Some(CacheKind::Unified),
            _ => None,
        }
    }
}

/// Which logical processors share a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheScope {
    /// The threads of one core (L1, L2).
    Core,
    /// The logical processors of one die (L3 and beyond).
    Die,
}

impl CacheScope {
    /// The scope we give a cache of `level`: L1 and L2 per core, the rest per die.
    pub fn for_level(level: u8) -> Self {
        if level <= 2 {
            CacheScope::Core
        } else {
            CacheScope::Die
        }
    }

    /// Addressable APIC IDs sharing a cache of this scope.
    pub fn sharing_ids(self, layout: &ApicIdLayout) -> u32 {
        match self {
            CacheScope::Core => layout.ids_per_core(),
            CacheScope::Die => layout.ids_per_die(),
        }
    }
}

/// One cache's geometry and properties, independent of who shares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheDescriptor {
    /// 1 for L1, ...
    pub level: u8,
    /// Data, instruction or unified.
    pub kind: CacheKind,
    /// Line size in bytes.
    pub line_size: u32,
    /// Physical line partitions.
    pub partitions: u32,
    /// Ways of associativity.
    pub ways: u32,
    /// Number of sets.
    pub sets: u32,
    /// Self-initializing (`EAX[8]`).
    pub self_initializing: bool,
    /// Fully associative (`EAX[9]`).
    pub fully_associative: bool,
    /// `EDX[0]`: WBINVD/INVD behaviour bit.
    pub wbinvd: bool,
    /// `EDX[1]`: inclusive of lower levels.
    pub inclusive: bool,
    /// `EDX[2]`: complex indexing (Intel leaf 0x4 only).
    pub complex_indexing: bool,
}

/// Which cache leaf to encode for: Intel's 0x4 carries the core count in `EAX[31:26]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheLeafFlavor {
    /// Leaf 0x4.
    Intel,
    /// Leaf 0x8000_001D.
    Amd,
}

impl CacheDescriptor {
    /// A simple cache with the usual flags (self-initializing, not fully associative,
    /// one partition).
    pub const fn new(level: u8, kind: CacheKind, line_size: u32, ways: u32, sets: u32) -> Self {
        Self {
            level,
            kind,
            line_size,
            partitions: 1,
            ways,
            sets,
            self_initializing: true,
            fully_associative: false,
            wbinvd: false,
            inclusive: false,
            complex_indexing: false,
        }
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        [self.line_size, self.partitions, self.ways, self.sets]
            .iter()
            .map(|&n| u64::from(n))
            .product()
    }

    /// Who shares this cache (see [`CacheScope::for_level`]).
    pub fn scope(&self) -> CacheScope {
        CacheScope::for_level(self.level)
    }

    /// Decodes one subleaf of a cache leaf; `None` for the terminating subleaf (type 0) and
    /// for values that make no sense (reserved type, level 0 or above 4).
    pub fn decode(eax: u32, ebx: u32, ecx: u32, edx: u32) -> Option<Self> {
        let kind = CacheKind::from_code(CACHE_EAX_TYPE.get(eax))?;
        let level = u8::try_from(CACHE_EAX_LEVEL.get(eax))
            .ok()
            .filter(|l| (1..=4).contains(l))?;
        Some(Self {
            level,
            kind,
            line_size: CACHE_EBX_LINE_MINUS_1.get(ebx) + 1,
            partitions: CACHE_EBX_PARTITIONS_MINUS_1.get(ebx) + 1,
            ways: CACHE_EBX_WAYS_MINUS_1.get(ebx) + 1,
            sets: ecx.saturating_add(1),
            self_initializing: CACHE_EAX_SELF_INIT.is_set(eax),
            fully_associative: CACHE_EAX_FULLY_ASSOC.is_set(eax),
            wbinvd: CACHE_EDX_WBINVD.is_set(edx),
            inclusive: CACHE_EDX_INCLUSIVE.is_set(edx),
            complex_indexing: CACHE_EDX_COMPLEX_INDEXING.is_set(edx),
        })
    }

    /// Encodes this cache as one subleaf (EAX, EBX, ECX, EDX) for a topology with `layout`.
    /// Sharing counts are addressable IDs (powers of two), as the SDM and APM define them.
    pub fn encode(&self, flavor: CacheLeafFlavor, layout: &ApicIdLayout) -> [u32; 4] {
        let sharing = self.scope().sharing_ids(layout);
        let mut eax = CACHE_EAX_TYPE.with(0, self.kind.code());
        eax = CACHE_EAX_LEVEL.with(eax, u32::from(self.level));
        eax = CACHE_EAX_SELF_INIT.with_flag(eax, self.self_initializing);
        eax = CACHE_EAX_FULLY_ASSOC.with_flag(eax, self.fully_associative);
        eax = CACHE_EAX_SHARING_MINUS_1.with(eax, sharing - 1);
        if flavor == CacheLeafFlavor::Intel {
            eax = CACHE_EAX_CORES_MINUS_1.with(eax, layout.core_ids_per_package() - 1);
        }
        let mut ebx = CACHE_EBX_LINE_MINUS_1.with(0, self.line_size.saturating_sub(1));
        ebx = CACHE_EBX_PARTITIONS_MINUS_1.with(ebx, self.partitions.saturating_sub(1));
        ebx = CACHE_EBX_WAYS_MINUS_1.with(ebx, self.ways.saturating_sub(1));
        let ecx = self.sets.saturating_sub(1);
        let mut edx = CACHE_EDX_WBINVD.with_flag(0, self.wbinvd);
        edx = CACHE_EDX_INCLUSIVE.with_flag(edx, self.inclusive);
        if flavor == CacheLeafFlavor::Intel {
            edx = CACHE_EDX_COMPLEX_INDEXING.with_flag(edx, self.complex_indexing);
        }
        [eax, ebx, ecx, edx]
    }
}

/// The caches we advertise when the host has no sane cache leaf (synthetic, but plausible):
/// L1d 32 KiB 8-way, L1i 32 KiB 8-way, L2 1 MiB 16-way (per core), L3 32 MiB 16-way
/// (per die), 64-byte lines.
pub fn default_caches() -> Vec<CacheDescriptor> {
    let mut l3 = CacheDescriptor::new(3, CacheKind::Unified, 64, 16, 32 * 1024);
    l3.wbinvd = true;
    vec![
        CacheDescriptor::new(1, CacheKind::Data, 64, 8, 64),
        CacheDescriptor::new(1, CacheKind::Instruction, 64, 8, 64),
        CacheDescriptor::new(2, CacheKind::Unified, 64, 16, 1024),
        l3,
    ]
}

/// The caches of a host cache leaf (`0x4` or `0x8000_001D`), or `None` when the host has no
/// sane data there: missing or all-zero subleaf 0, a reserved type or level, no L1, or no
/// terminating subleaf within [`MAX_CACHE_SUBLEAVES`].
pub fn host_cache_leaf(host: &[CpuidEntry], leaf: u32) -> Option<Vec<CacheDescriptor>> {
    let mut caches = Vec::new();
    for subleaf in 0..MAX_CACHE_SUBLEAVES {
        let Some(e) = find_entry(host, leaf, subleaf) else {
            break;
        };
        if CACHE_EAX_TYPE.get(e.eax) == 0 {
            break;
        }
        caches.push(CacheDescriptor::decode(e.eax, e.ebx, e.ecx, e.edx)?);
        if subleaf + 1 == MAX_CACHE_SUBLEAVES {
            return None;
        }
    }
    if caches.iter().any(|c| c.level == 1) {
        Some(caches)
    } else {
        None
    }
}

/// The caches to advertise: the host's leaf 0x4 or 0x8000_001D (the vendor's own leaf
/// first), else [`default_caches`].
pub fn caches_for(host: &[CpuidEntry], vendor: CpuVendor) -> Vec<CacheDescriptor> {
    let order = if vendor.is_amd_compatible() {
        [super::leaf::AMD_CACHE_PARAMS, super::leaf::CACHE_PARAMS]
    } else {
        [super::leaf::CACHE_PARAMS, super::leaf::AMD_CACHE_PARAMS]
    };
    order
        .iter()
        .find_map(|&leaf| host_cache_leaf(host, leaf))
        .unwrap_or_else(default_caches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_encode_round_trip() {
        // This machine's (AMD EPYC) L3 subleaf of 0x8000_001D.
        let c = CacheDescriptor::decode(0x0000_4163, 0x03c0_003f, 0x0000_7fff, 1).unwrap();
        assert_eq!(
            (c.level, c.kind, c.ways, c.sets),
            (3, CacheKind::Unified, 16, 32768)
        );
        assert_eq!(c.size_bytes(), 32 << 20);
        let layout = ApicIdLayout {
            thread_bits: 1,
            core_bits: 3,
            die_bits: 0,
            socket_bits: 0,
        };
        let [eax, ebx, ecx, edx] = c.encode(CacheLeafFlavor::Amd, &layout);
        // Type 3, level 3, self-initializing; 16 IDs share it (1 << (1 + 3)).
        assert_eq!(
            (eax, ebx, ecx, edx),
            (0x163 | (15 << 14), 0x03c0_003f, 0x7fff, 1)
        );
        assert_eq!(CacheDescriptor::decode(eax, ebx, ecx, edx), Some(c));
    }

    #[test]
    fn insane_host_leaves_are_rejected() {
        let zeros = [CpuidEntry::subleaf(4, 0, 0, 0, 0, 0)];
        assert_eq!(host_cache_leaf(&zeros, 4), None);
        assert_eq!(host_cache_leaf(&[], 4), None);
        // Reserved type 7.
        let bad = [CpuidEntry::subleaf(4, 0, 0x27, 0, 0, 0)];
        assert_eq!(host_cache_leaf(&bad, 4), None);
        // Only an L2: no L1.
        let l2 = [CpuidEntry::subleaf(4, 0, 0x43, 0, 0, 0)];
        assert_eq!(host_cache_leaf(&l2, 4), None);
    }
}
