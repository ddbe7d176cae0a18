//! The vCPU thread: its start, its loop around `KVM_RUN`, and why it leaves the loop.
//! Requests are handled in `mailbox`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use slog::{debug, error, info, warn, Logger};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Receiver, Sender};
use crate::handle::panic_message;
use crate::handle::{Envelope, Shared};
use crate::kick;
use crate::metrics::ExitKind;
use crate::seccomp;
use crate::state::{transition, Event, Transition};
use crate::{
    DeviceError, ExitHandler, IoAccess, IoOutcome, VcpuExitReason, VcpuState, VcpuStateSaver,
};

// `kvm_system_event.type` values (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// How many `KVM_RUN`s with `immediate_exit` a pause spends at most to complete pending I/O
/// (one, unless completing an access needs another user-space exit, e.g. an MMIO access KVM
/// splits in two).
const MAX_COMPLETION_RUNS: usize = 8;

/// What one trip through `KVM_RUN` asks the loop to do next.
pub(crate) enum Step {
    /// Look at the mailbox and run again.
    Continue,
    /// Go to `WaitingExit` for this reason (built once the exit borrow has ended).
    Stop(LoopEnd),
}

/// Why the run loop ends its `Running` phase: the raw material of a [`VcpuExitReason`].
pub(crate) enum LoopEnd {
    Shutdown,
    Reset,
    TripleFault,
    InternalError,
    FailEntry(u64),
    Unknown(Option<u32>),
    DeviceStop,
    DevicePanic {
        access: IoAccess,
        addr: u64,
        message: String,
    },
    RunError(i32),
    /// The thread made this forbidden system call (seccomp, `ViolationAction::StopVm`).
    Seccomp(i64),
}

/// Why a vCPU thread did not get ready (it hands the fd back first).
#[derive(Debug)]
pub(crate) enum StartFailure {
    /// The caller's setup failed.
    Setup(Box<dyn std::error::Error + Send + Sync>),
    /// `sched_setaffinity` failed.
    Affinity(String),
    /// `KVM_SET_SIGNAL_MASK` (or blocking the kick signal) failed.
    KickMask(std::io::Error),
    /// The seccomp filter could not be installed.
    Seccomp(String),
}

/// Everything the vCPU thread owns.
pub(crate) struct VcpuThread {
    pub(crate) shared: Arc<Shared>,
    pub(crate) vcpu: VcpuFd,
    handler: Arc<dyn ExitHandler>,
    /// Shared with the [`FinishGuard`]: one fd, which the seccomp filter lets the thread
    /// write and close.
    exit_evt: Arc<EventFd>,
    pub(crate) mailbox: Receiver<Envelope>,
    pub(crate) logger: Logger,
    /// The thread's own copy of the state; published to `shared.state` on every change.
    pub(crate) state: VcpuState,
    /// Answers `SaveState`.
    pub(crate) state_saver: Option<Arc<dyn VcpuStateSaver>>,
    /// The last `KVM_RUN` ended in an I/O exit whose instruction KVM completes only on the
    /// next `KVM_RUN` (see [`complete_pending_io`](Self::complete_pending_io)).
    io_pending: bool,
    /// When the vCPU was last paused (from `Running`).
    pub(crate) paused_at: Option<Instant>,
    /// A resume after a long pause was acknowledged: `KVM_KVMCLOCK_CTRL` is due before the
    /// next `KVM_RUN` (see `mailbox::KVMCLOCK_NOTICE_AFTER`).
    pub(crate) kvmclock_due: bool,
}

/// What the thread does before it reports ready (see [`VcpuThread::run`]).
pub(crate) struct ThreadStart {
    /// The caller's setup of the vCPU, if any.
    pub(crate) setup: Option<crate::VcpuSetup>,
    /// The host CPUs to pin the thread to, if any.
    pub(crate) affinity: Option<Vec<usize>>,
    /// The seccomp filter, if any.
    pub(crate) filter: Option<seccompiler::BpfProgram>,
    /// Go on to `Running` once ready, without waiting for `Resume`.
    pub(crate) run: bool,
}

/// Sets `finished` and wakes all waiters when the thread ends, even by a panic.
struct FinishGuard {
    shared: Arc<Shared>,
    exit_evt: Option<Arc<EventFd>>,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.state.store(VcpuState::Exited);
            if let Some(evt) = &self.exit_evt {
                let _ = evt.write(1);
            }
        }
        self.shared.lock_replies().finished = true;
        self.shared.reply_ready.notify_all();
    }
}

