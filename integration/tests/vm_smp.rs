//! End to end on real KVM: 4 of max 8 vCPUs (2 sockets x 2 cores x 2 threads) run the
//! smp_counter guest at CPL 3; the BSP wakes the APs with INIT/SIPI; every vCPU reports its
//! APIC IDs from CPUID; pause/resume/exit of all vCPUs.

use std::sync::Arc;
use std::time::Duration;

use integration::guest::{smp_counter, GuestVm};
use integration::kvm_or_skip;
use integration::loader::load_program;
use topology::{CpuTopology, SmpConfig};
use vcpu_actor::VcpuState;
use vmm_core::{VcpuConfig, VcpuManagerOptions, VmOptions};
use vpmu::VpmuFeatureLevel;

const GENEROUS: Duration = Duration::from_secs(30);

/// 4 of max 8 vCPUs: 2 sockets x 2 cores x 2 threads, no vPMU.
fn config() -> VcpuConfig {
    let smp = SmpConfig::new(4, 8, CpuTopology::new(2, 1, 2, 2).unwrap()).unwrap();
    VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled)
}

/// Waits (blocking in short sleeps, only to turn a hang into a failure) until `cond` holds.
fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    let held = integration::poll_until(GENEROUS, Duration::from_millis(2), cond);
    assert!(held, "timed out after {GENEROUS:?} waiting for {what}");
}

fn all_advanced(g: &GuestVm, before: &[u64]) -> bool {
    g.counters()
        .iter()
        .zip(before)
        .all(|(now, then)| now > then)
}

#[test]
fn vm_smp_boot_reports_apic_ids_and_pause_resume_exit_all() {
    let Some(kvm) = kvm_or_skip("vm_smp_boot_reports_apic_ids_and_pause_resume_exit_all") else {
        return;
    };
    let cfg = config();
    let topo = cfg.topology;
    let mut g = GuestVm::create(
        kvm,
        smp_counter(),
        cfg,
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
    .expect("create the VM");

    // Boot vCPUs present, paused, with the topology's APIC IDs.
    let present = g.vcpus.present_vcpus();
    let expected_ids: Vec<u32> = (0..4).map(|i| topo.apic_id(i).unwrap()).collect();
    assert_eq!(
        present.iter().map(|v| v.apic_id).collect::<Vec<_>>(),
        expected_ids
    );
    assert!(present
        .iter()
        .all(|v| v.state == VcpuState::Paused && v.tid.is_some()));

    g.vcpus.start_boot_vcpus().expect("start");
    // Every vCPU (the APs only after the BSP's INIT/SIPI) reports its APIC IDs.
    wait_until("4 CPUID reports", || g.reports.complete() == 4);
    let reports = g.reports.reports();
    for (r, id) in reports.iter().zip(&expected_ids) {
        assert_eq!(r.vcpu_id, *id, "{reports:?}");
        assert_eq!(r.leaf1_apic_id(), Some(*id), "leaf 0x1 EBX[31:24]: {r:?}");
        assert_eq!(r.leafb_edx, Some(*id), "leaf 0xB EDX: {r:?}");
    }
    // Everyone counts.
    let zeros = vec![0; 4];
    wait_until("every counter to advance", || all_advanced(&g, &zeros));

    // Pause all: every counter stops.
    g.vcpus.pause_all().expect("pause all");
    assert!(g.all_vcpus_in(VcpuState::Paused));
    let paused = g.counters();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.counters(), paused, "counters moved while paused");

    // Resume all: all advance.
    g.vcpus.resume_all().expect("resume all");
    wait_until("every counter to advance after resume", || {
        all_advanced(&g, &paused)
    });

    // 200 cycles, every acknowledgement in.
    for cycle in 0..200 {
        g.vcpus
            .pause_all()
            .unwrap_or_else(|e| panic!("pause, cycle {cycle}: {e}"));
        if cycle % 50 == 0 {
            let c = g.counters();
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(
                g.counters(),
                c,
                "cycle {cycle}: counters moved while paused"
            );
        }
        g.vcpus
            .resume_all()
            .unwrap_or_else(|e| panic!("resume, cycle {cycle}: {e}"));
    }
    let metrics = g.vcpus.vcpu_metrics();
    for (index, m) in &metrics {
        assert!(m.pauses >= 201 && m.resumes >= 202, "vCPU {index}: {m:?}");
    }
    let before_exit = g.counters();
    wait_until("every counter to advance after 200 cycles", || {
        all_advanced(&g, &before_exit)
    });

    // Exit all: threads joined, fds kept.
    let tids: Vec<i32> = g
        .vcpus
        .present_vcpus()
        .iter()
        .filter_map(|v| v.tid)
        .collect();
    g.vcpus.exit_all().expect("exit all");
    assert!(g.vcpus.present_vcpus().is_empty());
    assert_eq!(g.vcpus.kept_vcpu_fds(), expected_ids);
    for tid in tids {
        let gone = !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists();
        assert!(gone, "vCPU thread {tid} still exists after exit_all");
    }

    // The kept fds are reused: the same boot vCPUs again, on a freshly loaded program.
    let entry = load_program(g.vm.memory(), &smp_counter().program()).expect("reload");
    g.vcpus
        .create_boot_vcpus(Arc::new(entry))
        .expect("re-create");
    assert!(g.vcpus.kept_vcpu_fds().is_empty(), "every kept fd reused");
    let before = g.counters();
    g.vcpus.start_boot_vcpus().expect("restart");
    wait_until("every counter to advance after the restart", || {
        all_advanced(&g, &before)
    });
    g.vcpus.exit_all().expect("exit all again");
}

