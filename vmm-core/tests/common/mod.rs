//! Helpers shared by the KVM integration tests of this crate (each test file includes this
//! module and uses part of it).
#![allow(dead_code)]

/// The value of an `Option` that a KVM test needs, or an early `return` from the test when it is
/// `None` (no KVM here and `VCPU_REQUIRE_KVM` unset: the helper that gave `None` said why).
macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return,
        }
    };
}

use std::sync::{Mutex, MutexGuard};

use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use vmm_core::error::KvmOp;
use vmm_core::{BootEntry, CpuTopology, SmpConfig, VcpuConfig, VcpuSetupError, VpmuFeatureLevel};

/// `cli; hlt; jmp .-1` (back to the hlt): a vCPU that runs it halts with interrupts off and
/// costs no host CPU.
pub const HALT_LOOP: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// Where [`HaltingBsp`] puts [`HALT_LOOP`] and starts the BSP (real mode).
pub const HALT_AT: u64 = 0x1000;

/// A boot entry whose BSP runs [`HALT_LOOP`] at [`HALT_AT`] in real mode.
pub struct HaltingBsp;

impl BootEntry for HaltingBsp {
    fn setup_bsp(&self, vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<(), VcpuSetupError> {
        vmm_core::vm::write_guest(mem, HALT_AT, &HALT_LOOP).map_err(|e| {
            VcpuSetupError::InvalidState {
                op: vmm_core::ManagerOp::ConfigureBootVcpu,
                reason: e.to_string(),
            }
        })?;
        let err = |op| {
            move |source| VcpuSetupError::Kvm {
                vcpu_id: 0,
                op,
                source,
            }
        };
        let mut sregs = vcpu.get_sregs().map_err(err(KvmOp::GetSregs))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).map_err(err(KvmOp::SetSregs))?;
        let regs = kvm_bindings::kvm_regs {
            rip: HALT_AT,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(err(KvmOp::SetRegs))
    }
}

/// Tests that count this process's fds or threads run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds the one-at-a-time lock for the test's duration (a test that panicked while holding
/// it does not block the others).
pub fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `boot` of `max` vCPUs on `sockets` x `cores` x `threads` (one die), without vPMU,
/// template or affinity.
pub fn config(boot: u32, max: u32, (sockets, cores, threads): (u32, u32, u32)) -> VcpuConfig {
    let smp = SmpConfig {
        boot_cpus: boot,
        max_cpus: max,
        topology: CpuTopology::new(sockets, 1, cores, threads).unwrap(),
    };
    VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled)
}

/// A number field of `/proc/self/status` (`"Threads"`, `"FDSize"`).
pub fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
        .trim()
        .parse()
        .unwrap()
}
