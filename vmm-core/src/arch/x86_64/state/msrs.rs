//! Which MSRs a vCPU's state holds, and reading and writing them in chunks.
//!
//! The list is not hard-coded: it is KVM's own (`KVM_GET_MSR_INDEX_LIST`: every MSR KVM
//! saves and restores, including its paravirtual ones), filtered to those that this vCPU,
//! with its CPUID, can actually read (KVM lists MSRs of features a vCPU may not have, such as
//! Hyper-V's). A hard-coded list misses MSRs that a newer KVM or a PVM host adds, and a guest
//! then finds them reset after a restore.

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::error::{StateError, StateOp};

/// `IA32_TSC_DEADLINE`: the LAPIC timer's deadline in TSC-deadline mode.
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;

/// One saved MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// The MSRs to save for the vCPUs of one VM (all its vCPUs have the same CPUID features, so
/// one probe serves them all), in the order they are saved and restored:
/// `IA32_TSC_DEADLINE` last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveableMsrs {
    indices: Vec<u32>,
}

impl SaveableMsrs {
    /// KVM's MSR index list, less the MSRs `vcpu` cannot read, `IA32_TSC_DEADLINE` moved
    /// last. Only reads MSRs: probing does not change the vCPU. Call it after the vCPU's
    /// CPUID is set (what it can read depends on its CPUID).
    ///
    /// # Errors
    ///
    /// [`StateError::Kvm`] if `KVM_GET_MSR_INDEX_LIST` fails, or `KVM_GET_MSRS` fails
    /// otherwise than by stopping at an unreadable MSR.
    pub fn probe(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Self, StateError> {
        Self::probe_with(kvm, vcpu, &[])
    }

    /// [`probe`](Self::probe) with `extra` MSRs added to KVM's list before the filter: the
    /// MSRs a CPU template sets, which KVM's index list need not name (a template MSR the
    /// vCPU cannot read is dropped as any other).
    ///
    /// # Errors
    ///
    /// As [`probe`](Self::probe).
    pub fn probe_with(kvm: &Kvm, vcpu: &VcpuFd, extra: &[u32]) -> Result<Self, StateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(StateError::kvm(StateOp::GetMsrIndexList))?;
        let mut candidates: Vec<u32> = list.as_slice().to_vec();
        candidates.extend_from_slice(extra);
        candidates.sort_unstable();
        candidates.dedup();
        let mut readable = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(KVM_MAX_MSR_ENTRIES) {
            // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it
            // read: keep those, drop that one, go on with the rest. As many calls as
            // unreadable MSRs, plus one.
            let mut rest = chunk;
            while !rest.is_empty() {
                let mut msrs = to_msrs(rest.iter().map(|&index| (index, 0)))?;
                let read = vcpu
                    .get_msrs(&mut msrs)
                    .map_err(StateError::kvm(StateOp::GetMsrs))?;
                let read = read.min(rest.len());
                readable.extend_from_slice(&rest[..read]);
                rest = rest.get(read + 1..).unwrap_or(&[]);
            }
        }
        Ok(Self::from_indices(readable))
    }

    /// A list from given indices (deduplicated), `IA32_TSC_DEADLINE` moved last.
    pub fn from_indices(mut indices: Vec<u32>) -> Self {
        let mut seen = std::collections::HashSet::new();
        indices.retain(|i| seen.insert(*i));
        // TSC_DEADLINE is compared with the guest's TSC: restoring it before IA32_TSC would
        // arm the timer against the wrong TSC (and KVM drops a deadline already in the past),
        // so it is saved and restored after every other MSR.
        if let Some(pos) = indices.iter().position(|&i| i == IA32_TSC_DEADLINE) {
            let deadline = indices.remove(pos);
            indices.push(deadline);
        }
        Self { indices }
    }

    /// The indices, in save and restore order.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
}

/// `entries` as KVM's `Msrs`.
fn to_msrs(entries: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, StateError> {
    let entries: Vec<kvm_msr_entry> = entries
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| StateError::TooManyEntries {
        what: "MSRs",
        count: entries.len(),
        max: KVM_MAX_MSR_ENTRIES,
    })
}

/// Reads `list` from `vcpu`, in chunks of at most `KVM_MAX_MSR_ENTRIES`, in the list's order.
///
/// # Errors
///
/// [`StateError::MsrRefused`] naming the first MSR KVM did not read, [`StateError::Kvm`] if
/// `KVM_GET_MSRS` fails.
pub fn get_msrs(vcpu: &VcpuFd, list: &SaveableMsrs) -> Result<Vec<MsrValue>, StateError> {
    let mut out = Vec::with_capacity(list.indices.len());
    for chunk in list.indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let mut msrs = to_msrs(chunk.iter().map(|&index| (index, 0)))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(StateError::kvm(StateOp::GetMsrs))?;
        if read != chunk.len() {
            return Err(StateError::MsrRefused {
                op: StateOp::GetMsrs,
                msr: chunk.get(read).copied().unwrap_or(0),
                done: out.len() + read,
                total: list.indices.len(),
            });
        }
        out.extend(msrs.as_slice().iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
    }
    Ok(out)
}

/// Writes `values` to `vcpu`, in chunks of at most `KVM_MAX_MSR_ENTRIES`, in order (so
/// `IA32_TSC` before `IA32_TSC_DEADLINE`, which a saved list has last).
///
/// # Errors
///
/// [`StateError::MsrRefused`] naming the first MSR KVM did not set (a short count is an
/// error: a silently dropped MSR is a guest that misbehaves later), [`StateError::Kvm`] if
/// `KVM_SET_MSRS` fails.
pub fn set_msrs(vcpu: &VcpuFd, values: &[MsrValue]) -> Result<(), StateError> {
    let mut done = 0;
    for chunk in values.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = to_msrs(chunk.iter().map(|v| (v.index, v.data)))?;
        let set = vcpu
            .set_msrs(&msrs)
            .map_err(StateError::kvm(StateOp::SetMsrs))?;
        if set != chunk.len() {
            return Err(StateError::MsrRefused {
                op: StateOp::SetMsrs,
                msr: chunk.get(set).map_or(0, |v| v.index),
                done: done + set,
                total: values.len(),
            });
        }
        done += set;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_deadline_goes_last_and_duplicates_go() {
        let l = SaveableMsrs::from_indices(vec![0x10, IA32_TSC_DEADLINE, 0x174, 0x10]);
        assert_eq!(l.indices(), &[0x10, 0x174, IA32_TSC_DEADLINE]);
        let l = SaveableMsrs::from_indices(vec![0x10, 0x174]);
        assert_eq!(l.indices(), &[0x10, 0x174]);
    }
}