impl VcpuThread {
    pub(crate) fn new(
        shared: Arc<Shared>,
        vcpu: VcpuFd,
        handler: Arc<dyn ExitHandler>,
        exit_evt: Arc<EventFd>,
        mailbox: Receiver<Envelope>,
        logger: &Logger,
        state_saver: Option<Arc<dyn VcpuStateSaver>>,
    ) -> Self {
        VcpuThread {
            shared,
            vcpu,
            handler,
            exit_evt,
            mailbox,
            logger: logger.clone(),
            state: VcpuState::Paused,
            state_saver,
            io_pending: false,
            paused_at: None,
            kvmclock_due: false,
        }
    }

    /// The body of the thread: get ready (kick signal, CPU affinity, seccomp), report, loop,
    /// hand the fd back through `done`.
    pub(crate) fn run(
        mut self,
        start: ThreadStart,
        ready: Sender<Result<(), StartFailure>>,
        done: Sender<VcpuFd>,
    ) {
        // No exit event for a thread that never became ready (even one whose setup panics).
        let mut guard = FinishGuard {
            shared: Arc::clone(&self.shared),
            exit_evt: None,
        };
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.shared.tid.store(tid, Ordering::Relaxed);
        let run = start.run;
        if let Err(failure) = self.get_ready(start) {
            // The fd goes back to the spawner, which may create this vCPU again.
            let _ = done.send(self.vcpu);
            let _ = ready.send(Err(failure));
            return;
        }
        // The shared EventFd itself, not a duplicate: no fd is opened on this thread.
        guard.exit_evt = Some(Arc::clone(&self.exit_evt));
        if run {
            // Before the ready answer, so that the handle it completes reads `Running`. The
            // first KVM_RUN comes only after the answer went through: a spawner that gave up
            // before it gets no vCPU in KVM_RUN (one that gives up after it kicks, see
            // `GiveUpKick`).
            self.start_running();
        }
        if ready.send(Ok(())).is_err() {
            return;
        }
        drop(ready);

        self.main_loop();

        // Answer what is still queued (in state Exited: Exit and queries succeed, the rest is
        // not allowed), then close the mailbox so that later senders learn at once.
        while let Ok(env) = self.mailbox.try_recv() {
            self.handle(env);
        }
        let VcpuThread {
            vcpu,
            mailbox,
            logger,
            ..
        } = self;
        drop(mailbox);
        info!(logger, "vCPU thread exits");
        let _ = done.send(vcpu);
        drop(guard);
    }

    /// The kick signal's mask, the caller's setup, the CPU affinity and the seccomp filter, in
    /// that order: all before the filter, which allows neither their ioctls nor
    /// `sched_setaffinity`.
    fn get_ready(&self, start: ThreadStart) -> Result<(), StartFailure> {
        kick::deliver_only_in_kvm_run(&self.vcpu, self.shared.kick_signal).map_err(|e| {
            error!(self.logger, "cannot set the vCPU's signal mask"; "error" => %e);
            StartFailure::KickMask(e)
        })?;
        if let Some(setup) = start.setup {
            setup(&self.vcpu).map_err(|e| {
                error!(self.logger, "setting the vCPU up failed"; "error" => %e);
                StartFailure::Setup(e)
            })?;
        }
        if let Some(cpus) = &start.affinity {
            crate::affinity::set_current_thread_affinity(cpus).map_err(|e| {
                error!(self.logger, "cannot pin the vCPU thread"; "cpus" => ?cpus, "error" => %e);
                StartFailure::Affinity(e)
            })?;
            debug!(self.logger, "vCPU thread pinned"; "cpus" => ?cpus);
        }
        seccomp::prepare_thread();
        if let Some(prog) = &start.filter {
            seccompiler::apply_filter(prog).map_err(|e| {
                error!(self.logger, "cannot install the seccomp filter"; "error" => %e);
                StartFailure::Seccomp(e.to_string())
            })?;
            debug!(self.logger, "seccomp filter installed"; "instructions" => prog.len());
        }
        Ok(())
    }

    fn main_loop(&mut self) {
        loop {
            match self.state {
                VcpuState::Exited => return,
                VcpuState::Paused | VcpuState::WaitingExit => match self.mailbox.recv() {
                    Ok(env) => self.handle(env),
                    // Every handle is gone: nobody can ask for anything any more.
                    Err(_) => self.set_state(VcpuState::Exited),
                },
                VcpuState::Running => {
                    // T1 then T2 of the kick protocol (see the `kick` module): the mailbox
                    // is looked at only when a sender has set immediate_exit.
                    let kicked = self.shared.kvm_run.clear_immediate_exit();
                    if kicked {
                        self.drain_mailbox();
                    }
                    if self.state != VcpuState::Running {
                        continue;
                    }
                    // T3. A seccomp violation (made while paused, or by the exit just
                    // handled) stops the vCPU before it enters the guest again.
                    let step = match seccomp::take_violation() {
                        Some(nr) => Step::Stop(LoopEnd::Seccomp(nr)),
                        None => match self.run_once() {
                            Step::Continue => seccomp::take_violation()
                                .map_or(Step::Continue, |nr| Step::Stop(LoopEnd::Seccomp(nr))),
                            stop => stop,
                        },
                    };
                    match step {
                        Step::Continue => {}
                        Step::Stop(end) => self.enter_waiting_exit(end),
                    }
                }
            }
        }
    }

