//! The seccomp filter on real vCPU threads: on by default (`Seccomp: 2` in the thread's
//! status), ordinary work unaffected, and a forbidden call made from inside the filtered
//! thread (by an exit handler) stops the vCPU with a reason naming the call, while the
//! process carries on.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use common::{
    exit_and_join, expect, guests, kvm_test, run_in_rounds, wait_event, Recorder, TestVm, DATA_ADDR,
};
use vcpu_actor::{
    ReplyOutcome, SeccompMode, VcpuExitReason, VcpuHandle, VcpuOptions, VcpuRequest, VcpuState,
};

/// `Seccomp:` of `/proc/self/task/TID/status`: 0 none, 1 strict, 2 filter.
fn seccomp_of(tid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
        .expect("read the thread's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .expect("a Seccomp: line")
        .trim()
        .parse()
        .expect("a number")
}

kvm_test!(vcpu_threads_run_under_the_filter_by_default, false, |vm| {
    let rec = Recorder::new();
    let (h, evt) = vm.spawn_program(
        guests::pio(),
        DATA_ADDR,
        0x530,
        rec.clone(),
        VcpuOptions::default(),
    );
    let tid = h.tid().expect("tid");
    assert_eq!(seccomp_of(tid), 2, "the vCPU thread has no seccomp filter");
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    assert_eq!(
        seccomp_of(me),
        0,
        "the filter leaked to the spawning thread"
    );

    // Allowed work: port I/O through the handler, pause, resume, queries, exit.
    run_in_rounds(&h, &rec, 0x530, 5, 20);
    assert!(
        evt.read().is_err(),
        "the vCPU stopped: {:?}",
        h.exit_reason()
    );
    assert_eq!(h.state(), VcpuState::Paused);
    exit_and_join(h);
});

kvm_test!(disabled_mode_installs_no_filter, false, |vm| {
    let options = VcpuOptions {
        seccomp: SeccompMode::Disabled,
        ..VcpuOptions::default()
    };
    let rec = Recorder::new();
    let (h, _evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x531, rec.clone(), options);
    assert_eq!(seccomp_of(h.tid().expect("tid")), 0);
    run_in_rounds(&h, &rec, 0x531, 2, 10);
    exit_and_join(h);
});

kvm_test!(mmio_exits_work_under_the_default_filter, false, |vm| {
    // The counter lives past guest RAM: every store is an MMIO write the recorder rejects
    // (a device error, logged and counted); the guest keeps going.
    let rec = Recorder::new();
    let (h, evt) = vm.spawn_program(
        guests::counter(),
        0x30_0000,
        0x532,
        rec,
        VcpuOptions::default(),
    );
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    common::wait_until("MMIO exits", || h.metrics().exits.mmio_write >= 50);
    expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    assert!(
        evt.read().is_err(),
        "the vCPU stopped: {:?}",
        h.exit_reason()
    );
    exit_and_join(h);
});

/// What a forbidden call returned in the vCPU thread: (return value, errno).
type Outcome = Arc<OnceLock<(i64, i32)>>;

/// Runs the pio guest with the default options and a hook that makes `call` once, from the
/// vCPU thread, on the first port write. Returns the handle, the exit event and what the
/// call returned.
fn spawn_with_forbidden_call(
    vm: &TestVm,
    options: VcpuOptions,
    call: impl Fn() -> i64 + Send + Sync + 'static,
) -> (VcpuHandle, vmm_sys_util::eventfd::EventFd, Outcome) {
    let outcome: Outcome = Arc::new(OnceLock::new());
    let seen = Arc::clone(&outcome);
    let rec = Recorder::with_hook(move |_, _| {
        if seen.get().is_none() {
            let r = call();
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let _ = seen.set((r, errno));
        }
    });
    let (h, evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x533, rec, options);
    (h, evt, outcome)
}

/// The vCPU stops with a violation naming `syscall`/`name`; the call failed with EPERM.
fn expect_violation(
    h: &VcpuHandle,
    evt: &vmm_sys_util::eventfd::EventFd,
    outcome: &Outcome,
    syscall: i64,
    name: &str,
) {
    expect(h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    assert_eq!(wait_event(evt), 1);
    assert_eq!(h.state(), VcpuState::WaitingExit);
    match h.exit_reason() {
        Some(VcpuExitReason::SeccompViolation {
            vcpu_id: 0,
            syscall: nr,
            name: Some(n),
            ..
        }) => {
            assert_eq!((nr, n.as_str()), (syscall, name));
        }
        other => panic!("expected a seccomp violation of {name}, got {other:?}"),
    }
    let text = h.exit_reason().expect("reason").to_string();
    assert!(text.contains(name) && text.contains("seccomp"), "{text}");
    assert_eq!(
        outcome.get().copied(),
        Some((-1, libc::EPERM)),
        "the forbidden {name} did not fail with EPERM"
    );
}

/// The process is fine after a violation on a vCPU thread: this thread can still open
/// files and make ioctls.
fn process_is_fine(vm: &TestVm) {
    assert!(std::fs::read_to_string("/proc/self/status").is_ok());
    assert!(vm.kvm.get_vcpu_mmap_size().is_ok());
}

kvm_test!(
    ioctl_on_the_vm_fd_stops_the_vm_and_creates_nothing,
    false,
    |vm| {
        let vm_fd = vm.vm.as_raw_fd();
        let kvm_create_vcpu: libc::c_ulong = 0xae41;
        let (h, evt, outcome) = spawn_with_forbidden_call(&vm, VcpuOptions::default(), move || {
            // SAFETY: KVM_CREATE_VCPU on a VM fd takes the vCPU id by value; on success it
            // returns a new fd (which this test would leak).
            i64::from(unsafe { libc::ioctl(vm_fd, kvm_create_vcpu, 7) })
        });
        expect_violation(&h, &evt, &outcome, libc::SYS_ioctl, "ioctl");
        exit_and_join(h);
        process_is_fine(&vm);
        // The call never reached KVM: vCPU 7 can still be created.
        assert!(vm.vm.create_vcpu(7).is_ok());
    }
);

kvm_test!(
    an_ioctl_request_outside_the_list_stops_the_vm,
    false,
    |vm| {
        // On the vCPU's own fd, but not a vCPU state request: KVM_SET_CPUID2 (with a null
        // argument, which KVM would refuse with EFAULT).
        let vcpu_fd = Arc::new(Mutex::new(None::<RawFd>));
        let fd_for_hook = Arc::clone(&vcpu_fd);
        let kvm_set_cpuid2: libc::c_ulong = 0x4008_ae90;
        vm.load(guests::pio(), common::CODE_ADDR);
        let vcpu = vm.new_cpl3_vcpu(0, common::CODE_ADDR, DATA_ADDR, 0x534, 0);
        *vcpu_fd.lock().expect("lock") = Some(vcpu.as_raw_fd());
        let outcome: Outcome = Arc::new(OnceLock::new());
        let seen = Arc::clone(&outcome);
        let rec = Recorder::with_hook(move |_, _| {
            let fd = fd_for_hook.lock().expect("lock").expect("fd");
            if seen.get().is_none() {
                // SAFETY: an ioctl with a null argument on a vCPU fd: KVM would fail with EFAULT.
                let r = unsafe { libc::ioctl(fd, kvm_set_cpuid2, std::ptr::null_mut::<u8>()) };
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                let _ = seen.set((i64::from(r), errno));
            }
        });
        let (h, evt) = vm.spawn(0, vcpu, rec, VcpuOptions::default());
        expect_violation(&h, &evt, &outcome, libc::SYS_ioctl, "ioctl");
        exit_and_join(h);
    }
);

kvm_test!(open_stops_the_vm, false, |vm| {
    let (h, evt, outcome) = spawn_with_forbidden_call(&vm, VcpuOptions::default(), || {
        let path = c"/proc/self/status";
        // SAFETY: a NUL-terminated path; the fd (if any) is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
        }
        i64::from(fd)
    });
    // glibc's open() is the openat system call.
    expect_violation(&h, &evt, &outcome, libc::SYS_openat, "openat");
    exit_and_join(h);
    process_is_fine(&vm);
});

kvm_test!(executable_memory_stops_the_vm, false, |vm| {
    let (h, evt, outcome) = spawn_with_forbidden_call(&vm, VcpuOptions::default(), || {
        // SAFETY: a new anonymous mapping the kernel places; unmapped below if it succeeds.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return -1;
        }
        // SAFETY: unmapping what was just mapped.
        unsafe { libc::munmap(p, 4096) };
        0
    });
    expect_violation(&h, &evt, &outcome, libc::SYS_mmap, "mmap");
    exit_and_join(h);
    process_is_fine(&vm);
});

