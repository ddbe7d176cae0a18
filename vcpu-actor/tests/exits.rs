//! Exits the actor cannot handle (triple fault, a device asking to stop), device errors,
//! an AP woken by INIT/SIPI, and the seccomp filter.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    exit_and_join, expect, expect_refused, guests, kvm_test, run_in_rounds, wait_event, wait_until,
    Recorder, TestVm, AP_CODE_ADDR, CODE_ADDR, DATA_ADDR, TIMEOUT,
};
use vcpu_actor::{
    IoAccess, PendingVcpu, ReplyOutcome, SeccompMode, VcpuError, VcpuExitReason, VcpuHandle,
    VcpuOptions, VcpuRequest, VcpuState,
};

fn expect_not_allowed(h: &VcpuHandle, req: VcpuRequest) {
    expect_refused(h, req, VcpuState::WaitingExit);
}

kvm_test!(triple_fault_waits_for_exit, false, |vm| {
    let rec = Recorder::new();
    let options = VcpuOptions::default();
    let (h, evt) = vm.spawn_program(guests::fault(), DATA_ADDR, 0x512, rec.clone(), options);
    assert!(
        evt.read().is_err(),
        "the exit event fired before the guest ran"
    );

    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(wait_event(&evt), 1);
    assert_eq!(rec.port(0x512), (1, 7), "the guest ran up to the fault");
    assert_eq!(h.state(), VcpuState::WaitingExit);
    let rip = CODE_ADDR + guests::fault_ud2_offset();
    let reason = h.exit_reason().expect("exit reason");
    assert_eq!(reason, VcpuExitReason::TripleFault { vcpu_id: 0, rip });
    let text = reason.to_string();
    assert!(
        text.contains("vCPU 0") && text.contains(&format!("{rip:#x}")),
        "{text}"
    );

    // Everything but Exit is refused; queries still work; the event fires only once.
    expect_not_allowed(&h, VcpuRequest::Resume);
    expect_not_allowed(&h, VcpuRequest::Pause);
    expect(
        &h,
        VcpuRequest::GetState,
        ReplyOutcome::State(VcpuState::WaitingExit),
    );
    assert!(evt.read().is_err(), "the exit event fired twice");
    let m = h.metrics();
    assert_eq!((m.exits.shutdown, m.exits.io_out), (1, 1), "{m:?}");

    exit_and_join(h);
});

kvm_test!(device_stop_and_device_errors, false, |vm| {
    // The counter lives at 0x300000, past guest RAM: every store is an MMIO write that the
    // recorder rejects. The guest keeps going; its report port then stops the VM.
    let counter = 0x30_0000;
    let rec = Recorder::stopping_on(0x513);
    let options = VcpuOptions::default();
    let (h, evt) = vm.spawn_program(guests::counter(), counter, 0x513, rec, options);
    // The MMIO exits are slow (~60 us each here): pause after a while instead of waiting for
    // 2^20 of them.
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    wait_until("device errors to be counted", || {
        h.metrics().device_errors >= 100
    });
    expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    let m = h.metrics();
    assert_eq!(m.device_errors, m.exits.mmio_write, "{m:?}");
    assert_eq!(h.state(), VcpuState::Paused, "device errors are not fatal");
    assert!(evt.read().is_err());
    exit_and_join(h);

    // Same program with the counter in RAM: the first report stops the VM.
    let vm = TestVm::new(kvm_ioctls::Kvm::new().expect("kvm"), false);
    let rec = Recorder::stopping_on(0x513);
    let options = VcpuOptions::default();
    let (h, evt) = vm.spawn_program(guests::counter(), DATA_ADDR, 0x513, rec, options);
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(wait_event(&evt), 1);
    match h.exit_reason() {
        Some(VcpuExitReason::DeviceRequestedStop { vcpu_id: 0, rip }) => {
            let end = CODE_ADDR + guests::counter().len() as u64;
            assert!((CODE_ADDR..end).contains(&rip), "rip {rip:#x}");
        }
        other => panic!("expected DeviceRequestedStop, got {other:?}"),
    }
    assert_eq!(vm.read_u64(DATA_ADDR), 1 << 20);
    exit_and_join(h);
});

