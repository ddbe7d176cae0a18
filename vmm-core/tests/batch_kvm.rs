//! Creating vCPUs as one batch on real KVM: one fd per vCPU, all or nothing on an error with
//! every fd of the batch kept, and the fd table grown once up front.

#[macro_use]
mod common;

use std::sync::{Arc, MutexGuard};

use common::{config, proc_status, serial, HaltingBsp, HALT_AT};
use vcpu_actor::test_util::kvm_or_skip;
use vmm_core::{
    build_vm, BackendError, HotplugAck, HotplugBackend, HotplugFailure, HotplugOp, ResizeError,
    VcpuManager, VcpuManagerOptions, VcpuSetupError, Vm, VmOptions,
};

/// A VM with one boot vCPU of at most `max`, and the one-at-a-time lock (the tests count
/// this process's fds); `None` where `test` is skipped for want of KVM.
fn manager(test: &str, max: u32) -> Option<(MutexGuard<'static, ()>, Arc<Vm>, VcpuManager)> {
    let kvm = kvm_or_skip(test)?;
    let one = serial();
    let (vm, vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        config(1, max, (1, max, 1)),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    Some((one, vm, vcpus))
}

/// Open fds of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The size of this process's fd table (`FDSize` in /proc/self/status).
fn fd_table_size() -> u64 {
    proc_status("FDSize")
}

#[test]
fn a_batch_costs_one_fd_per_vcpu_and_gives_them_back() {
    let (_one, _vm, mut vcpus) = or_skip!(manager(
        "a_batch_costs_one_fd_per_vcpu_and_gives_them_back",
        8
    ));
    // APs only: no boot entry is needed for them.
    let before = open_fds();
    vcpus
        .create_vcpus(&[1, 2, 3, 4, 5])
        .expect("create five APs");
    assert_eq!(vcpus.present_vcpu_count(), 5);
    assert_eq!(open_fds(), before + 5, "one fd per vCPU, nothing else");
    vcpus.exit_vcpus(&[1, 2, 3, 4, 5]).expect("exit them");
    assert_eq!(vcpus.kept_vcpu_fds(), [1, 2, 3, 4, 5]);
    assert_eq!(open_fds(), before + 5, "the fds are kept, not closed");
    // Again: every kept fd is reused, no fd is opened.
    vcpus
        .create_vcpus(&[1, 2, 3, 4, 5])
        .expect("create them again");
    assert!(vcpus.kept_vcpu_fds().is_empty());
    assert_eq!(open_fds(), before + 5);
    vcpus.exit_all().expect("exit all");
}

#[test]
fn a_failed_batch_leaves_no_vcpu_and_keeps_every_fd() {
    let (_one, _vm, mut vcpus) = or_skip!(manager(
        "a_failed_batch_leaves_no_vcpu_and_keeps_every_fd",
        8
    ));
    // Index 0 is the BSP, which needs a boot entry this manager was not given: the batch
    // fails at its third vCPU, after two were created and configured.
    let e = vcpus.create_vcpus(&[1, 2, 0, 3]).unwrap_err();
    assert!(matches!(e, VcpuSetupError::InvalidState { .. }), "{e}");
    assert_eq!(vcpus.present_vcpu_count(), 0);
    assert_eq!(vcpus.kept_vcpu_fds(), [0, 1, 2]);
    // A batch that names a present vCPU, or one index twice, is refused before anything.
    vcpus.create_vcpus(&[1]).expect("create index 1");
    for bad in [&[2, 1][..], &[2, 2]] {
        assert!(matches!(
            vcpus.create_vcpus(bad),
            Err(VcpuSetupError::InvalidState { .. })
        ));
        assert_eq!(vcpus.present_vcpu_count(), 1);
    }
    assert!(matches!(
        vcpus.create_vcpus(&[2, 8]),
        Err(VcpuSetupError::IndexOutOfRange { index: 8, max: 8 })
    ));
    assert_eq!(vcpus.kept_vcpu_fds(), [0, 2]);
    // The kept fds serve the next batch.
    vcpus.create_vcpus(&[2, 3]).expect("create 2 and 3");
    assert_eq!(vcpus.kept_vcpu_fds(), [0]);
    assert_eq!(vcpus.present_vcpu_count(), 3);
    vcpus.exit_all().expect("exit all");
}

#[test]
fn the_fd_table_is_grown_once_for_every_possible_vcpu() {
    let (_one, _vm, mut vcpus) = or_skip!(manager(
        "the_fd_table_is_grown_once_for_every_possible_vcpu",
        200
    ));
    vcpus.create_vcpus(&[1]).expect("create one AP");
    // Sized for 200 vCPUs (and the slack) before the first vCPU fd.
    assert!(fd_table_size() >= 256, "FDSize {}", fd_table_size());
    vmm_core::vm::reserve_fd_table(600).unwrap();
    assert!(fd_table_size() >= 600, "FDSize {}", fd_table_size());
    // A smaller request does nothing.
    vmm_core::vm::reserve_fd_table(10).unwrap();
    assert!(fd_table_size() >= 600);
    vcpus.exit_all().expect("exit all");
}

#[test]
fn a_vcpu_its_own_thread_cannot_configure_fails_the_batch_and_keeps_every_fd() {
    let Some(kvm) = kvm_or_skip("a_vcpu_its_own_thread_cannot_configure_fails_the_batch") else {
        return;
    };
    let _one = serial();
    // A CPU template with an MSR KVM does not know: each vCPU's thread, configuring its
    // vCPU before it reports ready, gets KVM's refusal.
    let mut cfg = config(1, 8, (1, 8, 1));
    cfg.template = Some(
        vmm_core::template::CpuTemplate::from_json(
            r#"{"msr_modifiers": [{"addr": "0xdead", "bitmap": "0b0000000000000000000000000000000000000000000000000000000000000001"}]}"#,
        )
        .unwrap(),
    );
    let (_vm, mut vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        cfg,
        VcpuManagerOptions::default(),
    )
    .unwrap();
    let (fds, threads) = (open_fds(), proc_status("Threads"));
    let e = vcpus.create_vcpus(&[1, 2, 3]).unwrap_err();
    // The setup's own typed error, not a spawn failure that wraps it.
    assert!(!matches!(e, VcpuSetupError::Spawn { .. }), "{e:?}");
    assert!(e.to_string().contains("0xdead"), "{e}");
    assert_eq!(vcpus.present_vcpu_count(), 0);
    assert_eq!(vcpus.kept_vcpu_fds(), [1, 2, 3]);
    assert_eq!(
        open_fds(),
        fds + 3,
        "every fd of the batch kept, nothing else"
    );
    assert_eq!(
        proc_status("Threads"),
        threads,
        "no thread of the batch left"
    );
}

/// An interrupt message to `apic_id` through `KVM_SIGNAL_MSI` (xAPIC physical destination,
/// edge) with delivery mode `mode` and `vector`; KVM answers how many LAPICs it reached.
fn message(vm: &Vm, apic_id: u32, mode: u32, vector: u32) -> i32 {
    let msi = kvm_bindings::kvm_msi {
        address_lo: 0xfee0_0000 | (apic_id << 12),
        data: (mode << 8) | vector,
        ..Default::default()
    };
    vm.fd().signal_msi(msi).expect("KVM_SIGNAL_MSI")
}

/// Delivery mode INIT.
const INIT: u32 = 0b101;
/// Delivery mode STARTUP (SIPI).
const SIPI: u32 = 0b110;

/// An INIT message to `apic_id`; how many LAPICs it reached.
fn init_reaches(vm: &Vm, apic_id: u32) -> i32 {
    message(vm, apic_id, INIT, 0)
}

/// KVM rebuilds its APIC ID map while creating a vCPU but before that vCPU is in the VM's
/// list, so the vCPU created last would be unreachable by IPIs (a hot-added CPU the guest
/// could not start) until something rebuilt it: the batch's last vCPU does. Checked with an
/// INIT message to every new APIC ID, in a first batch and in a second one.
#[test]
fn every_vcpu_of_a_batch_is_reachable_by_an_ipi() {
    let (_one, vm, mut vcpus) =
        or_skip!(manager("every_vcpu_of_a_batch_is_reachable_by_an_ipi", 8));
    for batch in [&[1u32, 2, 3][..], &[4, 5]] {
        vcpus.create_vcpus(batch).expect("create the batch");
        for &apic_id in batch {
            assert_eq!(
                init_reaches(&vm, apic_id),
                1,
                "an INIT to APIC ID {apic_id} reached no LAPIC"
            );
        }
    }
    vcpus.exit_all().expect("exit all");
}

/// A guest that, asked to online CPUs, sends INIT and SIPI to the first (it starts, at the
/// BSP's halt loop, and halts), INIT alone to the second (it stops waiting for its SIPI, as
/// when a SIPI is lost) and nothing to the others, then fails the request.
#[derive(Debug)]
struct StallingGuest {
    vm: Arc<Vm>,
}

impl HotplugBackend for StallingGuest {
    fn name(&self) -> &'static str {
        "stalling"
    }

    fn max_apic_id(&self) -> Option<u32> {
        None
    }

    fn add(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        let vector = u32::try_from(HALT_AT >> 12).unwrap();
        message(&self.vm, apic_ids[0], INIT, 0);
        message(&self.vm, apic_ids[0], SIPI, vector);
        message(&self.vm, apic_ids[1], INIT, 0);
        Err(HotplugFailure {
            confirmed: Vec::new(),
            uncertain: Vec::new(),
            source: BackendError::GuestTimeout {
                backend: "stalling",
                op: HotplugOp::Add,
                apic_ids: apic_ids[1..].to_vec(),
                timeout: std::time::Duration::ZERO,
            },
        })
    }

    fn remove(&self, _apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        Ok(HotplugAck { requests: 0 })
    }
}

