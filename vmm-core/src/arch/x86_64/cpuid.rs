//! Conversion between KVM's `kvm_cpuid_entry2` and the KVM-free [`topology::CpuidEntry`],
//! setting a vCPU's CPUID ([`set_cpuid`]), and the VMM's CPUID normalisation ([`normalize`]).
//!
//! The two have the same fields with the same meaning, so this is a field-by-field copy; it
//! lives here so that no other module touches the KVM layout. What the entries say (topology
//! leaves, vPMU edits) is decided by the `topology` and `vpmu` crates.
//!
//! # Normalisation
//!
//! What every guest can rely on whatever host it runs on, applied after a CPU template and
//! before the topology and vPMU leaves (the order is
//! [`VcpuManager::vcpu_cpuid`](crate::VcpuManager::vcpu_cpuid)'s):
//!
//! | leaves | what | why |
//! | --- | --- | --- |
//! | 0x8000_0002-4 | the host's brand string, when KVM's are empty | [`set_brand_string`] |
//! | 0x6 | all zero | [`clear_power_management`] |
//! | 0x4000_0000, 0x4000_0010 | TSC and LAPIC timer frequencies, when the TSC is invariant | [`add_tsc_frequency_leaf`] |
//! | 0x7 EDX\[29\] | ARCH_CAPABILITIES cleared on AMD | [`clear_arch_capabilities_on_amd`] |

use std::ops::RangeInclusive;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::{VcpuFd, VmFd};
use topology::{find_entry, find_entry_mut, CpuVendor, CpuidEntry};

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

consts! {
    BRAND_LEAVES: RangeInclusive<u32> = 0x8000_0002..=0x8000_0004, "The brand string leaves, first to last (16 bytes each).";
    POWER_MANAGEMENT: u32 = 0x6, "The power management leaf (thermal and power: turbo, HWP, APERF/MPERF ...).";
    HYPERVISOR_BASE: u32 = 0x4000_0000, "The hypervisor leaves' base: EAX = the highest hypervisor leaf, EBX:ECX:EDX the signature.";
    HYPERVISOR_TSC_LEAF: u32 = 0x4000_0010, "The TSC frequency leaf: EAX = TSC kHz, EBX = LAPIC timer kHz (the convention VMware introduced, which Linux, FreeBSD and other guests read).";
    ADVANCED_POWER_MANAGEMENT: u32 = 0x8000_0007, "The advanced power management leaf (EDX\\[8\\]: the TSC is invariant).";
    INVARIANT_TSC: u32 = 1 << 8, "0x8000_0007 EDX bit 8: invariant TSC.";
    ARCH_CAPABILITIES: u32 = 1 << 29, "Leaf 7 EDX bit 29: `IA32_ARCH_CAPABILITIES` exists.";
    KVM_LAPIC_TIMER_KHZ: u32 = 1_000_000, "The LAPIC timer's rate in KVM, in kHz: KVM's emulated APIC bus runs at 1 GHz (`APIC_BUS_CYCLE_NS` = 1).";
}
/// KVM's hypervisor signature, "KVMKVMKVM\0\0\0", as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// What the normalisation needs from the host, queried once per VM
/// ([`NormalizeInputs::query`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NormalizeInputs {
    /// The host CPU's brand string ([`host_brand_string`]).
    pub host_brand: Option<String>,
    /// The guest TSC frequency in kHz (`KVM_GET_TSC_KHZ` on the VM).
    pub tsc_khz: Option<u32>,
}

impl NormalizeInputs {
    /// The host's brand string and `vm`'s TSC frequency (either `None` when it cannot be
    /// read: the leaf it feeds is then left as KVM gave it).
    pub fn query(vm: &VmFd) -> Self {
        Self {
            host_brand: host_brand_string(),
            tsc_khz: vm_tsc_khz(vm),
        }
    }
}

