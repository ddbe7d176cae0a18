//! ACPI CPU hotplug end to end on real KVM with the guest agent: the manager's backend is
//! [`AcpiBackend`](vmm_core::AcpiBackend); the agent's BSP polls the GED, scans the hotplug
//! controller, wakes inserted CPUs with INIT/SIPI at the APIC ID of their MADT entry, parks
//! and ejects CPUs marked for removal (see `integration::guest::agent::acpi`).
//!
//! - boot 2 of 14 (2 sockets x 7 cores: sparse APIC IDs, socket 1 from 8), grow to 14: every
//!   new vCPU runs guest code and reports its APIC ID from CPUID; shrink to 3; grow again,
//!   reusing the kept vCPU fds;
//! - a guest that never looks at the GED: the hot-add times out and is rolled back (no new
//!   vCPU present, the controller says absent again), the hot-remove times out and removes
//!   nothing;
//! - beyond 255 APIC IDs (x2APIC mode): grow and shrink across APIC IDs 254..=257.
//!
//! No timed assertions: every wait has a generous bound only to turn a hang into a failure.

use std::time::Duration;

mod common;

use common::kvm_allowing;
use integration::guest::agent::{
    attach_acpi, AgentAcpi, AgentAcpiOptions, AgentVm, AgentVmOptions, ApMode,
};
use integration::kvm_or_skip;
use vmm_core::{BackendError, HotplugOp, InterruptMode, ResizeError, VcpuConfig};

const TIMEOUT: Duration = Duration::from_secs(120);

fn config(sockets: u32, cores: u32, boot: u32) -> VcpuConfig {
    VcpuConfig {
        boot_vcpu_count: boot,
        max_vcpu_count: sockets * cores,
        topology: topology::CpuTopology::new(sockets, 1, cores, 1).unwrap(),
        vpmu: Default::default(),
        template: None,
        vcpu_affinity: Default::default(),
    }
}

/// The agent VM of `config` booted (boot vCPUs reported), with ACPI hotplug attached.
fn boot_with_acpi(
    kvm: kvm_ioctls::Kvm,
    config: VcpuConfig,
    vm_options: AgentVmOptions,
    acpi_options: AgentAcpiOptions,
) -> (AgentVm, AgentAcpi) {
    let mut vm = AgentVm::create(kvm, config, vm_options).expect("agent VM");
    vm.start(TIMEOUT).expect("boot vCPUs report");
    let acpi = attach_acpi(&mut vm, acpi_options).expect("ACPI hotplug");
    (vm, acpi)
}

/// ACPI hotplug options waiting `TIMEOUT` for the guest.
fn patient() -> AgentAcpiOptions {
    AgentAcpiOptions {
        guest_timeout: TIMEOUT,
        ..Default::default()
    }
}

/// The new vCPUs reported online, each with the APIC ID it read from CPUID leaf 0xB.
fn assert_reported(vm: &AgentVm, apic_ids: &[u32]) {
    vm.agent
        .wait_online(apic_ids, TIMEOUT)
        .expect("new vCPUs report online");
    for r in vm.agent.online_reports() {
        if apic_ids.contains(&r.vcpu_id) {
            assert_eq!(r.cpuid_apic_id, r.vcpu_id, "{r:?}");
        }
    }
}

