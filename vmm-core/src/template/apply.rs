//! Applying a template: its CPUID modifiers to a CPUID set, its MSR modifiers to a vCPU.

use kvm_bindings::Msrs;
use kvm_ioctls::VcpuFd;
use topology::CpuidEntry;

use super::{BitFilter, CpuTemplate, CpuidRegister};
use crate::arch::x86_64::cpuid::{normalize, NormalizeInputs};
use crate::arch::x86_64::msr;
use crate::error::{KvmOp, VcpuSetupError};

/// Leaves the VMM owns whole: the topology leaves (`topology`) and the PMU leaves (`vpmu`).
/// A template's changes to them are undone (see [`keep_vmm_owned`]).
pub const VMM_OWNED_LEAVES: &[u32] = &[
    0x4,         // deterministic cache parameters (topology: sharing)
    0xa,         // architectural PMU (vpmu)
    0xb,         // extended topology (topology)
    0x1f,        // V2 extended topology (topology)
    0x23,        // architectural PMU extended (vpmu)
    0x8000_001d, // AMD cache topology (topology)
    0x8000_001e, // AMD processor topology (topology)
    0x8000_0022, // AMD extended PMU (vpmu)
];

/// Bits the VMM owns in leaves it shares with a template: (leaf, subleaf, register index
/// 0..4 = EAX..EDX, mask).
const VMM_OWNED_BITS: &[(u32, u32, usize, u32)] = &[
    // Leaf 1: EBX[31:16] APIC ID and logical count (topology), ECX[15] PDCM (vpmu),
    // EDX[28] HTT (topology).
    (0x1, 0, 1, 0xffff_0000),
    (0x1, 0, 2, 1 << 15),
    (0x1, 0, 3, 1 << 28),
    // Leaf 7.1 EAX[8] ArchPerfmonExt (vpmu).
    (0x7, 1, 0, 1 << 8),
    // 0x8000_0001 ECX: CmpLegacy[1], TopoExt[22] (topology), PerfCtrExtCore[23],
    // PerfCtrExtNB[24], PerfCtrExtLLC[28] (vpmu).
    (
        0x8000_0001,
        0,
        2,
        (1 << 1) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 28),
    ),
    // 0x8000_0008 ECX[15:0]: logical CPUs per package and the APIC ID size (topology).
    (0x8000_0008, 0, 2, 0xffff),
];

/// Undoes what a template changed in the leaves and bits the VMM owns: every entry of the
/// [`VMM_OWNED_LEAVES`] becomes `original`'s again (an entry the template added goes), and
/// the owned bits of shared leaves (leaf 1's APIC ID, HTT and PDCM, 0x8000_0001's TopoExt,
/// CmpLegacy and PMU extension bits, 0x8000_0008 ECX) get `original`'s values back. The
/// topology and vPMU steps that follow then see what they would have seen without a template.
pub fn keep_vmm_owned(original: &[CpuidEntry], entries: &mut Vec<CpuidEntry>) {
    entries.retain(|e| !VMM_OWNED_LEAVES.contains(&e.function));
    entries.extend(
        original
            .iter()
            .filter(|e| VMM_OWNED_LEAVES.contains(&e.function))
            .copied(),
    );
    for &(leaf, subleaf, reg, mask) in VMM_OWNED_BITS {
        let was = original
            .iter()
            .find(|e| e.matches(leaf, subleaf))
            .map_or(0, |e| register(e, reg));
        if let Some(e) = entries.iter_mut().find(|e| e.matches(leaf, subleaf)) {
            let r = register_mut(e, reg);
            *r = (*r & !mask) | (was & mask);
        }
    }
    entries.sort_by_key(|e| (e.function, e.index));
}

fn register(e: &CpuidEntry, reg: usize) -> u32 {
    [e.eax, e.ebx, e.ecx, e.edx][reg & 3]
}

fn register_mut(e: &mut CpuidEntry, reg: usize) -> &mut u32 {
    match reg & 3 {
        0 => &mut e.eax,
        1 => &mut e.ebx,
        2 => &mut e.ecx,
        _ => &mut e.edx,
    }
}

