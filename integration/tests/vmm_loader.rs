//! The loader on real KVM, without the vCPU manager: a program entered at CPL 3 and at CPL 0
//! does port I/O (CPL 3 through the TSS I/O bitmap the loader provides).

use integration::kvm_or_skip;
use integration::loader::{load_program, GuestProgram, Privilege};
use kvm_ioctls::{Kvm, VcpuExit};
use vmm_core::{BootEntry, Vm, VmOptions};

const PORT: u16 = 0x610;
const VALUE: u32 = 0x1234;

core::arch::global_asm!(
    ".pushsection .rodata.vmm_core_test_out,\"a\"",
    ".globl vmm_core_test_out_start",
    ".globl vmm_core_test_out_end",
    "vmm_core_test_out_start:",
    "movl ${value}, %eax",
    "movw ${port}, %dx",
    "outl %eax, %dx",
    ".Lvmm_core_test_out_spin:",
    "jmp .Lvmm_core_test_out_spin",
    "vmm_core_test_out_end:",
    ".popsection",
    value = const VALUE,
    port = const PORT,
    options(att_syntax),
);

extern "C" {
    static vmm_core_test_out_start: u8;
    static vmm_core_test_out_end: u8;
}

/// `out %eax, (%dx)` of VALUE to PORT, then spin.
fn out_program() -> &'static [u8] {
    // SAFETY: the symbols delimit the read-only section emitted above.
    unsafe {
        let start = std::ptr::addr_of!(vmm_core_test_out_start);
        let end = std::ptr::addr_of!(vmm_core_test_out_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

fn first_exit(kvm: Kvm, privilege: Privilege) -> (u16, Vec<u8>) {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let vm = Vm::new(kvm, VmOptions::default()).unwrap();
    let mut p = GuestProgram::user("out", out_program(), 0);
    p.privilege = privilege;
    let entry = load_program(vm.memory(), &p).unwrap();
    let mut vcpu = vm.fd().create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    entry.setup_bsp(&vcpu, vm.memory()).unwrap();
    let exit = match vcpu.run() {
        Ok(VcpuExit::IoOut(port, data)) => Ok((port, data.to_vec())),
        other => Err(format!("{other:?}")),
    };
    exit.unwrap_or_else(|other| {
        panic!(
            "unexpected exit {other}: regs {:?} sregs {:?}",
            vcpu.get_regs(),
            vcpu.get_sregs()
        )
    })
}

/// The first exit of the program at `privilege` is its `out` of VALUE to PORT.
fn check_port_io(test: &str, privilege: Privilege) {
    let Some(kvm) = kvm_or_skip(test) else {
        return;
    };
    let expected = (PORT, VALUE.to_le_bytes().to_vec());
    assert_eq!(first_exit(kvm, privilege), expected);
}

#[test]
fn cpl3_program_does_port_io() {
    check_port_io("cpl3_program_does_port_io", Privilege::User);
}

#[test]
fn cpl0_program_does_port_io() {
    check_port_io("cpl0_program_does_port_io", Privilege::Kernel);
}