#[test]
fn grow_to_14_shrink_to_3_and_grow_again_over_acpi() {
    let Some(kvm) = kvm_or_skip("grow_to_14_shrink_to_3_and_grow_again_over_acpi") else {
        return;
    };
    let (mut vm, acpi) = boot_with_acpi(kvm, config(2, 7, 2), AgentVmOptions::default(), patient());
    assert_eq!(vm.vcpus.hotplug_backend().unwrap().name(), "acpi");
    let all: Vec<u32> = (0..7).chain(8..15).collect();

    let out = vm.vcpus.resize_vcpus(14).expect("grow to 14");
    let added: Vec<u32> = out.added.iter().map(|s| s.apic_id).collect();
    assert_eq!(added, all[2..]);
    assert_eq!(vm.present_apic_ids(), all);
    assert_reported(&vm, &all);
    let c = &acpi.hotplug.controller;
    assert_eq!(c.enabled(), (0..14).collect::<Vec<_>>());
    assert!(acpi.hotplug.ged.raised() >= 1);

    let out = vm.vcpus.resize_vcpus(3).expect("shrink to 3");
    let removed: Vec<u32> = out.removed.iter().map(|s| s.apic_id).collect();
    assert_eq!(removed, [14, 13, 12, 11, 10, 9, 8, 6, 5, 4, 3]);
    assert_eq!(vm.present_apic_ids(), [0, 1, 2]);
    assert_eq!(c.enabled(), [0, 1, 2]);
    assert_eq!(c.stats().ejects, 11);
    assert_eq!(c.stats().refused_ejects, 0);
    vm.agent.mark_parked(&removed);
    let mut kept = vm.vcpus.kept_vcpu_fds();
    kept.sort_unstable();
    assert_eq!(kept, all[3..]);

    // Grow again: the kept fds are reused, the CPUs start again.
    let out = vm.vcpus.resize_vcpus(10).expect("grow to 10 again");
    let added: Vec<u32> = out.added.iter().map(|s| s.apic_id).collect();
    assert_eq!(added, [3, 4, 5, 6, 8, 9, 10]);
    assert_reported(&vm, &added);
    assert_eq!(vm.vcpus.kept_vcpu_fds(), [11, 12, 13, 14]);
    let times: Vec<u32> = vm
        .agent
        .online_reports()
        .iter()
        .filter(|r| added.contains(&r.vcpu_id))
        .map(|r| r.times)
        .collect();
    // mark_parked forgot their first reports: these are new ones.
    assert_eq!(times, [1; 7], "each re-added vCPU reported again");
    vm.agent.request_shutdown().unwrap();
}

