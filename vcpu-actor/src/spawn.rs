//! Starting a vCPU actor: [`VcpuOptions`], [`VcpuParts`], [`VcpuHandle::spawn`] and, to start
//! many vCPUs without waiting for each thread in turn, [`PendingVcpu`].

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use slog::{debug, o, Logger};
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{channel, Receiver, RecvError, Sender};
use crate::handle::{Envelope, Shared};
use crate::kick::{self, KvmRunMapping};
use crate::os_thread::OsThread;
use crate::seccomp;
use crate::thread::{StartFailure, ThreadStart, VcpuThread};
use crate::{ExitHandler, SeccompMode, VcpuError, VcpuHandle, VcpuStateSaver};

/// How long a new thread may take to report that it is ready, counted from its start.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How a vCPU actor is set up.
#[derive(Clone)]
pub struct VcpuOptions {
    /// Where the actor logs; the vCPU id is added to its context as `vcpu`.
    pub logger: Logger,
    /// How the thread confines itself with seccomp before its first `KVM_RUN`. Default: the
    /// vCPU thread's allow-list, a violation stops the VM (see [`SeccompMode`]); a VMM whose
    /// devices write to a file descriptor from the vCPU thread (a console on stdout) adds it
    /// with [`SeccompMode::with_write_fds`].
    pub seccomp: SeccompMode,
    /// The kick signal is `SIGRTMIN + kick_signal_offset` (default 0). Its handler is installed
    /// once per process, and only where the signal's disposition is the default one (or
    /// already this crate's handler): pick another offset if something else in the process
    /// uses the signal. After a spawn, the process must not change that signal's disposition
    /// (a `SIG_IGN` or `SIG_DFL` there makes pauses time out, or kills the process).
    pub kick_signal_offset: i32,
    /// Stack size of the vCPU thread in bytes (default [`VcpuOptions::DEFAULT_STACK_SIZE`],
    /// at least `PTHREAD_STACK_MIN`; glibc keeps the thread's TLS, a few KiB, at its top).
    /// The [`ExitHandler`] runs on this stack: raise it for handlers that need deep stacks.
    /// The thread is started with `pthread_create`, without `std::thread`'s alternate signal
    /// stack: an overflow hits the guard page and the process dies of `SIGSEGV` without
    /// std's "has overflowed its stack" line, and a panic message names the thread
    /// `<unnamed>` (the error the handle returns carries the vCPU id).
    pub stack_size: usize,
    /// What answers [`VcpuRequest::SaveState`](crate::VcpuRequest::SaveState) (default
    /// `None`: such a request gets
    /// [`SaveStateError::NoSaver`](crate::SaveStateError::NoSaver)).
    pub state_saver: Option<Arc<dyn VcpuStateSaver>>,
    /// The host CPUs the vCPU thread may run on (default `None`: wherever the process may).
    /// The thread applies the set to itself (`sched_setaffinity` on its own TID) before it
    /// installs its seccomp filter; a set the kernel refuses fails the spawn with
    /// [`VcpuError::Affinity`]. Read it back with [`thread_affinity`](crate::thread_affinity).
    pub affinity: Option<Vec<usize>>,
}

impl fmt::Debug for VcpuOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuOptions")
            .field("logger", &self.logger)
            .field("seccomp", &self.seccomp)
            .field("kick_signal_offset", &self.kick_signal_offset)
            .field("stack_size", &self.stack_size)
            .field("state_saver", &self.state_saver.is_some())
            .field("affinity", &self.affinity)
            .finish()
    }
}

impl VcpuOptions {
    /// The default vCPU thread stack: 128 KiB (the Rust default is 2 MiB).
    ///
    /// Measured on the crate's tests (debug build): a vCPU thread that handles port exits
    /// through the test exit handler, takes kick signals inside `KVM_RUN` (their frames land
    /// on this stack) and answers every request touches 16 KiB of its stack (test
    /// `the_default_stack_leaves_a_wide_margin`), and every test of the crate, the
    /// seccomp, triple-fault and exit paths included, passes with a 24 KiB stack. 128 KiB
    /// leaves eight times the measured use for the VMM's exit handlers, which run on this
    /// stack: raise [`stack_size`](Self::stack_size) for handlers that need more. Only
    /// touched pages are resident; the size bounds the address space (and, where the kernel
    /// backs large anonymous mappings with huge pages, the memory) of each vCPU thread.
    pub const DEFAULT_STACK_SIZE: usize = 128 << 10;
}

