//! The vCPU manager against a misbehaving guest, end to end on real KVM: `vcpuctl chaos` for
//! every fault on three topologies, and one test per defect of issue 12's "Why" 1-4, each of
//! which failed on the code before the resize became a three-phase transaction:
//!
//! 1. a guest that never reads froze pause, resume and stop behind the resize;
//! 2. a stray reply was taken as the answer (success reported for a refused request);
//! 3. a partial failure rolled back vCPUs the guest had onlined, and every later resize failed;
//! 4. a resize held the manager for the whole guest round trip: pause waited, a resize of a
//!    paused VM waited for the whole timeout, a guest's own shutdown waited.
//!
//! No assertion is on a duration: "pause does not wait for the guest" is checked as "pause
//! returned while the resize was still waiting for a guest that never answers".

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hotplug::guest::GuestFault;
use integration::cmd::chaos::{chaos, ChaosOptions, ChaosReport};
use integration::cmd::{Out, VmSpec};
use integration::guest::agent::{attach_upcall, AgentUpcall, AgentUpcallOptions, AgentVm};
use integration::guest::agent::{AgentVmOptions, GuestAgent};
use integration::kvm_or_skip;
use topology::SmpConfig;
use vmm_core::{AsyncResizer, ResizeError, VcpuConfig, VcpuManager, VmRunState};
use vpmu::VpmuFeatureLevel;

/// Sparse APIC IDs (2 sockets x 3 cores x 2 threads), boot 2 of 12.
const SPARSE: &str = "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2";
/// Only the BSP at boot, 4 cores.
const FLAT: &str = "1,maxcpus=4,sockets=1,cores=4,threads=1";
/// 2 sockets x 2 cores x 2 threads, boot 3 of 8.
const SMT: &str = "3,maxcpus=8,sockets=2,cores=2,threads=2";
const TOPOLOGIES: [&str; 3] = [SPARSE, FLAT, SMT];

fn smp(spec: &str) -> SmpConfig {
    spec.parse().expect("a valid -smp")
}

fn spec(smp_spec: &str) -> VmSpec {
    VmSpec {
        smp: smp(smp_spec),
        vpmu: VpmuFeatureLevel::Disabled,
        memory_mib: 64,
        logger: slog::Logger::root(slog::Discard, slog::o!()),
        template: None,
        vcpu_affinity: Default::default(),
    }
}

/// The APIC IDs of indices `range` under `smp_spec`.
fn apic_ids(smp_spec: &str, range: std::ops::Range<u32>) -> Vec<u32> {
    let t = smp(smp_spec).topology;
    range
        .map(|i| t.apic_id(i).expect("index below max"))
        .collect()
}

/// Runs `vcpuctl chaos` for `fault` on `smp_spec` and checks what every fault must hold.
fn run_chaos(smp_spec: &str, fault: &str) -> ChaosReport {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (checked by kvm_or_skip)");
    let report = chaos(
        kvm,
        &spec(smp_spec),
        &ChaosOptions::new(fault),
        &Out::new(true),
    )
    .unwrap_or_else(|e| panic!("chaos {fault} on {smp_spec}: {}", e.message));
    let json = serde_json::to_string(&report).expect("JSON");
    eprintln!("chaos {fault} on {smp_spec}: {json}");
    assert!(
        report.problems.is_empty(),
        "{fault} on {smp_spec}: {:?}",
        report.problems
    );
    assert!(report.behaved);
    // Every fault below refuses the request or never answers it: never a success.
    assert!(!report.resize.ok, "{fault} on {smp_spec}: {json}");
    assert!(report.consistent, "{json}");
    assert!(report.after.resize_ok, "{json}");
    let boot = smp(smp_spec).boot_cpus;
    assert_eq!(
        report.after.cpus.vmm_present,
        apic_ids(smp_spec, 0..boot),
        "{json}"
    );
    assert_eq!(
        report.after.cpus.guest_online, report.after.cpus.vmm_present,
        "{json}"
    );
    assert!(report.running, "{json}");
    report
}

/// After the faulty resize the VMM has exactly the vCPUs of `indices`, the guest agrees and
/// knows its state.
fn assert_known_and_agreed(smp_spec: &str, r: &ChaosReport, indices: std::ops::Range<u32>) {
    assert_eq!(r.cpus.vmm_present, apic_ids(smp_spec, indices));
    assert_eq!(r.cpus.guest_online, r.cpus.vmm_present);
    assert!(!r.resize.guest_state_unknown);
}

