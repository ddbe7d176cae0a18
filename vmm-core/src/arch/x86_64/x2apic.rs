//! x2APIC mode: what a VM whose APIC IDs do not all fit 8 bits needs (see
//! [`InterruptMode::X2Apic`], chosen by [`InterruptMode::Auto`] when the largest APIC ID is
//! above 254).
//!
//! - The VM: `KVM_CAP_X2APIC_API` with 32-bit APIC IDs (`KVM_X2APIC_API_USE_32BIT_IDS`: the
//!   LAPIC ID register, `KVM_GET/SET_LAPIC` and MSI routes carry the full vCPU id) and without
//!   the broadcast quirk (`KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK`: destination 0xFF is an
//!   ordinary APIC ID, not a broadcast, for x2APIC-mode interrupts), before any vCPU exists
//!   ([`enable_x2apic_api`]).
//! - Every vCPU: its local APIC enabled in x2APIC mode (`IA32_APIC_BASE` bit 10 `EXTD` with
//!   bit 11 `EN`, bit 8 `BSP` on the BSP; [`apic_base`]), as the x2APIC specification asks of
//!   firmware that hands over more than 255 processors: all of them in x2APIC mode. INIT keeps
//!   the mode, so an AP woken later is in x2APIC mode too. Guests reach the registers through
//!   the MSRs `0x800..0x8FF` (the ICR is [`X2APIC_ICR_MSR`], one 64-bit write with a 32-bit
//!   destination).
//! - CPUID: KVM's paravirtual feature leaf `0x4000_0001` EAX bit 15,
//!   `KVM_FEATURE_MSI_EXT_DEST_ID` ([`apply_cpuid`]): the guest may put destination APIC ID
//!   bits 8..14 in the MSI address (Linux then reaches 32768 CPUs with I/O APIC and MSI
//!   interrupts without an IOMMU). Leaf 1's `x2APIC` feature flag (ECX bit 21) is KVM's own and
//!   stays. Leaf 1 EBX\[31:24\] keeps only the low 8 bits of the APIC ID, as on hardware with
//!   more than 255 processors; the full ID is in leaves 0xB and 0x1F EDX.
//!
//! Linux boot writes no MP table in this mode (it cannot carry the IDs) and lists the large IDs
//! as Local x2APIC entries in the MADT ([`super::acpi`]).

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_X2APIC_API, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
    KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Cap, VmFd};
use topology::CpuidEntry;

use super::layout::LAPIC_ADDR;
use crate::config::InterruptMode;
use crate::error::{KvmOp, VmError};

consts! {
    IA32_APIC_BASE: u32 = 0x1b, "`IA32_APIC_BASE`.";
    APIC_BASE_BSP: u64 = 1 << 8, "`IA32_APIC_BASE` bit 8: this is the bootstrap processor.";
    APIC_BASE_EXTD: u64 = 1 << 10, "`IA32_APIC_BASE` bit 10: x2APIC mode (with [`APIC_BASE_ENABLE`]).";
    APIC_BASE_ENABLE: u64 = 1 << 11, "`IA32_APIC_BASE` bit 11: the local APIC is enabled.";
    X2APIC_ICR_MSR: u32 = 0x830, "The x2APIC interrupt command register (MSR `0x800 + 0x300 / 16`): one 64-bit write, the destination in bits 63:32.";
    X2APIC_ID_MSR: u32 = 0x802, "The x2APIC ID register (MSR `0x800 + 0x20 / 16`).";
    KVM_CPUID_FEATURES: u32 = 0x4000_0001, "KVM's paravirtual feature leaf (`KVM_CPUID_FEATURES`).";
    KVM_FEATURE_MSI_EXT_DEST_ID: u32 = 1 << 15, "`KVM_FEATURE_MSI_EXT_DEST_ID`: bit 15 of [`KVM_CPUID_FEATURES`] EAX.";
    X2APIC_API_FLAGS: u32 = KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK, "The flags given with `KVM_CAP_X2APIC_API`.";
}

/// `IA32_APIC_BASE` of a vCPU in `mode` (resolved: not `Auto`): the LAPIC at
/// [`LAPIC_ADDR`], enabled, `BSP` for the BSP, `EXTD` in x2APIC mode.
pub fn apic_base(mode: InterruptMode, bsp: bool) -> u64 {
    let mut base = u64::from(LAPIC_ADDR) | APIC_BASE_ENABLE;
    if bsp {
        base |= APIC_BASE_BSP;
    }
    if mode == InterruptMode::X2Apic {
        base |= APIC_BASE_EXTD;
    }
    base
}

/// In x2APIC mode, enables `KVM_CAP_X2APIC_API` with [`X2APIC_API_FLAGS`] on `vm` (call before
/// any vCPU exists); nothing in the other modes.
///
/// # Errors
///
/// [`VmError::X2apicApiMissing`] if this host's KVM lacks the capability,
/// [`VmError::Kvm`] with [`KvmOp::EnableCapX2apicApi`] if enabling it fails.
pub fn enable_x2apic_api(vm: &VmFd, mode: InterruptMode) -> Result<(), VmError> {
    if mode != InterruptMode::X2Apic {
        return Ok(());
    }
    if !vm.check_extension(Cap::X2ApicApi) {
        return Err(VmError::X2apicApiMissing);
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X2APIC_API,
        args: [u64::from(X2APIC_API_FLAGS), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|source| VmError::Kvm {
        op: KvmOp::EnableCapX2apicApi,
        source,
    })
}

/// In x2APIC mode, sets `KVM_FEATURE_MSI_EXT_DEST_ID` in KVM's feature leaf if the CPUID set
/// has KVM's leaves (as `KVM_GET_SUPPORTED_CPUID` gives them); nothing in the other modes.
pub fn apply_cpuid(mode: InterruptMode, entries: &mut [CpuidEntry]) {
    if mode != InterruptMode::X2Apic {
        return;
    }
    if let Some(e) = topology::find_entry_mut(entries, KVM_CPUID_FEATURES, 0) {
        e.eax |= KVM_FEATURE_MSI_EXT_DEST_ID;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_base_per_mode() {
        assert_eq!(apic_base(InterruptMode::XApic, true), 0xfee0_0900);
        assert_eq!(apic_base(InterruptMode::XApic, false), 0xfee0_0800);
        assert_eq!(apic_base(InterruptMode::X2Apic, true), 0xfee0_0d00);
        assert_eq!(apic_base(InterruptMode::X2Apic, false), 0xfee0_0c00);
    }

    #[test]
    fn msi_ext_dest_id_only_in_x2apic_mode() {
        let mut e = vec![
            CpuidEntry::leaf(KVM_CPUID_FEATURES, 0x1, 0, 0, 0),
            CpuidEntry::leaf(1, 0, 0, 0, 0),
        ];
        apply_cpuid(InterruptMode::XApic, &mut e);
        assert_eq!(e[0].eax, 1);
        apply_cpuid(InterruptMode::X2Apic, &mut e);
        assert_eq!(e[0].eax, 1 | (1 << 15));
        assert_eq!(e[1], CpuidEntry::leaf(1, 0, 0, 0, 0));
        // No KVM leaf: nothing to add to.
        let mut none = vec![CpuidEntry::leaf(1, 0, 0, 0, 0)];
        apply_cpuid(InterruptMode::X2Apic, &mut none);
        assert_eq!(none, [CpuidEntry::leaf(1, 0, 0, 0, 0)]);
    }
}