impl Default for VcpuOptions {
    fn default() -> Self {
        VcpuOptions {
            logger: Logger::root(slog::Discard, o!()),
            seccomp: SeccompMode::default(),
            kick_signal_offset: 0,
            stack_size: Self::DEFAULT_STACK_SIZE,
            state_saver: None,
            affinity: None,
        }
    }
}

/// What a vCPU actor is made of: the vCPU fd and what its thread needs beside it.
pub struct VcpuParts {
    /// The vCPU id (the thread is named `vcpu{id}`; replies and errors carry it).
    pub id: u32,
    /// The vCPU fd, configured by the VMM (registers, CPUID ...); the thread owns it.
    pub vcpu: VcpuFd,
    /// `Kvm::get_vcpu_mmap_size()`.
    pub vcpu_mmap_size: usize,
    /// The VMM's devices, called on every I/O exit.
    pub handler: Arc<dyn ExitHandler>,
    /// Written once when the vCPU reaches [`VcpuState::WaitingExit`](crate::VcpuState) (or
    /// its thread dies). Shared: one EventFd serves every vCPU of a VM, so a vCPU costs the
    /// process one fd (its vCPU fd), not one more per vCPU for a duplicate of this one.
    pub exit_evt: Arc<EventFd>,
}

impl fmt::Debug for VcpuParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuParts")
            .field("id", &self.id)
            .field("vcpu", &self.vcpu.as_raw_fd())
            .field("vcpu_mmap_size", &self.vcpu_mmap_size)
            .field("exit_evt", &self.exit_evt)
            .finish_non_exhaustive()
    }
}

/// Work on a new vCPU that its own thread does before it reports ready, before its seccomp
/// filter (so any vCPU ioctl and `/dev/kvm` query is allowed): see
/// [`PendingVcpu::start_with_setup`]. Its error fails the start with [`VcpuError::Setup`].
pub type VcpuSetup =
    Box<dyn FnOnce(&VcpuFd) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send>;

/// A failed spawn: why, and the vCPU fd when it could be kept.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SpawnFailure {
    /// Why the actor did not start.
    pub error: VcpuError,
    /// The vCPU fd, unless it was lost with a thread that could not be created or did not
    /// answer in time. KVM cannot destroy a vCPU, so a VMM that loses the fd can never
    /// create a vCPU with that id again: keep it.
    pub vcpu: Option<VcpuFd>,
}

impl From<SpawnFailure> for VcpuError {
    fn from(failure: SpawnFailure) -> Self {
        failure.error
    }
}

impl VcpuHandle {
    /// Spawns thread `vcpu{id}`, which owns `parts.vcpu` and answers messages sent through
    /// the returned handle, and waits until the thread is ready. The actor starts
    /// [`VcpuState::Paused`](crate::VcpuState): the guest does not run until
    /// [`VcpuRequest::Resume`](crate::VcpuRequest).
    ///
    /// The same as [`PendingVcpu::start`] followed by [`PendingVcpu::wait_ready`]; use those
    /// to start many vCPUs and then wait for all of them.
    ///
    /// # Errors
    ///
    /// A [`SpawnFailure`] whose `vcpu` gives the fd back where it can.
    pub fn spawn(parts: VcpuParts, options: VcpuOptions) -> Result<VcpuHandle, SpawnFailure> {
        PendingVcpu::start(parts, options)?.wait_ready()
    }
}

/// A vCPU thread that has been started but has not yet said that it is ready. Start every
/// vCPU with [`PendingVcpu::start`], then call [`wait_ready`](Self::wait_ready) on each:
/// the threads get ready in parallel instead of one after another.
///
/// Dropping a `PendingVcpu` without `wait_ready` ends its thread, which closes the vCPU fd.
#[derive(Debug)]
pub struct PendingVcpu {
    shared: Arc<Shared>,
    tx: Sender<Envelope>,
    /// Dropped after `tx` (fields drop in this order), so that a thread it kicks finds its
    /// mailbox closed.
    give_up: GiveUpKick,
    done_rx: Receiver<VcpuFd>,
    ready_rx: Receiver<Result<(), StartFailure>>,
    join: OsThread,
    started: Instant,
    logger: Logger,
}

