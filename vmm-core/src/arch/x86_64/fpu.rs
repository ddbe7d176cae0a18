//! The x87/SSE state every vCPU gets at creation: the values after `fninit` and the default
//! MXCSR (all exceptions masked, round to nearest).
//!
//! KVM creates vCPUs with exactly this state, so only a kept vCPU fd needs [`setup_fpu`]. Note
//! that `KVM_SET_FPU` does not write MXCSR (nor `KVM_GET_FPU` read it: it reports 0); only
//! `KVM_SET_XSAVE` reaches it.

use kvm_bindings::kvm_fpu;
use kvm_ioctls::VcpuFd;

use crate::error::{KvmOp, VcpuSetupError};

/// The x87 control word after `fninit`: all exceptions masked, 64-bit precision.
pub const FCW_DEFAULT: u16 = 0x37f;
/// The MXCSR at reset: all SIMD exceptions masked, round to nearest.
pub const MXCSR_DEFAULT: u32 = 0x1f80;

/// The FPU state at creation.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// Sets [`boot_fpu`] on `vcpu` (KVM vCPU id `vcpu_id`).
// Not inlined: its kvm_fpu (and kvm-ioctls' copy of it) stays out of `setup_vcpu`'s frame,
// which every vCPU's thread runs (see `setup_vcpu` on stack depth).
#[inline(never)]
pub fn setup_fpu(vcpu: &VcpuFd, vcpu_id: u32) -> Result<(), VcpuSetupError> {
    vcpu.set_fpu(&boot_fpu())
        .map_err(crate::vcpu_kvm_error(vcpu_id, KvmOp::SetFpu))
}
