//! Saving and restoring the whole state of an x86 vCPU ([`X86VcpuState`]), in the order KVM
//! needs.
//!
//! [`save`] reads, and [`restore`] writes, everything KVM keeps for a vCPU: MP state,
//! general and special registers, the XSAVE area (x87/SSE/AVX...), XCRs, debug registers,
//! the local APIC, the TSC frequency, the vCPU's CPUID, its MSRs (the list [`SaveableMsrs`]
//! probes from KVM, not a hard-coded one) and its pending events. The order of the calls
//! matters to KVM; each call has a comment saying why it is where it is.
//!
//! Save a vCPU only while it is out of `KVM_RUN` (paused), and restore into a vCPU fd that
//! has not run yet (KVM refuses to change the CPUID of a vCPU that has run), before it first
//! runs. The VM-scope state (clock, PIT, PICs, IOAPIC) is [`super::vm_state`]'s, and is
//! restored before any vCPU runs.

pub mod msrs;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use topology::CpuidEntry;

use super::cpuid::{entries_from_kvm, entry_to_kvm};
use crate::error::{StateError, StateOp};
pub use msrs::{MsrValue, SaveableMsrs, IA32_TSC_DEADLINE};

/// Bytes of the legacy `kvm_xsave` area (`KVM_GET_XSAVE`).
const LEGACY_XSAVE_BYTES: usize = std::mem::size_of::<kvm_xsave>();
/// Bytes per XSAVE word (the areas are `u32` arrays).
const XSAVE_WORD: usize = std::mem::size_of::<u32>();

/// The complete state of one x86 vCPU, as KVM gives it. Serializable: the `kvm_*` fields are
/// KVM's structures as bytes (their layout is KVM's ABI), the rest are plain fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct X86VcpuState {
    /// `KVM_GET_MP_STATE`: runnable, halted, waiting for INIT/SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area as `u32` words: the 4096-byte legacy area, then what
    /// `KVM_GET_XSAVE2` adds (dynamically enabled features such as AMX).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0); `None` where KVM lacks `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// The vCPU's TSC frequency in kHz; `None` where KVM lacks `KVM_CAP_GET_TSC_KHZ`.
    pub tsc_khz: Option<u32>,
    /// The vCPU's CPUID, as KVM holds it (`KVM_GET_CPUID2`).
    pub cpuid: Vec<CpuidEntry>,
    /// The MSRs, in restore order (`IA32_TSC_DEADLINE` last).
    pub msrs: Vec<MsrValue>,
    /// Pending exceptions, interrupts, NMIs, SMIs and the interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

impl X86VcpuState {
    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    /// The APIC ID in the saved LAPIC's ID register (bits 31:24 in xAPIC mode).
    pub fn lapic_apic_id(&self) -> u32 {
        super::lapic::read_register(&self.lapic, APIC_ID_REGISTER) >> 24
    }
}

/// Offset of the LAPIC ID register.
const APIC_ID_REGISTER: usize = 0x20;