/// Whether a new actor waits for `Resume` or runs once ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StartAs {
    Paused,
    Running,
}

/// Kicks a thread started running out of `KVM_RUN` when its [`PendingVcpu`] is given up
/// (dropped, or its `wait_ready` failed); nothing for one started paused (`pthread` `None`),
/// which sees its closed mailbox by itself.
#[derive(Debug)]
struct GiveUpKick {
    shared: Arc<Shared>,
    /// The thread, neither joined nor detached while this lives (the `PendingVcpu` holds its
    /// `OsThread`, declared after this field).
    pthread: Option<libc::pthread_t>,
    logger: Logger,
}

impl Drop for GiveUpKick {
    fn drop(&mut self) {
        if self.pthread.is_some() {
            self.shared.kick(self.pthread, &self.logger);
        }
    }
}

impl PendingVcpu {
    /// Prepares the actor (kick signal, seccomp filter, `kvm_run` mapping) and starts its
    /// thread without waiting for it. If a seccomp filter is configured, the thread installs
    /// it before it reports ready, so a filter that cannot be installed is reported by
    /// [`wait_ready`](Self::wait_ready).
    ///
    /// # Errors
    ///
    /// A [`SpawnFailure`] with the fd when the preparation fails, without it when the thread
    /// cannot be created.
    pub fn start(parts: VcpuParts, options: VcpuOptions) -> Result<PendingVcpu, SpawnFailure> {
        Self::start_inner(parts, options, None, StartAs::Paused)
    }

