//! Named bit fields of the CPUID registers this crate reads and writes.
//!
//! Each field is a [`BitField`] constant named `LEAF_REGISTER_FIELD`, so the builder never
//! shifts or masks by hand.

/// A bit field `[lo, hi]` (inclusive) of a 32-bit register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitField {
    lo: u32,
    hi: u32,
}

impl BitField {
    /// The field of bits `lo..=hi`.
    pub const fn new(lo: u32, hi: u32) -> Self {
        assert!(lo <= hi && hi < 32);
        Self { lo, hi }
    }

    /// A one-bit field (a flag).
    pub const fn bit(n: u32) -> Self {
        Self::new(n, n)
    }

    /// The largest value the field holds.
    pub const fn max(self) -> u32 {
        u32::MAX >> (31 - (self.hi - self.lo))
    }

    /// The field's bits in place.
    pub const fn mask(self) -> u32 {
        self.max() << self.lo
    }

    /// The field's value in `reg`.
    pub const fn get(self, reg: u32) -> u32 {
        (reg & self.mask()) >> self.lo
    }

    /// Whether a one-bit field is set in `reg`.
    pub const fn is_set(self, reg: u32) -> bool {
        self.get(reg) != 0
    }

    /// `reg` with the field set to `value`, saturated to [`BitField::max`] when it does not
    /// fit (what real CPUs do for legacy count fields that outgrew their width).
    pub const fn with(self, reg: u32, value: u32) -> u32 {
        let v = if value > self.max() {
            self.max()
        } else {
            value
        };
        (reg & !self.mask()) | (v << self.lo)
    }

    /// `reg` with the field set to the low bits of `value` (for ID fields, which wrap like
    /// the hardware's instead of saturating).
    pub const fn with_low_bits(self, reg: u32, value: u32) -> u32 {
        (reg & !self.mask()) | ((value & self.max()) << self.lo)
    }

    /// `reg` with a one-bit field set or cleared.
    pub const fn with_flag(self, reg: u32, on: bool) -> u32 {
        self.with(reg, on as u32)
    }
}

// Leaf 0x1.
/// Leaf `0x1 EBX[31:24]`: initial (xAPIC) APIC ID.
pub const LEAF1_EBX_INITIAL_APIC_ID: BitField = BitField::new(24, 31);
/// Leaf `0x1 EBX[23:16]`: addressable logical processor IDs per package.
pub const LEAF1_EBX_LOGICAL_PER_PACKAGE: BitField = BitField::new(16, 23);
/// Leaf `0x1 ECX[21]`: x2APIC supported.
pub const LEAF1_ECX_X2APIC: BitField = BitField::bit(21);
/// Leaf `0x1 EDX[28]`: HTT, the package has more than one logical processor ID.
pub const LEAF1_EDX_HTT: BitField = BitField::bit(28);

// Deterministic cache parameters: leaf 0x4 (Intel) and 0x8000_001D (AMD) share this layout.
/// Cache leaf `EAX[4:0]`: cache type (0 = no more caches, 1 data, 2 instruction, 3 unified).
pub const CACHE_EAX_TYPE: BitField = BitField::new(0, 4);
/// Cache leaf `EAX[7:5]`: cache level (1-based).
pub const CACHE_EAX_LEVEL: BitField = BitField::new(5, 7);
/// Cache leaf `EAX[8]`: self-initializing.
pub const CACHE_EAX_SELF_INIT: BitField = BitField::bit(8);
/// Cache leaf `EAX[9]`: fully associative.
pub const CACHE_EAX_FULLY_ASSOC: BitField = BitField::bit(9);
/// Cache leaf `EAX[25:14]`: addressable logical processor IDs sharing this cache, minus 1.
pub const CACHE_EAX_SHARING_MINUS_1: BitField = BitField::new(14, 25);
/// Leaf `0x4 EAX[31:26]`: addressable core IDs per package, minus 1 (Intel only; AMD reserved).
pub const CACHE_EAX_CORES_MINUS_1: BitField = BitField::new(26, 31);
/// Cache leaf `EBX[11:0]`: line size in bytes, minus 1.
pub const CACHE_EBX_LINE_MINUS_1: BitField = BitField::new(0, 11);
/// Cache leaf `EBX[21:12]`: physical line partitions, minus 1.
pub const CACHE_EBX_PARTITIONS_MINUS_1: BitField = BitField::new(12, 21);
/// Cache leaf `EBX[31:22]`: ways of associativity, minus 1.
pub const CACHE_EBX_WAYS_MINUS_1: BitField = BitField::new(22, 31);
/// Cache leaf `EDX[0]`: WBINVD/INVD does not act on lower levels' sharing threads.
pub const CACHE_EDX_WBINVD: BitField = BitField::bit(0);
/// Cache leaf `EDX[1]`: inclusive of lower levels.
pub const CACHE_EDX_INCLUSIVE: BitField = BitField::bit(1);
/// Leaf `0x4 EDX[2]`: complex indexing (Intel).
pub const CACHE_EDX_COMPLEX_INDEXING: BitField = BitField::bit(2);

