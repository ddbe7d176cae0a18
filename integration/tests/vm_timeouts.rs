//! An embedder's timeouts at the extremes: `Duration::MAX` means "no deadline", never an
//! arithmetic overflow (which used to abort the process in `pause_all`, then panic again in
//! the manager's `Drop`).

use std::time::Duration;

use integration::guest::{smp_counter, GuestVm};
use integration::kvm_or_skip;
use vmm_core::{VcpuConfig, VcpuManagerOptions, VcpuState, VmOptions};

#[test]
fn duration_max_timeouts_pause_resume_and_exit_without_overflow() {
    let Some(kvm) = kvm_or_skip("duration_max_timeouts_pause_resume_and_exit_without_overflow")
    else {
        return;
    };
    let options = VcpuManagerOptions {
        ack_timeout: Duration::MAX,
        join_timeout: Duration::MAX,
        ..VcpuManagerOptions::default()
    };
    let config = VcpuConfig::with_counts(2, 2).expect("config");
    let mut g = GuestVm::create(kvm, smp_counter(), config, VmOptions::default(), options)
        .expect("create the VM");
    g.vcpus.start_boot_vcpus().expect("start");
    g.vcpus.pause_all().expect("pause with Duration::MAX");
    assert!(g.all_vcpus_in(VcpuState::Paused));
    g.vcpus.resume_all().expect("resume with Duration::MAX");
    g.vcpus.exit_all().expect("exit with Duration::MAX");
    assert!(g.vcpus.present_vcpus().is_empty());
}
