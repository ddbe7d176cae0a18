//! The state machine driven against real KVM guests: pause/resume of a counting guest,
//! request/reply matching under load, and every request in every state.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{
    expect, expect_gone_or_refused, expect_queries, guests, kvm_test, run_in_rounds, wait_until,
    Recorder, TestVm, CODE_ADDR, DATA_ADDR, TIMEOUT,
};
use vcpu_actor::{
    ReplyOutcome, SeccompMode, VcpuError, VcpuHandle, VcpuOptions, VcpuRequest, VcpuState,
    ViolationAction,
};

const REPORT_PORT: u16 = 0x510;

/// Spawns vCPU 0 running the counter guest, which counts at DATA_ADDR.
fn counter_actor(vm: &TestVm, rec: Arc<Recorder>) -> VcpuHandle {
    let options = VcpuOptions::default();
    vm.spawn_program(guests::counter(), DATA_ADDR, REPORT_PORT, rec, options)
        .0
}

kvm_test!(counter_guest_follows_pause_and_resume, false, |vm| {
    let rec = Recorder::new();
    let h = counter_actor(&vm, rec.clone());
    assert_eq!(h.state(), VcpuState::Paused);
    assert!(h.tid().is_some());

    // Created paused: the guest does not run.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.read_u64(DATA_ADDR), 0, "a paused vCPU ran its guest");

    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(h.state(), VcpuState::Running);
    // The guest reports every 2^20 counts through the port.
    let (_, reported) = rec.wait_port(REPORT_PORT, 2, TIMEOUT);
    assert_eq!(reported % (1 << 20), 0);

    expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    let still = vm.read_u64(DATA_ADDR);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        vm.read_u64(DATA_ADDR),
        still,
        "the counter moved while paused"
    );

    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    wait_until("the counter to advance after the second resume", || {
        vm.read_u64(DATA_ADDR) > still
    });

    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
    assert_eq!(h.state(), VcpuState::Exited);
    let m = h.metrics();
    assert_eq!((m.pauses, m.resumes), (1, 2));
    assert!(m.exits.io_out >= 2 && m.run_time_ns > 0, "{m:?}");
    assert!(
        m.exits.eintr >= 1,
        "the pause must have kicked the vCPU: {m:?}"
    );

    // The fd comes back and still belongs to the same vCPU, stopped inside the program.
    let vcpu = h.join(TIMEOUT).expect("join");
    let rip = vcpu.get_regs().expect("regs").rip;
    let end = CODE_ADDR + guests::counter().len() as u64;
    assert!((CODE_ADDR..end).contains(&rip), "rip {rip:#x}");
});

kvm_test!(thousand_pause_resume_cycles_lose_no_reply, false, |vm| {
    let h = counter_actor(&vm, Recorder::new());

    // One at a time.
    for _ in 0..1000 {
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    }
    // All queued at once, then the replies collected in a shuffled order.
    let mut ids: Vec<_> = (0..1000)
        .flat_map(|_| [VcpuRequest::Resume, VcpuRequest::Pause])
        .map(|r| (h.send(r).expect("send"), r))
        .collect();
    ids.reverse();
    for (id, req) in ids {
        let reply = h.wait_reply(id, TIMEOUT).expect("reply");
        assert_eq!((reply.request_id, reply.request), (id, req));
        let want = match req {
            VcpuRequest::Resume => ReplyOutcome::Resumed,
            _ => ReplyOutcome::Paused,
        };
        assert_eq!(reply.outcome, want);
        // A reply is taken once.
        assert!(matches!(
            h.wait_reply(id, Duration::from_millis(1)),
            Err(VcpuError::ReplyTimeout { .. })
        ));
    }
    let m = h.metrics();
    assert_eq!((m.pauses, m.resumes), (2000, 2000));
    assert_eq!(h.state(), VcpuState::Paused);
    h.join(TIMEOUT).expect("join");
});