/// A device that holds the vCPU that writes it until the test opens the gate.
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl vmm_core::BusDevice for Gate {
    fn read(
        &self,
        _a: vmm_core::BusAccess,
        data: &mut [u8],
    ) -> Result<vcpu_actor::IoOutcome, vcpu_actor::DeviceError> {
        data.fill(0);
        Ok(vcpu_actor::IoOutcome::Handled)
    }

    fn write(
        &self,
        _a: vmm_core::BusAccess,
        _data: &[u8],
    ) -> Result<vcpu_actor::IoOutcome, vcpu_actor::DeviceError> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        Ok(vcpu_actor::IoOutcome::Handled)
    }
}

#[test]
fn vm_smp_pause_timeout_names_the_vcpu_that_did_not_answer() {
    let Some(kvm) = kvm_or_skip("vm_smp_pause_timeout_names_the_vcpu_that_did_not_answer") else {
        return;
    };
    // The BSP's first report write blocks in the gate, before it wakes the APs: the APs
    // (waiting for SIPI in KVM_RUN) answer a pause, the BSP cannot.
    let options = VcpuManagerOptions {
        ack_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (vm, mut vcpus) =
        vmm_core::build_vm(kvm, VmOptions::default(), config(), options).expect("create the VM");
    let gate = Arc::new(Gate {
        open: std::sync::Mutex::new(false),
        opened: std::sync::Condvar::new(),
    });
    vm.io_bus()
        .register(
            vmm_core::BusSpace::Pio,
            u64::from(integration::guest::ports::REPORT_BASE),
            u64::from(integration::guest::ports::REPORT_LEN),
            "gate",
            gate.clone(),
        )
        .unwrap();
    let entry = load_program(vm.memory(), &smp_counter().program()).unwrap();
    vcpus.create_boot_vcpus(Arc::new(entry)).unwrap();
    vcpus.start_boot_vcpus().expect("start");
    // The BSP reaches the gate (its metrics count the exit).
    wait_until("the BSP to block in the gate", || {
        vcpus.vcpu_metrics()[0].1.exits.io_out > 0
    });
    match vcpus.pause_all() {
        Err(vmm_core::VcpuControlError::VcpusDidNotAnswer {
            request, vcpu_ids, ..
        }) => {
            assert_eq!(request, vmm_core::VcpuRequest::Pause);
            assert_eq!(vcpu_ids, [0]);
        }
        other => panic!("expected vCPU 0 not to answer, got {other:?}"),
    }
    // Open the gate: the BSP finishes its access and takes the pause it was sent.
    *gate.open.lock().unwrap() = true;
    gate.opened.notify_all();
    wait_until("the BSP to pause", || {
        vcpus.present_vcpus()[0].state == VcpuState::Paused
    });
    vcpus.pause_all().expect("now everyone answers");
    vcpus.exit_all().expect("exit all");
}

#[test]
fn vm_smp_add_and_remove_a_vcpu_at_an_index_reusing_its_fd() {
    let Some(kvm) = kvm_or_skip("vm_smp_add_and_remove_a_vcpu_at_an_index_reusing_its_fd") else {
        return;
    };
    let mut g = GuestVm::create(
        kvm,
        smp_counter(),
        config(),
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
    .expect("create the VM");
    g.vcpus.start_boot_vcpus().expect("start");
    assert!(
        g.vcpus.removable_vcpus().is_empty(),
        "boot vCPUs are not removable"
    );

    // Index 5 of 2 x 2 x 2 is socket 1, core 0, thread 1: APIC ID 5. It waits for INIT/SIPI.
    g.vcpus.create_vcpu(5).expect("add index 5");
    g.vcpus.start_vcpus(&[5]).expect("start index 5");
    let added = g.vcpus.present_vcpus();
    assert_eq!(added.len(), 5);
    assert_eq!((added[4].index, added[4].apic_id), (5, 5));
    assert_eq!(g.vcpus.removable_vcpus(), [5]);
    assert!(matches!(
        g.vcpus.create_vcpu(5),
        Err(vmm_core::VcpuSetupError::InvalidState { .. })
    ));
    assert!(matches!(
        g.vcpus.create_vcpu(8),
        Err(vmm_core::VcpuSetupError::IndexOutOfRange { index: 8, max: 8 })
    ));

    // Remove it: thread joined, fd kept; add it again: the fd is reused.
    g.vcpus.exit_vcpus(&[5]).expect("remove index 5");
    assert_eq!(g.vcpus.present_vcpus().len(), 4);
    assert_eq!(g.vcpus.kept_vcpu_fds(), [5]);
    assert!(g.vcpus.removable_vcpus().is_empty());
    g.vcpus.create_vcpu(5).expect("add index 5 again");
    assert!(g.vcpus.kept_vcpu_fds().is_empty());
    g.vcpus.start_vcpus(&[5]).expect("start index 5 again");
    g.vcpus.pause_all().expect("pause all five");
    g.vcpus.resume_all().expect("resume all five");
    g.vcpus.exit_all().expect("exit all");
}
