//! vCPU thread affinity on real KVM: the set a vCPU thread applied to itself is the one the
//! kernel reports for its TID, the thread still runs its guest under its seccomp filter, and
//! a set the kernel refuses fails the spawn and hands the fd back.

mod common;

use common::{expect, guests, kvm_test, wait_until, Recorder, DATA_ADDR};
use vcpu_actor::{thread_affinity, ReplyOutcome, VcpuError, VcpuHandle, VcpuOptions, VcpuRequest};

const REPORT_PORT: u16 = 0x510;

kvm_test!(a_vcpu_thread_runs_on_the_cpus_it_was_given, false, |vm| {
    // The CPUs this process may use; the vCPU thread gets only the last one.
    let allowed = thread_affinity(0).expect("sched_getaffinity of this thread");
    let want = vec![*allowed.last().expect("at least one CPU")];
    let options = VcpuOptions {
        affinity: Some(want.clone()),
        ..VcpuOptions::default()
    };
    let (h, _evt) = vm.spawn_program(
        guests::counter(),
        DATA_ADDR,
        REPORT_PORT,
        Recorder::new(),
        options,
    );
    let tid = h.tid().expect("tid");
    assert_eq!(thread_affinity(tid).expect("sched_getaffinity"), want);
    // The spawning thread keeps its own set.
    assert_eq!(thread_affinity(0).unwrap(), allowed);
    // Under its seccomp filter (installed after the affinity), the guest runs.
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    wait_until("the pinned guest to count", || vm.read_u64(DATA_ADDR) > 0);
    assert_eq!(thread_affinity(tid).unwrap(), want);
    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
});

kvm_test!(
    a_set_the_kernel_refuses_fails_the_spawn_with_the_fd_back,
    false,
    |vm| {
        // CPU_SETSIZE - 1 is not a CPU of a 2-core machine: sched_setaffinity says EINVAL.
        let allowed = thread_affinity(0).unwrap();
        let absent = vcpu_actor::MAX_CPUS - 1;
        if allowed.contains(&absent) {
            eprintln!("skipped: CPU {absent} exists here");
            return;
        }
        let vcpu = vm.new_plain_vcpu(0);
        let (parts, _evt) = vm.parts(0, vcpu, Recorder::new());
        let options = VcpuOptions {
            affinity: Some(vec![absent]),
            ..VcpuOptions::default()
        };
        let failure = VcpuHandle::spawn(parts, options).expect_err("an absent CPU");
        assert!(
            matches!(failure.error, VcpuError::Affinity { vcpu_id: 0, .. }),
            "{:?}",
            failure.error
        );
        assert!(
            failure.error.to_string().contains("cannot pin"),
            "{}",
            failure.error
        );
        assert!(failure.vcpu.is_some(), "the fd must come back");
    }
);