// Extended topology enumeration: leaf 0xB and (V2) leaf 0x1F.
/// Topology leaf `EAX[4:0]`: shift right of the x2APIC ID to get the next level's ID.
pub const TOPO_EAX_SHIFT: BitField = BitField::new(0, 4);
/// Topology leaf `EBX[15:0]`: logical processors at this level.
pub const TOPO_EBX_LOGICAL_COUNT: BitField = BitField::new(0, 15);
/// Topology leaf `ECX[7:0]`: the subleaf (level) number.
pub const TOPO_ECX_LEVEL_NUMBER: BitField = BitField::new(0, 7);
/// Topology leaf `ECX[15:8]`: the level type ([`super::LevelType`]).
pub const TOPO_ECX_LEVEL_TYPE: BitField = BitField::new(8, 15);

// AMD extended leaves.
/// Leaf `0x8000_0001 ECX[1]`: CmpLegacy (core multi-processing legacy mode).
pub const AMD_EXT1_ECX_CMP_LEGACY: BitField = BitField::bit(1);
/// Leaf `0x8000_0001 ECX[22]`: TopoExt (leaves 0x8000_001D and 0x8000_001E exist).
pub const AMD_EXT1_ECX_TOPOEXT: BitField = BitField::bit(22);
/// Leaf `0x8000_0008 ECX[7:0]`: NC, logical processors per package minus 1.
pub const AMD_SIZE_ECX_NC: BitField = BitField::new(0, 7);
/// Leaf `0x8000_0008 ECX[15:12]`: ApicIdSize, APIC ID bits of the logical processors of a
/// package.
pub const AMD_SIZE_ECX_APIC_ID_SIZE: BitField = BitField::new(12, 15);
/// Leaf `0x8000_001E EBX[7:0]`: core ID (within the package).
pub const AMD_TOPO_EBX_CORE_ID: BitField = BitField::new(0, 7);
/// Leaf `0x8000_001E EBX[15:8]`: threads per core, minus 1.
pub const AMD_TOPO_EBX_THREADS_MINUS_1: BitField = BitField::new(8, 15);
/// Leaf `0x8000_001E ECX[7:0]`: node ID (the die, in Linux's eyes).
pub const AMD_TOPO_ECX_NODE_ID: BitField = BitField::new(0, 7);
/// Leaf `0x8000_001E ECX[10:8]`: nodes per processor (package), minus 1.
pub const AMD_TOPO_ECX_NODES_MINUS_1: BitField = BitField::new(8, 10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_field_basics() {
        let f = BitField::new(14, 25);
        assert_eq!(f.max(), 0xfff);
        assert_eq!(f.mask(), 0x03ff_c000);
        assert_eq!(f.get(f.with(0xffff_ffff, 5)), 5);
        assert_eq!(f.with(0, 0x1_0000), 0xfff << 14);
        assert_eq!(f.with_low_bits(0, 0x1001), 1 << 14);
        assert_eq!(BitField::new(0, 31).max(), u32::MAX);
        assert_eq!(LEAF1_EDX_HTT.with_flag(0, true), 1 << 28);
        assert!(LEAF1_EDX_HTT.is_set(1 << 28));
    }
}
