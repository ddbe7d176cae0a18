//! Saving and restoring the VM-scope state KVM keeps outside the vCPUs ([`X86VmState`]): the
//! kvmclock, the in-kernel PIT and interrupt controllers (both PICs and the IOAPIC).
//!
//! Restore it into the new VM before any vCPU runs: a vCPU that runs before `KVM_SET_CLOCK`
//! sees a kvmclock that starts again from zero and the guest hangs waiting for time to catch
//! up; one that runs before the IOAPIC and PICs are restored loses their routing and masks.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME,
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::error::{StateError, StateOp};

/// The VM-scope state of an x86 VM with the in-kernel irqchip. Serializable: the fields are
/// KVM's structures as bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct X86VmState {
    /// The kvmclock (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// The PIT (`KVM_GET_PIT2`); `None` for a VM created without one.
    pub pit: Option<kvm_pit_state2>,
    /// The master PIC (irqchip 0).
    pub pic_master: kvm_irqchip,
    /// The slave PIC (irqchip 1).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (irqchip 2).
    pub ioapic: kvm_irqchip,
}

/// Reads `vm`'s state. Every vCPU must be paused (out of `KVM_RUN`), so that nothing changes
/// the interrupt controllers or the clock in between.
///
/// # Errors
///
/// [`StateError::Kvm`] naming the call that failed (a VM without the in-kernel irqchip
/// fails `KVM_GET_IRQCHIP`).
pub fn save_vm(vm: &VmFd) -> Result<X86VmState, StateError> {
    let pit = match vm.get_pit2() {
        Ok(p) => Some(p),
        // KVM answers ENXIO when the VM has no PIT.
        Err(e) if e.errno() == libc::ENXIO => None,
        Err(e) => {
            return Err(StateError::Kvm {
                op: StateOp::GetPit2,
                source: e,
            })
        }
    };
    let chip = |id: u32| {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(StateError::kvm(StateOp::GetIrqchip(id)))?;
        Ok::<_, StateError>(c)
    };
    let pic_master = chip(KVM_IRQCHIP_PIC_MASTER)?;
    let pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = chip(KVM_IRQCHIP_IOAPIC)?;
    // The clock last, closest to the moment the vCPUs' state is saved (they are paused, so
    // their TSCs and this clock stop being read by the guest at the same point).
    let clock = vm.get_clock().map_err(StateError::kvm(StateOp::GetClock))?;
    Ok(X86VmState {
        clock,
        pit,
        pic_master,
        pic_slave,
        ioapic,
    })
}

/// Writes `state` into `vm`, a new VM with the in-kernel irqchip (and a PIT where the state
/// has one), before any of its vCPUs runs.
///
/// # Errors
///
/// [`StateError::Kvm`] naming the call that failed.
pub fn restore_vm(vm: &VmFd, state: &X86VmState) -> Result<(), StateError> {
    // The interrupt controllers first: the PIT's output goes to them, and restoring the
    // PIT into controllers that are still in their reset state would route its pending
    // interrupt with the wrong masks.
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip)
            .map_err(StateError::kvm(StateOp::SetIrqchip(chip.chip_id)))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit)
            .map_err(StateError::kvm(StateOp::SetPit2))?;
    }
    // The clock before any vCPU runs (the module documentation says why). Only the value
    // goes in: the flags KVM_GET_CLOCK reported (TSC_STABLE, and REALTIME/HOST_TSC, which
    // would make KVM move the clock forward by the wall time since the save) are cleared,
    // so the guest's clock continues from where it was saved, as for a paused VM.
    let clock = kvm_clock_data {
        flags: state.clock.flags
            & !(KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC),
        realtime: 0,
        host_tsc: 0,
        ..state.clock
    };
    vm.set_clock(&clock)
        .map_err(StateError::kvm(StateOp::SetClock))
}
