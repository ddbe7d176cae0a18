//! Conversion between KVM's `kvm_cpuid_entry2` and the KVM-free [`topology::CpuidEntry`].
//!
//! The two have the same fields with the same meaning, so this is a field-by-field copy; it
//! lives here so that no other module touches the KVM layout.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use topology::CpuidEntry;

use crate::error::VcpuSetupError;

/// One KVM entry as a [`CpuidEntry`].
pub fn entry_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// One [`CpuidEntry`] as a KVM entry.
pub fn entry_to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// A whole KVM CPUID set as [`CpuidEntry`]s.
pub fn entries_from_kvm(entries: &[kvm_cpuid_entry2]) -> Vec<CpuidEntry> {
    entries.iter().map(entry_from_kvm).collect()
}

/// A whole [`CpuidEntry`] set as KVM's `CpuId` (for `KVM_SET_CPUID2`).
///
/// # Errors
///
/// [`VcpuSetupError::TooManyCpuidEntries`] if the set is larger than KVM takes.
pub fn entries_to_kvm(entries: &[CpuidEntry]) -> Result<CpuId, VcpuSetupError> {
    let kvm: Vec<kvm_cpuid_entry2> = entries.iter().map(entry_to_kvm).collect();
    CpuId::from_entries(&kvm).map_err(|_| VcpuSetupError::TooManyCpuidEntries {
        count: entries.len(),
        max: kvm_bindings::KVM_MAX_CPUID_ENTRIES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let e = CpuidEntry::subleaf(0xb, 1, 4, 8, 0x201, 7);
        let k = entry_to_kvm(&e);
        assert_eq!((k.function, k.index, k.flags), (0xb, 1, 1));
        assert_eq!((k.eax, k.ebx, k.ecx, k.edx), (4, 8, 0x201, 7));
        assert_eq!(entry_from_kvm(&k), e);
        let set = entries_to_kvm(&[e, CpuidEntry::leaf(0, 0x1f, 1, 2, 3)]).unwrap();
        assert_eq!(
            entries_from_kvm(set.as_slice())[1],
            CpuidEntry::leaf(0, 0x1f, 1, 2, 3)
        );
    }
}