kvm_test!(
    a_panicking_device_stops_the_vcpu_and_keeps_its_fd,
    false,
    |vm| {
        // The device on port 0x517 panics on its third write: the vCPU stops with a reason that
        // names the access, the thread lives on, answers, and gives the fd back.
        let writes = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = Arc::clone(&writes);
        let rec = Recorder::with_hook(move |_, port| {
            if port == 0x517 && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
                panic!("the test device broke on purpose");
            }
        });
        let options = VcpuOptions::default();
        let (h, evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x517, rec.clone(), options);
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        assert_eq!(wait_event(&evt), 1);
        assert_eq!(h.state(), VcpuState::WaitingExit);
        assert_eq!(rec.port(0x517).0, 2, "the panicking write was not recorded");
        let reason = h.exit_reason().expect("exit reason");
        match &reason {
            VcpuExitReason::DevicePanicked {
                vcpu_id: 0,
                rip,
                access: IoAccess::PioWrite,
                addr: 0x517,
                message,
            } => {
                let end = CODE_ADDR + guests::pio().len() as u64;
                assert!((CODE_ADDR..end).contains(rip), "rip {rip:#x}");
                assert_eq!(message, "the test device broke on purpose");
            }
            other => panic!("expected DevicePanicked, got {other:?}"),
        }
        let text = reason.to_string();
        assert!(
            text.starts_with("vCPU 0: ") && text.contains("port write at 0x517 panicked"),
            "{text}"
        );
        expect_not_allowed(&h, VcpuRequest::Resume);
        expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
        let vcpu = h
            .join(TIMEOUT)
            .expect("the fd comes back from a panicking device");
        assert!(vcpu.get_regs().is_ok());
    }
);

