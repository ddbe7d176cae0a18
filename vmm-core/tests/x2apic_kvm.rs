//! x2APIC mode and KVM's vCPU limit on real KVM: a vCPU set up in x2APIC mode has
//! `IA32_APIC_BASE.EXTD` and its full 32-bit APIC ID in the LAPIC ID register; the manager
//! picks x2APIC by itself when an APIC ID is above 254 and says MSI extended destination IDs
//! are available; a fresh vCPU already has the MP state that setup leaves out; and a VM with as many vCPUs as KVM allows (1024 on this project's hosts) is
//! created, started (the APs wait for SIPI), paused, resumed and exited.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::HaltingBsp;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use vcpu_actor::test_util::kvm_or_skip;
use vmm_core::arch::x86_64::{self, lapic, x2apic};
use vmm_core::{
    build_vm, InterruptMode, KvmLimits, VcpuConfig, VcpuManager, VcpuManagerOptions, VcpuState,
    VmOptions,
};

fn config(boot: u32, (s, c, t): (u32, u32, u32)) -> VcpuConfig {
    common::config(boot, s * c * t, (s, c, t))
}

#[test]
fn a_vcpu_set_up_in_x2apic_mode_has_extd_and_its_32_bit_id() {
    let kvm = or_skip!(kvm_or_skip(
        "a_vcpu_set_up_in_x2apic_mode_has_extd_and_its_32_bit_id"
    ));
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    x2apic::enable_x2apic_api(&vm, InterruptMode::X2Apic).unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    for id in [0u32, 300] {
        let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        let start = x86_64::VcpuStart {
            bsp: id == 0,
            fresh: true,
            last_of_batch: true,
        };
        x86_64::setup_vcpu(&vcpu, id, InterruptMode::X2Apic, start).unwrap();
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: x2apic::IA32_APIC_BASE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        assert_eq!(
            msrs.as_slice()[0].data,
            x2apic::apic_base(InterruptMode::X2Apic, id == 0),
            "vCPU {id}: IA32_APIC_BASE"
        );
        // With 32-bit IDs the LAPIC ID register holds the whole x2APIC ID.
        let state = vcpu.get_lapic().unwrap();
        assert_eq!(
            lapic::read_register(&state, 0x20),
            id,
            "vCPU {id}: LAPIC ID"
        );
        // The BSP's LINT1 is NMI; an AP's stays as KVM made it (masked), as its INIT would
        // leave it anyway.
        let lint1 = lapic::read_register(&state, lapic::LVT_LINT1);
        if id == 0 {
            assert_eq!((lint1 >> 8) & 7, 0b100, "BSP LINT1: {lint1:#x}");
        } else {
            assert_ne!(lint1 & (1 << 16), 0, "AP LINT1 masked: {lint1:#x}");
        }
    }
}

/// What `setup_vcpu` and `set_boot_mp_state` leave out on a fresh fd must be KVM's own state
/// at creation: the MP state of `kvm_created_mp_state`, and `fpu::boot_fpu`'s FCW and MXCSR
/// (read through `KVM_GET_XSAVE`: `KVM_GET_FPU` always reports MXCSR 0 and `KVM_SET_FPU`
/// ignores it). On a kept fd (one a guest changed) both are written again.
#[test]
fn a_fresh_vcpu_already_has_the_state_setup_leaves_out() {
    let kvm = or_skip!(kvm_or_skip(
        "a_fresh_vcpu_already_has_the_state_setup_leaves_out"
    ));
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let want = x86_64::fpu::boot_fpu();
    for id in [0u32, 1, 7] {
        let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
        // The legacy area of the XSAVE image: FCW in bytes 0-1, MXCSR in bytes 24-27.
        let x = vcpu.get_xsave().unwrap();
        assert_eq!(
            (x.region[0] & 0xffff, x.region[6]),
            (u32::from(want.fcw), want.mxcsr),
            "vCPU {id}: FCW and MXCSR at creation"
        );
        assert_eq!(
            vcpu.get_mp_state().unwrap().mp_state,
            x86_64::kvm_created_mp_state(id),
            "vCPU {id}: MP state at creation"
        );
        // Set up as a fresh AP (or BSP), it has the boot MP state.
        vcpu.set_cpuid2(&cpuid).unwrap();
        let start = x86_64::VcpuStart {
            bsp: id == 0,
            fresh: true,
            last_of_batch: true,
        };
        x86_64::setup_vcpu(&vcpu, id, InterruptMode::XApic, start).unwrap();
        x86_64::set_boot_mp_state(&vcpu, id, start).unwrap();
        assert_eq!(
            vcpu.get_mp_state().unwrap().mp_state,
            x86_64::boot_mp_state(id == 0),
            "vCPU {id}: boot MP state"
        );
        if id == 0 {
            continue;
        }
        // A kept fd: a guest ran it (runnable, FPU changed); set up again, it is back.
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .unwrap();
        let mut dirty = vcpu.get_fpu().unwrap();
        dirty.fcw = 0x27f;
        vcpu.set_fpu(&dirty).unwrap();
        let kept = x86_64::VcpuStart {
            bsp: false,
            fresh: false,
            last_of_batch: true,
        };
        x86_64::setup_vcpu(&vcpu, id, InterruptMode::XApic, kept).unwrap();
        x86_64::set_boot_mp_state(&vcpu, id, kept).unwrap();
        assert_eq!(
            vcpu.get_fpu().unwrap().fcw,
            want.fcw,
            "vCPU {id}: kept fd's FCW"
        );
        assert_eq!(
            vcpu.get_mp_state().unwrap().mp_state,
            x86_64::boot_mp_state(false),
            "vCPU {id}: kept fd back to wait-for-SIPI"
        );
    }
}