/// The brand string of `entries` (leaves 0x8000_0002-4), trimmed; `None` when the leaves are
/// missing or hold only NULs and spaces.
pub fn brand_string(entries: &[CpuidEntry]) -> Option<String> {
    let mut bytes = Vec::with_capacity(48);
    for leaf in BRAND_LEAVES {
        let e = find_entry(entries, leaf, 0)?;
        for r in [e.eax, e.ebx, e.ecx, e.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
    }
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    let s = String::from_utf8_lossy(&bytes[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// This machine's CPU brand string: from the CPUID instruction (its three brand leaves only;
/// on these PVM hosts, CPL-3 CPUID answers with the outer host's values), else `model name`
/// of `/proc/cpuinfo`.
pub fn host_brand_string() -> Option<String> {
    topology::host::this_host_leaves(BRAND_LEAVES)
        .ok()
        .and_then(|e| brand_string(&e))
        .or_else(|| {
            let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|v| v.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        })
}

/// The ioctl numbers kvm-ioctls does not offer on a VM fd.
mod ioctl_numbers {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);
}
use ioctl_numbers::KVM_GET_TSC_KHZ;

/// The guest TSC frequency of `vm` in kHz: `KVM_GET_TSC_KHZ` on the VM fd (Linux 6.0 and
/// later, `KVM_CAP_VM_TSC_CONTROL`). `None` when KVM does not answer.
pub fn vm_tsc_khz(vm: &VmFd) -> Option<u32> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the frequency or -1; the fd is a
    // live VM fd borrowed for the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_GET_TSC_KHZ()) };
    u32::try_from(ret).ok().filter(|khz| *khz > 0)
}

/// Writes `brand` (at most 47 bytes, NUL-padded) into leaves 0x8000_0002-4 when they are
/// missing or empty, and raises 0x8000_0000 EAX to cover them.
///
/// Why: KVM passes the host's brand string through, but on some hosts (these PVM hosts among
/// them) it is empty, and guests print it (`/proc/cpuinfo`'s `model name`, boot logs) and
/// some software keys decisions on it. The host's own model is the honest value; a template
/// that sets the leaves wins, since it runs first.
pub fn set_brand_string(entries: &mut Vec<CpuidEntry>, brand: &str) {
    if brand_string(entries).is_some() || brand.is_empty() {
        return;
    }
    let mut bytes = [0u8; 48];
    let src = brand.as_bytes();
    let n = src.len().min(47);
    bytes[..n].copy_from_slice(&src[..n]);
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    for (k, leaf) in BRAND_LEAVES.enumerate() {
        let o = k * 16;
        let regs = (word(o), word(o + 4), word(o + 8), word(o + 12));
        upsert(
            entries,
            CpuidEntry::leaf(leaf, regs.0, regs.1, regs.2, regs.3),
        );
    }
    raise_max(entries, 0x8000_0000, *BRAND_LEAVES.end());
}

/// Clears leaf 6 (thermal and power management).
///
/// Why: its bits describe the host's power management (turbo, HWP, energy bias, APERF/MPERF
/// counters) which a guest cannot use: the MSRs behind them are not given to the guest, and a
/// guest that believes in them (e.g. Linux's intel_pstate with HWP) probes MSRs KVM does not
/// emulate. Firecracker and Dragonball clear it too.
pub fn clear_power_management(entries: &mut [CpuidEntry]) {
    if let Some(e) = find_entry_mut(entries, POWER_MANAGEMENT, 0) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
}

/// Adds the TSC frequency leaf 0x4000_0010 (EAX = `tsc_khz`, EBX = the LAPIC timer's
/// [`KVM_LAPIC_TIMER_KHZ`]) and raises the highest hypervisor leaf (0x4000_0000 EAX) to it,
/// when the TSC is invariant (0x8000_0007 EDX\[8\]). Without 0x4000_0000 the leaf gets
/// KVM's signature.
///
/// Why: a guest that knows the TSC frequency from CPUID does not calibrate it against the
/// PIT or HPET at boot, which in a VM is slow and imprecise (and on these PVM hosts, where
/// kernel code is emulated, very slow); only an invariant TSC has one frequency to tell.
pub fn add_tsc_frequency_leaf(entries: &mut Vec<CpuidEntry>, tsc_khz: u32) {
    let invariant = find_entry(entries, ADVANCED_POWER_MANAGEMENT, 0)
        .is_some_and(|e| e.edx & INVARIANT_TSC != 0);
    if !invariant || tsc_khz == 0 {
        return;
    }
    if find_entry(entries, HYPERVISOR_BASE, 0).is_none() {
        let [b, c, d] = KVM_SIGNATURE;
        upsert(
            entries,
            CpuidEntry::leaf(HYPERVISOR_BASE, HYPERVISOR_TSC_LEAF, b, c, d),
        );
    }
    raise_max(entries, HYPERVISOR_BASE, HYPERVISOR_TSC_LEAF);
    upsert(
        entries,
        CpuidEntry::leaf(HYPERVISOR_TSC_LEAF, tsc_khz, KVM_LAPIC_TIMER_KHZ, 0, 0),
    );
}

/// On AMD (and Hygon), clears leaf 7 EDX\[29\] (`IA32_ARCH_CAPABILITIES`).
///
/// Why: KVM emulates the MSR on every host and so reports the bit on AMD too, but AMD CPUs
/// have no such MSR: a guest reads it for speculation mitigations it then mis-applies (an AMD
/// guest that sees ARCH_CAPABILITIES may skip mitigations it needs), and the bit differs
/// between kernels, which breaks migration between hosts. Dragonball clears it on AMD too.
pub fn clear_arch_capabilities_on_amd(entries: &mut [CpuidEntry], vendor: CpuVendor) {
    if vendor == CpuVendor::Intel {
        return;
    }
    if let Some(e) = find_entry_mut(entries, 0x7, 0) {
        e.edx &= !ARCH_CAPABILITIES;
    }
}

/// The whole normalisation (see the module documentation), in this order: brand string,
/// leaf 6, TSC frequency leaf, ARCH_CAPABILITIES. The result stays sorted by (leaf, subleaf).
pub fn normalize(entries: &mut Vec<CpuidEntry>, vendor: CpuVendor, inputs: &NormalizeInputs) {
    if let Some(brand) = &inputs.host_brand {
        set_brand_string(entries, brand);
    }
    clear_power_management(entries);
    if let Some(khz) = inputs.tsc_khz {
        add_tsc_frequency_leaf(entries, khz);
    }
    clear_arch_capabilities_on_amd(entries, vendor);
    entries.sort_by_key(|e| (e.function, e.index));
}

/// Replaces the entry (leaf, subleaf 0) or adds it.
fn upsert(entries: &mut Vec<CpuidEntry>, e: CpuidEntry) {
    match find_entry_mut(entries, e.function, e.index) {
        Some(old) => *old = e,
        None => entries.push(e),
    }
}

/// Raises EAX of `leaf` (a range's maximum leaf) to at least `max`.
fn raise_max(entries: &mut [CpuidEntry], leaf: u32, max: u32) {
    if let Some(e) = find_entry_mut(entries, leaf, 0) {
        e.eax = e.eax.max(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brand_string_is_set_only_when_empty() {
        let mut e = topology::host::synthetic_amd();
        e.retain(|x| !BRAND_LEAVES.contains(&x.function));
        assert_eq!(brand_string(&e), None);
        set_brand_string(&mut e, "Test CPU @ 2.00GHz");
        assert_eq!(brand_string(&e).as_deref(), Some("Test CPU @ 2.00GHz"));
        set_brand_string(&mut e, "Another");
        assert_eq!(brand_string(&e).as_deref(), Some("Test CPU @ 2.00GHz"));
        // 47 bytes at most: the 48th is the terminating NUL.
        let mut e2 = Vec::new();
        set_brand_string(&mut e2, &"y".repeat(60));
        assert_eq!(brand_string(&e2).map(|s| s.len()), Some(47));
    }

    #[test]
    fn tsc_leaf_only_with_an_invariant_tsc() {
        let mut e = vec![CpuidEntry::leaf(ADVANCED_POWER_MANAGEMENT, 0, 0, 0, 0)];
        add_tsc_frequency_leaf(&mut e, 2_000_000);
        assert!(find_entry(&e, HYPERVISOR_TSC_LEAF, 0).is_none());
        e[0].edx = INVARIANT_TSC;
        e.push(CpuidEntry::leaf(HYPERVISOR_BASE, 0x4000_0001, 1, 2, 3));
        add_tsc_frequency_leaf(&mut e, 2_000_000);
        let base = find_entry(&e, HYPERVISOR_BASE, 0).unwrap();
        assert_eq!((base.eax, base.ebx), (HYPERVISOR_TSC_LEAF, 1));
        let t = find_entry(&e, HYPERVISOR_TSC_LEAF, 0).unwrap();
        assert_eq!((t.eax, t.ebx), (2_000_000, KVM_LAPIC_TIMER_KHZ));
        // Without hypervisor leaves, KVM's signature comes with them.
        let mut e = vec![CpuidEntry::leaf(
            ADVANCED_POWER_MANAGEMENT,
            0,
            0,
            0,
            INVARIANT_TSC,
        )];
        add_tsc_frequency_leaf(&mut e, 1000);
        let base = find_entry(&e, HYPERVISOR_BASE, 0).unwrap();
        let sig: Vec<u8> = [base.ebx, base.ecx, base.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn leaf6_and_arch_capabilities() {
        for vendor in [CpuVendor::Intel, CpuVendor::Amd] {
            let mut e = vec![
                CpuidEntry::leaf(POWER_MANAGEMENT, 7, 1, 9, 0),
                CpuidEntry::subleaf(7, 0, 0, 0, 0, ARCH_CAPABILITIES | 1),
            ];
            normalize(&mut e, vendor, &NormalizeInputs::default());
            let six = find_entry(&e, POWER_MANAGEMENT, 0).unwrap();
            assert_eq!((six.eax, six.ebx, six.ecx, six.edx), (0, 0, 0, 0));
            let seven = find_entry(&e, 7, 0).unwrap();
            let want = if vendor == CpuVendor::Intel {
                ARCH_CAPABILITIES | 1
            } else {
                1
            };
            assert_eq!(seven.edx, want, "{vendor:?}");
        }
    }

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