    /// [`start`](Self::start), with `setup` run on the new thread first: the VMM configures
    /// the vCPU (CPUID, MSRs, registers ...) there, so that many vCPUs are configured in
    /// parallel, each by its own thread, while the caller goes on creating the next ones.
    /// A setup that fails ends the thread before it is ready: [`wait_ready`](Self::wait_ready)
    /// returns [`VcpuError::Setup`] with the setup's error and the fd.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_with_setup(
        parts: VcpuParts,
        options: VcpuOptions,
        setup: VcpuSetup,
    ) -> Result<PendingVcpu, SpawnFailure> {
        Self::start_inner(parts, options, Some(setup), StartAs::Paused)
    }

    /// [`start_with_setup`](Self::start_with_setup) for a vCPU that runs no guest code until
    /// the guest wakes it (an application processor that `setup` leaves waiting for
    /// INIT/SIPI, as a hot-added vCPU is): once ready, the thread goes on to
    /// [`VcpuState::Running`](crate::VcpuState) by itself, as if it had been sent
    /// [`VcpuRequest::Resume`](crate::VcpuRequest), and enters `KVM_RUN`. Starting a batch of
    /// them costs no `Resume` round trip through each mailbox. A `PendingVcpu` whose
    /// [`wait_ready`](Self::wait_ready) fails, or that is dropped, kicks its thread out of
    /// `KVM_RUN` so that it ends (and, for a failed `wait_ready`, hands the fd back).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_running_with_setup(
        parts: VcpuParts,
        options: VcpuOptions,
        setup: VcpuSetup,
    ) -> Result<PendingVcpu, SpawnFailure> {
        Self::start_inner(parts, options, Some(setup), StartAs::Running)
    }

    fn start_inner(
        parts: VcpuParts,
        options: VcpuOptions,
        setup: Option<VcpuSetup>,
        start_as: StartAs,
    ) -> Result<PendingVcpu, SpawnFailure> {
        let VcpuParts {
            id,
            vcpu,
            vcpu_mmap_size,
            handler,
            exit_evt,
        } = parts;
        let logger = options.logger.new(o!("vcpu" => id));
        let affinity = options.affinity.clone();
        // Everything that can fail before the thread owns the fd.
        let prepared = kick::kick_signal(options.kick_signal_offset).and_then(|signal| {
            let build_error = |reason| VcpuError::SeccompBuild {
                vcpu_id: id,
                reason,
            };
            // Per thread: the filter names this vCPU's fd and exit EventFd.
            let filter = options
                .seccomp
                .compile(vcpu.as_raw_fd(), exit_evt.as_raw_fd())
                .map_err(build_error)?;
            if options.seccomp.traps() {
                seccomp::install_sigsys_handler().map_err(build_error)?;
            }
            let kvm_run = KvmRunMapping::new(id, &vcpu, vcpu_mmap_size)?;
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
        let shared = Arc::new(Shared::new(id, kvm_run, kick_signal));
        let (tx, rx) = channel::<Envelope>();
        let (done_tx, done_rx) = channel::<VcpuFd>();
        let (ready_tx, ready_rx) = channel::<Result<(), StartFailure>>();
        let thread = VcpuThread::new(
            Arc::clone(&shared),
            vcpu,
            handler,
            exit_evt,
            rx,
            &logger,
            options.state_saver,
        );
        let body = move || {
            let start = ThreadStart {
                setup,
                affinity,
                filter,
                run: start_as == StartAs::Running,
            };
            thread.run(start, ready_tx, done_tx);
        };
        let join =
            OsThread::spawn(&format!("vcpu{id}"), options.stack_size, body).map_err(|source| {
                SpawnFailure {
                    error: VcpuError::SpawnThread {
                        vcpu_id: id,
                        source,
                    },
                    vcpu: None,
                }
            })?;
        let give_up = GiveUpKick {
            shared: Arc::clone(&shared),
            pthread: (start_as == StartAs::Running).then(|| join.pthread()),
            logger: logger.clone(),
        };
        Ok(PendingVcpu {
            shared,
            tx,
            give_up,
            done_rx,
            ready_rx,
            join,
            started: Instant::now(),
            logger,
        })
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Waits until the thread is ready (at most 10 s after [`start`](Self::start)) and
    /// returns its handle.
    ///
    /// # Errors
    ///
    /// A [`SpawnFailure`]: the fd comes back when the setup, the CPU affinity or the seccomp
    /// filter failed; it is lost with a thread that panicked or did not answer in time.
    pub fn wait_ready(self) -> Result<VcpuHandle, SpawnFailure> {
        let id = self.shared.id;
        let left = STARTUP_TIMEOUT.saturating_sub(self.started.elapsed());
        let started = match self.ready_rx.recv_timeout(left) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(StartFailure::Seccomp(reason))) => Err(VcpuError::SeccompApply {
                vcpu_id: id,
                reason,
            }),
            Ok(Err(StartFailure::Setup(source))) => Err(VcpuError::Setup {
                vcpu_id: id,
                source,
            }),
            Ok(Err(StartFailure::Affinity(reason))) => Err(VcpuError::Affinity {
                vcpu_id: id,
                reason,
            }),
            Ok(Err(StartFailure::KickMask(source))) => Err(VcpuError::KickMask {
                vcpu_id: id,
                source,
            }),
            Err(RecvError::Timeout) => Err(VcpuError::StartupTimeout {
                vcpu_id: id,
                timeout: STARTUP_TIMEOUT,
            }),
            Err(RecvError::Disconnected) => Err(VcpuError::ThreadPanicked {
                vcpu_id: id,
                message: "the thread ended before it was ready".to_string(),
            }),
        };
        let PendingVcpu {
            shared,
            tx,
            mut give_up,
            done_rx,
            join,
            logger,
            ..
        } = self;
        if let Err(error) = started {
            // The thread ends on its own once its mailbox is gone (or has already ended); a
            // thread that failed to install its filter hands the fd back first. One started
            // running may have got ready since the timeout: the kick makes it look.
            drop(tx);
            drop(give_up);
            let vcpu = done_rx.recv_timeout(STARTUP_TIMEOUT).ok();
            let _ = join.join();
            return Err(SpawnFailure { error, vcpu });
        }
        give_up.pthread = None;
        debug!(logger, "vCPU thread started"; "tid" => shared.tid.load(Ordering::Relaxed));
        Ok(VcpuHandle {
            pthread: join.pthread(),
            join: Some(join),
            shared,
            tx,
            done_rx,
            next_id: AtomicU64::new(0),
            logger,
        })
    }
}
