//! The vCPU thread and its handle.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use kvm_ioctls::{VcpuExit, VcpuFd};
use slog::{debug, error, info, o, warn, Logger};
use vmm_sys_util::eventfd::EventFd;

use crate::kick::{self, KvmRunMapping};
use crate::metrics::{ExitKind, VcpuMetrics};
use crate::state::{transition, AtomicVcpuState, Event, Transition};
use crate::{
    DeviceError, ExitHandler, IoOutcome, ReplyOutcome, RequestId, SeccompMode, VcpuError,
    VcpuExitReason, VcpuMetricsSnapshot, VcpuReply, VcpuRequest, VcpuState,
};

/// At most this many replies wait unclaimed per vCPU; older ones are dropped (with a warning).
const MAX_UNCLAIMED_REPLIES: usize = 4096;

/// How long `spawn` waits for the new thread to report that it is ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

// `kvm_system_event.type` values (include/uapi/linux/kvm.h).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// How a vCPU actor is set up.
#[derive(Debug, Clone)]
pub struct VcpuOptions {
    /// Where the actor logs; the vCPU id is added to its context as `vcpu`.
    pub logger: Logger,
    /// Whether the thread confines itself with seccomp before its first `KVM_RUN`.
    pub seccomp: SeccompMode,
    /// The kick signal is `SIGRTMIN + kick_signal_offset` (default 0). Its handler is installed
    /// once per process; pick another offset if something else in the process uses it.
    pub kick_signal_offset: i32,
    /// Stack size of the vCPU thread in bytes (`None`: the Rust default, 2 MiB).
    pub stack_size: Option<usize>,
}

impl Default for VcpuOptions {
    fn default() -> Self {
        VcpuOptions {
            logger: Logger::root(slog::Discard, o!()),
            seccomp: SeccompMode::Disabled,
            kick_signal_offset: 0,
            stack_size: None,
        }
    }
}

/// A request as it travels through the mailbox.
#[derive(Debug, Clone, Copy)]
struct Envelope {
    id: RequestId,
    request: VcpuRequest,
}

/// Replies not yet claimed by `wait_reply`.
#[derive(Debug, Default)]
struct ReplyBox {
    replies: BTreeMap<u64, VcpuReply>,
    /// The thread has dropped its mailbox: no further replies will come.
    finished: bool,
}

/// What the handle and the thread share.
#[derive(Debug)]
struct Shared {
    id: u32,
    state: AtomicVcpuState,
    metrics: VcpuMetrics,
    /// 0 until the thread has started.
    tid: AtomicI32,
    exit_reason: OnceLock<VcpuExitReason>,
    replies: Mutex<ReplyBox>,
    reply_ready: Condvar,
    kvm_run: KvmRunMapping,
}

impl Shared {
    fn lock_replies(&self) -> MutexGuard<'_, ReplyBox> {
        // A poisoned lock only means a waiter panicked; the map itself is consistent.
        self.replies.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A failed [`VcpuActor::spawn_keeping_fd`]: why, and the vCPU fd when it could be kept.
#[derive(Debug)]
pub struct SpawnFailure {
    /// Why the actor did not start.
    pub error: VcpuError,
    /// The vCPU fd, unless it was lost with a thread that could not be created or did not
    /// answer in time.
    pub vcpu: Option<VcpuFd>,
}

/// Spawns vCPU actor threads. See the crate documentation for an example.
#[derive(Debug)]
pub struct VcpuActor;

impl VcpuActor {
    /// Spawns thread `vcpu{id}`, which owns `vcpu` and answers messages sent through the
    /// returned handle. The actor starts [`VcpuState::Paused`]: the guest does not run until
    /// [`VcpuRequest::Resume`].
    ///
    /// `vcpu_mmap_size` is `Kvm::get_vcpu_mmap_size()`. `exit_evt` is written once when the
    /// vCPU reaches [`VcpuState::WaitingExit`] (or its thread dies). If a seccomp filter is
    /// configured, the thread installs it before returning from here, so a filter that cannot
    /// be built or installed is reported as an error.
    pub fn spawn(
        id: u32,
        vcpu: VcpuFd,
        vcpu_mmap_size: usize,
        handler: Arc<dyn ExitHandler>,
        exit_evt: EventFd,
        options: VcpuOptions,
    ) -> Result<VcpuHandle, VcpuError> {
        Self::spawn_keeping_fd(id, vcpu, vcpu_mmap_size, handler, exit_evt, options)
            .map_err(|failure| failure.error)
    }