/// What this VM's KVM offers for vCPU state, asked once per VM (`KVM_CHECK_EXTENSION` on
/// the VM fd, where the answers can depend on the VM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateCaps {
    /// `KVM_CAP_XSAVE2`: the XSAVE area's size in bytes; 0 where KVM only has
    /// `KVM_GET_XSAVE` (4096 bytes).
    pub xsave2_size: usize,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_GET_TSC_KHZ`.
    pub get_tsc_khz: bool,
    /// `KVM_CAP_TSC_CONTROL` (`KVM_SET_TSC_KHZ` works).
    pub tsc_control: bool,
}

impl StateCaps {
    /// Asks `vm`'s KVM.
    pub fn query(vm: &VmFd) -> Self {
        Self {
            xsave2_size: usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
            xcrs: vm.check_extension(Cap::Xcrs),
            get_tsc_khz: vm.check_extension(Cap::GetTscKhz),
            tsc_control: vm.check_extension(Cap::TscControl),
        }
    }

    /// The XSAVE area's size in bytes that this KVM reads and writes.
    pub fn xsave_bytes(&self) -> usize {
        self.xsave2_size.max(LEGACY_XSAVE_BYTES)
    }
}

/// Reads the whole state of `vcpu`, which must be out of `KVM_RUN` (paused). `msrs` is the
/// VM's [`SaveableMsrs`] (probed once, on any of its vCPUs).
///
/// # Errors
///
/// [`StateError::Kvm`] naming the call that failed; [`StateError::MsrRefused`] if KVM did
/// not read an MSR of the list.
pub fn save(
    vcpu: &VcpuFd,
    caps: &StateCaps,
    msrs: &SaveableMsrs,
) -> Result<X86VcpuState, StateError> {
    // First: KVM_GET_MP_STATE processes pending INIT/SIPI events of the LAPIC
    // (kvm_apic_accept_events), which can change the LAPIC and the registers read below.
    // Reading it later would save registers and a LAPIC from before that change.
    let mp_state = vcpu
        .get_mp_state()
        .map_err(StateError::kvm(StateOp::GetMpState))?;
    let regs = vcpu.get_regs().map_err(StateError::kvm(StateOp::GetRegs))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(StateError::kvm(StateOp::GetSregs))?;
    let xsave = get_xsave(vcpu, caps)?;
    let xcrs = if caps.xcrs {
        Some(vcpu.get_xcrs().map_err(StateError::kvm(StateOp::GetXcrs))?)
    } else {
        None
    };
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(StateError::kvm(StateOp::GetDebugRegs))?;
    let lapic = vcpu
        .get_lapic()
        .map_err(StateError::kvm(StateOp::GetLapic))?;
    let tsc_khz = if caps.get_tsc_khz {
        Some(
            vcpu.get_tsc_khz()
                .map_err(StateError::kvm(StateOp::GetTscKhz))?,
        )
    } else {
        None
    };
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(StateError::kvm(StateOp::GetCpuid2))?;
    let cpuid = entries_from_kvm(cpuid.as_slice());
    // In the list's order, which has IA32_TSC_DEADLINE last (see SaveableMsrs).
    let msrs = msrs::get_msrs(vcpu, msrs)?;
    // Last: the pending-event state (exception, interrupt, NMI, SMI, latched INIT) is what
    // the calls above may still have settled (KVM_GET_MP_STATE accepting an INIT, for one);
    // read last, it is the newest and matches everything saved before it.
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(StateError::kvm(StateOp::GetVcpuEvents))?;
    Ok(X86VcpuState {
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        cpuid,
        msrs,
        vcpu_events,
    })
}

/// `KVM_GET_XSAVE2` with the size `KVM_CAP_XSAVE2` gives, or `KVM_GET_XSAVE` where KVM lacks
/// it; the area as words.
fn get_xsave(vcpu: &VcpuFd, caps: &StateCaps) -> Result<Vec<u32>, StateError> {
    if caps.xsave2_size == 0 {
        let x = vcpu
            .get_xsave()
            .map_err(StateError::kvm(StateOp::GetXsave))?;
        return Ok(x.region.to_vec());
    }
    let mut x = new_xsave2(caps.xsave_bytes())?;
    // SAFETY: `x` has room for `caps.xsave2_size` bytes, the size KVM_CAP_XSAVE2 reported for
    // this VM, which is what KVM_GET_XSAVE2 writes (this process enables no XSAVE feature
    // with arch_prctl after asking).
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(StateError::kvm(StateOp::GetXsave2))?;
    let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
    words.extend_from_slice(x.as_slice());
    Ok(words)
}

/// An `Xsave` with room for `bytes` bytes.
fn new_xsave2(bytes: usize) -> Result<Xsave, StateError> {
    let extra = bytes
        .saturating_sub(LEGACY_XSAVE_BYTES)
        .div_ceil(XSAVE_WORD);
    Xsave::new(extra).map_err(|_| StateError::TooManyEntries {
        what: "XSAVE words",
        count: extra,
        max: u32::MAX as usize,
    })
}

/// Writes `state` into `vcpu`, which has not run yet (KVM refuses a new CPUID on a vCPU that
/// has run), in the order KVM needs. Then tells the guest's kvmclock that it was paused
/// ([`notify_paused`]).
///
/// # Errors
///
/// [`StateError::Kvm`] naming the call that failed, [`StateError::MsrRefused`] naming an MSR
/// KVM did not set, [`StateError::XsaveTooLarge`] for an XSAVE area this KVM cannot take,
/// [`StateError::TooManyEntries`] for a CPUID or MSR list too long for KVM. The vCPU is then
/// partly written: do not run it.
pub fn restore(vcpu: &VcpuFd, caps: &StateCaps, state: &X86VcpuState) -> Result<(), StateError> {
    // The TSC frequency first, and only where the host's differs: KVM scales the TSC values
    // written below (IA32_TSC, the TSC deadline) and the LAPIC timer with it. Setting it
    // needs KVM_CAP_TSC_CONTROL; the call is skipped on a same-frequency host, where it is
    // not needed and may be unsupported.
    if let (Some(khz), true) = (state.tsc_khz, caps.get_tsc_khz) {
        let current = vcpu
            .get_tsc_khz()
            .map_err(StateError::kvm(StateOp::GetTscKhz))?;
        if current != khz {
            vcpu.set_tsc_khz(khz)
                .map_err(StateError::kvm(StateOp::SetTscKhz))?;
        }
    }
    // CPUID before everything else: KVM checks what is set next against the guest's CPUID
    // (XCR0 and the XSAVE features, CR4 bits in sregs, which MSRs exist), and refuses a new
    // CPUID once the vCPU has run.
    let cpuid = to_kvm_cpuid(&state.cpuid)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(StateError::kvm(StateOp::SetCpuid2))?;
    // MP state right after CPUID, before registers and events: a vCPU restored as waiting
    // for INIT/SIPI or with a SIPI received gets its registers reset by KVM when it handles
    // that state, so the state is in place first and the saved registers and pending events
    // (latched INIT) written after it are the ones that stay.
    vcpu.set_mp_state(state.mp_state)
        .map_err(StateError::kvm(StateOp::SetMpState))?;
    // Registers before vCPU events: KVM_SET_REGS drops a pending exception, so a saved
    // pending exception written by KVM_SET_VCPU_EVENTS before it would be lost.
    vcpu.set_regs(&state.regs)
        .map_err(StateError::kvm(StateOp::SetRegs))?;
    // Special registers before the LAPIC: KVM_SET_SREGS writes the APIC base MSR (LAPIC
    // enable, xAPIC/x2APIC mode), which resets the LAPIC's mode; the LAPIC registers written
    // after it keep their saved values in the right mode.
    vcpu.set_sregs(&state.sregs)
        .map_err(StateError::kvm(StateOp::SetSregs))?;
    // XSAVE and XCRs after CPUID (checked against the XSAVE features it allows); XSAVE
    // before XCRs as KVM's own save order has them.
    set_xsave(vcpu, caps, &state.xsave)?;
    if let (Some(xcrs), true) = (&state.xcrs, caps.xcrs) {
        vcpu.set_xcrs(xcrs)
            .map_err(StateError::kvm(StateOp::SetXcrs))?;
    }
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(StateError::kvm(StateOp::SetDebugRegs))?;
    // LAPIC after sregs (above) and before the MSRs: writing IA32_TSC_DEADLINE arms the
    // LAPIC timer only if the LAPIC's timer LVT is in TSC-deadline mode, so with the LAPIC
    // restored later the deadline would be dropped and the guest's timer never fire.
    vcpu.set_lapic(&state.lapic)
        .map_err(StateError::kvm(StateOp::SetLapic))?;
    // MSRs in the saved order: IA32_TSC before IA32_TSC_DEADLINE (last), because the
    // deadline is compared with the guest TSC, which must be the restored one. A short count
    // is an error naming the MSR.
    msrs::set_msrs(vcpu, &state.msrs)?;
    // vCPU events after the registers (KVM_SET_REGS drops pending exceptions), the LAPIC and
    // the MSRs, so the pending exception/interrupt/NMI/SMI state is the last word.
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(StateError::kvm(StateOp::SetVcpuEvents))?;
    // Last: the guest was stopped for a while; tell its kvmclock so its watchdogs do not see
    // a soft lockup when it runs again.
    notify_paused(vcpu)
}

/// `KVM_KVMCLOCK_CTRL`: sets the guest's kvmclock "stopped" flag, so that the guest's
/// watchdogs do not report a soft lockup for the time the vCPU was paused. Call it just
/// before a paused or restored vCPU runs again. KVM answers `EINVAL` when the guest has not
/// enabled kvmclock: that errno alone is not an error.
///
/// # Errors
///
/// [`StateError::Kvm`] for any other failure.
pub fn notify_paused(vcpu: &VcpuFd) -> Result<(), StateError> {
    match vcpu.kvmclock_ctrl() {
        Err(e) if e.errno() == libc::EINVAL => Ok(()),
        r => r.map_err(StateError::kvm(StateOp::KvmclockCtrl)),
    }
}

/// `KVM_SET_XSAVE` with the saved area, sized for this KVM.
fn set_xsave(vcpu: &VcpuFd, caps: &StateCaps, words: &[u32]) -> Result<(), StateError> {
    let host = caps.xsave_bytes();
    let saved = words.len() * XSAVE_WORD;
    if saved > host {
        return Err(StateError::XsaveTooLarge { saved, host });
    }
    let legacy_words = LEGACY_XSAVE_BYTES / XSAVE_WORD;
    let (legacy, extra) = words.split_at(words.len().min(legacy_words));
    if caps.xsave2_size == 0 {
        let mut x = kvm_xsave::default();
        x.region[..legacy.len()].copy_from_slice(legacy);
        // SAFETY: this KVM lacks KVM_CAP_XSAVE2, so KVM_SET_XSAVE reads exactly the legacy
        // 4096-byte `kvm_xsave` that `x` is.
        return unsafe { vcpu.set_xsave(&x) }.map_err(StateError::kvm(StateOp::SetXsave));
    }
    let mut x = new_xsave2(host)?;
    // SAFETY: only the plain-data region array of the struct is written; the FAM length is
    // unchanged.
    unsafe { x.as_mut_fam_struct() }.xsave.region[..legacy.len()].copy_from_slice(legacy);
    x.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `x` has room for `caps.xsave2_size` bytes, what KVM_CAP_XSAVE2 reported for this
    // VM and what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave2(&x) }.map_err(StateError::kvm(StateOp::SetXsave))
}

/// The saved CPUID as KVM's `CpuId`.
fn to_kvm_cpuid(entries: &[CpuidEntry]) -> Result<CpuId, StateError> {
    let kvm: Vec<kvm_cpuid_entry2> = entries.iter().map(entry_to_kvm).collect();
    CpuId::from_entries(&kvm).map_err(|_| StateError::TooManyEntries {
        what: "CPUID entries",
        count: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_sizes() {
        let caps = StateCaps {
            xsave2_size: 0,
            xcrs: true,
            get_tsc_khz: true,
            tsc_control: false,
        };
        assert_eq!(caps.xsave_bytes(), 4096);
        let caps = StateCaps {
            xsave2_size: 11008,
            ..caps
        };
        assert_eq!(caps.xsave_bytes(), 11008);
        let x = new_xsave2(11008).unwrap();
        assert_eq!(x.as_slice().len(), (11008 - 4096) / 4);
    }
}