/// After a failed hot-add the manager keeps the vCPUs the guest started and exits the others:
/// a vCPU that got INIT but no SIPI still waits for its SIPI and runs no guest code, so it is
/// not counted as brought up (it was, when any MP state but "uninitialized" counted).
#[test]
fn a_failed_hot_add_keeps_only_the_vcpus_that_got_their_sipi() {
    let (_one, vm, mut vcpus) = or_skip!(manager(
        "a_failed_hot_add_keeps_only_the_vcpus_that_got_their_sipi",
        4
    ));
    vcpus.create_boot_vcpus(Arc::new(HaltingBsp)).unwrap();
    vcpus.start_boot_vcpus().unwrap();
    vcpus.set_hotplug_backend(Arc::new(StallingGuest {
        vm: Arc::clone(&vm),
    }));
    let e = vcpus.resize_vcpus(4).unwrap_err();
    match &e {
        ResizeError::HotplugFailed {
            op: HotplugOp::Add,
            present_after,
            source,
            ..
        } => {
            assert_eq!(present_after, &[0, 1], "{e}");
            assert_eq!(source.confirmed, [1], "{e}");
        }
        other => panic!("expected a failed hot-add, got {other}"),
    }
    assert_eq!(vcpus.kept_vcpu_fds(), [2, 3]);
    vcpus.exit_all().expect("exit all");
}
