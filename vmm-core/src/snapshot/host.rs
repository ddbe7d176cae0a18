//! The host a snapshot was taken on ([`HostInfo`]), and whether this host can restore it
//! ([`check_cpuid_supported`]).

use std::collections::BTreeMap;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use topology::{find_entry, find_entry_mut, CpuidEntry};

use crate::arch::x86_64::cpuid::entries_from_kvm;
use crate::error::{SnapshotError, StateError, StateOp};

/// The host CPU and KVM a snapshot was taken on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// CPUID leaf 0's vendor string, e.g. `GenuineIntel`.
    pub vendor: String,
    /// Display family (CPUID leaf 1, with the extended family).
    pub family: u32,
    /// Display model (CPUID leaf 1, with the extended model).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// The brand string (leaves 0x8000_0002..4), trimmed.
    pub brand: String,
    /// KVM capabilities that matter to the saved state, by name (`KVM_CHECK_EXTENSION`'s
    /// answer: 0 absent, else present or a size).
    pub kvm_caps: BTreeMap<String, i32>,
}

/// The capabilities recorded in [`HostInfo::kvm_caps`].
const RECORDED_CAPS: &[(&str, Cap)] = &[
    ("KVM_CAP_XSAVE", Cap::Xsave),
    ("KVM_CAP_XSAVE2", Cap::Xsave2),
    ("KVM_CAP_XCRS", Cap::Xcrs),
    ("KVM_CAP_GET_TSC_KHZ", Cap::GetTscKhz),
    ("KVM_CAP_TSC_CONTROL", Cap::TscControl),
    ("KVM_CAP_KVMCLOCK_CTRL", Cap::KvmclockCtrl),
    ("KVM_CAP_ADJUST_CLOCK", Cap::AdjustClock),
    ("KVM_CAP_VCPU_EVENTS", Cap::VcpuEvents),
    ("KVM_CAP_PIT2", Cap::Pit2),
    ("KVM_CAP_IRQCHIP", Cap::Irqchip),
];

/// The vendor string in leaf 0's EBX, EDX, ECX.
fn vendor_string(entries: &[CpuidEntry]) -> String {
    let Some(e) = find_entry(entries, 0, 0) else {
        return String::from("unknown");
    };
    let mut b = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&b).trim_matches('\0').to_string()
}