#[test]
fn a_guest_that_never_answers_times_out_and_rolls_back() {
    let Some(kvm) = kvm_or_skip("a_guest_that_never_answers_times_out_and_rolls_back") else {
        return;
    };
    let (mut vm, acpi) = boot_with_acpi(
        kvm,
        config(2, 7, 2),
        AgentVmOptions::default(),
        AgentAcpiOptions {
            guest_timeout: Duration::from_millis(300),
            guest_answers: false,
            ..Default::default()
        },
    );
    let e = vm.vcpus.resize_vcpus(5).unwrap_err();
    match &e {
        ResizeError::HotplugFailed {
            op: HotplugOp::Add,
            present_after,
            source,
            ..
        } => {
            assert_eq!(present_after, &[0, 1]);
            assert!(
                matches!(source.source, BackendError::GuestTimeout { .. }),
                "{e}"
            );
        }
        other => panic!("expected a failed hot-add, got {other}"),
    }
    assert_eq!(vm.present_apic_ids(), [0, 1]);
    assert_eq!(acpi.hotplug.controller.enabled(), [0, 1]);
    let mut kept = vm.vcpus.kept_vcpu_fds();
    kept.sort_unstable();
    assert_eq!(kept, [2, 3, 4]);

    // The guest starts answering: the next resize works and reuses the kept fds.
    acpi.set_polling(&vm, Some(1 << 16)).unwrap();
    let out = vm.vcpus.resize_vcpus(5).expect("grow after the timeout");
    assert_eq!(out.added.len(), 3);
    assert_reported(&vm, &[2, 3, 4]);

    // It stops answering: the hot-remove times out and removes nothing.
    acpi.set_polling(&vm, None).unwrap();
    let e = vm.vcpus.resize_vcpus(2).unwrap_err();
    assert!(
        matches!(
            e,
            ResizeError::HotplugFailed {
                op: HotplugOp::Remove,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(vm.present_apic_ids(), [0, 1, 2, 3, 4]);
    assert_eq!(acpi.hotplug.controller.enabled(), [0, 1, 2, 3, 4]);
    vm.agent.request_shutdown().unwrap();
}

#[test]
fn grow_and_shrink_beyond_255_apic_ids_in_x2apic_mode() {
    let Some(kvm) = kvm_allowing("grow_and_shrink_beyond_255_apic_ids_in_x2apic_mode", 260) else {
        return;
    };
    // 1 socket x 260 cores: APIC ID = index. 254 at boot (halting once reported, so that they
    // use no host CPU), so that a few hot-added vCPUs cross 255.
    let options = AgentVmOptions {
        ap_mode: ApMode::Halt,
        ..Default::default()
    };
    let (mut vm, _acpi) = boot_with_acpi(kvm, config(1, 260, 254), options, patient());
    assert_eq!(vm.vcpus.interrupt_mode(), InterruptMode::X2Apic);
    let out = vm.vcpus.resize_vcpus(258).expect("grow across 255");
    let added: Vec<u32> = out.added.iter().map(|s| s.apic_id).collect();
    assert_eq!(added, [254, 255, 256, 257]);
    assert_reported(&vm, &added);
    let out = vm.vcpus.resize_vcpus(255).expect("shrink below 256");
    let removed: Vec<u32> = out.removed.iter().map(|s| s.apic_id).collect();
    assert_eq!(removed, [257, 256, 255]);
    vm.agent.mark_parked(&removed);
    let out = vm.vcpus.resize_vcpus(256).expect("grow to 256 again");
    assert_eq!(
        out.added.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
        [255]
    );
    assert_reported(&vm, &[255]);
    vm.agent.request_shutdown().unwrap();
}

#[test]
fn bad_controller_input_never_removes_a_vcpu_the_manager_counts() {
    let Some(kvm) = kvm_or_skip("bad_controller_input_never_removes_a_vcpu_the_manager_counts")
    else {
        return;
    };
    use vmm_core::acpi_hotplug::{regs, CPU_HOTPLUG_MMIO_BASE};
    use vmm_core::BusSpace;
    let (mut vm, acpi) = boot_with_acpi(kvm, config(2, 7, 2), AgentVmOptions::default(), patient());
    vm.vcpus.resize_vcpus(5).expect("grow to 5");
    assert_reported(&vm, &[2, 3, 4]);
    // Accesses as vCPU 1 would make them (the bus is what every vCPU's MMIO exit goes to).
    let bus = vm.vm.io_bus();
    let base = u64::from(CPU_HOTPLUG_MMIO_BASE);
    let write = |offset: u64, data: &[u8]| {
        bus.write(BusSpace::Mmio, 1, base + offset, data)
            .expect("the controller never fails an access");
    };
    let select = |index: u32| write(regs::SEL, &index.to_le_bytes());
    // Eject of CPU 0, of present CPUs not marked for removal, out-of-range selections,
    // unknown command bits, writes to read-only registers and past the block.
    for index in [0, 3, 4, 14, 1000, u32::MAX] {
        select(index);
        write(
            regs::STAT,
            &[regs::command::EJECT | regs::command::ACK_REMOVE | 0xf0],
        );
        write(regs::STAT, &[regs::command::EJECT, 0xff, 0xff, 0xff]);
    }
    write(regs::NEXT, &[0; 4]);
    write(regs::COUNT, &[0xff; 4]);
    write(u64::from(regs::LEN), &[regs::command::EJECT]);
    let stats = acpi.hotplug.controller.stats();
    assert_eq!(stats.ejects, 0);
    assert_eq!(stats.refused_ejects, 6, "{stats:?}");
    assert_eq!(stats.out_of_range, 6, "{stats:?}");
    assert_eq!(acpi.hotplug.controller.enabled(), [0, 1, 2, 3, 4]);
    assert_eq!(vm.present_apic_ids(), [0, 1, 2, 3, 4]);
    // The vCPUs the guest tried to eject still run guest code.
    let before = vm.agent.progress_of(&[3, 4]);
    let moved = integration::poll_until(TIMEOUT, Duration::from_millis(5), || {
        vm.agent
            .progress_of(&[3, 4])
            .iter()
            .zip(&before)
            .all(|(now, then)| now > then)
    });
    assert!(moved, "vCPUs 3 and 4 still count");
    // And the protocol still works.
    let out = vm.vcpus.resize_vcpus(2).expect("shrink to 2");
    assert_eq!(out.removed.len(), 3);
    assert_eq!(acpi.hotplug.controller.stats().ejects, 3);
    vm.agent.request_shutdown().unwrap();
}
