//! Control registers, EFER and RFLAGS as named bits, and the one builder of a vCPU's special
//! registers for a direct entry into 64-bit mode ([`LongModeEntry`]).

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::gdt::Descriptor;
use crate::error::{KvmOp, VcpuSetupError};

/// CR0 bits.
pub mod cr0 {
    consts! {
        PE: u64 = 1 << 0, "Protected mode.";
        MP: u64 = 1 << 1, "Monitor coprocessor.";
        ET: u64 = 1 << 4, "Extension type (always 1).";
        NE: u64 = 1 << 5, "Native x87 errors.";
        WP: u64 = 1 << 16, "Write protect: CPL-0 writes honour read-only pages.";
        PG: u64 = 1 << 31, "Paging.";
    }
    /// The least CR0 of 64-bit mode: PE | MP | ET | NE | PG.
    pub const LONG_MODE: u64 = PE | MP | ET | NE | PG;
}

/// CR4 bits.
pub mod cr4 {
    consts! {
        PAE: u64 = 1 << 5, "Physical address extension (required for long mode).";
        OSFXSR: u64 = 1 << 9, "The OS saves SSE state with `fxsave` (SSE instructions allowed).";
        OSXMMEXCPT: u64 = 1 << 10, "The OS handles SIMD floating-point exceptions.";
    }
    /// The least CR4 of 64-bit mode: PAE.
    pub const LONG_MODE: u64 = PAE;
}

/// EFER (MSR `0xC000_0080`, [`super::msr::EFER`]) bits.
pub mod efer {
    consts! {
        LME: u64 = 1 << 8, "Long mode enable.";
        LMA: u64 = 1 << 10, "Long mode active.";
    }
    /// EFER of 64-bit mode: LME | LMA.
    pub const LONG_MODE: u64 = LME | LMA;
}

/// RFLAGS bits.
pub mod rflags {
    consts! {
        RESERVED: u64 = 1 << 1, "Bit 1, always set.";
        IF: u64 = 1 << 9, "Interrupts enabled.";
        IOPL3: u64 = 3 << 12, "I/O privilege level 3: `in`/`out` allowed at every CPL (where the host honours it).";
    }
}

/// Everything that decides a vCPU's special registers at a direct 64-bit entry: flat code and
/// data segments, a task register, the GDT, the page tables and the control registers. There
/// is no IDT: the guest installs its own before it enables interrupts, and any exception
/// before that triple-faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongModeEntry {
    /// `CS`: its selector and descriptor (64-bit code, at the entry's DPL).
    pub code: (u16, Descriptor),
    /// `DS`, `ES`, `FS`, `GS` and `SS`: selector and descriptor.
    pub data: (u16, Descriptor),
    /// `TR`: selector and (busy) TSS descriptor.
    pub task: (u16, Descriptor),
    /// The GDT's guest address.
    pub gdt_base: u64,
    /// The GDT's limit.
    pub gdt_limit: u16,
    /// `CR3`: the PML4 table.
    pub cr3: u64,
    /// `CR0`: at least [`cr0::LONG_MODE`].
    pub cr0: u64,
    /// `CR4`: at least [`cr4::LONG_MODE`].
    pub cr4: u64,
}

impl LongModeEntry {
    /// `sregs` with this entry's registers, keeping what it does not set (e.g. the LDT and
    /// the APIC base).
    pub fn sregs(&self, mut sregs: kvm_sregs) -> kvm_sregs {
        let data = self.data.1.to_kvm_segment(self.data.0);
        sregs.cs = self.code.1.to_kvm_segment(self.code.0);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = self.task.1.to_kvm_segment(self.task.0);
        sregs.gdt.base = self.gdt_base;
        sregs.gdt.limit = self.gdt_limit;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = self.cr0;
        sregs.cr3 = self.cr3;
        sregs.cr4 = self.cr4;
        sregs.efer = efer::LONG_MODE;
        sregs
    }

    /// Sets the special registers of `vcpu` (KVM vCPU id `vcpu_id`) to this entry, then its
    /// general registers to `regs`.
    pub fn apply(
        &self,
        vcpu: &VcpuFd,
        vcpu_id: u32,
        regs: &kvm_regs,
    ) -> Result<(), VcpuSetupError> {
        let err = |op| crate::vcpu_kvm_error(vcpu_id, op);
        let sregs = vcpu.get_sregs().map_err(err(KvmOp::GetSregs))?;
        vcpu.set_sregs(&self.sregs(sregs))
            .map_err(err(KvmOp::SetSregs))?;
        vcpu.set_regs(regs).map_err(err(KvmOp::SetRegs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_bits_are_the_architectural_values() {
        assert_eq!(cr0::LONG_MODE | cr0::WP, 0x8001_0033);
        assert_eq!(cr4::LONG_MODE | cr4::OSFXSR | cr4::OSXMMEXCPT, 0x620);
        assert_eq!(efer::LONG_MODE, 0x500);
        assert_eq!(rflags::RESERVED | rflags::IOPL3, 0x3002);
    }
}
