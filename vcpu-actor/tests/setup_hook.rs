//! `PendingVcpu::start_with_setup` on real KVM: the setup runs on the vCPU's own thread
//! before it is ready (and before its seccomp filter), its error fails the start with the
//! fd handed back, and a setup that panics ends the thread without an exit event.

mod common;

use std::sync::{Arc, Mutex};

use common::{exit_and_join, kvm_test, Recorder, TestVm};
use vcpu_actor::{PendingVcpu, SpawnFailure, VcpuError, VcpuOptions, VcpuSetup};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
#[error("the VMM's own setup error for vCPU {0}")]
struct MySetupError(u32);

kvm_test!(
    the_setup_runs_on_the_vcpu_thread_before_it_is_ready,
    false,
    |vm| {
        let seen: Arc<Mutex<Option<(i32, kvm_bindings::kvm_regs)>>> = Arc::default();
        let record = Arc::clone(&seen);
        let vcpu = vm.new_plain_vcpu(0);
        let (parts, _evt) = vm.parts(0, vcpu, Recorder::new());
        let pending = PendingVcpu::start_with_setup(
            parts,
            VcpuOptions::default(),
            Box::new(move |fd| {
                // A vCPU ioctl the thread's seccomp filter would refuse (KVM_SET_REGS is
                // allowed, KVM_SET_CPUID2 is not): the setup runs before the filter.
                let mut regs = fd.get_regs()?;
                regs.rax = 0x5e7;
                fd.set_regs(&regs)?;
                let cpuid = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?;
                fd.set_cpuid2(&cpuid)?;
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                *record.lock().unwrap() = Some((tid, regs));
                Ok(())
            }),
        )
        .expect("start");
        let h = pending.wait_ready().expect("ready");
        let (tid, regs) = seen.lock().unwrap().expect("the setup ran before ready");
        assert_eq!(Some(tid), h.tid(), "on the vCPU's own thread");
        assert_eq!(regs.rax, 0x5e7);
        let fd = exit_and_join(h);
        assert_eq!(fd.get_regs().unwrap().rax, 0x5e7);
    }
);

/// Starts vCPU `id` of `vm` with `setup` and waits for it to fail; also returns its exit
/// EventFd.
fn start_failing(vm: &TestVm, id: u32, setup: VcpuSetup) -> (SpawnFailure, EventFd) {
    let vcpu = vm.new_plain_vcpu(id.into());
    let (parts, evt) = vm.parts(id, vcpu, Recorder::new());
    let pending =
        PendingVcpu::start_with_setup(parts, VcpuOptions::default(), setup).expect("start");
    (pending.wait_ready().unwrap_err(), evt)
}

kvm_test!(
    a_failed_setup_fails_the_start_and_gives_the_fd_back,
    false,
    |vm| {
        let (failure, evt) = start_failing(&vm, 3, Box::new(|_| Err(Box::new(MySetupError(3)))));
        match failure.error {
            VcpuError::Setup { vcpu_id, source } => {
                assert_eq!(vcpu_id, 3);
                // The caller gets its own error type back.
                let mine = source
                    .downcast::<MySetupError>()
                    .expect("the setup's error");
                assert_eq!(mine.0, 3);
            }
            other => panic!("expected VcpuError::Setup, got {other:?}"),
        }
        let fd = failure.vcpu.expect("the fd comes back");
        assert!(fd.get_regs().is_ok(), "the fd is open and usable");
        assert!(
            evt.read().is_err(),
            "no exit event for a thread that never got ready"
        );
    }
);

kvm_test!(
    a_setup_that_panics_ends_the_thread_without_an_exit_event,
    false,
    |vm| {
        let (failure, evt) = start_failing(&vm, 4, Box::new(|_| panic!("a VMM bug in the setup")));
        assert!(
            matches!(failure.error, VcpuError::ThreadPanicked { vcpu_id: 4, .. }),
            "{:?}",
            failure.error
        );
        assert!(
            evt.read().is_err(),
            "no exit event for a thread that never got ready"
        );
    }
);