kvm_test!(
    unclaimed_replies_are_bounded_with_a_clear_error,
    false,
    |vm| {
        let h = counter_actor(&vm, Recorder::new());
        let limit = VcpuHandle::MAX_UNCLAIMED_REPLIES;
        // Flood without waiting: more replies than the actor keeps unclaimed.
        let ids: Vec<_> = (0..limit + 1000)
            .map(|_| h.send(VcpuRequest::GetState).expect("send"))
            .collect();
        let last = *ids.last().expect("ids");
        let reply = h.wait_reply(last, TIMEOUT).expect("the last reply is kept");
        assert_eq!(reply.outcome, ReplyOutcome::State(VcpuState::Paused));
        // The oldest 1000 were discarded, and waiting for one says so at once (not a timeout
        // that blames a device handler).
        let first_kept = ids[1000];
        h.wait_reply(first_kept, TIMEOUT)
            .expect("the oldest kept reply is there");
        for id in [ids[0], ids[999]] {
            match h.wait_reply(id, TIMEOUT) {
                Err(e @ VcpuError::ReplyDiscarded { .. }) => {
                    let text = e.to_string();
                    assert!(
                        text.starts_with("vCPU 0: ")
                            && text.contains(&format!("request {id}"))
                            && text.contains(&format!("{limit} replies"))
                            && !text.contains("device handler"),
                        "{text}"
                    );
                }
                other => panic!("request {id}: expected ReplyDiscarded, got {other:?}"),
            }
        }
        // The actor is unharmed.
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
        h.join(TIMEOUT).expect("join");
    }
);

kvm_test!(
    rapid_messages_from_other_threads_are_all_answered,
    false,
    |vm| {
        // The pio guest exits on every iteration, so messages also arrive while an exit is
        // being handled, not only while the guest runs.
        let options = VcpuOptions::default();
        let (h, _evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x511, Recorder::new(), options);
        let h = Arc::new(h);
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);

        let senders: Vec<_> = (0..4)
            .map(|t| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    let mut sent = Vec::new();
                    for i in 0..500 {
                        let req = match (t + i) % 4 {
                            0 => VcpuRequest::GetState,
                            1 => VcpuRequest::GetTid,
                            2 => VcpuRequest::Pause,
                            _ => VcpuRequest::Resume,
                        };
                        sent.push((h.send(req).expect("send"), req));
                    }
                    for (id, req) in sent {
                        let reply = h.wait_reply(id, TIMEOUT).expect("reply");
                        assert_eq!((reply.request_id, reply.request), (id, req));
                        match (req, &reply.outcome) {
                            (VcpuRequest::GetState, ReplyOutcome::State(s)) => {
                                assert!(matches!(s, VcpuState::Running | VcpuState::Paused))
                            }
                            (VcpuRequest::GetTid, ReplyOutcome::Tid(tid)) => {
                                assert_eq!(Some(*tid), h.tid())
                            }
                            (VcpuRequest::Pause, ReplyOutcome::Paused)
                            | (VcpuRequest::Resume, ReplyOutcome::Resumed) => {}
                            other => panic!("unexpected reply {other:?}"),
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().expect("sender thread");
        }
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        let before = vm.read_u64(DATA_ADDR);
        wait_until("the guest to keep running", || {
            vm.read_u64(DATA_ADDR) > before
        });
        let h = Arc::into_inner(h).expect("last handle");
        h.join(TIMEOUT).expect("join");
    }
);

kvm_test!(requests_in_paused_and_running_states, false, |vm| {
    let h = counter_actor(&vm, Recorder::new());
    let tid = h.tid().expect("tid");

    expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    expect_queries(&h, VcpuState::Paused, tid);
    assert_eq!(h.metrics().pauses, 0, "pause while paused is a no-op");

    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    expect_queries(&h, VcpuState::Running, tid);
    assert_eq!(h.metrics().resumes, 1, "resume while running is a no-op");

    // Exit straight from running.
    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
    // After exit: either the send fails or the queued request is refused.
    expect_gone_or_refused(&h, VcpuRequest::Resume);
    h.join(TIMEOUT).expect("join");
});

kvm_test!(exit_while_paused_and_drop_without_join, false, |vm| {
    let h = counter_actor(&vm, Recorder::new());
    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
    expect_gone_or_refused(&h, VcpuRequest::Pause);
    h.join(TIMEOUT).expect("join");

    // join() on a running actor sends Exit itself.
    let h = counter_actor(&vm_again(), Recorder::new());
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    h.join(TIMEOUT).expect("join of a running actor");

    // Dropping a running handle stops the thread (it is detached, nothing to assert but
    // that the drop does not hang or panic).
    let h = counter_actor(&vm_again(), Recorder::new());
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    drop(h);
});

fn vm_again() -> TestVm {
    TestVm::new(kvm_ioctls::Kvm::new().expect("kvm"), false)
}

/// The lowest address and the size of the calling thread's stack.
fn current_stack() -> (usize, usize) {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    // SAFETY: `attr` is valid for writes; pthread_getattr_np initializes it.
    let rc = unsafe { libc::pthread_getattr_np(me, attr.as_mut_ptr()) };
    assert_eq!(rc, 0);
    let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `attr` was initialized above; the out-pointers are valid.
    let rc = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) };
    assert_eq!(rc, 0);
    // SAFETY: destroys the attr initialized above, once.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    (addr as usize, size)
}

