//! `GetMpState`: the MP state read on the vCPU's own thread, for an AP waiting for INIT/SIPI,
//! a runnable BSP, an AP the BSP woke, a vCPU waiting to exit and an exiting one; refused
//! while running. And APs started running (`PendingVcpu::start_running_with_setup`).

mod common;

use std::sync::{Arc, Condvar, Mutex};

use common::{
    expect, expect_refused, guests, kvm_test, wait_event, wait_until, Recorder, TestVm,
    AP_CODE_ADDR, CODE_ADDR, DATA_ADDR, TIMEOUT,
};
use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use vcpu_actor::{
    PendingVcpu, ReplyOutcome, VcpuHandle, VcpuOptions, VcpuParts, VcpuRequest, VcpuState,
};
use vmm_sys_util::eventfd::EventFd;

/// Asks for the MP state and returns it (the reply must be an `MpState`).
fn mp_state(h: &VcpuHandle) -> u32 {
    let reply = h.request(VcpuRequest::GetMpState, TIMEOUT).expect("reply");
    assert_eq!(
        (reply.vcpu_id, reply.request),
        (h.id(), VcpuRequest::GetMpState)
    );
    assert!(reply.is_ok(), "{reply:?}");
    match reply.outcome {
        ReplyOutcome::MpState(s) => s,
        other => panic!("expected MpState, got {other:?}"),
    }
}

kvm_test!(
    an_ap_waiting_for_sipi_is_uninitialized_and_running_refuses,
    true,
    |vm| {
        let rec = Recorder::new();
        let (bsp, _bsp_evt) =
            vm.spawn(0, vm.new_plain_vcpu(0), rec.clone(), VcpuOptions::default());
        let (ap, _ap_evt) = vm.spawn(1, vm.new_plain_vcpu(1), rec, VcpuOptions::default());
        // Both paused (as created): the BSP is runnable, the AP waits for INIT/SIPI.
        assert_eq!(mp_state(&bsp), KVM_MP_STATE_RUNNABLE);
        assert_eq!(mp_state(&ap), KVM_MP_STATE_UNINITIALIZED);

        // Running, the AP's thread blocks inside KVM_RUN: the request is refused at once (the
        // kick brings the thread out to answer), never left waiting behind KVM_RUN.
        expect(&ap, VcpuRequest::Resume, ReplyOutcome::Resumed);
        expect_refused(&ap, VcpuRequest::GetMpState, VcpuState::Running);
        assert_eq!(ap.state(), VcpuState::Running);

        // Paused again: still waiting for SIPI.
        expect(&ap, VcpuRequest::Pause, ReplyOutcome::Paused);
        assert_eq!(mp_state(&ap), KVM_MP_STATE_UNINITIALIZED);
        assert_eq!(ap.metrics().exits.guest_exits(), 0);
        bsp.join(TIMEOUT).expect("join bsp");
        ap.join(TIMEOUT).expect("join ap");
    }
);

/// A BSP that sends INIT/SIPI to APIC ID 1 and then reports on 0x514, which stops it, and
/// that AP, whose real-mode code reports on 0x520: their parts (not started), the BSP's exit
/// EventFd and the recorder both report to.
fn bsp_waking_ap(vm: &TestVm) -> (Arc<Recorder>, VcpuParts, EventFd, VcpuParts) {
    vm.load(guests::bsp_sipi(), CODE_ADDR);
    vm.load(guests::ap(), AP_CODE_ADDR);
    let rec = Recorder::stopping_on(0x514);
    let bsp = vm.new_cpl3_vcpu(0, CODE_ADDR, DATA_ADDR, 0x514, 1 << 24);
    let (bsp_parts, bsp_evt) = vm.parts(0, bsp, rec.clone());
    let (ap_parts, _ap_evt) = vm.parts(1, vm.new_plain_vcpu(1), rec.clone());
    (rec, bsp_parts, bsp_evt, ap_parts)
}

