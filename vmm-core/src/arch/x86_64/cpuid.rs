//! Conversion between KVM's `kvm_cpuid_entry2` and the KVM-free [`topology::CpuidEntry`], and
//! setting a vCPU's CPUID ([`set_cpuid`]).
//!
//! The two have the same fields with the same meaning, so this is a field-by-field copy; it
//! lives here so that no other module touches the KVM layout. What the entries say (topology
//! leaves, vPMU edits) is decided by the `topology` and `vpmu` crates.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::VcpuFd;
use topology::CpuidEntry;

use crate::error::{KvmOp, VcpuSetupError};

/// One KVM entry as a [`CpuidEntry`].
pub fn entry_from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    let regs = CpuidEntry::subleaf(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx);
    CpuidEntry {
        flags: e.flags,
        ..regs
    }
}

/// One [`CpuidEntry`] as a KVM entry.
pub fn entry_to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    let mut k = kvm_cpuid_entry2::default();
    (k.function, k.index, k.flags) = (e.function, e.index, e.flags);
    (k.eax, k.ebx, k.ecx, k.edx) = (e.eax, e.ebx, e.ecx, e.edx);
    k
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

/// What [`set_cpuid`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidSet {
    /// KVM took the entries.
    Set,
    /// A vCPU fd that has run before kept its CPUID: KVM refuses to change CPUID once a vCPU
    /// has run (EINVAL unless identical, and KVM edits some bits at run time).
    KeptFromEarlierRun,
}

/// Sets `entries` as the CPUID of `vcpu` (KVM vCPU id `vcpu_id`). With `reused` (a kept vCPU
/// fd, whose APIC ID fixes its index and so its CPUID), KVM's EINVAL means the vCPU keeps the
/// CPUID it already has.
pub fn set_cpuid(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    entries: &[CpuidEntry],
    reused: bool,
) -> Result<CpuidSet, VcpuSetupError> {
    let cpuid = entries_to_kvm(entries)?;
    match vcpu.set_cpuid2(&cpuid) {
        Ok(()) => Ok(CpuidSet::Set),
        Err(e) if reused && e.errno() == libc::EINVAL => Ok(CpuidSet::KeptFromEarlierRun),
        Err(e) => Err(crate::vcpu_kvm_error(vcpu_id, KvmOp::SetCpuid2)(e)),
    }
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
