//! `VcpuManager::resize_vcpus` on real KVM, with the guest-side upcall server of `hotplug`
//! behind its vsock muxer stub on a real Unix socket.
//!
//! The guest program is a CPL-3 spin loop and nobody sends INIT/SIPI, so the new vCPU threads
//! stay blocked in `KVM_RUN` waiting for it: enough to check what the manager creates, starts,
//! exits and keeps, and what it asks the guest. The server's callback only records the actions
//! (and fails them on demand).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotplug::guest::{
    CpuAction, GuestFault, GuestServerOptions, GuestUpcallServer, VsockMuxerStub, EINVAL, EIO,
};
use hotplug::{HotplugError, HybridVsockConnector, UpcallClient, UpcallConfig, UPCALL_GUEST_PORT};
use integration::kvm_or_skip;
use integration::loader::{load_program, GuestProgram};
use kvm_ioctls::Kvm;
use vmm_core::{
    build_vm, AsyncResizer, CpuTopology, ResizeError, VcpuConfig, VcpuManager, VcpuManagerOptions,
    VcpuSlot, VmOptions, VpmuFeatureLevel,
};

/// `jmp .` at CPL 3.
const SPIN: [u8; 2] = [0xeb, 0xfe];
/// 2 sockets x 3 cores x 2 threads: APIC IDs are sparse (0, 1, 2, 3, 4, 5, 8, 9, ...).
const MAX: u32 = 12;

/// A VM with 2 boot vCPUs of at most 12, an upcall client, the guest server and its muxer.
struct Harness {
    vcpus: VcpuManager,
    server: GuestUpcallServer,
    muxer: Option<VsockMuxerStub>,
    /// What the guest server asked the guest to do, in order.
    actions: Arc<Mutex<Vec<CpuAction>>>,
    /// The errno the guest answers an online with (0: success).
    online_errno: Arc<AtomicI32>,
    /// The errno the guest answers an offline with (0: success).
    offline_errno: Arc<AtomicI32>,
    /// While set, the guest holds every online (a slow guest).
    hold: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.vcpus.exit_all();
        if let Some(m) = self.muxer.take() {
            m.shutdown();
        }
    }
}

fn config() -> VcpuConfig {
    VcpuConfig {
        boot_vcpu_count: 2,
        max_vcpu_count: MAX,
        topology: CpuTopology::new(2, 1, 3, 2).expect("2x1x3x2 is a valid topology"),
        vpmu: VpmuFeatureLevel::Disabled,
        template: None,
        vcpu_affinity: Default::default(),
    }
}

/// How long the upcall client waits for the guest's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The reply timeout of the tests whose guest never answers.
const SHORT_REPLY_TIMEOUT: Duration = Duration::from_millis(300);

/// Runs `body` on a fresh harness whose upcall client waits `reply_timeout` for a reply; without
/// KVM, skips `test` (see [`kvm_or_skip`]).
fn with_harness(test: &str, reply_timeout: Duration, body: impl FnOnce(&mut Harness)) {
    if let Some(kvm) = kvm_or_skip(test) {
        body(&mut harness(kvm, reply_timeout));
    }
}

/// `resize_test!(name, reply_timeout, |h| { ... })`: the test `name`, run by [`with_harness`].
macro_rules! resize_test {
    ($name:ident, $reply_timeout:expr, $body:expr) => {
        #[test]
        fn $name() {
            with_harness(stringify!($name), $reply_timeout, $body);
        }
    };
}