kvm_test!(an_ap_woken_by_init_sipi_leaves_uninitialized, true, |vm| {
    let (rec, bsp_parts, bsp_evt, ap_parts) = bsp_waking_ap(&vm);
    let start = |parts| {
        PendingVcpu::start(parts, VcpuOptions::default())
            .expect("start")
            .wait_ready()
            .expect("ready")
    };
    let (bsp_h, ap_h) = (start(bsp_parts), start(ap_parts));
    assert_eq!(mp_state(&ap_h), KVM_MP_STATE_UNINITIALIZED);

    expect(&ap_h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    expect(&bsp_h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    // The AP reports on 0x520 once it runs its real-mode code.
    assert_eq!(rec.wait_port(0x520, 1, TIMEOUT), (1, 0x5a));
    assert_eq!(wait_event(&bsp_evt), 1);

    // The BSP waits to exit: its fd is still the thread's, and it reads runnable.
    assert_eq!(bsp_h.state(), VcpuState::WaitingExit);
    assert_eq!(mp_state(&bsp_h), KVM_MP_STATE_RUNNABLE);
    // The AP was brought up: paused, it is no longer waiting for SIPI (runnable, or halted).
    expect(&ap_h, VcpuRequest::Pause, ReplyOutcome::Paused);
    let woken = mp_state(&ap_h);
    assert_ne!(woken, KVM_MP_STATE_UNINITIALIZED);
    assert_ne!(woken, kvm_bindings::KVM_MP_STATE_INIT_RECEIVED);

    expect(&bsp_h, VcpuRequest::Exit, ReplyOutcome::Exited);
    expect(&ap_h, VcpuRequest::Exit, ReplyOutcome::Exited);
    bsp_h.join(TIMEOUT).expect("join bsp");
    ap_h.join(TIMEOUT).expect("join ap");
});

/// A gate a port-write hook waits at until it is opened (and then never again).
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Gate {
    /// Marks the hook as arrived and waits until the gate is open.
    fn pass(&self) {
        let mut s = self.state.lock().expect("gate");
        s.0 = true;
        self.changed.notify_all();
        while !s.1 {
            s = self.changed.wait(s).expect("gate");
        }
    }

    fn arrived(&self) -> bool {
        self.state.lock().expect("gate").0
    }

    fn open(&self) {
        self.state.lock().expect("gate").1 = true;
        self.changed.notify_all();
    }
}

kvm_test!(
    a_request_queued_behind_exit_is_answered_with_the_fd,
    false,
    |vm| {
        // The thread is held inside the exit handler of its first port write while `Exit` and
        // then `GetMpState` are queued: it takes both in one pass over its mailbox, the second
        // in state `Exited`, before it gives the fd back.
        let gate = Arc::new(Gate::default());
        let hook_gate = Arc::clone(&gate);
        let rec = Recorder::with_hook(move |_, _| hook_gate.pass());
        let (h, _evt) =
            vm.spawn_program(guests::pio(), DATA_ADDR, 0x515, rec, VcpuOptions::default());
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        wait_until("the first port write", || gate.arrived());
        let exit = h.send(VcpuRequest::Exit).expect("send exit");
        let query = h.send(VcpuRequest::GetMpState).expect("send get_mp_state");
        gate.open();
        let reply = h.wait_reply(exit, TIMEOUT).expect("exit reply");
        assert_eq!(reply.outcome, ReplyOutcome::Exited);
        let reply = h.wait_reply(query, TIMEOUT).expect("get_mp_state reply");
        // Without an irqchip every vCPU is runnable.
        assert_eq!(reply.outcome, ReplyOutcome::MpState(KVM_MP_STATE_RUNNABLE));
        assert_eq!(h.state(), VcpuState::Exited);
        let fd = h.join(TIMEOUT).expect("join");
        assert_eq!(
            fd.get_mp_state().expect("mp state").mp_state,
            KVM_MP_STATE_RUNNABLE
        );
    }
);

// `start_running_with_setup`: an AP is `Running` once ready, with no `Resume` sent, and is
// in `KVM_RUN` when the BSP wakes it (it reports from its real-mode code).
kvm_test!(an_ap_started_running_needs_no_resume, true, |vm| {
    let (rec, bsp_parts, bsp_evt, ap_parts) = bsp_waking_ap(&vm);
    let ap_h = PendingVcpu::start_running_with_setup(
        ap_parts,
        VcpuOptions::default(),
        Box::new(|_| Ok(())),
    )
    .expect("start")
    .wait_ready()
    .expect("ready");
    assert_eq!(ap_h.state(), VcpuState::Running);
    let bsp_h = VcpuHandle::spawn(bsp_parts, VcpuOptions::default()).expect("bsp");
    assert_eq!(
        bsp_h.state(),
        VcpuState::Paused,
        "a plain start still waits"
    );

    expect(&bsp_h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(rec.wait_port(0x520, 1, TIMEOUT), (1, 0x5a));
    assert_eq!(wait_event(&bsp_evt), 1);
    assert_eq!(ap_h.metrics().resumes, 1, "counted as a resume");

    expect(&ap_h, VcpuRequest::Exit, ReplyOutcome::Exited);
    expect(&bsp_h, VcpuRequest::Exit, ReplyOutcome::Exited);
    bsp_h.join(TIMEOUT).expect("join bsp");
    ap_h.join(TIMEOUT).expect("join ap");
});

/// Whether thread `tid` of this process is blocked in `ioctl(_, KVM_RUN)`
/// (`/proc/self/task/<tid>/syscall`: the number, then the arguments in hex).
fn in_kvm_run(tid: i32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) else {
        return false;
    };
    let mut fields = s.split_whitespace();
    let nr = fields.next();
    let request = fields.nth(1);
    nr == Some(libc::SYS_ioctl.to_string().as_str()) && request == Some("0xae80")
}

// A `PendingVcpu` started running and dropped while its thread waits in `KVM_RUN` for a
// SIPI that never comes: the thread is kicked out and ends (without the kick it would stay
// there for good, holding the vCPU fd).
kvm_test!(a_dropped_pending_vcpu_started_running_ends, true, |vm| {
    let (parts, _evt) = vm.parts(1, vm.new_plain_vcpu(1), Recorder::new());
    let tid = Arc::new(Mutex::new(None));
    let record = Arc::clone(&tid);
    let pending = PendingVcpu::start_running_with_setup(
        parts,
        VcpuOptions::default(),
        Box::new(move |_| {
            // SAFETY: gettid has no preconditions.
            *record.lock().unwrap() = Some(unsafe { libc::gettid() });
            Ok(())
        }),
    )
    .expect("start");
    wait_until("the setup", || tid.lock().unwrap().is_some());
    let tid = tid.lock().unwrap().expect("tid");
    wait_until("the thread in KVM_RUN", || in_kvm_run(tid));
    drop(pending);
    wait_until("the thread's end", || {
        !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
    });
});
