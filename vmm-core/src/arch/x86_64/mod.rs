//! Everything that knows x86 registers and firmware tables.
//!
//! | module | what |
//! | --- | --- |
//! | [`layout`] | the guest physical memory map: RAM, the MMIO gap, where Linux boot puts things |
//! | [`cpuid`] | KVM's CPUID entries to and from `topology`'s, and setting them on a vCPU |
//! | [`msr`] | MSR indices and the MSRs every vCPU gets at creation |
//! | [`lapic`] | local APIC registers and the LINT0/LINT1 wiring |
//! | [`fpu`] | the x87/SSE state at creation |
//! | [`gdt`] | segment descriptors and GDTs |
//! | [`paging`] | identity page tables for a direct 64-bit entry |
//! | [`regs`] | CR0/CR4/EFER/RFLAGS bits and the 64-bit entry's special registers |
//! | [`mptable`] | the MP table (processors, I/O APIC, interrupt wiring) |
//! | [`acpi`] | the ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) |
//! | [`x2apic`] | x2APIC mode: `KVM_CAP_X2APIC_API`, `IA32_APIC_BASE`, the MSI extended destination ID |
//! | [`e820`] | the e820 memory map |
//! | [`state`] | saving and restoring a vCPU's whole state, in KVM's order |
//! | [`vm_state`] | saving and restoring the VM's clock, PIT, PICs and IOAPIC |
//!
//! [`setup_vcpu`] is what the vCPU manager does to every new vCPU after its CPUID; a boot
//! entry (Linux boot in [`crate::boot`], or a loader outside this crate) then sets the BSP's
//! registers with [`gdt`], [`paging`] and [`regs`].
//!
//! ACPI tables are in [`acpi`] (next to [`mptable`] and [`e820`], placed in [`layout`]),
//! x2APIC mode in [`x2apic`]. Saving and restoring vCPU and VM state is in [`state`] and
//! [`vm_state`]; the snapshot files that hold it are [`crate::snapshot`]'s.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod fpu;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
pub mod state;
pub mod vm_state;
pub mod x2apic;

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::VcpuFd;

use crate::config::InterruptMode;
use crate::error::{KvmOp, VcpuSetupError};
pub(crate) use crate::vm::write_guest;

/// The architectural setup of a new vCPU (KVM vCPU id `vcpu_id`) after its CPUID: the boot
/// MSRs ([`msr::boot_msrs`]), in x2APIC mode `IA32_APIC_BASE` with x2APIC enabled
/// ([`x2apic::apic_base`]; the BSP is vCPU id 0), LINT0/LINT1 ([`lapic::setup_lint`]) and the
/// FPU ([`fpu::setup_fpu`]). `mode` is the VM's resolved interrupt mode.
pub fn setup_vcpu(vcpu: &VcpuFd, vcpu_id: u32, mode: InterruptMode) -> Result<(), VcpuSetupError> {
    let mut msrs = msr::boot_msrs();
    if mode == InterruptMode::X2Apic {
        // After CPUID: KVM refuses EXTD unless the vCPU's CPUID has the x2APIC flag.
        let base = x2apic::apic_base(mode, vcpu_id == 0);
        msrs.push(msr::entry(x2apic::IA32_APIC_BASE, base));
    }
    msr::set_msrs(vcpu, vcpu_id, &msrs)?;
    lapic::setup_lint(vcpu, vcpu_id)?;
    fpu::setup_fpu(vcpu, vcpu_id)
}

/// Makes `vcpu` (KVM vCPU id `vcpu_id`) runnable (the BSP, whose registers are set), or
/// leaves it waiting in `KVM_RUN` for the guest's INIT and SIPI (an AP).
pub fn set_boot_mp_state(vcpu: &VcpuFd, vcpu_id: u32, bsp: bool) -> Result<(), VcpuSetupError> {
    let mp_state = if bsp {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    };
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .map_err(crate::vcpu_kvm_error(vcpu_id, KvmOp::SetMpState))
}
