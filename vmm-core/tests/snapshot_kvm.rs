//! The vCPU manager's save and restore on real KVM, without a guest program: vCPUs that wait
//! for INIT/SIPI (sparse APIC IDs, some hot-added), saved on their own threads, written,
//! restored into a new VM; saves refused while created, running and during a resize; a
//! damaged snapshot refused before any vCPU exists.

use std::sync::mpsc;
#[macro_use]
mod common;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{proc_status, serial, HaltingBsp};
use kvm_ioctls::Kvm;
use vcpu_actor::test_util::kvm_or_skip;
use vmm_core::snapshot::{self, STATE_FILE};
use vmm_core::{
    build_vm, AsyncResizer, BackendError, HotplugAck, HotplugBackend, HotplugFailure,
    SnapshotError, VcpuConfig, VcpuManager, VcpuManagerOptions, Vm, VmOptions, VmRunState,
    VmmError,
};

/// 2 sockets x 3 cores: index 3 is APIC ID 4, index 5 is 6 (sparse). The tests count this
/// process's threads: one at a time ([`serial`]).
fn config() -> VcpuConfig {
    common::config(2, 6, (2, 3, 1))
}

/// For `test`: KVM (`None`: skip), the one-at-a-time lock ([`serial`]) and a VM of 16 MiB
/// with [`config`]'s manager.
fn manager(test: &str) -> Option<(MutexGuard<'static, ()>, Arc<Vm>, VcpuManager)> {
    let kvm = kvm_or_skip(test)?;
    let one = serial();
    let (vm, vcpus) = build_vm(
        kvm,
        VmOptions {
            memory_size: 16 << 20,
            ..VmOptions::default()
        },
        config(),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    Some((one, vm, vcpus))
}

fn threads() -> u64 {
    proc_status("Threads")
}

fn ids(m: &VcpuManager) -> Vec<(u32, u32)> {
    m.present_vcpus()
        .iter()
        .map(|v| (v.index, v.apic_id))
        .collect()
}

/// `e` is [`SnapshotError::NotPaused`] in `state`.
fn assert_not_paused(e: &SnapshotError, state: VmRunState) {
    assert!(
        matches!(e, SnapshotError::NotPaused { state: s } if *s == state),
        "{e}"
    );
}

#[test]
fn save_needs_a_paused_vm_and_restore_gives_the_same_vcpus() {
    let (_one, vm, mut vcpus) = or_skip!(manager(
        "save_needs_a_paused_vm_and_restore_gives_the_same_vcpus"
    ));
    // APs only (no boot entry needed): 1 and 2 "at boot", 3 and 5 as if hot-added.
    vcpus.create_vcpus(&[1, 2, 3, 5]).unwrap();
    let e = vcpus.save().unwrap_err();
    assert_not_paused(&e, VmRunState::Created);
    vcpus.start_boot_vcpus().unwrap();
    let e = vcpus.save().unwrap_err();
    assert_not_paused(&e, VmRunState::Running);
    assert!(e.to_string().contains("pause it first"), "{e}");
    vcpus.pause_all().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let saved = vcpus.save_to(dir.path()).unwrap();
    assert_eq!(saved.vcpu_ids(), [(1, 1), (2, 2), (3, 4), (5, 6)]);
    assert_eq!(saved.vcpu_ids(), ids(&vcpus));
    for v in &saved.state().vcpus {
        assert!(!v.state.msrs.is_empty(), "vCPU {}: no MSR saved", v.index);
        assert_eq!(v.state.lapic_apic_id(), v.apic_id);
    }
    // Saving again gives the same state: a save changes nothing.
    let again = vcpus.save().unwrap();
    for (a, b) in saved.state().vcpus.iter().zip(&again.state().vcpus) {
        assert_eq!(a.state.regs, b.state.regs);
        assert_eq!(a.state.mp_state, b.state.mp_state);
    }
    drop(again);
    vcpus.exit_all().unwrap();
    drop(vcpus);
    drop(vm);

    let kvm = Kvm::new().unwrap();
    let (vm2, restored) = VcpuManager::restore_from(
        kvm,
        dir.path(),
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    assert_eq!(ids(&restored), [(1, 1), (2, 2), (3, 4), (5, 6)]);
    assert_eq!(restored.run_state(), VmRunState::Created);
    // The snapshot's memory size, whatever the options said.
    assert_eq!(
        snapshot::memory::regions(vm2.memory())
            .iter()
            .map(|r| r.size)
            .sum::<u64>(),
        16 << 20
    );
    restored.resume_all().unwrap();
    restored.pause_all().unwrap();
    let after = restored.save().unwrap();
    for (a, b) in saved.state().vcpus.iter().zip(&after.state().vcpus) {
        assert_eq!((a.index, a.apic_id), (b.index, b.apic_id));
        assert_eq!(a.state.mp_state, b.state.mp_state, "vCPU {}", a.index);
        assert_eq!(a.state.sregs, b.state.sregs, "vCPU {}", a.index);
        assert_eq!(a.state.cpuid, b.state.cpuid, "vCPU {}", a.index);
    }
}

#[test]
fn a_damaged_snapshot_is_refused_before_any_vcpu_exists() {
    let (_one, _vm, mut vcpus) = or_skip!(manager(
        "a_damaged_snapshot_is_refused_before_any_vcpu_exists"
    ));
    vcpus.create_vcpus(&[1, 3]).unwrap();
    vcpus.start_boot_vcpus().unwrap();
    vcpus.pause_all().unwrap();
    let dir = tempfile::tempdir().unwrap();
    vcpus.save_to(dir.path()).unwrap();
    vcpus.exit_all().unwrap();
    let threads_before = threads();

    let p = dir.path().join(STATE_FILE);
    let mut b = std::fs::read(&p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x20;
    std::fs::write(&p, b).unwrap();
    let e = VcpuManager::restore_from(
        Kvm::new().unwrap(),
        dir.path(),
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, VmmError::Snapshot(SnapshotError::Checksum { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("corrupted"), "{e}");
    assert_eq!(threads(), threads_before, "a refused restore left threads");
}

/// A hotplug backend whose `add` waits until the test lets it go, then refuses.
#[derive(Debug)]
struct GatedBackend {
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl HotplugBackend for GatedBackend {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn max_apic_id(&self) -> Option<u32> {
        None
    }

    fn add(&self, _apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        let _ = self.entered.lock().unwrap().send(());
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(30));
        Err(HotplugFailure {
            confirmed: Vec::new(),
            uncertain: Vec::new(),
            source: BackendError::Panicked {
                backend: "gated",
                message: "refused by the test".into(),
            },
        })
    }

    fn remove(&self, _apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        Ok(HotplugAck { requests: 0 })
    }
}

#[test]
fn save_is_refused_while_a_resize_is_in_flight() {
    let (_one, _vm, mut vcpus) = or_skip!(manager("save_is_refused_while_a_resize_is_in_flight"));
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    vcpus.set_hotplug_backend(Arc::new(GatedBackend {
        entered: Mutex::new(entered_tx),
        release: Mutex::new(release_rx),
    }));
    vcpus.create_boot_vcpus(Arc::new(HaltingBsp)).unwrap();
    vcpus.start_boot_vcpus().unwrap();
    let shared = Arc::new(Mutex::new(vcpus));
    let resizer = AsyncResizer::new(Arc::clone(&shared));
    let handle = resizer.start(3).unwrap();
    entered
        .recv_timeout(Duration::from_secs(30))
        .expect("the resize reached the backend");
    {
        let m = shared.lock().unwrap();
        m.pause_all().unwrap();
        let e = m.save().unwrap_err();
        assert!(
            matches!(e, SnapshotError::ResizeInFlight { target: 3 }),
            "{e}"
        );
        assert!(e.to_string().contains("wait for the resize"), "{e}");
    }
    release.send(()).unwrap();
    let _ = handle.wait_timeout(Duration::from_secs(60));
    let m = shared.lock().unwrap();
    assert!(m.resize_in_flight().is_none());
    // Once the resize ended, the paused VM saves.
    m.pause_all().unwrap();
    m.save().unwrap();
}

/// The template's own bits of 0x8000_0001 ECX: bits 0 and 12 set, bit 5 cleared; and its MSR
/// (IA32_MISC_ENABLE, bit 0 set).
const EXT_TEMPLATE: &str = include_str!("data/cpu_templates/ext-features.json");
const EXT_MASK: u32 = (1 << 12) | (1 << 5) | 1;
const EXT_BITS: u32 = (1 << 12) | 1;
const MISC_ENABLE: u32 = 0x1a0;

fn ext_ecx(cpuid: &[vmm_core::CpuidEntry]) -> u32 {
    topology::find_entry(cpuid, 0x8000_0001, 0).unwrap().ecx
}

#[test]
fn a_vm_built_with_a_cpu_template_is_restored_with_it() {
    let kvm = or_skip!(kvm_or_skip(
        "a_vm_built_with_a_cpu_template_is_restored_with_it"
    ));
    let _one = serial();
    let template = vmm_core::CpuTemplate::from_json(EXT_TEMPLATE).unwrap();
    let (vm, mut vcpus) = build_vm(
        kvm,
        VmOptions {
            memory_size: 16 << 20,
            ..VmOptions::default()
        },
        config().with_template(Some(template.clone())),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    vcpus.create_vcpus(&[1, 3]).unwrap();
    vcpus.start_boot_vcpus().unwrap();
    vcpus.pause_all().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let saved = vcpus.save_to(dir.path()).unwrap();
    // The snapshot holds the template, the template's CPUID bits and its MSR value.
    assert_eq!(saved.state().config.template.as_ref(), Some(&template));
    for v in &saved.state().vcpus {
        assert_eq!(
            ext_ecx(&v.state.cpuid) & EXT_MASK,
            EXT_BITS,
            "vCPU {}",
            v.index
        );
        let misc = v.state.msr(MISC_ENABLE);
        assert_eq!(misc.map(|m| m & 1), Some(1), "vCPU {}: {misc:?}", v.index);
    }
    vcpus.exit_all().unwrap();
    drop(vcpus);
    drop(vm);

    let verified = snapshot::read(dir.path()).unwrap();
    assert_eq!(verified.state().config.template.as_ref(), Some(&template));
    let (_vm2, mut restored) = VcpuManager::restore(
        Kvm::new().unwrap(),
        &verified,
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    assert_eq!(restored.config().template.as_ref(), Some(&template));
    assert_eq!(ids(&restored), [(1, 1), (3, 4)]);
    // A vCPU added after the restore is built from the template too.
    assert_eq!(
        ext_ecx(&restored.vcpu_cpuid(5).unwrap()) & EXT_MASK,
        EXT_BITS
    );
    restored.resume_all().unwrap();
    restored.pause_all().unwrap();
    let after = restored.save().unwrap();
    for v in &after.state().vcpus {
        let misc = v.state.msr(MISC_ENABLE);
        assert_eq!(misc.map(|m| m & 1), Some(1), "vCPU {}: {misc:?}", v.index);
    }
    restored.exit_all().unwrap();
    // What KVM holds for each restored vCPU.
    for (_, apic_id) in [(1, 1), (3, 4)] {
        let kvm_cpuid = restored.kept_vcpu_kvm_cpuid(apic_id).unwrap();
        assert_eq!(
            ext_ecx(&kvm_cpuid) & EXT_MASK,
            EXT_BITS,
            "APIC ID {apic_id}: KVM's 0x8000_0001 ECX"
        );
    }
}

#[test]
fn a_snapshot_config_without_a_template_field_reads_as_none() {
    let c = vmm_core::snapshot::SnapshotConfig::from(&config());
    let mut json: serde_json::Value = serde_json::to_value(&c).unwrap();
    json.as_object_mut().unwrap().remove("template");
    let back: vmm_core::snapshot::SnapshotConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, c);
    assert_eq!(back.template, None);
}
