//! The bare-KVM side of the benchmarks, written once: a VM with KVM's supported CPUID
//! ([`BareVm`]), the cost of `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` ([`bare_create`]), and the
//! one kick harness ([`KickedVcpus`]) that the pause/resume rows of spinning and of idle vCPUs
//! both compare against.
//!
//! The harness gives each vCPU fd a thread that, when told to go, clears `immediate_exit`,
//! acknowledges, and runs the vCPU until a kick (`immediate_exit` = 1 plus a signal) gets it out
//! of `KVM_RUN` with `EINTR`; then it acknowledges again and blocks (it does not spin: on a
//! small host spinning threads would measure their own scheduling, see the host notes).

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::loader::load_program;
use kvm_bindings::{kvm_mp_state, kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use vmm_core::{BootEntry, Vm, VmOptions};

use super::ACK_TIMEOUT;
use crate::guest::GuestCode;
use crate::IntegrationError;

/// The bare kick signal: `SIGRTMIN + 3` (the vCPU actors use `SIGRTMIN + 0`).
const BARE_KICK_OFFSET: i32 = 3;

/// A VM without the vCPU manager: vCPUs get KVM's supported CPUID and nothing else.
pub struct BareVm {
    vm: Vm,
    cpuid: CpuId,
}

impl std::fmt::Debug for BareVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BareVm")
            .field("cpuid_entries", &self.cpuid.as_slice().len())
            .finish_non_exhaustive()
    }
}

