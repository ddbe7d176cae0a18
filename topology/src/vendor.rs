//! The CPU vendor, as leaf 0 tells it.

use serde::{Deserialize, Serialize};

use crate::cpuid_entry::{find_entry, CpuidEntry};

/// The CPU vendors whose topology and PMU leaves we know how to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`.
    Amd,
    /// `HygonGenuine` (AMD-compatible topology and PMU leaves).
    Hygon,
}

impl CpuVendor {
    /// The 12-byte vendor string in leaf 0 (EBX, EDX, ECX order).
    pub fn id_string(self) -> &'static str {
        match self {
            CpuVendor::Intel => "GenuineIntel",
            CpuVendor::Amd => "AuthenticAMD",
            CpuVendor::Hygon => "HygonGenuine",
        }
    }

    /// Whether this vendor uses AMD's extended topology leaves (0x8000_001E ...).
    pub fn is_amd_compatible(self) -> bool {
        matches!(self, CpuVendor::Amd | CpuVendor::Hygon)
    }

    /// Decodes the vendor from leaf 0's EBX, EDX, ECX. `None` for a vendor we do not know.
    pub fn from_leaf0(ebx: u32, ecx: u32, edx: u32) -> Option<Self> {
        let mut s = [0u8; 12];
        s[0..4].copy_from_slice(&ebx.to_le_bytes());
        s[4..8].copy_from_slice(&edx.to_le_bytes());
        s[8..12].copy_from_slice(&ecx.to_le_bytes());
        [CpuVendor::Intel, CpuVendor::Amd, CpuVendor::Hygon]
            .into_iter()
            .find(|v| v.id_string().as_bytes() == s)
    }

    /// Decodes the vendor from leaf 0 of a CPUID entry set. `None` when leaf 0 is
    /// missing or names a vendor we do not know.
    pub fn from_entries(entries: &[CpuidEntry]) -> Option<Self> {
        let e = find_entry(entries, 0, 0)?;
        Self::from_leaf0(e.ebx, e.ecx, e.edx)
    }

    /// Leaf 0's (EBX, ECX, EDX) for this vendor.
    pub fn leaf0_registers(self) -> (u32, u32, u32) {
        let b = self.id_string().as_bytes();
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (word(0), word(8), word(4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf0_round_trip() {
        for v in [CpuVendor::Intel, CpuVendor::Amd, CpuVendor::Hygon] {
            let (ebx, ecx, edx) = v.leaf0_registers();
            assert_eq!(CpuVendor::from_leaf0(ebx, ecx, edx), Some(v));
        }
        // "GenuineIntel" as the CPU returns it: EBX="Genu", EDX="ineI", ECX="ntel".
        assert_eq!(
            CpuVendor::from_leaf0(0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            Some(CpuVendor::Intel)
        );
        assert_eq!(CpuVendor::from_leaf0(0, 0, 0), None);
    }
}