fn harness(kvm: Kvm, reply_timeout: Duration) -> Harness {
    let (vm, mut vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        config(),
        VcpuManagerOptions::default(),
    )
    .expect("build the VM");
    let entry = load_program(vm.memory(), &GuestProgram::user("spin", &SPIN, 0))
        .expect("load the spin program");
    vcpus
        .create_boot_vcpus(Arc::new(entry))
        .expect("create boot vCPUs");
    vcpus.start_boot_vcpus().expect("start boot vCPUs");

    let actions = Arc::new(Mutex::new(Vec::new()));
    let online_errno = Arc::new(AtomicI32::new(0));
    let offline_errno = Arc::new(AtomicI32::new(0));
    let hold = Arc::new(AtomicBool::new(false));
    let (rec, on, off, held) = (
        Arc::clone(&actions),
        Arc::clone(&online_errno),
        Arc::clone(&offline_errno),
        Arc::clone(&hold),
    );
    let callback = Box::new(move |action: CpuAction| -> Result<(), i32> {
        rec.lock().unwrap_or_else(|e| e.into_inner()).push(action);
        while held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let errno = match action {
            CpuAction::Online(_) => on.load(Ordering::SeqCst),
            CpuAction::Offline(_) => off.load(Ordering::SeqCst),
        };
        if errno == 0 {
            Ok(())
        } else {
            Err(errno)
        }
    });
    let boot_ids: Vec<u8> = vcpus
        .present_vcpus()
        .iter()
        .map(|v| u8::try_from(v.apic_id).expect("boot APIC IDs are small"))
        .collect();
    let server = GuestUpcallServer::new(&boot_ids, callback, GuestServerOptions::default())
        .expect("guest server");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vsock.sock");
    let muxer = VsockMuxerStub::start(&socket, UPCALL_GUEST_PORT, server.clone(), discard())
        .expect("muxer stub");
    let client = UpcallClient::new(
        Box::new(HybridVsockConnector::new(&socket, UPCALL_GUEST_PORT)),
        UpcallConfig {
            reply_timeout,
            ..UpcallConfig::default()
        },
        discard(),
    );
    client.connect().expect("connect the upcall client");
    vcpus.set_upcall_client(Arc::new(client));
    Harness {
        vcpus,
        server,
        muxer: Some(muxer),
        actions,
        online_errno,
        offline_errno,
        hold,
        _dir: dir,
    }
}

