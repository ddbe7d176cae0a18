//! A plain CPUID entry, independent of KVM.
//!
//! Crates that talk to KVM convert [`CpuidEntry`] to and from `kvm_cpuid_entry2`;
//! the field names and the meaning of [`CpuidEntry::flags`] match KVM's so the
//! conversion is a field-by-field copy.

use serde::{Deserialize, Serialize};

/// One CPUID leaf/subleaf and the four registers it returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// The leaf: the value of EAX when CPUID executes.
    pub function: u32,
    /// The subleaf: the value of ECX when CPUID executes (only meaningful when
    /// [`CpuidEntry::SIGNIFICANT_INDEX`] is set in `flags`).
    pub index: u32,
    /// KVM's `KVM_CPUID_FLAG_*` bits.
    pub flags: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

impl CpuidEntry {
    /// The subleaf (`index`) selects the entry (KVM's `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`).
    pub const SIGNIFICANT_INDEX: u32 = 1;

    /// An entry for a leaf whose output does not depend on ECX.
    pub const fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> Self {
        Self {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// An entry for one subleaf of a leaf whose output depends on ECX.
    pub const fn subleaf(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> Self {
        Self {
            function,
            index,
            flags: Self::SIGNIFICANT_INDEX,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// Whether this entry answers CPUID with `EAX = function`, `ECX = index`.
    pub fn matches(&self, function: u32, index: u32) -> bool {
        self.function == function
            && (self.flags & Self::SIGNIFICANT_INDEX == 0 || self.index == index)
    }
}

/// Finds the entry a CPU would use to answer `CPUID(function, index)`.
pub fn find_entry(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries.iter().find(|e| e.matches(function, index))
}

/// Mutable form of [`find_entry`].
pub fn find_entry_mut(
    entries: &mut [CpuidEntry],
    function: u32,
    index: u32,
) -> Option<&mut CpuidEntry> {
    entries.iter_mut().find(|e| e.matches(function, index))
}
