//! Pausing completes the I/O instruction of the last exit, and `SaveState` runs the VMM's
//! saver on the paused vCPU's own thread.

mod common;

use std::sync::{Arc, Condvar, Mutex};

use common::{
    expect, expect_refused, guests, kvm_test, Recorder, TestVm, CODE_ADDR, DATA_ADDR, TIMEOUT,
};
use kvm_ioctls::VcpuFd;
use vcpu_actor::{
    DeviceError, ExitHandler, IoOutcome, ReplyOutcome, SaveStateError, VcpuHandle, VcpuOptions,
    VcpuParts, VcpuRequest, VcpuState, VcpuStateSaver,
};
use vmm_sys_util::eventfd::EventFd;

const PORT: u16 = 0x518;

/// What an `in` from [`PORT`] returns after the `out` of count `n`.
fn read_value(n: u64) -> u64 {
    0x5a00_0000 | (n & 0xff_ffff)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Out,
    In,
}

#[derive(Default)]
struct GateState {
    /// Block at the next access of this kind.
    armed: Option<Access>,
    /// The count the guest had when a handler blocked.
    blocked_at: Option<u64>,
    release: bool,
    /// Every count written, in order, and how many reads there were.
    written: Vec<u64>,
    reads: u64,
}

/// The device on [`PORT`]: records writes, answers reads with [`read_value`], and can hold
/// the vCPU inside one access until the test lets it go.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gate {
    fn maybe_block(&self, mut s: std::sync::MutexGuard<'_, GateState>, access: Access, n: u64) {
        if s.armed == Some(access) {
            s.armed = None;
            s.blocked_at = Some(n);
            self.changed.notify_all();
            while !s.release {
                s = self.changed.wait(s).expect("gate lock");
            }
            s.release = false;
        }
    }

    /// Arms the gate for `access` and waits until a handler blocks there; returns the count.
    fn block_at_next(&self, access: Access) -> u64 {
        let mut s = self.state.lock().expect("gate lock");
        s.blocked_at = None;
        s.armed = Some(access);
        loop {
            if let Some(n) = s.blocked_at {
                return n;
            }
            let (guard, timeout) = self.changed.wait_timeout(s, TIMEOUT).expect("gate lock");
            assert!(
                !timeout.timed_out(),
                "the guest did not reach the {access:?}"
            );
            s = guard;
        }
    }

    fn release(&self) {
        self.state.lock().expect("gate lock").release = true;
        self.changed.notify_all();
    }

    fn written(&self) -> Vec<u64> {
        self.state.lock().expect("gate lock").written.clone()
    }

    fn reads(&self) -> u64 {
        self.state.lock().expect("gate lock").reads
    }
}

impl ExitHandler for Gate {
    fn pio_read(&self, _: u32, port: u16, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        let mut s = self.state.lock().expect("gate lock");
        let n = s.written.last().copied().unwrap_or(0);
        s.reads += 1;
        let v = if port == PORT { read_value(n) } else { 0 };
        let n_bytes = data.len().min(8);
        data[..n_bytes].copy_from_slice(&v.to_le_bytes()[..n_bytes]);
        self.maybe_block(s, Access::In, n);
        Ok(IoOutcome::Handled)
    }

    fn pio_write(&self, _: u32, _: u16, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        let mut s = self.state.lock().expect("gate lock");
        let n = common::le_value(data);
        s.written.push(n);
        self.maybe_block(s, Access::Out, n);
        Ok(IoOutcome::Handled)
    }

    fn mmio_read(&self, _: u32, addr: u64, _: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        Err(DeviceError(format!("no device at {addr:#x}")))
    }

    fn mmio_write(&self, _: u32, addr: u64, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        Err(DeviceError(format!("no device at {addr:#x}")))
    }
}

/// Saves RIP, RAX, RBX (KVM_GET_REGS) and the Linux thread id it ran on, 8 bytes each.
struct RegsSaver;

impl VcpuStateSaver for RegsSaver {
    fn save(&self, _: u32, vcpu: &VcpuFd) -> Result<Vec<u8>, String> {
        let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() };
        let tid = u64::try_from(tid).map_err(|e| e.to_string())?;
        Ok([regs.rip, regs.rax, regs.rbx, tid]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect())
    }
}