#[test]
fn the_manager_picks_x2apic_for_ids_over_254_and_xapic_otherwise() {
    let kvm = or_skip!(kvm_or_skip(
        "the_manager_picks_x2apic_for_ids_over_254_and_xapic_otherwise"
    ));
    let limits = KvmLimits::query(&kvm).unwrap();
    let small = build_vm(
        Kvm::new().unwrap(),
        VmOptions::default(),
        config(1, (2, 3, 2)),
        VcpuManagerOptions::default(),
    )
    .unwrap()
    .1;
    assert_eq!(small.interrupt_mode(), InterruptMode::XApic);
    // 2 sockets x 75 cores x 2 threads: APIC IDs up to 405.
    if limits.max_vcpus < 300 || limits.max_vcpu_id <= 405 {
        eprintln!("SKIPPED (KVM allows fewer vCPUs): x2APIC part");
        return;
    }
    let (_vm, mut vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        config(1, (2, 75, 2)),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    assert_eq!(vcpus.interrupt_mode(), InterruptMode::X2Apic);
    let leaf = vmm_core::topology::find_entry(
        &vcpus.vcpu_cpuid(299).unwrap(),
        x2apic::KVM_CPUID_FEATURES,
        0,
    )
    .copied();
    if let Some(leaf) = leaf {
        assert_ne!(leaf.eax & x2apic::KVM_FEATURE_MSI_EXT_DEST_ID, 0);
    }
    // The vCPU with APIC ID 405 can be created and set up (x2APIC base, full LAPIC ID).
    vcpus.create_boot_vcpus(Arc::new(HaltingBsp)).unwrap();
    vcpus.create_vcpu(299).unwrap();
    assert_eq!(vcpus.apic_id(299).unwrap(), 405);
    vcpus.exit_all().unwrap();
}

/// How long `f` took.
fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Whether every present vCPU is in `state`.
fn all_in(vcpus: &VcpuManager, state: VcpuState) -> bool {
    vcpus.present_vcpus().iter().all(|v| v.state == state)
}

#[test]
fn as_many_vcpus_as_kvm_allows_start_pause_resume_and_exit() {
    let test = "as_many_vcpus_as_kvm_allows_start_pause_resume_and_exit";
    let kvm = or_skip!(kvm_or_skip(test));
    let limits = KvmLimits::query(&kvm).unwrap();
    // 1024 on this project's hosts: 4 sockets x 128 cores x 2 threads (IDs up to 1023).
    let n = limits.max_vcpus.min(1024);
    let shape = if n == 1024 { (4, 128, 2) } else { (1, n, 1) };
    let options = VcpuManagerOptions {
        ack_timeout: Duration::from_secs(120),
        join_timeout: Duration::from_secs(60),
        ..VcpuManagerOptions::default()
    };
    let (_vm, mut vcpus) = build_vm(kvm, VmOptions::default(), config(n, shape), options).unwrap();
    assert_eq!(
        vcpus.interrupt_mode(),
        if n > 255 {
            InterruptMode::X2Apic
        } else {
            InterruptMode::XApic
        }
    );
    let created = timed(|| vcpus.create_boot_vcpus(Arc::new(HaltingBsp)).unwrap());
    assert_eq!(vcpus.present_vcpu_count(), n);
    let started = timed(|| vcpus.start_boot_vcpus().unwrap());
    assert!(all_in(&vcpus, VcpuState::Running));
    let paused = timed(|| vcpus.pause_all().unwrap());
    assert!(all_in(&vcpus, VcpuState::Paused));
    let resumed = timed(|| vcpus.resume_all().unwrap());
    let exited = timed(|| vcpus.exit_all().unwrap());
    assert_eq!(vcpus.present_vcpu_count(), 0);
    assert_eq!(vcpus.kept_vcpu_fds().len(), n as usize);
    eprintln!(
        "{test}: {n} vCPUs: created {created:?}, started {started:?}, paused {paused:?}, \
         resumed {resumed:?}, exited {exited:?}"
    );
}