    /// [`spawn`](Self::spawn), but a failure gives the vCPU fd back where it can
    /// ([`SpawnFailure::vcpu`]): KVM cannot destroy a vCPU, so a VMM that loses the fd can
    /// never create a vCPU with that id again.
    pub fn spawn_keeping_fd(
        id: u32,
        vcpu: VcpuFd,
        vcpu_mmap_size: usize,
        handler: Arc<dyn ExitHandler>,
        exit_evt: EventFd,
        options: VcpuOptions,
    ) -> Result<VcpuHandle, SpawnFailure> {
        let logger = options.logger.new(o!("vcpu" => id));
        // Everything that can fail before the thread owns the fd.
        let prepared = kick::kick_signal(options.kick_signal_offset).and_then(|signal| {
            let filter = options
                .seccomp
                .compile()
                .map_err(|reason| VcpuError::SeccompBuild {
                    vcpu_id: id,
                    reason,
                })?;
            let kvm_run = KvmRunMapping::new(id, vcpu.as_raw_fd(), vcpu_mmap_size)?;
            Ok((signal, filter, kvm_run))
        });
        let (kick_signal, filter, kvm_run) = match prepared {
            Ok(p) => p,
            Err(error) => {
                return Err(SpawnFailure {
                    error,
                    vcpu: Some(vcpu),
                })
            }
        };
        let shared = Arc::new(Shared {
            id,
            state: AtomicVcpuState::new(VcpuState::Paused),
            metrics: VcpuMetrics::default(),
            tid: AtomicI32::new(0),
            exit_reason: OnceLock::new(),
            replies: Mutex::new(ReplyBox::default()),
            reply_ready: Condvar::new(),
            kvm_run,
        });
        let (tx, rx) = crossbeam_channel::unbounded::<Envelope>();
        let (done_tx, done_rx) = crossbeam_channel::bounded::<VcpuFd>(1);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(1);

        let thread = VcpuThread {
            shared: Arc::clone(&shared),
            vcpu,
            handler,
            exit_evt,
            mailbox: rx,
            logger: logger.clone(),
            state: VcpuState::Paused,
        };
        let mut builder = std::thread::Builder::new().name(format!("vcpu{id}"));
        if let Some(size) = options.stack_size {
            builder = builder.stack_size(size);
        }
        let join = builder
            .spawn(move || thread.run(kick_signal, filter, ready_tx, done_tx))
            .map_err(|source| SpawnFailure {
                error: VcpuError::SpawnThread {
                    vcpu_id: id,
                    source,
                },
                vcpu: None,
            })?;

        let started = match ready_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(VcpuError::SeccompApply {
                vcpu_id: id,
                reason,
            }),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::StartupTimeout {
                vcpu_id: id,
                timeout: STARTUP_TIMEOUT,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::ThreadPanicked {
                vcpu_id: id,
                message: "the thread ended before it was ready".to_string(),
            }),
        };
        if let Err(error) = started {
            // The thread ends on its own once its mailbox is gone (or has already ended); a
            // thread that failed to install its filter hands the fd back first.
            drop(tx);
            let vcpu = done_rx.recv_timeout(STARTUP_TIMEOUT).ok();
            let _ = join.join();
            return Err(SpawnFailure { error, vcpu });
        }
        debug!(logger, "vCPU thread started"; "tid" => shared.tid.load(Ordering::Relaxed));
        Ok(VcpuHandle {
            pthread: join.as_pthread_t(),
            join: Some(join),
            shared,
            tx,
            done_rx,
            next_id: AtomicU64::new(0),
            kick_signal,
            logger,
        })
    }
}

/// The manager's end of one vCPU actor. `Send + Sync`: any thread may send requests and wait
/// for their replies. Dropping the handle without [`join`](Self::join) asks the thread to
/// exit and detaches it.
#[derive(Debug)]
pub struct VcpuHandle {
    shared: Arc<Shared>,
    tx: Sender<Envelope>,
    done_rx: Receiver<VcpuFd>,
    join: Option<JoinHandle<()>>,
    /// Valid while `join` is `Some` (the thread is not joined, so the id is not reused).
    pthread: libc::pthread_t,
    next_id: AtomicU64,
    kick_signal: libc::c_int,
    logger: Logger,
}

impl VcpuHandle {
    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Enqueues `req` and kicks the thread out of `KVM_RUN` so that it sees it promptly.
    /// The reply is taken with [`wait_reply`](Self::wait_reply).
    pub fn send(&self, req: VcpuRequest) -> Result<RequestId, VcpuError> {
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.tx
            .send(Envelope { id, request: req })
            .map_err(|_| self.thread_gone())?;
        self.kick();
        Ok(id)
    }