/// (rip, rax, rbx, tid) from a `SaveState` reply.
fn saved_regs(h: &VcpuHandle) -> [u64; 4] {
    let reply = h.request(VcpuRequest::SaveState, TIMEOUT).expect("reply");
    assert!(reply.is_ok(), "{reply:?}");
    let ReplyOutcome::StateSaved(bytes) = reply.outcome else {
        panic!("expected StateSaved, got {:?}", reply.outcome);
    };
    assert_eq!(bytes.len(), 32);
    let mut out = [0u64; 4];
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        out[i] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    out
}

fn spawn_inout(vm: &TestVm, gate: Arc<Gate>, options: VcpuOptions) -> VcpuHandle {
    vm.load(guests::inout(), CODE_ADDR);
    let vcpu = vm.new_cpl3_vcpu(0, CODE_ADDR, DATA_ADDR, PORT.into(), 0);
    let parts = VcpuParts {
        id: 0,
        vcpu,
        vcpu_mmap_size: vm.mmap_size,
        handler: gate,
        exit_evt: Arc::new(EventFd::new(0).expect("eventfd")),
    };
    VcpuHandle::spawn(parts, options).expect("spawn")
}

kvm_test!(pause_completes_pending_io_and_save_sees_it, false, |vm| {
    let gate = Arc::new(Gate::default());
    let options = VcpuOptions {
        state_saver: Some(Arc::new(RegsSaver)),
        ..VcpuOptions::default()
    };
    let h = spawn_inout(&vm, Arc::clone(&gate), options);
    let tid = u64::try_from(h.tid().expect("tid")).expect("tid");
    let (after_out, after_in) = guests::inout_after_out_and_in();
    expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);

    for access in [Access::Out, Access::In, Access::Out] {
        // Hold the vCPU inside the handler of one access, ask for a pause, then let it go:
        // the pause is handled right after that I/O exit.
        let n = gate.block_at_next(access);
        let pause = h.send(VcpuRequest::Pause).expect("send");
        gate.release();
        let reply = h.wait_reply(pause, TIMEOUT).expect("pause reply");
        assert_eq!(reply.outcome, ReplyOutcome::Paused);

        let [rip, rax, rbx, saved_on] = saved_regs(&h);
        assert_eq!(saved_on, tid, "the saver ran on another thread");
        assert_eq!(rbx, n, "{access:?}");
        match access {
            // The `out` is complete: RIP is past it.
            Access::Out => assert_eq!(rip, CODE_ADDR + after_out, "{access:?}"),
            // The `in` is complete: RIP is past it and RAX holds what the device returned.
            Access::In => {
                assert_eq!(rip, CODE_ADDR + after_in, "{access:?}");
                assert_eq!(rax, read_value(n), "{access:?}");
            }
        }
        expect(&h, VcpuRequest::Resume, ReplyOutcome::Resumed);
    }

    // Refused while running, nothing changes.
    expect_refused(&h, VcpuRequest::SaveState, VcpuState::Running);

    expect(&h, VcpuRequest::Pause, ReplyOutcome::Paused);
    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
    h.join(TIMEOUT).expect("join");

    // No instruction ran twice: every count was written once, in order, and read once.
    // Two `out`s were held above; more may have run since the last resume (timing).
    let written = gate.written();
    assert!(written.len() >= 2, "{written:?}");
    assert!(
        written.iter().zip(1u64..).all(|(w, i)| *w == i),
        "{:?}",
        &written[..written.len().min(20)]
    );
    let reads = gate.reads();
    let len = written.len() as u64;
    assert!(
        reads == len || reads + 1 == len,
        "{reads} reads, {len} writes"
    );
});

kvm_test!(save_state_without_a_saver_is_refused_typed, false, |vm| {
    let h = vm
        .spawn_program(
            guests::pio(),
            DATA_ADDR,
            0x519,
            Recorder::new(),
            VcpuOptions::default(),
        )
        .0;
    // Paused from the start: allowed, but there is no saver.
    let reply = h.request(VcpuRequest::SaveState, TIMEOUT).expect("reply");
    assert_eq!(
        reply.outcome,
        ReplyOutcome::SaveFailed(SaveStateError::NoSaver)
    );
    assert!(!reply.is_ok());
    assert!(
        SaveStateError::NoSaver
            .to_string()
            .contains("VcpuOptions::state_saver"),
        "the error says what to do"
    );
    expect(&h, VcpuRequest::Exit, ReplyOutcome::Exited);
    // Not allowed once exited.
    let reply = h.request(VcpuRequest::SaveState, TIMEOUT);
    assert!(
        !matches!(reply, Ok(ref r) if r.is_ok()),
        "save after exit: {reply:?}"
    );
    h.join(TIMEOUT).expect("join");
});