impl BareVm {
    /// A fresh VM (default options) and KVM's supported CPUID.
    pub fn new() -> Result<Self, IntegrationError> {
        let kvm = crate::open_kvm()?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(IntegrationError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let vm = Vm::new(kvm, VmOptions::default())?;
        Ok(Self { vm, cpuid })
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` for vCPU id `id`: the bare cost of a vCPU.
    pub fn create_vcpu(&self, id: u32) -> Result<VcpuFd, IntegrationError> {
        let fd = self
            .vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(IntegrationError::kvm("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&self.cpuid)
            .map_err(IntegrationError::kvm("KVM_SET_CPUID2"))?;
        Ok(fd)
    }

    /// `n` vCPUs (ids `0..n`) that all run `code` from the loader's BSP registers, runnable
    /// at once (the program must touch no per-vCPU memory, like [`crate::guest::spin`]).
    pub fn runnable_vcpus(
        &self,
        code: &GuestCode,
        n: u32,
    ) -> Result<Vec<VcpuFd>, IntegrationError> {
        let entry = load_program(self.vm.memory(), &code.program())?;
        (0..n)
            .map(|id| {
                let fd = self.create_vcpu(id)?;
                entry.setup_bsp(&fd, self.vm.memory())?;
                fd.set_mp_state(kvm_mp_state {
                    mp_state: KVM_MP_STATE_RUNNABLE,
                })
                .map_err(IntegrationError::kvm("KVM_SET_MP_STATE"))?;
                Ok(fd)
            })
            .collect()
    }

    /// `n` AP vCPUs (ids `1..=n`) left in wait-for-SIPI: inside `KVM_RUN` they block and use
    /// no CPU.
    pub fn idle_vcpus(&self, n: u32) -> Result<Vec<VcpuFd>, IntegrationError> {
        (1..=n)
            .map(|id| {
                self.vm
                    .fd()
                    .create_vcpu(u64::from(id))
                    .map_err(IntegrationError::kvm("KVM_CREATE_VCPU"))
            })
            .collect()
    }
}

/// How many fresh VMs [`bare_create`] takes the median of.
pub const BARE_CREATE_RUNS: usize = 5;

/// Times `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` for `n` vCPUs of a fresh VM: the median of
/// [`BARE_CREATE_RUNS`] VMs.
pub fn bare_create(n: u32) -> Result<Duration, IntegrationError> {
    let runs = (0..BARE_CREATE_RUNS)
        .map(|_| bare_create_once(n))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(super::median(runs))
}

fn bare_create_once(n: u32) -> Result<Duration, IntegrationError> {
    let bare = BareVm::new()?;
    let t = Instant::now();
    let fds = (0..n)
        .map(|id| bare.create_vcpu(id))
        .collect::<Result<Vec<_>, _>>()?;
    let took = t.elapsed();
    drop(fds);
    Ok(took)
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A real-time signal `SIGRTMIN + offset` that interrupts a thread's `KVM_RUN`: its (empty)
/// handler is installed once per process, on first use.
#[derive(Debug)]
pub(super) struct KickSignal {
    offset: libc::c_int,
    /// What the signal is for, in an error message.
    what: &'static str,
    installed: OnceLock<Result<libc::c_int, String>>,
}

impl KickSignal {
    /// The signal `SIGRTMIN + offset`, for `what`.
    pub(super) const fn new(offset: libc::c_int, what: &'static str) -> Self {
        Self {
            offset,
            what,
            installed: OnceLock::new(),
        }
    }

    /// The signal number, its handler installed.
    pub(super) fn get(&self) -> Result<libc::c_int, IntegrationError> {
        self.installed
            .get_or_init(|| {
                let signal = vmm_sys_util::signal::SIGRTMIN() + self.offset;
                vmm_sys_util::signal::register_signal_handler(signal, kick_handler)
                    .map(|()| signal)
                    .map_err(|e| format!("installing the handler of the {}: {e}", self.what))
            })
            .clone()
            .map_err(IntegrationError::Guest)
    }
}

/// The bare kick signal.
static BARE_KICK: KickSignal = KickSignal::new(BARE_KICK_OFFSET, "bare kick signal");

#[derive(Debug)]
struct KickThread {
    pthread: libc::pthread_t,
    /// The vCPU's `kvm_run` mapping, alive as long as the fd the thread owns (until joined).
    run: *mut kvm_run,
    go: SyncSender<()>,
    join: JoinHandle<()>,
}

/// Bare threads, one per vCPU fd, started paused (see the module doc).
#[derive(Debug)]
pub struct KickedVcpus {
    _bare: BareVm,
    threads: Vec<KickThread>,
    /// Whether the threads were told to run and not kicked since.
    running: Cell<bool>,
    acks: Receiver<()>,
    signal: libc::c_int,
}

fn kick_thread(mut fd: VcpuFd, go: Receiver<()>, ack: Sender<()>) {
    while go.recv().is_ok() {
        fd.set_kvm_immediate_exit(0);
        let _ = ack.send(());
        loop {
            match fd.run() {
                Err(e) if e.errno() == libc::EINTR => break,
                Err(e) if e.errno() == libc::EAGAIN => {}
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = ack.send(());
    }
}

impl KickedVcpus {
    /// One thread per fd of `bare` (they own the fds), each waiting to be resumed.
    pub fn spawn(bare: BareVm, fds: Vec<VcpuFd>) -> Result<Self, IntegrationError> {
        let signal = BARE_KICK.get()?;
        let (ack_tx, acks) = channel();
        let mut threads = Vec::with_capacity(fds.len());
        for (i, mut fd) in fds.into_iter().enumerate() {
            let run: *mut kvm_run = fd.get_kvm_run();
            let (go, go_rx) = sync_channel(1);
            let ack = ack_tx.clone();
            let join = std::thread::Builder::new()
                .name(format!("bare{i}"))
                .spawn(move || kick_thread(fd, go_rx, ack))
                .map_err(|e| {
                    IntegrationError::Guest(format!("spawning a bare vCPU thread: {e}"))
                })?;
            threads.push(KickThread {
                pthread: join.as_pthread_t(),
                run,
                go,
                join,
            });
        }
        Ok(Self {
            _bare: bare,
            threads,
            running: Cell::new(false),
            acks,
            signal,
        })
    }

    fn wait_acks(&self, what: &str) -> Result<(), IntegrationError> {
        for _ in &self.threads {
            self.acks
                .recv_timeout(ACK_TIMEOUT)
                .map_err(|e| IntegrationError::Guest(format!("bare vCPU {what}: {e}")))?;
        }
        Ok(())
    }

    /// Tells every thread to run its vCPU; returns once all acknowledged.
    pub fn resume(&self) -> Result<(), IntegrationError> {
        for t in &self.threads {
            t.go.send(())
                .map_err(|_| IntegrationError::Guest("a bare vCPU thread ended".into()))?;
        }
        self.running.set(true);
        self.wait_acks("resume acknowledgement")
    }

    /// Kicks every vCPU out of `KVM_RUN`; returns once all threads are out.
    pub fn pause(&self) -> Result<(), IntegrationError> {
        for t in &self.threads {
            let flag = t
                .run
                .cast::<u8>()
                .wrapping_add(std::mem::offset_of!(kvm_run, immediate_exit));
            // SAFETY: `run` is the live kvm_run mapping of a vCPU fd owned by a thread not yet
            // joined, so `flag` points at its immediate_exit byte, which KVM reads on entry and
            // which is only ever written atomically here.
            let immediate_exit = unsafe { AtomicU8::from_ptr(flag) };
            immediate_exit.store(1, Ordering::SeqCst);
            // SAFETY: the thread is not joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.pthread, self.signal) };
        }
        self.running.set(false);
        self.wait_acks("out of KVM_RUN")
    }
}

impl Drop for KickedVcpus {
    fn drop(&mut self) {
        if self.running.get() {
            let _ = self.pause();
        }
        for t in self.threads.drain(..) {
            drop(t.go);
            let _ = t.join.join();
        }
    }
}