/// The brand string of leaves 0x8000_0002..4.
fn brand_string(entries: &[CpuidEntry]) -> String {
    let mut b = Vec::with_capacity(48);
    for leaf in 0x8000_0002..=0x8000_0004 {
        if let Some(e) = find_entry(entries, leaf, 0) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    String::from_utf8_lossy(&b)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

impl HostInfo {
    /// This host: its CPU (CPUID, read with the `cpuid` instruction) and `kvm`'s
    /// capabilities.
    pub fn this_host(kvm: &Kvm) -> Self {
        let cpuid = topology::host::this_host().unwrap_or_default();
        Self::from_cpuid(&cpuid, kvm)
    }

    /// A host with CPUID `cpuid` and `kvm`'s capabilities.
    pub fn from_cpuid(cpuid: &[CpuidEntry], kvm: &Kvm) -> Self {
        let eax = find_entry(cpuid, 1, 0).map_or(0, |e| e.eax);
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let base_model = (eax >> 4) & 0xf;
        let model = if base_family == 0x6 || base_family == 0xf {
            base_model | (((eax >> 16) & 0xf) << 4)
        } else {
            base_model
        };
        Self {
            vendor: vendor_string(cpuid),
            family,
            model,
            stepping: eax & 0xf,
            brand: brand_string(cpuid),
            kvm_caps: RECORDED_CAPS
                .iter()
                .map(|(name, cap)| ((*name).to_string(), kvm.check_extension_int(*cap)))
                .collect(),
        }
    }

    /// Whether a snapshot taken on `saved` may be restored on this host: the same CPU vendor
    /// (guest code and KVM's vendor-specific state, such as the MSRs, differ between vendors).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::CpuVendor`] naming both vendors.
    pub fn check_vendor(&self, saved: &HostInfo) -> Result<(), SnapshotError> {
        if self.vendor != saved.vendor {
            return Err(SnapshotError::CpuVendor {
                saved: saved.vendor.clone(),
                host: self.vendor.clone(),
            });
        }
        Ok(())
    }
}

/// The CPUID this host's KVM provides to a vCPU: `KVM_GET_SUPPORTED_CPUID`, each entry
/// widened by what `KVM_GET_CPUID2` reports for a scratch vCPU given exactly that set. The
/// second part matters: KVM itself adds bits to a vCPU's CPUID (OSXSAVE, APIC, from the
/// vCPU's registers), and PVM hosts overlay the host CPU's feature bits on leaves 1 and 7
/// whatever was set, so a saved vCPU's CPUID (read with `KVM_GET_CPUID2`) has bits that the
/// supported list lacks though this KVM provides them.
///
/// # Errors
///
/// [`StateError::Kvm`] if a KVM call fails.
pub fn kvm_provided_cpuid(kvm: &Kvm) -> Result<Vec<CpuidEntry>, StateError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(StateError::kvm(StateOp::GetSupportedCpuid))?;
    let vm = kvm
        .create_vm()
        .map_err(StateError::kvm(StateOp::CreateVm))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(StateError::kvm(StateOp::CreateVcpu))?;
    vcpu.set_cpuid2(&supported)
        .map_err(StateError::kvm(StateOp::SetCpuid2))?;
    let given = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(StateError::kvm(StateOp::GetCpuid2))?;
    let mut provided = entries_from_kvm(supported.as_slice());
    for g in entries_from_kvm(given.as_slice()) {
        match find_entry_mut(&mut provided, g.function, g.index) {
            Some(p) => {
                p.eax |= g.eax;
                p.ebx |= g.ebx;
                p.ecx |= g.ecx;
                p.edx |= g.edx;
            }
            None => provided.push(g),
        }
    }
    Ok(provided)
}

/// A CPUID register.
#[derive(Clone, Copy, Debug)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn name(self) -> &'static str {
        match self {
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }

    fn of(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
}

/// Leaf 1 ECX bits that KVM's supported CPUID does not list though every KVM with the
/// in-kernel LAPIC provides them, or that KVM sets at run time from the guest's control
/// registers: x2APIC (21), TSC-deadline (24), OSXSAVE (27, mirrors CR4.OSXSAVE),
/// hypervisor (31).
const LEAF1_ECX_RUNTIME: u32 = (1 << 21) | (1 << 24) | (1 << 27) | (1 << 31);
/// Leaf 1 EDX bits the VMM or KVM sets: APIC (9, follows the APIC base MSR's enable bit),
/// HTT (28, set by the topology for more than one logical CPU per package).
const LEAF1_EDX_RUNTIME: u32 = (1 << 9) | (1 << 28);
/// Leaf 7.0 ECX bits KVM sets at run time: OSPKE (4, mirrors CR4.PKE).
const LEAF7_ECX_RUNTIME: u32 = 1 << 4;

/// The feature registers compared with KVM's supported CPUID, with the bits left out of the
/// comparison (see the constants above).
const CHECKED: &[(u32, u32, Reg, u32)] = &[
    (1, 0, Reg::Ecx, LEAF1_ECX_RUNTIME),
    (1, 0, Reg::Edx, LEAF1_EDX_RUNTIME),
    (7, 0, Reg::Ebx, 0),
    (7, 0, Reg::Ecx, LEAF7_ECX_RUNTIME),
    (7, 0, Reg::Edx, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
];

/// Checks that the feature bits of a vCPU's saved CPUID (`saved`, vCPU `vcpu_index`) are
/// all in `supported` (what this host's KVM provides: [`kvm_provided_cpuid`]), for the
/// feature leaves: 1
/// ECX/EDX, 7.0 EBX/ECX/EDX, 0x8000_0001 ECX/EDX. A guest that saw a feature must find it
/// after the restore, or it faults on its first use.
///
/// # Errors
///
/// [`SnapshotError::CpuidUnsupported`] naming the first leaf and register with missing bits.
pub fn check_cpuid_supported(
    vcpu_index: u32,
    saved: &[CpuidEntry],
    supported: &[CpuidEntry],
) -> Result<(), SnapshotError> {
    for &(leaf, subleaf, reg, ignored) in CHECKED {
        let Some(s) = find_entry(saved, leaf, subleaf) else {
            continue;
        };
        let host = find_entry(supported, leaf, subleaf).map_or(0, |e| reg.of(e));
        let missing = reg.of(s) & !host & !ignored;
        if missing != 0 {
            return Err(SnapshotError::CpuidUnsupported {
                vcpu_index,
                leaf,
                subleaf,
                register: reg.name(),
                missing,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_subset_check() {
        let supported = [
            CpuidEntry::leaf(1, 0, 0, 0b1011, 0xff),
            CpuidEntry::subleaf(7, 0, 0, 0xf0, 0, 0),
        ];
        let ok = [
            CpuidEntry::leaf(1, 0, 0, 0b0011 | (1 << 31), 0x0f),
            CpuidEntry::subleaf(7, 0, 0, 0x10, 0, 0),
        ];
        check_cpuid_supported(0, &ok, &supported).unwrap();
        let bad = [CpuidEntry::subleaf(7, 0, 0, 0x1f0, 0, 0)];
        let e = check_cpuid_supported(3, &bad, &supported).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::CpuidUnsupported {
                    vcpu_index: 3,
                    leaf: 7,
                    register: "ebx",
                    missing: 0x100,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("0x00000100"), "{e}");
    }

    #[test]
    fn vendor_and_brand_strings() {
        let (ebx, ecx, edx) = topology::CpuVendor::Amd.leaf0_registers();
        let mut cpuid = vec![CpuidEntry::leaf(0, 0xd, ebx, ecx, edx)];
        let brand = b"AMD EPYC Test Processor\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
            let w = |j: usize| {
                let o = i * 16 + j * 4;
                u32::from_le_bytes([brand[o], brand[o + 1], brand[o + 2], brand[o + 3]])
            };
            cpuid.push(CpuidEntry::leaf(leaf, w(0), w(1), w(2), w(3)));
        }
        assert_eq!(vendor_string(&cpuid), "AuthenticAMD");
        assert_eq!(brand_string(&cpuid), "AMD EPYC Test Processor");
    }
}