/// `chaos_test!(name, "fault", |smp_spec, report| { extra checks })`: the fault on every
/// topology.
macro_rules! chaos_test {
    ($name:ident, $fault:expr, $check:expr) => {
        #[test]
        fn $name() {
            if kvm_or_skip(stringify!($name)).is_none() {
                return;
            }
            for smp_spec in TOPOLOGIES {
                let report = run_chaos(smp_spec, $fault);
                let check: &dyn Fn(&str, &ChaosReport) = &$check;
                check(smp_spec, &report);
            }
        }
    };
}

chaos_test!(
    chaos_partial_add_keeps_what_the_guest_onlined,
    "partial-add:2",
    |s, r| {
        // The first two new vCPUs came up and stay; the guest agrees exactly.
        let boot = smp(s).boot_cpus;
        assert_known_and_agreed(s, r, 0..boot + 2);
    }
);

chaos_test!(
    chaos_partial_remove_exits_exactly_what_the_guest_offlined,
    "partial-remove:2",
    |s, r| {
        // Grown to max, then the two highest were offlined and their threads exited; the rest stay.
        let max = smp(s).max_cpus;
        assert_known_and_agreed(s, r, 0..max - 2);
    }
);

chaos_test!(
    chaos_silent_guest_times_out_and_pause_does_not_wait,
    "silent",
    |s, r| {
        assert!(
            r.paused_during_flight,
            "pause/resume waited for the silent guest"
        );
        assert!(r.resize.guest_state_unknown);
        assert_eq!(r.cpus.vmm_present, apic_ids(s, 0..smp(s).boot_cpus));
    }
);

chaos_test!(
    chaos_stray_reply_is_never_an_answer,
    "stray-reply",
    |s, r| {
        let error = r.resize.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("errno 22"),
            "the refusal that follows: {error}"
        );
        assert!(!r.resize.guest_state_unknown);
        assert_eq!(r.cpus.vmm_present, apic_ids(s, 0..smp(s).boot_cpus));
    }
);

chaos_test!(
    chaos_never_read_guest_cannot_block_the_manager,
    "never-read",
    |s, r| {
        assert!(r.paused_during_flight, "pause/resume waited for the guest");
        assert!(r.resize.guest_state_unknown);
        assert_eq!(r.cpus.vmm_present, apic_ids(s, 0..smp(s).boot_cpus));
    }
);

chaos_test!(chaos_hang_up_is_unknown_not_success, "hang-up", |s, r| {
    assert!(r.resize.guest_state_unknown);
    assert_eq!(r.cpus.vmm_present, apic_ids(s, 0..smp(s).boot_cpus));
});

#[test]
fn chaos_cli_exits_0_and_prints_exactly_the_documented_json() {
    if kvm_or_skip("chaos_cli_exits_0_and_prints_exactly_the_documented_json").is_none() {
        return;
    }
    let out = assert_cmd::Command::cargo_bin("vcpuctl")
        .expect("the vcpuctl binary")
        .args([
            "chaos",
            "--fault",
            "partial-add:1",
            "--smp",
            FLAT,
            "--to",
            "3",
            "--json",
        ])
        .timeout(Duration::from_secs(300))
        .output()
        .expect("run vcpuctl");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&v),
        [
            "after",
            "consistent",
            "fault",
            "guest_online",
            "pause_wait_ms",
            "resize",
            "resume_wait_ms",
            "running",
            "vmm_present"
        ]
    );
    assert_eq!(keys(&v["resize"]), ["error", "guest_state_unknown", "ok"]);
    assert_eq!(
        keys(&v["after"]),
        ["guest_online", "resize_ok", "vmm_present"]
    );
    assert_eq!(v["vmm_present"], serde_json::json!([0, 1]));
    assert_eq!(v["resize"]["ok"], serde_json::json!(false));

    let bad = assert_cmd::Command::cargo_bin("vcpuctl")
        .expect("the vcpuctl binary")
        .args(["chaos", "--fault", "sneeze"])
        .output()
        .expect("run vcpuctl");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown fault is a usage error"
    );
}

// ---- The defects of "Why" 1-4, each with the manager shared and resized without its lock.

/// A started agent VM whose manager is shared, with its upcall channel.
struct Rig {
    manager: Arc<Mutex<VcpuManager>>,
    agent: Arc<GuestAgent>,
    upcall: AgentUpcall,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = lock(&self.manager).exit_all();
    }
}

fn lock(m: &Mutex<VcpuManager>) -> MutexGuard<'_, VcpuManager> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reply timeout of the rigs: long next to what pause, resume and stop take, so that
/// "it returned while the resize was still in flight" holds with a wide margin.
const RIG_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn rig(kvm: kvm_ioctls::Kvm, smp_spec: &str, fail_offline_after: Option<usize>) -> Rig {
    let config = VcpuConfig::from_smp(smp(smp_spec), VpmuFeatureLevel::Disabled);
    let mut vm = AgentVm::create(kvm, config, AgentVmOptions::default()).expect("agent VM");
    vm.start(Duration::from_secs(60))
        .expect("boot vCPUs report");
    let upcall = attach_upcall(
        &mut vm,
        AgentUpcallOptions {
            reply_timeout: RIG_REPLY_TIMEOUT,
            fail_offline_after,
            ..AgentUpcallOptions::default()
        },
    )
    .expect("upcall");
    let AgentVm { vcpus, agent, .. } = vm;
    Rig {
        manager: Arc::new(Mutex::new(vcpus)),
        agent,
        upcall,
    }
}