kvm_test!(a_write_to_stdout_stops_the_vm, false, |vm| {
    let (h, evt, outcome) = spawn_with_forbidden_call(&vm, VcpuOptions::default(), || {
        // SAFETY: a zero-length write from a valid pointer.
        let n = unsafe { libc::write(libc::STDOUT_FILENO, c"".as_ptr().cast(), 0) };
        i64::try_from(n).unwrap_or(i64::MIN)
    });
    expect_violation(&h, &evt, &outcome, libc::SYS_write, "write");
    exit_and_join(h);
});

kvm_test!(an_allowed_write_fd_takes_writes, false, |vm| {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    let [read_end, write_end] = fds;
    let options = VcpuOptions {
        seccomp: SeccompMode::default().with_write_fds([write_end]),
        ..VcpuOptions::default()
    };
    let rec_count = Arc::new(Mutex::new(0u32));
    let count = Arc::clone(&rec_count);
    let rec = Recorder::with_hook(move |_, _| {
        let mut c = count.lock().expect("lock");
        if *c < 8 {
            // SAFETY: a one-byte write from a valid buffer to the pipe's write end.
            let n = unsafe { libc::write(write_end, b"x".as_ptr().cast(), 1) };
            assert_eq!(n, 1, "{}", std::io::Error::last_os_error());
            *c += 1;
        }
    });
    let (h, evt) = vm.spawn_program(guests::pio(), DATA_ADDR, 0x535, rec.clone(), options);
    run_in_rounds(&h, &rec, 0x535, 2, 20);
    assert!(
        evt.read().is_err(),
        "the vCPU stopped: {:?}",
        h.exit_reason()
    );
    exit_and_join(h);
    let mut buf = [0u8; 16];
    // SAFETY: reading into a valid buffer from the pipe's read end.
    let n = unsafe { libc::read(read_end, buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, 8);
    for fd in [read_end, write_end] {
        // SAFETY: closing each fd of the pipe, once.
        unsafe { libc::close(fd) };
    }
});