    pub(crate) fn set_state(&mut self, s: VcpuState) {
        self.state = s;
        self.shared.state.store(s);
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> Step {
        let id = self.shared.id;
        let start = Instant::now();
        let result = self.vcpu.run();
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let metrics = &self.shared.metrics;
        metrics.add_run_time_ns(ns);
        let handler = &*self.handler;
        // A panicking handler must not take the thread (and the vCPU fd) with it: the panic
        // is caught here and stops this vCPU with a reason naming the device access.
        let device = |r: Result<Result<IoOutcome, DeviceError>, String>,
                      access: IoAccess,
                      addr: u64| match r {
            Ok(Ok(IoOutcome::Handled)) => Step::Continue,
            Ok(Ok(IoOutcome::StopVm)) => Step::Stop(LoopEnd::DeviceStop),
            Ok(Err(e)) => {
                let n = metrics.count_device_error();
                // Rate-limited: a guest can hammer a failing device.
                if n <= 16 || n.is_power_of_two() {
                    warn!(self.logger, "device error"; "access" => %access,
                          "address" => format!("{addr:#x}"), "error" => %e, "count" => n);
                }
                Step::Continue
            }
            Err(message) => Step::Stop(LoopEnd::DevicePanic {
                access,
                addr,
                message,
            }),
        };
        // The four I/O exits leave their instruction for the next KVM_RUN to complete.
        let mut io = false;
        let step = match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                io = true;
                metrics.count_exit(ExitKind::IoIn);
                let r = guarded_read(data, |data| handler.pio_read(id, port, data));
                device(r, IoAccess::PioRead, port.into())
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                io = true;
                metrics.count_exit(ExitKind::IoOut);
                let r = guarded(|| handler.pio_write(id, port, data));
                device(r, IoAccess::PioWrite, port.into())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                io = true;
                metrics.count_exit(ExitKind::MmioRead);
                let r = guarded_read(data, |data| handler.mmio_read(id, addr, data));
                device(r, IoAccess::MmioRead, addr)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                io = true;
                metrics.count_exit(ExitKind::MmioWrite);
                let r = guarded(|| handler.mmio_write(id, addr, data));
                device(r, IoAccess::MmioWrite, addr)
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel irqchip. KVM resumes the guest after the `hlt`
                // on the next KVM_RUN; nothing else can wake it, so carry on.
                metrics.count_exit(ExitKind::Hlt);
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                metrics.count_exit(ExitKind::Shutdown);
                Step::Stop(LoopEnd::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                metrics.count_exit(ExitKind::SystemEvent);
                Step::Stop(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_CRASH => LoopEnd::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => LoopEnd::Reset,
                    _ => LoopEnd::Unknown(Some(kvm_bindings::KVM_EXIT_SYSTEM_EVENT)),
                })
            }
            Ok(VcpuExit::InternalError) => {
                metrics.count_exit(ExitKind::InternalError);
                Step::Stop(LoopEnd::InternalError)
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                metrics.count_exit(ExitKind::FailEntry);
                Step::Stop(LoopEnd::FailEntry(reason))
            }
            Ok(VcpuExit::Unsupported(exit)) => {
                metrics.count_exit(ExitKind::Unknown);
                Step::Stop(LoopEnd::Unknown(Some(exit)))
            }
            Ok(_) => {
                metrics.count_exit(ExitKind::Unknown);
                Step::Stop(LoopEnd::Unknown(None))
            }
            Err(e) if e.errno() == libc::EINTR => {
                metrics.count_exit(ExitKind::Eintr);
                // Take the kick off the queue first, then let senders signal again (the
                // order `VcpuHandle::kick` relies on).
                kick::take_queued(self.shared.kick_signal);
                self.shared.kick_queued.store(false, Ordering::SeqCst);
                Step::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => {
                metrics.count_exit(ExitKind::Eagain);
                Step::Continue
            }
            Err(e) => Step::Stop(LoopEnd::RunError(e.errno())),
        };
        self.io_pending = io;
        step
    }

