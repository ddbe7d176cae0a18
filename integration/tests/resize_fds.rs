//! What a hot-add costs in file descriptors, on real KVM with the guest agent, over upcall and
//! over ACPI: one fd per added vCPU (its vCPU fd), kept when the vCPU is removed and reused
//! when it comes back. Both hot-add paths read each new vCPU's MP state (upcall after a
//! partial failure, ACPI on every add) through the vCPU's own thread, not through a second
//! fd. One test in its own process, the two channels one after the other, so that nothing
//! else opens fds while it counts.

mod common;

use std::time::Duration;

use integration::guest::agent::{
    attach_acpi, attach_upcall, AgentAcpiOptions, AgentUpcallOptions, AgentVm, AgentVmOptions,
    ApMode,
};
use integration::kvm_or_skip;
use vmm_core::VcpuConfig;

/// An agent VM of 1 boot vCPU out of 9, its APs halting when parked.
fn agent_vm(kvm: kvm_ioctls::Kvm) -> AgentVm {
    let options = AgentVmOptions {
        ap_mode: ApMode::Halt,
        ..AgentVmOptions::default()
    };
    let vm =
        AgentVm::create(kvm, VcpuConfig::with_counts(1, 9).unwrap(), options).expect("agent VM");
    vm.start(Duration::from_secs(60)).expect("the BSP reports");
    vm
}

/// Grows to 9, shrinks to 1 and grows to 9 again, counting fds after each step.
fn grow_shrink_grow(vm: &mut AgentVm, wait_online: bool, channel: &str) {
    let before = common::usage().fds;
    let added = vm.vcpus.resize_vcpus(9).expect("grow to 9");
    assert_eq!(
        (added.from, added.to, added.added.len()),
        (1, 9, 8),
        "{channel}"
    );
    if wait_online {
        let ids: Vec<u32> = added.added.iter().map(|s| s.apic_id).collect();
        vm.agent
            .wait_online(&ids, Duration::from_secs(60))
            .expect("the new vCPUs report");
    }
    assert_eq!(
        common::usage().fds,
        before + 8,
        "{channel}: one fd per added vCPU"
    );
    let removed = vm.vcpus.resize_vcpus(1).expect("shrink to 1");
    let ids: Vec<u32> = removed.removed.iter().map(|s| s.apic_id).collect();
    vm.agent.mark_parked(&ids);
    assert_eq!(vm.vcpus.kept_vcpu_fds().len(), 8, "{channel}");
    assert_eq!(
        common::usage().fds,
        before + 8,
        "{channel}: the fds are kept"
    );
    vm.vcpus.resize_vcpus(9).expect("grow to 9 again");
    assert!(vm.vcpus.kept_vcpu_fds().is_empty(), "{channel}");
    assert_eq!(
        common::usage().fds,
        before + 8,
        "{channel}: the kept fds are reused"
    );
}

#[test]
fn a_hot_add_costs_one_fd_per_vcpu_over_upcall_and_acpi() {
    let Some(kvm) = kvm_or_skip("a_hot_add_costs_one_fd_per_vcpu_over_upcall_and_acpi") else {
        return;
    };
    {
        let mut vm = agent_vm(kvm);
        let _upcall = attach_upcall(&mut vm, AgentUpcallOptions::default()).expect("upcall");
        grow_shrink_grow(&mut vm, false, "upcall");
        vm.vcpus.exit_all().expect("exit all");
    }
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let mut vm = agent_vm(kvm);
    let _acpi = attach_acpi(&mut vm, AgentAcpiOptions::default()).expect("ACPI");
    grow_shrink_grow(&mut vm, true, "ACPI");
    vm.vcpus.exit_all().expect("exit all");
}
