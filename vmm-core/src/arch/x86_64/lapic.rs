//! The local APIC in xAPIC mode: register access on KVM's `kvm_lapic_state`, and the LINT0/LINT1
//! wiring every vCPU gets at creation ([`setup_lint`]). An x2APIC mode would live here too.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use crate::error::{KvmOp, VcpuSetupError};

/// LVT LINT0.
pub const LVT_LINT0: usize = 0x350;
/// LVT LINT1.
pub const LVT_LINT1: usize = 0x360;

/// LVT delivery modes (bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Fixed vector.
    Fixed = 0b000,
    /// Non-maskable interrupt.
    Nmi = 0b100,
    /// External interrupt (the 8259 PIC's INTR).
    ExtInt = 0b111,
}

/// Reads a 32-bit APIC register.
pub fn read_register(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(&state.regs[offset..offset + 4]) {
        *dst = *src as u8;
    }
    u32::from_le_bytes(b)
}

/// Writes a 32-bit APIC register.
pub fn write_register(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in state.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as _;
    }
}

/// Sets the delivery mode of the LVT entry at `offset`, keeping its other bits.
pub fn set_lvt_delivery_mode(state: &mut kvm_lapic_state, offset: usize, mode: DeliveryMode) {
    let v = read_register(state, offset);
    write_register(state, offset, (v & !(0b111 << 8)) | ((mode as u32) << 8));
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI on `vcpu` (KVM vCPU id `vcpu_id`), as
/// the MP table says.
// Not inlined: its kvm_lapic_state (and kvm-ioctls' copy of it) stays out of `setup_vcpu`'s frame,
// which every vCPU's thread runs (see `setup_vcpu` on stack depth).
#[inline(never)]
pub fn setup_lint(vcpu: &VcpuFd, vcpu_id: u32) -> Result<(), VcpuSetupError> {
    let err = |op| crate::vcpu_kvm_error(vcpu_id, op);
    let mut state = vcpu.get_lapic().map_err(err(KvmOp::GetLapic))?;
    set_lvt_delivery_mode(&mut state, LVT_LINT0, DeliveryMode::ExtInt);
    set_lvt_delivery_mode(&mut state, LVT_LINT1, DeliveryMode::Nmi);
    vcpu.set_lapic(&state).map_err(err(KvmOp::SetLapic))
}

/// Makes KVM rebuild the VM's APIC ID -> vCPU map by setting `vcpu`'s (KVM vCPU id
/// `vcpu_id`) LAPIC state back unchanged.
///
/// KVM delivers IPIs and MSIs through that map, and rebuilds it when a LAPIC's ID, mode or
/// state changes; the rebuild that creating a vCPU does runs before the new vCPU is in the
/// VM's list, so the vCPU created last is missing from the map until something rebuilds it
/// again (an INIT IPI for it is then lost). Each rebuild walks every vCPU, so the manager
/// asks for one per batch, on the vCPU created last, rather than one per vCPU.
// Not inlined: its kvm_lapic_state (and kvm-ioctls' copy of it) stays out of `setup_vcpu`'s frame,
// which every vCPU's thread runs (see `setup_vcpu` on stack depth).
#[inline(never)]
pub fn refresh_apic_map(vcpu: &VcpuFd, vcpu_id: u32) -> Result<(), VcpuSetupError> {
    let err = |op| crate::vcpu_kvm_error(vcpu_id, op);
    let state = vcpu.get_lapic().map_err(err(KvmOp::GetLapic))?;
    vcpu.set_lapic(&state).map_err(err(KvmOp::SetLapic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_modes_keep_other_bits() {
        let mut s = kvm_lapic_state::default();
        write_register(&mut s, LVT_LINT0, 0x0001_0000); // masked
        set_lvt_delivery_mode(&mut s, LVT_LINT0, DeliveryMode::ExtInt);
        set_lvt_delivery_mode(&mut s, LVT_LINT1, DeliveryMode::Nmi);
        assert_eq!(read_register(&s, LVT_LINT0), 0x0001_0700);
        assert_eq!(read_register(&s, LVT_LINT1), 0x0000_0400);
        set_lvt_delivery_mode(&mut s, LVT_LINT1, DeliveryMode::Fixed);
        assert_eq!(read_register(&s, LVT_LINT1), 0);
    }
}
