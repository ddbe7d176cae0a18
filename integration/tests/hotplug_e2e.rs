//! vCPU hotplug end to end on real KVM: 2 of max 12 vCPUs (2 sockets x 3 cores x 2 threads,
//! sparse APIC IDs) of the guest agent; the upcall client talks to the guest-side server
//! through a Unix socket muxer stub; the guest's BSP wakes each new APIC ID with INIT/SIPI and
//! the new vCPU reports its APIC ID from CPUID. (Rollback on guest errors, silence and
//! hang-ups is tested in vmm-core/tests/resize_kvm.rs.)

use std::time::Duration;

use integration::kvm_or_skip;
use vmm_core::ResizeError;
use vpmu::VpmuFeatureLevel;

fn agent_config() -> vmm_core::VcpuConfig {
    vmm_core::VcpuConfig {
        boot_vcpu_count: 2,
        max_vcpu_count: 12,
        topology: topology::CpuTopology::new(2, 1, 3, 2).unwrap(),
        vpmu: VpmuFeatureLevel::Disabled,
        template: None,
        vcpu_affinity: Default::default(),
    }
}

/// Waits (in short sleeps, only to turn a hang into a failure) until `cond` holds.
fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    let step = Duration::from_millis(5);
    let held = integration::poll_until(Duration::from_secs(60), step, cond);
    assert!(held, "timed out waiting for {what}");
}

#[test]
fn agent_guest_wakes_exactly_the_requested_apic_ids_and_parks_removed_ones() {
    let Some(kvm) =
        kvm_or_skip("agent_guest_wakes_exactly_the_requested_apic_ids_and_parks_removed_ones")
    else {
        return;
    };
    use integration::guest::agent::{AgentVm, AgentVmOptions};
    let mut vm = AgentVm::create(kvm, agent_config(), AgentVmOptions::default()).expect("agent VM");
    vm.start(Duration::from_secs(60))
        .expect("boot vCPUs report");
    let dir = tempfile::tempdir().unwrap();
    let upcall = integration::guest::agent::attach_upcall(
        &mut vm,
        integration::guest::agent::AgentUpcallOptions {
            socket: Some(dir.path().join("agent-upcall.sock")),
            ..Default::default()
        },
    )
    .expect("upcall");
    assert_eq!(vm.present_apic_ids(), [0, 1]);
    assert!(vm.agent.woken_apic_ids().is_empty());

    // Out of range: nothing changes, nothing is asked.
    for bad in [0, 13] {
        let e = vm.vcpus.resize_vcpus(bad).unwrap_err();
        assert!(
            matches!(e, ResizeError::OutOfRange { target, max: 12 } if target == bad),
            "{e}"
        );
        assert_eq!(vm.present_apic_ids(), [0, 1]);
    }
    assert_eq!(upcall.server.requests_handled(), 0);

    // Grow to 12: the BSP sends INIT/SIPI to exactly the requested (sparse) APIC IDs, in
    // order, and each new vCPU reports the APIC ID it read from CPUID.
    let all = [0u32, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13];
    let out = vm.vcpus.resize_vcpus(12).expect("grow to 12");
    let added: Vec<u32> = out.added.iter().map(|s| s.apic_id).collect();
    assert_eq!(added, all[2..]);
    assert_eq!(vm.agent.woken_apic_ids(), all[2..]);
    assert_eq!(vm.present_apic_ids(), all);
    assert_eq!(vm.agent.reported_apic_ids(), all);
    for r in vm.agent.online_reports() {
        assert_eq!(r.cpuid_apic_id, r.vcpu_id, "CPUID leaf 0xB EDX of {r:?}");
    }

    // Shrink to 3: the guest parks the highest ones; their threads end, their fds are kept.
    let out = vm.vcpus.resize_vcpus(3).expect("shrink to 3");
    let removed: Vec<u32> = out.removed.iter().map(|s| s.apic_id).collect();
    assert_eq!(removed, [13, 12, 11, 10, 9, 8, 5, 4, 3]);
    assert_eq!(vm.present_apic_ids(), [0, 1, 2]);
    assert_eq!(vm.agent.parked_apic_ids(), all[3..]);
    assert_eq!(vm.vcpus.kept_vcpu_fds(), all[3..]);
    assert_eq!(vm.vcpus.vcpu_tids().len(), 3);

    // Grow to 6: the kept fds are reused, the BSP wakes 3, 4, 5 again and they report.
    let out = vm.vcpus.resize_vcpus(6).expect("grow to 6");
    let added: Vec<u32> = out.added.iter().map(|s| s.apic_id).collect();
    assert_eq!(added, [3, 4, 5]);
    assert_eq!(&vm.agent.woken_apic_ids()[10..], [3, 4, 5]);
    assert_eq!(vm.present_apic_ids(), all[..6]);
    assert_eq!(vm.vcpus.kept_vcpu_fds(), all[6..]);
    assert_eq!(vm.agent.reported_apic_ids(), all[..6]);
    assert_eq!(vm.agent.parked_apic_ids(), all[6..]);

    // A re-added vCPU runs guest code again: its progress counter moves.
    let before = vm.agent.progress(5);
    wait_until("vCPU 5's progress counter to move", || {
        vm.agent.progress(5) != before
    });

    // Out of range again: nothing changes.
    for bad in [0, 13] {
        assert!(vm.vcpus.resize_vcpus(bad).is_err());
        assert_eq!(vm.present_apic_ids(), all[..6]);
        assert_eq!(vm.vcpus.kept_vcpu_fds(), all[6..]);
    }
    vm.vcpus.exit_all().expect("exit all");
}

#[test]
fn bench_resize_reports_add_and_remove_latency_split() {
    let Some(kvm) = kvm_or_skip("bench_resize_reports_add_and_remove_latency_split") else {
        return;
    };
    use integration::bench::hotplug::{bench_resize, ResizeBenchOptions};
    let options = ResizeBenchOptions {
        steps: vec![1, 7],
        rounds: 2,
        ..ResizeBenchOptions::default()
    };
    let report = bench_resize(kvm, &options).expect("bench");
    // Per round and step: the add, then the remove.
    let shape: Vec<(u32, u32)> = report.samples.iter().map(|s| (s.from, s.to)).collect();
    assert_eq!(
        shape,
        [
            (1, 2),
            (2, 1),
            (1, 8),
            (8, 1),
            (1, 2),
            (2, 1),
            (1, 8),
            (8, 1)
        ]
    );
    // The first add of an APIC ID creates its vCPU; the second round reuses the kept fds.
    let reused: Vec<bool> = report.samples.iter().map(|s| s.reused_fds).collect();
    assert_eq!(
        reused,
        [false, false, false, false, true, false, true, false]
    );
    for s in &report.samples {
        assert!(s.vcpu_work + s.upcall <= s.total, "{s:?}");
        eprintln!(
            "resize {} -> {}{}: total {:?} (vCPU work {:?}, upcall {:?})",
            s.from,
            s.to,
            if s.reused_fds { " (kept fds)" } else { "" },
            s.total,
            s.vcpu_work,
            s.upcall
        );
    }
}