fn discard() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Harness {
    fn present(&self) -> Vec<VcpuSlot> {
        self.vcpus
            .present_vcpus()
            .iter()
            .map(|v| VcpuSlot {
                index: v.index,
                apic_id: v.apic_id,
            })
            .collect()
    }

    fn slots(&self, indices: impl IntoIterator<Item = u32>) -> Vec<VcpuSlot> {
        indices
            .into_iter()
            .map(|index| VcpuSlot {
                index,
                apic_id: self.vcpus.apic_id(index).expect("index below max"),
            })
            .collect()
    }

    fn ids(&self, indices: impl IntoIterator<Item = u32>) -> Vec<u32> {
        self.slots(indices).iter().map(|s| s.apic_id).collect()
    }

    fn take_actions(&self) -> Vec<CpuAction> {
        std::mem::take(&mut *self.actions.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn server_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .server
            .present_apic_ids()
            .into_iter()
            .map(u32::from)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Grows `from` -> `to`, which must succeed now (`after` says after what), and checks
    /// that exactly `from..to` were added and `0..to` are present.
    fn grow_succeeds(&mut self, from: u32, to: u32, after: &str) {
        let out = self
            .vcpus
            .resize_vcpus(to)
            .unwrap_or_else(|e| panic!("resize {from} -> {to} {after}: {e}"));
        assert_eq!(out.added, self.slots(from..to));
        self.assert_present(0..to);
    }

    fn assert_present(&self, indices: std::ops::Range<u32>) {
        let want = self.slots(indices.clone());
        assert_eq!(self.present(), want, "present vCPUs");
        assert_eq!(
            self.vcpus.present_vcpu_count(),
            u32::try_from(want.len()).expect("at most MAX vCPUs")
        );
        assert_eq!(self.server_ids(), self.ids(indices), "the guest's CPUs");
    }
}

fn online(ids: &[u32]) -> Vec<CpuAction> {
    ids.iter()
        .map(|&id| CpuAction::Online(u8::try_from(id).expect("small APIC ID")))
        .collect()
}

fn offline(ids: &[u32]) -> Vec<CpuAction> {
    ids.iter()
        .map(|&id| CpuAction::Offline(u8::try_from(id).expect("small APIC ID")))
        .collect()
}

resize_test!(resize_grow_shrink_grow_reuses_fds, REPLY_TIMEOUT, |h| {
    h.assert_present(0..2);

    // Grow to the maximum: the lowest free indices, sent with their (sparse) APIC IDs.
    let out = h.vcpus.resize_vcpus(MAX).expect("resize 2 -> 12");
    assert_eq!((out.from, out.to), (2, MAX));
    assert_eq!(out.added, h.slots(2..MAX));
    assert!(out.removed.is_empty());
    assert_eq!(h.take_actions(), online(&h.ids(2..MAX)));
    h.assert_present(0..MAX);
    assert!(h.vcpus.kept_vcpu_fds().is_empty());
    assert_eq!(h.ids(0..MAX), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    // The timing split adds up: creation + start is the vCPU work, within the total.
    assert_eq!(out.vcpu_create + out.vcpu_start, out.vcpu_work);
    assert!(out.vcpu_work + out.upcall <= out.total, "{out:?}");

    // Shrink to 3: highest indices first; their threads end, their fds are kept.
    let out = h.vcpus.resize_vcpus(3).expect("resize 12 -> 3");
    // Shrinking creates and starts nothing; its vCPU work is the exit of the threads.
    assert_eq!(
        (out.vcpu_create, out.vcpu_start),
        (Duration::ZERO, Duration::ZERO)
    );
    assert!(out.vcpu_work + out.upcall <= out.total, "{out:?}");
    assert_eq!((out.from, out.to), (MAX, 3));
    assert_eq!(out.removed, h.slots((3..MAX).rev()));
    assert!(out.added.is_empty());
    assert_eq!(h.take_actions(), offline(&h.ids((3..MAX).rev())));
    h.assert_present(0..3);
    assert_eq!(h.vcpus.kept_vcpu_fds(), h.ids(3..MAX));

    // Grow to 6 again: indices 3..6 come back on their kept fds.
    let out = h.vcpus.resize_vcpus(6).expect("resize 3 -> 6");
    assert_eq!(out.added, h.slots(3..6));
    assert_eq!(h.take_actions(), online(&h.ids(3..6)));
    h.assert_present(0..6);
    assert_eq!(h.vcpus.kept_vcpu_fds(), h.ids(6..MAX));

    // Same size: nothing is asked.
    let requests = h.server.requests_handled();
    let out = h.vcpus.resize_vcpus(6).expect("resize 6 -> 6");
    assert!(out.added.is_empty() && out.removed.is_empty());
    assert_eq!(h.server.requests_handled(), requests);
    h.assert_present(0..6);
});

resize_test!(resize_out_of_range_changes_nothing, REPLY_TIMEOUT, |h| {
    for target in [0, MAX + 1] {
        match h.vcpus.resize_vcpus(target) {
            Err(ResizeError::OutOfRange { target: t, max }) => {
                assert_eq!((t, max), (target, MAX));
            }
            other => panic!("resize to {target}: expected ResizeOutOfRange, got {other:?}"),
        }
        h.assert_present(0..2);
    }
    assert_eq!(h.server.requests_handled(), 0);
    assert!(h.vcpus.kept_vcpu_fds().is_empty());
});

#[test]
fn resize_without_upcall_client_is_a_typed_error() {
    let Some(kvm) = kvm_or_skip("resize_without_upcall_client_is_a_typed_error") else {
        return;
    };
    let (_vm, mut vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        config(),
        VcpuManagerOptions::default(),
    )
    .expect("build the VM");
    let err = vcpus.resize_vcpus(4).expect_err("no client");
    assert!(matches!(err, ResizeError::NoHotplugBackend), "{err:?}");
    assert!(err.to_string().contains("set_upcall_client"), "{err}");
    assert_eq!(vcpus.present_vcpu_count(), 0);
}

resize_test!(resize_guest_error_rolls_back, REPLY_TIMEOUT, |h| {
    h.online_errno.store(EINVAL, Ordering::SeqCst);
    let err = h.vcpus.resize_vcpus(4).expect_err("the guest refuses");
    match &err {
        ResizeError::HotplugFailed {
            source,
            guest_state_unknown,
            apic_ids,
            ..
        } => {
            assert_eq!(source.guest_errno(), Some(EINVAL), "{err}");
            assert!(!guest_state_unknown);
            assert_eq!(apic_ids, &h.ids(2..4));
        }
        other => panic!("expected HotplugFailed, got {other:?}"),
    }
    // The new threads are gone, their fds kept; the guest's CPUs are as before.
    h.assert_present(0..2);
    assert_eq!(h.vcpus.kept_vcpu_fds(), h.ids(2..4));

    // Once the guest agrees, the same vCPUs come up on the kept fds.
    h.online_errno.store(0, Ordering::SeqCst);
    h.take_actions();
    h.grow_succeeds(2, 4, "after the refusal");
    assert!(h.vcpus.kept_vcpu_fds().is_empty());
});

resize_test!(
    resize_silent_guest_times_out_and_rolls_back,
    SHORT_REPLY_TIMEOUT,
    |h| {
        h.server.inject_fault(GuestFault::Silent);
        let err = h
            .vcpus
            .resize_vcpus(5)
            .expect_err("the guest never answers");
        match &err {
            ResizeError::HotplugFailed {
                source,
                guest_state_unknown: true,
                ..
            } if matches!(source.source.upcall(), Some(HotplugError::Timeout { .. })) => {}
            other => panic!("expected HotplugFailed(Timeout), got {other:?}"),
        }
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert_eq!(h.present(), h.slots(0..2));
        assert_eq!(h.vcpus.kept_vcpu_fds(), h.ids(2..5));
    }
);

resize_test!(
    resize_hang_up_is_not_success_and_rolls_back,
    REPLY_TIMEOUT,
    |h| {
        h.server.inject_fault(GuestFault::HangUp);
        let err = h.vcpus.resize_vcpus(3).expect_err("the guest hangs up");
        match &err {
            ResizeError::HotplugFailed {
                source,
                guest_state_unknown: true,
                ..
            } => assert!(
                matches!(
                    source.source.upcall(),
                    Some(HotplugError::ConnectionReset { .. } | HotplugError::Io { .. })
                ),
                "{source:?}"
            ),
            other => panic!("expected HotplugFailed(reset), got {other:?}"),
        }
        h.assert_present(0..2);
        assert_eq!(h.vcpus.kept_vcpu_fds(), h.ids(2..3));
        // The guest did not act (a hang-up before acting): the next request reconnects.
        h.grow_succeeds(2, 3, "after reconnecting");
    }
);

resize_test!(
    resize_never_removes_vcpu_0_and_a_refused_shrink_changes_nothing,
    REPLY_TIMEOUT,
    |h| {
        h.vcpus.resize_vcpus(4).expect("resize 2 -> 4");
        h.take_actions();

        // A guest that cannot offline: every vCPU keeps running.
        h.offline_errno.store(EIO, Ordering::SeqCst);
        let err = h
            .vcpus
            .resize_vcpus(1)
            .expect_err("the guest refuses to offline");
        match &err {
            ResizeError::HotplugFailed { source, .. } => {
                assert_eq!(source.guest_errno(), Some(EIO), "{err}")
            }
            other => panic!("expected HotplugFailed, got {other:?}"),
        }
        assert_eq!(h.present(), h.slots(0..4));
        assert!(h.vcpus.kept_vcpu_fds().is_empty());
        h.take_actions();

        h.offline_errno.store(0, Ordering::SeqCst);
        let out = h.vcpus.resize_vcpus(1).expect("resize 4 -> 1");
        assert_eq!(out.removed, h.slots((1..4).rev()));
        assert_eq!(h.take_actions(), offline(&h.ids((1..4).rev())));
        h.assert_present(0..1);
        assert_eq!(h.vcpus.kept_vcpu_fds(), h.ids(1..4));
        assert_eq!(h.vcpus.removable_vcpus(), Vec::<u32>::new());
    }
);

resize_test!(
    async_resize_is_waited_on_with_a_timeout_and_a_second_one_is_busy,
    REPLY_TIMEOUT,
    |h| {
        // The manager moves behind a mutex for the resizer; a stand-in takes its place in `h`.
        let (_vm, spare) = build_vm(
            Kvm::new().expect("/dev/kvm opened once already"),
            VmOptions::default(),
            config(),
            VcpuManagerOptions::default(),
        )
        .expect("build a spare VM");
        let manager = Arc::new(Mutex::new(std::mem::replace(&mut h.vcpus, spare)));
        let resizer = AsyncResizer::new(Arc::clone(&manager));

        h.hold.store(true, Ordering::SeqCst);
        let handle = resizer.start(4).expect("start 2 -> 4");
        assert_eq!(handle.target(), 4);
        match resizer.start(6) {
            Err(ResizeError::Busy {
                target: 6,
                in_flight: 4,
            }) => {}
            other => panic!("expected ResizeBusy, got {other:?}"),
        }
        match handle.wait_timeout(Duration::from_millis(50)) {
            Err(ResizeError::StillRunning { target: 4, .. }) => {}
            other => panic!("expected ResizeStillRunning, got {other:?}"),
        }
        h.hold.store(false, Ordering::SeqCst);
        let out = handle
            .wait_timeout(Duration::from_secs(60))
            .expect("resize 2 -> 4 finishes");
        assert_eq!((out.from, out.to), (2, 4));
        assert!(matches!(
            handle.wait_timeout(Duration::from_millis(1)),
            Err(ResizeError::OutcomeGone { target: 4 })
        ));
        assert_eq!(resizer.in_flight_target(), None);

        // Idle again: the next one starts, and its errors come through the handle.
        let handle = resizer.start(0).expect("start a resize to 0");
        assert!(matches!(
            handle.wait_timeout(Duration::from_secs(60)),
            Err(ResizeError::OutOfRange { target: 0, .. })
        ));
        let guard = manager.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(guard.present_vcpu_count(), 4);
        drop(guard);
        drop(resizer);
        h.vcpus = Arc::try_unwrap(manager)
            .expect("no other owner of the manager")
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        h.assert_present(0..4);
    }
);