/// How many bytes of `[addr, addr + size)` are resident: the pages a stack has touched.
fn resident_bytes(addr: usize, size: usize) -> usize {
    let page = 4096;
    let mut vec = vec![0u8; size.div_ceil(page)];
    // SAFETY: the range is the vCPU thread's mapped stack (the thread is alive and paused);
    // `vec` has one byte per page.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, size, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count() * page
}

kvm_test!(the_default_stack_leaves_a_wide_margin, false, |vm| {
    let stack = Arc::new(std::sync::OnceLock::new());
    let seen = Arc::clone(&stack);
    let rec = Recorder::with_hook(move |_, _| {
        seen.get_or_init(current_stack);
    });
    // Port exits through the handler, kicks (the signal frame lands on this stack) and
    // every request, on the default stack size. The hook's pthread_getattr_np needs
    // sched_getaffinity, which the default seccomp filter does not allow.
    let options = VcpuOptions {
        seccomp: SeccompMode::Enforce {
            action: ViolationAction::StopVm,
            extra_syscalls: vec![libc::SYS_sched_getaffinity],
            extra_write_fds: Vec::new(),
        },
        ..VcpuOptions::default()
    };
    let (h, _evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x517, rec.clone(), options);
    run_in_rounds(&h, &rec, 0x517, 50, 10);
    let &(addr, size) = stack.get().expect("the handler ran");
    assert_eq!(size, VcpuOptions::DEFAULT_STACK_SIZE);
    let used = resident_bytes(addr, size);
    eprintln!("vCPU thread stack: {used} of {size} bytes touched");
    assert!(
        used <= size / 2,
        "the vCPU thread touched {used} of its {size} stack bytes: raise DEFAULT_STACK_SIZE"
    );
    h.join(TIMEOUT).expect("join");
});

kvm_test!(
    duration_max_waits_without_deadline_and_unwinding_drops_cleanly,
    false,
    |vm| {
        let h = counter_actor(&vm, Recorder::new());
        // A timeout that cannot be added to the current time means "no deadline", never an
        // overflow panic.
        let reply = h
            .request(VcpuRequest::Resume, Duration::MAX)
            .expect("reply");
        assert_eq!(reply.outcome, ReplyOutcome::Resumed);
        let id = h.send(VcpuRequest::Pause).expect("send");
        let reply = h.wait_reply(id, Duration::MAX).expect("reply");
        assert_eq!(reply.outcome, ReplyOutcome::Paused);
        h.join(Duration::MAX).expect("join without deadline");

        // A handle dropped while its owner unwinds from a panic asks the thread to exit and
        // does not panic again (which would abort the process).
        let h = counter_actor(&vm_again(), Recorder::new());
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _owner = h;
            panic!("the VMM's own panic");
        }));
        let payload = unwound.expect_err("the closure panics");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"the VMM's own panic"));
    }
);
