//! Model-specific registers: the indices this crate uses, the table every vCPU gets at creation
//! ([`boot_msrs`]) and the one way to set a list of them ([`set_msrs`]).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use crate::error::{KvmOp, VcpuSetupError};

/// `IA32_TIME_STAMP_COUNTER`.
pub const IA32_TSC: u32 = 0x10;
/// `IA32_SYSENTER_CS`: the code selector `sysenter` loads; `sysexit` derives the user
/// selectors from it (+32 code, +40 data in 64-bit mode).
pub const IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_EFER` (bits in [`super::regs::efer`]).
pub const EFER: u32 = 0xc000_0080;
/// `STAR`: `syscall`/`sysret` selectors.
pub const STAR: u32 = 0xc000_0081;
/// `LSTAR`: the 64-bit `syscall` entry.
pub const LSTAR: u32 = 0xc000_0082;
/// `CSTAR`: the compatibility-mode `syscall` entry.
pub const CSTAR: u32 = 0xc000_0083;
/// `SFMASK`: the RFLAGS bits `syscall` clears.
pub const SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`: what `swapgs` swaps in.
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE` bit 11: MTRRs enabled.
const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
const MTRR_TYPE_WRITE_BACK: u64 = 6;

/// One MSR entry: `index` = `data`.
pub fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSRs every vCPU gets at creation: SYSENTER/SYSCALL MSRs cleared, TSC 0, fast strings
/// on, MTRRs enabled with write-back as the default type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    vec![
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(LSTAR, 0),
        entry(CSTAR, 0),
        entry(SYSCALL_MASK, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
}

/// Sets `entries` on `vcpu` (KVM vCPU id `vcpu_id`); fails with the first MSR KVM did not
/// set.
pub fn set_msrs(
    vcpu: &VcpuFd,
    vcpu_id: u32,
    entries: &[kvm_msr_entry],
) -> Result<(), VcpuSetupError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| VcpuSetupError::MsrRejected {
        vcpu_id,
        msr: entries.first().map_or(0, |e| e.index),
        set: 0,
        total: entries.len(),
    })?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(crate::vcpu_kvm_error(vcpu_id, KvmOp::SetMsrs))?;
    if set != entries.len() {
        return Err(VcpuSetupError::MsrRejected {
            vcpu_id,
            msr: entries.get(set).map_or(0, |e| e.index),
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_are_unique() {
        let m = boot_msrs();
        let mut idx: Vec<u32> = m.iter().map(|e| e.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), m.len());
    }
}