/// The CPUID set every vCPU of a VM starts from, before its topology and vPMU leaves: KVM's
/// `supported` CPUID, then `template` (if any; the leaves and bits the VMM owns are then
/// restored, [`keep_vmm_owned`]), then the normalisation ([`normalize`]).
pub fn guest_base_cpuid(
    supported: &[CpuidEntry],
    template: Option<&CpuTemplate>,
    vendor: topology::CpuVendor,
    inputs: &NormalizeInputs,
) -> Vec<CpuidEntry> {
    let mut entries = supported.to_vec();
    if let Some(t) = template {
        apply_cpuid_modifiers(t, &mut entries);
        keep_vmm_owned(supported, &mut entries);
    }
    normalize(&mut entries, vendor, inputs);
    entries
}

/// Applies every CPUID modifier of `template` to `entries`. An entry the template names but
/// `entries` lacks is added (all registers 0 before the modifiers, with the template's
/// flags), so a template can add a leaf; the list is sorted by (leaf, subleaf) afterwards.
pub fn apply_cpuid_modifiers(template: &CpuTemplate, entries: &mut Vec<CpuidEntry>) {
    for l in &template.cpuid_modifiers {
        let pos = entries.iter().position(|e| e.matches(l.leaf, l.subleaf));
        let e = match pos {
            Some(i) => &mut entries[i],
            None => {
                let mut e = CpuidEntry::subleaf(l.leaf, l.subleaf, 0, 0, 0, 0);
                e.flags = l.flags;
                entries.push(e);
                let last = entries.len() - 1;
                &mut entries[last]
            }
        };
        for m in &l.modifiers {
            let reg = match m.register {
                CpuidRegister::Eax => &mut e.eax,
                CpuidRegister::Ebx => &mut e.ebx,
                CpuidRegister::Ecx => &mut e.ecx,
                CpuidRegister::Edx => &mut e.edx,
            };
            *reg = m.bits.apply(*reg);
        }
    }
    entries.sort_by_key(|e| (e.function, e.index));
}

/// `current` with the MSR modifier `bits` applied.
pub fn apply_msr_value(bits: &BitFilter<u64>, current: u64) -> u64 {
    bits.apply(current)
}

impl CpuTemplate {
    /// Sets the template's MSRs on `vcpu` (KVM vCPU id `vcpu_id`): MSRs whose every bit the
    /// template gives are written as they are; the others are read first
    /// (`KVM_GET_MSRS`) and only the template's bits change. Returns what was written.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::Kvm`] if KVM cannot read them, [`VcpuSetupError::MsrRejected`] if it
    /// does not take one (an MSR this host's KVM does not know).
    pub fn apply_msrs(
        &self,
        vcpu: &VcpuFd,
        vcpu_id: u32,
    ) -> Result<Vec<(u32, u64)>, VcpuSetupError> {
        if self.msr_modifiers.is_empty() {
            return Ok(Vec::new());
        }
        let partial: Vec<u32> = self
            .msr_modifiers
            .iter()
            .filter(|m| m.bits.filter != u64::MAX)
            .map(|m| m.addr)
            .collect();
        let mut current = std::collections::BTreeMap::new();
        if !partial.is_empty() {
            let entries: Vec<_> = partial.iter().map(|a| msr::entry(*a, 0)).collect();
            let mut msrs =
                Msrs::from_entries(&entries).map_err(|_| VcpuSetupError::MsrRejected {
                    vcpu_id,
                    msr: partial[0],
                    set: 0,
                    total: partial.len(),
                })?;
            let read = vcpu
                .get_msrs(&mut msrs)
                .map_err(crate::vcpu_kvm_error(vcpu_id, KvmOp::GetMsrs))?;
            if read != partial.len() {
                return Err(VcpuSetupError::MsrRejected {
                    vcpu_id,
                    msr: partial.get(read).copied().unwrap_or(0),
                    set: read,
                    total: partial.len(),
                });
            }
            for e in msrs.as_slice() {
                current.insert(e.index, e.data);
            }
        }
        let values: Vec<(u32, u64)> = self
            .msr_modifiers
            .iter()
            .map(|m| {
                let now = current.get(&m.addr).copied().unwrap_or(0);
                (m.addr, apply_msr_value(&m.bits, now))
            })
            .collect();
        let entries: Vec<_> = values.iter().map(|(a, v)| msr::entry(*a, *v)).collect();
        msr::set_msrs(vcpu, vcpu_id, &entries)?;
        Ok(values)
    }
}