kvm_test!(ap_runs_only_after_init_sipi, true, |vm| {
    vm.load(guests::bsp_sipi(), CODE_ADDR);
    vm.load(guests::ap(), AP_CODE_ADDR);
    let rec = Recorder::stopping_on(0x514);
    // BSP: send INIT/SIPI to APIC ID 1, report on 0x514 (which stops it).
    let bsp = vm.new_cpl3_vcpu(0, CODE_ADDR, DATA_ADDR, 0x514, 1 << 24);
    let ap = vm.new_plain_vcpu(1);
    assert_eq!(
        ap.get_mp_state().expect("mp state").mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
    // Both threads are started before either is waited for.
    let (bsp_parts, bsp_evt) = vm.parts(0, bsp, rec.clone());
    let (ap_parts, ap_evt) = vm.parts(1, ap, rec.clone());
    let pending: Vec<PendingVcpu> = [bsp_parts, ap_parts]
        .into_iter()
        .map(|parts| PendingVcpu::start(parts, VcpuOptions::default()).expect("start"))
        .collect();
    assert_eq!(
        pending.iter().map(PendingVcpu::id).collect::<Vec<_>>(),
        [0, 1]
    );
    let mut handles = pending.into_iter().map(|p| p.wait_ready().expect("ready"));
    let (bsp_h, ap_h) = (handles.next().expect("bsp"), handles.next().expect("ap"));

    // The AP's thread is running but blocked inside KVM_RUN: no guest exits, and it still
    // answers (each request kicks it out with EINTR).
    expect(&ap_h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    std::thread::sleep(Duration::from_millis(100));
    expect(
        &ap_h,
        VcpuRequest::GetState,
        ReplyOutcome::State(VcpuState::Running),
    );
    let m = ap_h.metrics();
    assert_eq!(
        m.exits.guest_exits(),
        0,
        "the AP ran before INIT/SIPI: {m:?}"
    );
    assert_eq!(rec.port(0x520).0, 0);

    expect(&bsp_h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(rec.wait_port(0x520, 1, TIMEOUT), (1, 0x5a));
    let m = ap_h.metrics();
    assert!(
        m.exits.eagain >= 1,
        "the woken AP's KVM_RUN returns EAGAIN: {m:?}"
    );
    assert_eq!(m.exits.io_out, 1);
    assert_eq!(wait_event(&bsp_evt), 1);
    assert!(matches!(
        bsp_h.exit_reason(),
        Some(VcpuExitReason::DeviceRequestedStop { vcpu_id: 0, .. })
    ));

    // The AP now halts inside KVM_RUN; a Pause still gets it out.
    expect(&ap_h, VcpuRequest::Pause, ReplyOutcome::Paused);
    assert!(ap_evt.read().is_err());
    expect(&bsp_h, VcpuRequest::Exit, ReplyOutcome::Exited);
    expect(&ap_h, VcpuRequest::Exit, ReplyOutcome::Exited);
    bsp_h.join(TIMEOUT).expect("join bsp");
    ap_h.join(TIMEOUT).expect("join ap");
});

kvm_test!(seccomp_refuses_a_syscall_outside_the_list, false, |vm| {
    // The handler calls getpid(2) (not in the allow-list) on every port write and keeps
    // what the calls returned (bounded).
    let results = Arc::new(Mutex::new(Vec::<(i64, i32)>::new()));
    let seen = Arc::clone(&results);
    let rec = Recorder::with_hook(move |_, _| {
        // SAFETY: getpid has no arguments and no side effects.
        let r = unsafe { libc::syscall(libc::SYS_getpid) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut seen = seen.lock().expect("lock");
        if seen.len() < 1000 {
            seen.push((r, errno));
        }
    });
    let options = VcpuOptions {
        seccomp: SeccompMode::errno_eperm(),
        ..VcpuOptions::default()
    };
    let (h, _evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x515, rec.clone(), options);
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    rec.wait_port(0x515, 50, TIMEOUT);
    // The vCPU keeps working: it pauses, resumes and makes progress.
    expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    let count = rec.port(0x515).0;
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    rec.wait_port(0x515, count + 50, TIMEOUT);
    exit_and_join(h);

    let results = results.lock().expect("lock");
    assert!(results.len() >= 100);
    assert!(
        results.iter().all(|&(r, e)| r == -1 && e == libc::EPERM),
        "getpid was not refused with EPERM: {:?}",
        &results[..3]
    );
    // The filter confines the vCPU thread only.
    // SAFETY: getpid has no arguments and no side effects.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) };
    assert_eq!(pid, i64::from(std::process::id()));
});

kvm_test!(
    the_default_allow_list_is_enough_for_the_actor_itself,
    false,
    |vm| {
        // Any syscall the actor makes outside the list would kill this test process.
        let rec = Recorder::new();
        let options = VcpuOptions {
            seccomp: SeccompMode::kill(),
            ..VcpuOptions::default()
        };
        let (h, _evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x516, rec.clone(), options);
        run_in_rounds(&h, &rec, 0x516, 3, 20);
        exit_and_join(h);
    }
);

kvm_test!(a_failed_spawn_gives_the_vcpu_fd_back, false, |vm| {
    vm.load(guests::fault(), CODE_ADDR);
    let vcpu = vm.new_cpl3_vcpu(0, CODE_ADDR, DATA_ADDR, 0x512, 0);
    let (parts, _) = vm.parts(0, vcpu, Recorder::new());
    // An empty BPF program: the thread cannot install it.
    let options = VcpuOptions {
        seccomp: SeccompMode::Custom(Vec::new()),
        ..VcpuOptions::default()
    };
    let failure =
        VcpuHandle::spawn(parts, options).expect_err("an empty filter cannot be installed");
    assert!(
        failure.error.to_string().contains("seccomp"),
        "{}",
        failure.error
    );
    let vcpu = failure.vcpu.expect("the fd comes back");

    // A kick signal that already has someone else's handler is refused, the fd comes back.
    let offset = 9;
    let sig = vmm_sys_util::signal::SIGRTMIN() + offset;
    vmm_sys_util::signal::register_signal_handler(sig, foreign_handler).expect("sigaction");
    let (parts, _) = vm.parts(0, vcpu, Recorder::new());
    let options = VcpuOptions {
        kick_signal_offset: offset,
        ..VcpuOptions::default()
    };
    let failure = VcpuHandle::spawn(parts, options).expect_err("the signal is someone else's");
    assert!(
        matches!(failure.error, VcpuError::KickSignalInUse { signal, .. } if signal == sig),
        "{}",
        failure.error
    );
    let vcpu = failure.vcpu.expect("the fd comes back");

    // The same KVM vCPU runs under a new actor: the guest triple-faults as it should.
    let (h, evt) = vm.spawn(0, vcpu, Recorder::new(), VcpuOptions::default());
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(wait_event(&evt), 1);
    assert!(matches!(
        h.exit_reason(),
        Some(VcpuExitReason::TripleFault { vcpu_id: 0, .. })
    ));
    exit_and_join(h);
});

extern "C" fn foreign_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Signals queued for this process's user (`SigQ` in /proc/self/status).
fn queued_signals() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigQ:"))
        .and_then(|v| v.trim().split('/').next()?.parse().ok())
        .expect("SigQ line")
}

kvm_test!(
    kicks_neither_interrupt_a_busy_handler_nor_pile_up,
    false,
    |vm| {
        // The handler's first port write blocks in read(2) on a pipe until the test writes to it;
        // meanwhile every request kicks the (running) vCPU. A kick delivered to a handler would
        // make that read fail with EINTR; a kick per request would queue hundreds of signals.
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let [read_end, write_end] = fds;
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let read_result = Arc::new(Mutex::new(None::<(isize, i32)>));
        let (flag, result) = (Arc::clone(&entered), Arc::clone(&read_result));
        let rec = Recorder::with_hook(move |_, _| {
            if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let mut byte = 0u8;
            // SAFETY: reads one byte into `byte` from the pipe, which outlives the vCPU.
            let r = unsafe { libc::read(read_end, (&raw mut byte).cast(), 1) };
            // errno means something only after a failed call (a kick taken off the queue
            // before the handler ran leaves sigtimedwait's EAGAIN there).
            let errno = if r < 0 {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            };
            *result.lock().expect("lock") = Some((r, errno));
        });
        let options = VcpuOptions {
            // read(2) on a pipe is not in the filter's list.
            seccomp: SeccompMode::Disabled,
            ..VcpuOptions::default()
        };
        let (h, _evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x515, rec.clone(), options);
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        wait_until("the handler blocks", || {
            entered.load(std::sync::atomic::Ordering::SeqCst)
        });

        let before = queued_signals();
        let ids: Vec<_> = (0..300)
            .map(|_| h.send(VcpuRequest::GetState).expect("send"))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let during = queued_signals();
        assert!(
            read_result.lock().expect("lock").is_none(),
            "the handler's read returned while nothing had been written: {:?}",
            read_result.lock().expect("lock")
        );
        // SAFETY: writes one byte from a live buffer to the pipe.
        let written = unsafe { libc::write(write_end, b"x".as_ptr().cast(), 1) };
        assert_eq!(written, 1);
        for id in ids {
            let reply = h.wait_reply(id, TIMEOUT).expect("reply");
            assert_eq!(reply.outcome, ReplyOutcome::State(VcpuState::Running));
        }
        assert_eq!(*read_result.lock().expect("lock"), Some((1, 0)));
        // Other tests of this process may have a kick or two queued at the same moment.
        assert!(
            during.saturating_sub(before) < 30,
            "300 kicks of a busy vCPU queued {} signals",
            during.saturating_sub(before)
        );
        exit_and_join(h);
        for fd in [read_end, write_end] {
            // SAFETY: closing the pipe's fds, which nothing uses any more.
            unsafe { libc::close(fd) };
        }
    }
);

/// A signal mask line (`SigBlk:` ...) of /proc/self/task/<tid>/status, as bits.
fn task_mask(tid: i32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).expect("task status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("mask line")
}

kvm_test!(
    a_vcpu_thread_takes_no_signal_sent_to_the_process,
    false,
    |vm| {
        // Process-directed signals (SIGCHLD of a child, SIGINT, SIGTERM ...) go to a thread that
        // does not block them: a vCPU thread must not be one (the embedder's handler would run
        // under its seccomp filter). The signals of its own faults stay unblocked.
        let rec = Recorder::new();
        let (h, _evt) = vm.spawn_program(
            guests::pio(),
            DATA_ADDR,
            0x515,
            rec.clone(),
            VcpuOptions::default(),
        );
        // Read while paused: inside KVM_RUN the thread has KVM's mask, the kick unblocked.
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
        let blocked = task_mask(h.tid().expect("tid"), "SigBlk:");
        let bit = |sig: i32| 1u64 << (sig - 1);
        for sig in [
            libc::SIGCHLD,
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGPIPE,
            libc::SIGALRM,
            libc::SIGRTMIN(),
        ] {
            assert_ne!(
                blocked & bit(sig),
                0,
                "signal {sig} not blocked: {blocked:#x}"
            );
        }
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGSYS,
        ] {
            assert_eq!(blocked & bit(sig), 0, "signal {sig} blocked: {blocked:#x}");
        }
        // And it still answers (kicks reach it inside KVM_RUN).
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
        expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
        exit_and_join(h);
    }
);