    /// Completes the I/O instruction of the last exit, if any, without running guest code.
    ///
    /// KVM finishes a port-I/O or MMIO instruction (RIP past it, an `in`'s or MMIO read's data
    /// in its register) only on the next `KVM_RUN`: until then the registers show it undone,
    /// and that pending part is in no state user space can save. A `KVM_RUN` with
    /// `immediate_exit` set completes it and then returns `EINTR` at once (KVM's documented
    /// way to do this), so a vCPU that reports `paused` has registers that hold the completed
    /// instruction. Returns why the vCPU must stop instead, if completing ran into such an
    /// exit (a device asked to stop, or panicked).
    pub(crate) fn complete_pending_io(&mut self) -> Option<LoopEnd> {
        for _ in 0..MAX_COMPLETION_RUNS {
            if !self.io_pending {
                return None;
            }
            // Left set afterwards: a sender's kick that lands meanwhile is not lost (a paused
            // thread reads its mailbox anyway, and the next T1 clears the flag).
            self.shared.kvm_run.request_immediate_exit();
            if let Step::Stop(end) = self.run_once() {
                return Some(end);
            }
        }
        if self.io_pending {
            warn!(self.logger, "I/O still pending after the completion runs; pausing anyway";
                  "runs" => MAX_COMPLETION_RUNS);
        }
        None
    }

    pub(crate) fn enter_waiting_exit(&mut self, end: LoopEnd) {
        let vcpu_id = self.shared.id;
        let rip = match self.vcpu.get_regs() {
            Ok(regs) => regs.rip,
            Err(e) => {
                warn!(self.logger, "cannot read RIP for the exit reason; reporting 0";
                      "error" => %e);
                0
            }
        };
        let reason = match end {
            LoopEnd::Shutdown => VcpuExitReason::GuestShutdown { vcpu_id, rip },
            LoopEnd::Reset => VcpuExitReason::GuestReset { vcpu_id, rip },
            LoopEnd::TripleFault => VcpuExitReason::TripleFault { vcpu_id, rip },
            LoopEnd::InternalError => {
                // SAFETY: exit_reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
                // member KVM filled in.
                let suberror =
                    unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                VcpuExitReason::InternalError {
                    vcpu_id,
                    rip,
                    suberror,
                }
            }
            LoopEnd::FailEntry(reason) => VcpuExitReason::FailEntry {
                vcpu_id,
                rip,
                reason,
            },
            LoopEnd::Unknown(exit) => VcpuExitReason::Unknown {
                vcpu_id,
                rip,
                exit: exit.unwrap_or_else(|| self.vcpu.get_kvm_run().exit_reason),
            },
            LoopEnd::DeviceStop => VcpuExitReason::DeviceRequestedStop { vcpu_id, rip },
            LoopEnd::DevicePanic {
                access,
                addr,
                message,
            } => VcpuExitReason::DevicePanicked {
                vcpu_id,
                rip,
                access,
                addr,
                message,
            },
            LoopEnd::RunError(errno) => VcpuExitReason::KvmRunError { vcpu_id, errno },
            LoopEnd::Seccomp(syscall) => VcpuExitReason::SeccompViolation {
                vcpu_id,
                rip,
                syscall,
                name: seccomp::syscall_name(syscall).map(str::to_owned),
            },
        };
        if let Transition::To(to) = transition(self.state, Event::FatalExit) {
            error!(self.logger, "vCPU stopped, waiting for exit"; "reason" => %reason);
            // The reason is published before the state, so whoever sees WaitingExit sees it.
            let _ = self.shared.exit_reason.set(reason);
            self.set_state(to);
            if let Err(e) = self.exit_evt.write(1) {
                error!(self.logger, "cannot signal the exit event"; "error" => %e);
            }
        }
    }
}

/// A device read through [`guarded`]: when it fails or panics, the guest reads all ones (as
/// from a missing device), never what the handler left half-written.
fn guarded_read(
    data: &mut [u8],
    read: impl FnOnce(&mut [u8]) -> Result<IoOutcome, DeviceError>,
) -> Result<Result<IoOutcome, DeviceError>, String> {
    let r = guarded(|| read(data));
    if !matches!(r, Ok(Ok(_))) {
        data.fill(0xff);
    }
    r
}

/// Runs an exit handler method, catching a panic (as its message) so that it cannot unwind
/// through the vCPU thread. The handler is only borrowed: whatever it left half-done stays
/// the device's business, and the vCPU stops for good (`waiting_exit`), so nothing of this
/// thread observes a broken invariant afterwards.
pub(crate) fn guarded<R>(call: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))
        .map_err(|payload| panic_message(payload.as_ref()))
}