    /// Makes the thread leave `KVM_RUN` (if it is in it) and look at its mailbox; see the
    /// ordering argument in the `kick` module.
    fn kick(&self) {
        self.shared.kvm_run.request_immediate_exit();
        if self.shared.state.load() == VcpuState::Running && self.join.is_some() {
            // SAFETY: `pthread` belongs to a thread that has not been joined (`join` is Some),
            // so the id is valid even if the thread has ended (pthread_kill then says ESRCH).
            let rc = unsafe { libc::pthread_kill(self.pthread, self.kick_signal) };
            if rc != 0 && rc != libc::ESRCH {
                warn!(self.logger, "cannot signal the vCPU thread";
                      "signal" => self.kick_signal, "errno" => rc);
            }
        }
    }

    fn thread_gone(&self) -> VcpuError {
        VcpuError::ThreadGone {
            vcpu_id: self.shared.id,
            state: self.shared.state.load(),
        }
    }

    /// Waits up to `timeout` for the reply to request `id` and takes it (each reply can be
    /// taken once).
    pub fn wait_reply(&self, id: RequestId, timeout: Duration) -> Result<VcpuReply, VcpuError> {
        if id.0 >= self.next_id.load(Ordering::Relaxed) {
            return Err(VcpuError::UnknownRequest {
                vcpu_id: self.shared.id,
                request_id: id,
            });
        }
        let deadline = Instant::now().checked_add(timeout);
        let mut replies = self.shared.lock_replies();
        loop {
            if let Some(reply) = replies.replies.remove(&id.0) {
                return Ok(reply);
            }
            if replies.finished {
                return Err(self.thread_gone());
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d > now => d - now,
                Some(_) => {
                    return Err(VcpuError::ReplyTimeout {
                        vcpu_id: self.shared.id,
                        request_id: id,
                        timeout,
                        state: self.shared.state.load(),
                    })
                }
                // A timeout too large for Instant: wait in long slices.
                None => Duration::from_secs(3600),
            };
            replies = self
                .shared
                .reply_ready
                .wait_timeout(replies, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// [`send`](Self::send) then [`wait_reply`](Self::wait_reply).
    pub fn request(&self, req: VcpuRequest, timeout: Duration) -> Result<VcpuReply, VcpuError> {
        let id = self.send(req)?;
        self.wait_reply(id, timeout)
    }

    /// The state last published by the thread (a lock-free read).
    pub fn state(&self) -> VcpuState {
        self.shared.state.load()
    }

    /// Why the vCPU went to [`VcpuState::WaitingExit`], once it has.
    pub fn exit_reason(&self) -> Option<VcpuExitReason> {
        self.shared.exit_reason.get().cloned()
    }

    /// A copy of the vCPU's counters.
    pub fn metrics(&self) -> VcpuMetricsSnapshot {
        self.shared.metrics.snapshot(self.shared.id)
    }

    /// The Linux thread id of the vCPU thread (known once `spawn` has returned).
    pub fn tid(&self) -> Option<i32> {
        match self.shared.tid.load(Ordering::Relaxed) {
            0 => None,
            tid => Some(tid),
        }
    }

    /// Waits up to `timeout` for the thread to end and gives the vCPU fd back. If the actor
    /// has not exited yet, `Exit` is sent first.
    pub fn join(mut self, timeout: Duration) -> Result<VcpuFd, VcpuError> {
        if self.shared.state.load() != VcpuState::Exited {
            // The thread may be gone already; what matters is what done_rx says.
            let _ = self.send(VcpuRequest::Exit);
        }
        let id = self.shared.id;
        match self.done_rx.recv_timeout(timeout) {
            Ok(fd) => {
                if let Some(join) = self.join.take() {
                    // The thread sent the fd as its last act; this returns promptly.
                    let _ = join.join();
                }
                Ok(fd)
            }
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::JoinTimeout {
                vcpu_id: id,
                timeout,
                state: self.shared.state.load(),
            }),
            Err(RecvTimeoutError::Disconnected) => {
                let message = match self.join.take().map(JoinHandle::join) {
                    Some(Err(payload)) => panic_message(payload.as_ref()),
                    _ => "the thread ended without giving the vCPU fd back".to_string(),
                };
                Err(VcpuError::ThreadPanicked {
                    vcpu_id: id,
                    message,
                })
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.join.is_some() && self.shared.state.load() != VcpuState::Exited {
            debug!(
                self.logger,
                "handle dropped without join: asking the vCPU thread to exit"
            );
            let _ = self.send(VcpuRequest::Exit);
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

/// What one trip through `KVM_RUN` asks the loop to do next.
enum Step {
    /// Look at the mailbox and run again.
    Continue,
    /// Go to `WaitingExit` for this reason (built once the exit borrow has ended).
    Stop(StopCause),
}

enum StopCause {
    Shutdown,
    Reset,
    TripleFault,
    InternalError,
    FailEntry(u64),
    Unknown(Option<u32>),
    DeviceStop,
    RunError(i32),
}

/// Everything the vCPU thread owns.
struct VcpuThread {
    shared: Arc<Shared>,
    vcpu: VcpuFd,
    handler: Arc<dyn ExitHandler>,
    exit_evt: EventFd,
    mailbox: Receiver<Envelope>,
    logger: Logger,
    /// The thread's own copy of the state; published to `shared.state` on every change.
    state: VcpuState,
}

/// Sets `finished` and wakes all waiters when the thread ends, even by a panic.
struct FinishGuard {
    shared: Arc<Shared>,
    exit_evt: Option<EventFd>,
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
    fn run(
        mut self,
        kick_signal: libc::c_int,
        filter: Option<seccompiler::BpfProgram>,
        ready: Sender<Result<(), String>>,
        done: Sender<VcpuFd>,
    ) {
        let mut guard = FinishGuard {
            shared: Arc::clone(&self.shared),
            exit_evt: self.exit_evt.try_clone().ok(),
        };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
        self.shared.tid.store(tid, Ordering::Relaxed);
        kick::unblock_in_current_thread(kick_signal);
        if let Some(prog) = &filter {
            if let Err(e) = seccompiler::apply_filter(prog) {
                error!(self.logger, "cannot install the seccomp filter"; "error" => %e);
                // No exit event for a thread that never became ready.
                guard.exit_evt = None;
                // The fd goes back to the spawner, which may create this vCPU again.
                let _ = done.send(self.vcpu);
                let _ = ready.send(Err(e.to_string()));
                return;
            }
            debug!(self.logger, "seccomp filter installed"; "instructions" => prog.len());
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
                    // T3.
                    match self.run_once() {
                        Step::Continue => {}
                        Step::Stop(cause) => self.enter_waiting_exit(cause),
                    }
                }
            }
        }
    }

    /// Handles every queued request (T2 of the kick protocol).
    fn drain_mailbox(&mut self) {
        loop {
            match self.mailbox.try_recv() {
                Ok(env) => self.handle(env),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.set_state(VcpuState::Exited);
                    return;
                }
            }
        }
    }

    fn set_state(&mut self, s: VcpuState) {
        self.state = s;
        self.shared.state.store(s);
    }

    fn not_allowed(&self, req: VcpuRequest) -> String {
        format!(
            "vCPU {}: {req} is not allowed in state {}{}",
            self.shared.id,
            self.state,
            match self.state {
                VcpuState::WaitingExit => "; only exit is (the guest stopped)",
                VcpuState::Exited => "; the vCPU thread has ended",
                _ => "",
            }
        )
    }

    fn handle(&mut self, env: Envelope) {
        let outcome = match env.request {
            VcpuRequest::GetTid => ReplyOutcome::Tid(self.shared.tid.load(Ordering::Relaxed)),
            VcpuRequest::GetState => ReplyOutcome::State(self.state),
            VcpuRequest::Resume => self.apply(Event::Resume, env.request, ReplyOutcome::Resumed),
            VcpuRequest::Pause => self.apply(Event::Pause, env.request, ReplyOutcome::Paused),
            VcpuRequest::Exit => self.apply(Event::Exit, env.request, ReplyOutcome::Exited),
        };
        self.reply(env, outcome);
    }

    fn apply(&mut self, event: Event, req: VcpuRequest, ok: ReplyOutcome) -> ReplyOutcome {
        let from = self.state;
        match transition(from, event) {
            Transition::NotAllowed => ReplyOutcome::NotAllowed(self.not_allowed(req)),
            Transition::To(to) => {
                if from == VcpuState::Running && to == VcpuState::Paused {
                    self.shared.metrics.count_pause();
                    // Tell the guest's kvmclock that it was stopped on purpose (no soft-lockup
                    // warnings). A guest without kvmclock makes this fail: that is fine.
                    if let Err(e) = self.vcpu.kvmclock_ctrl() {
                        debug!(self.logger, "KVM_KVMCLOCK_CTRL not applied"; "error" => %e);
                    }
                }
                if from == VcpuState::Paused && to == VcpuState::Running {
                    self.shared.metrics.count_resume();
                }
                if from != to {
                    debug!(self.logger, "state change"; "from" => %from, "to" => %to);
                    self.set_state(to);
                }
                ok
            }
        }
    }

    fn reply(&self, env: Envelope, outcome: ReplyOutcome) {
        let reply = VcpuReply {
            vcpu_id: self.shared.id,
            request_id: env.id,
            request: env.request,
            outcome,
        };
        let mut replies = self.shared.lock_replies();
        if replies.replies.len() >= MAX_UNCLAIMED_REPLIES {
            if let Some((old, _)) = replies.replies.pop_first() {
                warn!(self.logger, "too many unclaimed replies, dropping the oldest";
                      "request" => old);
            }
        }
        replies.replies.insert(env.id.0, reply);
        drop(replies);
        self.shared.reply_ready.notify_all();
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
        let device = |r: Result<IoOutcome, DeviceError>, what: &str, at: u64| match r {
            Ok(IoOutcome::Handled) => Step::Continue,
            Ok(IoOutcome::StopVm) => Step::Stop(StopCause::DeviceStop),
            Err(e) => {
                let n = metrics.count_device_error();
                // Rate-limited: a guest can hammer a failing device.
                if n <= 16 || n.is_power_of_two() {
                    warn!(self.logger, "device error"; "access" => what,
                          "address" => format!("{at:#x}"), "error" => %e, "count" => n);
                }
                Step::Continue
            }
        };
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                metrics.count_exit(ExitKind::IoIn);
                let r = handler.pio_read(id, port, data);
                if r.is_err() {
                    data.fill(0xff);
                }
                device(r, "pio_read", port.into())
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                metrics.count_exit(ExitKind::IoOut);
                device(handler.pio_write(id, port, data), "pio_write", port.into())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                metrics.count_exit(ExitKind::MmioRead);
                let r = handler.mmio_read(id, addr, data);
                if r.is_err() {
                    data.fill(0xff);
                }
                device(r, "mmio_read", addr)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                metrics.count_exit(ExitKind::MmioWrite);
                device(handler.mmio_write(id, addr, data), "mmio_write", addr)
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel irqchip. KVM resumes the guest after the `hlt`
                // on the next KVM_RUN; nothing else can wake it, so carry on.
                metrics.count_exit(ExitKind::Hlt);
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                metrics.count_exit(ExitKind::Shutdown);
                Step::Stop(StopCause::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                metrics.count_exit(ExitKind::SystemEvent);
                Step::Stop(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_CRASH => StopCause::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => StopCause::Reset,
                    _ => StopCause::Unknown(Some(kvm_bindings::KVM_EXIT_SYSTEM_EVENT)),
                })
            }
            Ok(VcpuExit::InternalError) => {
                metrics.count_exit(ExitKind::InternalError);
                Step::Stop(StopCause::InternalError)
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                metrics.count_exit(ExitKind::FailEntry);
                Step::Stop(StopCause::FailEntry(reason))
            }
            Ok(VcpuExit::Unsupported(exit)) => {
                metrics.count_exit(ExitKind::Unknown);
                Step::Stop(StopCause::Unknown(Some(exit)))
            }
            Ok(_) => {
                metrics.count_exit(ExitKind::Unknown);
                Step::Stop(StopCause::Unknown(None))
            }
            Err(e) if e.errno() == libc::EINTR => {
                metrics.count_exit(ExitKind::Eintr);
                Step::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => {
                metrics.count_exit(ExitKind::Eagain);
                Step::Continue
            }
            Err(e) => Step::Stop(StopCause::RunError(e.errno())),
        }
    }

    fn enter_waiting_exit(&mut self, cause: StopCause) {
        let vcpu_id = self.shared.id;
        let rip = match self.vcpu.get_regs() {
            Ok(regs) => regs.rip,
            Err(e) => {
                warn!(self.logger, "cannot read RIP for the exit reason; reporting 0";
                      "error" => %e);
                0
            }
        };
        let reason = match cause {
            StopCause::Shutdown => VcpuExitReason::GuestShutdown { vcpu_id, rip },
            StopCause::Reset => VcpuExitReason::GuestReset { vcpu_id, rip },
            StopCause::TripleFault => VcpuExitReason::TripleFault { vcpu_id, rip },
            StopCause::InternalError => {
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
            StopCause::FailEntry(reason) => VcpuExitReason::FailEntry {
                vcpu_id,
                rip,
                reason,
            },
            StopCause::Unknown(exit) => VcpuExitReason::Unknown {
                vcpu_id,
                rip,
                exit: exit.unwrap_or_else(|| self.vcpu.get_kvm_run().exit_reason),
            },
            StopCause::DeviceStop => VcpuExitReason::DeviceRequestedStop { vcpu_id, rip },
            StopCause::RunError(errno) => VcpuExitReason::KvmRunError { vcpu_id, errno },
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