impl Rig {
    fn present(&self) -> Vec<u32> {
        lock(&self.manager)
            .present_vcpus()
            .iter()
            .map(|v| v.apic_id)
            .collect()
    }

    fn guest_online(&self) -> Vec<u32> {
        self.upcall.guest_online_apic_ids()
    }

    /// Starts a resize to `target` in the background and waits until it waits for the guest
    /// (phase 1 done: it is marked in flight and the lock is free).
    fn start_resize(&self, target: u32) -> (AsyncResizer, vmm_core::ResizeHandle) {
        let resizer = AsyncResizer::new(Arc::clone(&self.manager));
        let handle = resizer.start(target).expect("start the resize");
        let in_flight =
            integration::poll_until(Duration::from_secs(60), Duration::from_micros(200), || {
                lock(&self.manager).resize_in_flight().is_some()
            });
        assert!(in_flight, "the resize never got in flight");
        (resizer, handle)
    }

    fn in_flight(&self) -> bool {
        lock(&self.manager).resize_in_flight().is_some()
    }
}

/// Why 1 and 4: a guest that never reads (or never answers) freezes nothing: pause, resume,
/// a second resize (refused at once) and a resize of a paused VM (refused at once, nothing
/// sent) all return while the resize still waits; the resize then fails, rolled back, and the
/// next one works.
#[test]
fn a_stalled_guest_freezes_neither_pause_nor_resume_nor_other_resizes() {
    if kvm_or_skip("a_stalled_guest_freezes_neither_pause_nor_resume_nor_other_resizes").is_none() {
        return;
    }
    for fault in [GuestFault::NeverRead, GuestFault::Silent] {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (checked by kvm_or_skip)");
        let r = rig(kvm, SPARSE, None);
        let idle = fault == GuestFault::NeverRead;
        let used = r.upcall.server.faults_used();
        r.upcall.server.inject_fault(fault.clone());
        if idle {
            assert!(integration::poll_until(
                Duration::from_secs(60),
                Duration::from_millis(1),
                || r.upcall.server.faults_used() > used
            ));
        }
        let (_resizer, handle) = r.start_resize(6);

        lock(&r.manager)
            .pause_all()
            .expect("pause during the resize");
        assert_eq!(lock(&r.manager).run_state(), VmRunState::Paused);
        assert!(r.in_flight(), "{fault:?}: pause_all waited for the guest");
        // A second resize is refused at once (one at a time), and nothing goes to the guest.
        let requests = r.upcall.server.requests_handled();
        match VcpuManager::resize_shared(&r.manager, 3) {
            Err(ResizeError::Busy {
                target: 3,
                in_flight: 6,
            }) => {}
            other => panic!("expected Busy while one is in flight, got {other:?}"),
        }
        lock(&r.manager)
            .resume_all()
            .expect("resume during the resize");
        assert!(r.in_flight(), "{fault:?}: resume_all waited for the guest");
        assert_eq!(r.upcall.server.requests_handled(), requests);

        let err = handle
            .wait_timeout(RIG_REPLY_TIMEOUT * 6)
            .expect_err("the guest never answers");
        match &err {
            ResizeError::HotplugFailed {
                guest_state_unknown: true,
                present_after,
                ..
            } => assert_eq!(present_after, &[0, 1]),
            other => panic!("{fault:?}: expected HotplugFailed, got {other:?}"),
        }
        assert_eq!(r.present(), [0, 1]);
        assert_eq!(r.guest_online(), [0, 1]);

        // Paused: refused at once, nothing sent; resumed: it works.
        lock(&r.manager).pause_all().expect("pause");
        let requests = r.upcall.server.requests_handled();
        match VcpuManager::resize_shared(&r.manager, 4) {
            Err(ResizeError::NotRunning {
                target: 4,
                state: VmRunState::Paused,
            }) => {}
            other => panic!("expected NotRunning(Paused), got {other:?}"),
        }
        assert_eq!(r.upcall.server.requests_handled(), requests);
        lock(&r.manager).resume_all().expect("resume");
        VcpuManager::resize_shared(&r.manager, 4).expect("the next resize works");
        assert_eq!(r.present(), [0, 1, 2, 3]);
        assert_eq!(r.guest_online(), [0, 1, 2, 3]);
    }
}

