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

/// What a vCPU being set up is: the boot processor or an AP, on a vCPU fd just created or on
/// one kept from an earlier life of the vCPU (hot-unplugged, then added again).
///
/// A fresh fd already holds KVM's creation state, so [`setup_vcpu`] and [`set_boot_mp_state`]
/// skip the writes that would only repeat it (each vCPU ioctl costs a `vcpu_load`, and with
/// hundreds of vCPUs being configured at once that adds up); a kept fd holds whatever its
/// last guest left, so everything is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuStart {
    /// The boot processor (the vCPU that runs first; KVM vCPU id 0 at boot).
    pub bsp: bool,
    /// The fd was created for this start (`KVM_CREATE_VCPU`), not kept from an earlier one.
    pub fresh: bool,
    /// The last vCPU of a batch: set up after every vCPU of the batch was created, it makes
    /// KVM rebuild its APIC ID map ([`lapic::refresh_apic_map`]) so that IPIs reach them all.
    pub last_of_batch: bool,
}

/// The architectural setup of a new vCPU (KVM vCPU id `vcpu_id`) after its CPUID: the boot
/// MSRs ([`msr::boot_msrs`]), in x2APIC mode `IA32_APIC_BASE` with x2APIC enabled
/// ([`x2apic::apic_base`]; the BSP is vCPU id 0), LINT0/LINT1 on the BSP
/// ([`lapic::setup_lint`]), on the last vCPU of a batch the APIC map refresh
/// ([`lapic::refresh_apic_map`]; the BSP's LINT setup refreshes it too) and, on a kept fd, the
/// FPU ([`fpu::setup_fpu`]). `mode` is the VM's resolved interrupt mode.
///
/// What is left out, and why the guest cannot tell:
/// - LINT0/LINT1 of an AP: an AP starts in wait-for-SIPI, and the INIT the guest sends before
///   its SIPI resets every LVT entry to masked (Intel SDM vol. 3, "Local Vector Table"; KVM's
///   `kvm_lapic_reset`), so nothing written there would survive to the AP's first
///   instruction. The guest programs its own (Linux masks LINT0 on APs, LINT1 is NMI).
/// - The FPU of a fresh fd: KVM creates a vCPU with exactly [`fpu::boot_fpu`]'s x87 and SSE
///   control state (read back through `KVM_GET_XSAVE` by this crate's tests).
///
/// Stack depth: the steps with large KVM structures (the LAPIC's 1 KiB, the FPU's 416 bytes)
/// are functions of their own, not inlined here, so that an AP's setup on a fresh fd stays
/// within the two top pages of its thread's stack, where its run loop lives: a page touched
/// once stays resident for the thread's life. Only the BSP and the last vCPU of each batch
/// go deeper.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    mode: InterruptMode,
    start: VcpuStart,
) -> Result<(), VcpuSetupError> {
    let mut msrs = msr::boot_msrs();
    if mode == InterruptMode::X2Apic {
        // After CPUID: KVM refuses EXTD unless the vCPU's CPUID has the x2APIC flag.
        let base = x2apic::apic_base(mode, vcpu_id == 0);
        msrs.push(msr::entry(x2apic::IA32_APIC_BASE, base));
    }
    msr::set_msrs(vcpu, vcpu_id, &msrs)?;
    if start.bsp {
        lapic::setup_lint(vcpu, vcpu_id)?;
    } else if start.last_of_batch {
        lapic::refresh_apic_map(vcpu, vcpu_id)?;
    }
    if start.fresh {
        return Ok(());
    }
    fpu::setup_fpu(vcpu, vcpu_id)
}

/// The MP state [`set_boot_mp_state`] gives: runnable for the BSP (whose registers are set),
/// waiting in `KVM_RUN` for the guest's INIT and SIPI for an AP.
pub fn boot_mp_state(bsp: bool) -> u32 {
    if bsp {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    }
}

/// The MP state KVM gives a vCPU it creates in a VM with the in-kernel irqchip: runnable for
/// its reset BSP (vCPU id 0 unless the VMM moved it with `KVM_SET_BOOT_CPU_ID`, which this
/// crate never does), uninitialized (waiting for INIT) for the others.
pub fn kvm_created_mp_state(vcpu_id: u32) -> u32 {
    boot_mp_state(vcpu_id == 0)
}

/// Makes `vcpu` (KVM vCPU id `vcpu_id`) runnable (the BSP, whose registers are set), or
/// leaves it waiting in `KVM_RUN` for the guest's INIT and SIPI (an AP). On a fresh fd whose
/// creation state ([`kvm_created_mp_state`]) is already that, nothing is written.
pub fn set_boot_mp_state(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    start: VcpuStart,
) -> Result<(), VcpuSetupError> {
    let mp_state = boot_mp_state(start.bsp);
    if start.fresh && kvm_created_mp_state(vcpu_id) == mp_state {
        return Ok(());
    }
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .map_err(crate::vcpu_kvm_error(vcpu_id, KvmOp::SetMpState))
}