/// Why 4: the guest's own shutdown request is served while a resize waits for it; the resize
/// then ends with `VmStopped`, and nothing runs again.
#[test]
fn a_guest_shutdown_is_served_while_a_resize_waits() {
    let Some(kvm) = kvm_or_skip("a_guest_shutdown_is_served_while_a_resize_waits") else {
        return;
    };
    let r = rig(kvm, SPARSE, None);
    r.upcall.server.inject_fault(GuestFault::Silent);
    let (_resizer, handle) = r.start_resize(5);
    let monitor = lock(&r.manager).exit_monitor();
    r.agent
        .request_shutdown()
        .expect("ask the guest to shut down");
    let signal = monitor
        .wait(Some(Duration::from_secs(60)))
        .expect("exit monitor")
        .expect("the guest's shutdown reached the exit monitor");
    let stop = lock(&r.manager)
        .stop_vm(signal)
        .expect("stop")
        .expect("a vCPU stopped the VM");
    assert_eq!(stop.vcpu_id, Some(0), "{stop}");
    assert!(r.in_flight(), "the stop waited for the guest's answer");
    assert_eq!(lock(&r.manager).run_state(), VmRunState::Stopped);
    assert!(r.present().is_empty());

    match handle.wait_timeout(RIG_REPLY_TIMEOUT * 6) {
        Err(ResizeError::VmStopped { target: 5 }) => {}
        other => panic!("expected VmStopped, got {other:?}"),
    }
    assert!(!r.in_flight());
    match VcpuManager::resize_shared(&r.manager, 3) {
        Err(ResizeError::NotRunning {
            state: VmRunState::Stopped,
            ..
        }) => {}
        other => panic!("expected NotRunning(Stopped), got {other:?}"),
    }
    assert!(lock(&r.manager).resume_all().is_err());
}

/// Asserts that `err` is a partial hot-plug failure with a known guest state: the guest
/// confirmed exactly `confirmed` (in order, nothing uncertain) and `present_after` are present.
fn assert_partial(err: &ResizeError, confirmed: &[u32], present_after: &[u32]) {
    match err {
        ResizeError::HotplugFailed {
            source,
            present_after: present,
            guest_state_unknown: false,
            ..
        } => {
            assert_eq!(source.confirmed, confirmed);
            assert!(source.uncertain.is_empty());
            assert_eq!(present, present_after);
        }
        other => panic!("expected HotplugFailed, got {other:?}"),
    }
}

/// Why 3: after a partial hot-add the vCPUs the guest onlined keep running (their counters
/// advance), VMM and guest agree, and the next resizes work (the old code exited them under the
/// guest, and every later resize failed with EINVAL, "already present"). The same for a partial
/// hot-remove.
#[test]
fn partial_failures_leave_vmm_and_guest_in_step() {
    let Some(kvm) = kvm_or_skip("partial_failures_leave_vmm_and_guest_in_step") else {
        return;
    };
    let r = rig(kvm, SPARSE, Some(2));
    r.upcall
        .server
        .inject_fault("partial-add:3".parse().expect("a fault"));
    let err = VcpuManager::resize_shared(&r.manager, 12).expect_err("the guest refuses the 4th");
    let brought_up = [2, 3, 4];
    assert_partial(&err, &brought_up, &[0, 1, 2, 3, 4]);
    assert_eq!(r.guest_online(), r.present());
    let before = r.agent.progress_of(&brought_up);
    assert!(
        integration::poll_until(Duration::from_secs(60), Duration::from_millis(1), || {
            r.agent
                .progress_of(&brought_up)
                .iter()
                .zip(&before)
                .all(|(now, then)| now > then)
        }),
        "the vCPUs the guest onlined do not run"
    );
    VcpuManager::resize_shared(&r.manager, 7).expect("grow on from the partial add");
    assert_eq!(r.present(), [0, 1, 2, 3, 4, 5, 8]);
    assert_eq!(r.guest_online(), r.present());

    // A remove that the guest stops after two CPUs (one APIC ID per DEL_CPU request):
    // exactly those two are exited, highest index first.
    let err = VcpuManager::resize_shared(&r.manager, 2).expect_err("the guest refuses the 3rd");
    assert_partial(&err, &[8, 5], &[0, 1, 2, 3, 4]);
    assert_eq!(r.guest_online(), r.present());
    // The refused partial add earlier left 9..=13 kept; now 5 and 8 are kept too.
    assert_eq!(lock(&r.manager).kept_vcpu_fds(), [5, 8, 9, 10, 11, 12, 13]);
    VcpuManager::resize_shared(&r.manager, 2).expect("shrink on from the partial remove");
    assert_eq!(r.present(), [0, 1]);
    assert_eq!(r.guest_online(), [0, 1]);
}
