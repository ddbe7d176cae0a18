//! The vCPU actor's own costs, next to bare KVM, through public APIs only (the same
//! measurements as `cargo bench -p vcpu-actor`, gathered here for `vcpuctl bench`):
//!
//! - [`exit_rate`]: port-I/O exits per second of one vCPU running a CPL-3 `out` loop
//!   ([`crate::agent::pio_loop`]) through a [`VcpuActor`] with a counting [`ExitHandler`],
//!   next to a bare `VcpuFd::run` loop calling the same handler on its own thread. Rounds
//!   alternate the two so that background load hits both alike.
//! - [`idle_pause_resume`]: pause-all and resume-all latency of N actors whose vCPUs are APs
//!   that never got INIT/SIPI (blocked inside `KVM_RUN`, using no CPU: this is the kick and
//!   message path itself), next to N bare threads kicked the same way (`immediate_exit` plus a
//!   signal) that report and block once out of `KVM_RUN`.
//!
//! Numbers are medians; nothing here asserts on time.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_run, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::Serialize;
use vcpu_actor::{
    DeviceError, ExitHandler, IoOutcome, ReplyOutcome, VcpuActor, VcpuHandle, VcpuOptions,
    VcpuRequest,
};
use vmm_core::loader::load_program;
use vmm_core::{BootEntry, Vm, VmOptions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cmd_bench::BenchLine;
use crate::IntegrationError;

/// How long to wait for any acknowledgement before calling it a hang.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// The bare kick signal: `SIGRTMIN + 5` (the actors use `SIGRTMIN + 0`, [`crate::bench`]
/// `SIGRTMIN + 3`).
const BARE_SIGNAL_OFFSET: i32 = 5;

/// The least a device can do: count port writes.
#[derive(Default)]
struct CountingHandler(AtomicU64);

impl ExitHandler for CountingHandler {
    fn pio_read(&self, _: u32, _: u16, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }
    fn pio_write(&self, _: u32, _: u16, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(IoOutcome::Handled)
    }
    fn mmio_read(&self, _: u32, _: u64, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }
    fn mmio_write(&self, _: u32, _: u64, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        Ok(IoOutcome::Handled)
    }
}

fn kvm() -> Result<Kvm, IntegrationError> {
    Kvm::new().map_err(|source| IntegrationError::Kvm {
        op: "opening /dev/kvm",
        source,
    })
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> IntegrationError {
    move |source| IntegrationError::Kvm { op, source }
}

fn guest_err(msg: impl Into<String>) -> IntegrationError {
    IntegrationError::Guest(msg.into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A VM whose vCPU 0 runs the port-I/O loop at CPL 3 (KVM's supported CPUID, loader
/// registers).
fn pio_vm() -> Result<(Vm, VcpuFd), IntegrationError> {
    let kvm = kvm()?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let vm = Vm::new(kvm, VmOptions::default())?;
    let entry = load_program(vm.memory(), &crate::agent::pio_loop())?;
    let fd = vm.fd().create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    entry.setup_bsp(&fd, vm.memory())?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    Ok((vm, fd))
}

/// Exits per second through an actor over `window` (after a short warm-up).
fn actor_rate(window: Duration) -> Result<f64, IntegrationError> {
    let (vm, fd) = pio_vm()?;
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| guest_err(format!("eventfd: {e}")))?;
    let handle = VcpuActor::spawn(
        0,
        fd,
        vm.vcpu_mmap_size(),
        Arc::new(CountingHandler::default()),
        evt,
        VcpuOptions::default(),
    )
    .map_err(|e| guest_err(format!("spawning the vCPU actor: {e}")))?;
    let resumed = handle
        .request(VcpuRequest::Resume, ACK_TIMEOUT)
        .map_err(|e| guest_err(format!("resume: {e}")))?;
    if resumed.outcome != ReplyOutcome::Resumed {
        return Err(guest_err(format!("resume refused: {:?}", resumed.outcome)));
    }
    std::thread::sleep(Duration::from_millis(20));
    let (t0, m0) = (Instant::now(), handle.metrics());
    std::thread::sleep(window);
    let (t1, m1) = (Instant::now(), handle.metrics());
    let _ = handle.request(VcpuRequest::Exit, ACK_TIMEOUT);
    handle
        .join(ACK_TIMEOUT)
        .map_err(|e| guest_err(format!("joining the vCPU actor: {e}")))?;
    let exits = m1.exits.io_out.saturating_sub(m0.exits.io_out) as f64;
    Ok(exits / (t1 - t0).as_secs_f64().max(1e-9))
}

/// Exits per second of a bare `VcpuFd::run` loop (on a fresh thread, like the actor's).
fn bare_rate(window: Duration) -> Result<f64, IntegrationError> {
    let (vm, mut fd) = pio_vm()?;
    let worker = std::thread::spawn(move || -> Result<f64, String> {
        let handler = CountingHandler::default();
        let warm = Instant::now() + Duration::from_millis(20);
        while Instant::now() < warm {
            fd.run().map_err(|e| format!("KVM_RUN: {e}"))?;
        }
        let t0 = Instant::now();
        let mut n = 0u64;
        loop {
            match fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let _ = handler.pio_write(0, port, data);
                    n += 1;
                }
                Ok(other) => return Err(format!("unexpected exit {other:?}")),
                Err(e) => return Err(format!("KVM_RUN: {e}")),
            }
            if n % 64 == 0 && t0.elapsed() >= window {
                break;
            }
        }
        Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9))
    });
    let rate = worker
        .join()
        .map_err(|_| guest_err("the bare vCPU thread panicked"))?
        .map_err(|e| guest_err(format!("bare vCPU loop: {e}")))?;
    drop(vm);
    Ok(rate)
}

/// Port-I/O exit rates (exits per second, medians over the rounds).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ExitRate {
    /// Through the vCPU actor.
    pub actor: f64,
    /// Bare `VcpuFd::run` loop.
    pub bare: f64,
    /// The median of the per-round ratios actor / bare.
    pub ratio: f64,
}

/// Measures [`ExitRate`] over `rounds` rounds of `window` each (at least one).
pub fn exit_rate(window: Duration, rounds: u32) -> Result<ExitRate, IntegrationError> {
    let (mut actor, mut bare, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let b = bare_rate(window)?;
        let a = actor_rate(window)?;
        ratios.push(a / b.max(1e-9));
        actor.push(a);
        bare.push(b);
    }
    Ok(ExitRate {
        actor: median(actor),
        bare: median(bare),
        ratio: median(ratios),
    })
}

/// Pause-all and resume-all latency of idle vCPUs (medians).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct IdleLatency {
    /// N.
    pub vcpus: u32,
    /// Actors: `Pause` sent to all until all replied.
    pub pause_actor: Duration,
    /// Bare threads: kicked until all out of `KVM_RUN`.
    pub pause_bare: Duration,
    /// Actors: `Resume` sent to all until all replied.
    pub resume_actor: Duration,
    /// Bare threads: told to go on until all acknowledged.
    pub resume_bare: Duration,
}

/// An idle VM: `n` AP vCPUs (ids 1..=n) that stay in wait-for-SIPI.
fn idle_vm(n: u32) -> Result<(Vm, Vec<VcpuFd>), IntegrationError> {
    let vm = Vm::new(kvm()?, VmOptions::default())?;
    let fds = (1..=u64::from(n))
        .map(|id| vm.fd().create_vcpu(id).map_err(kvm_err("KVM_CREATE_VCPU")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((vm, fds))
}

fn all(handles: &[VcpuHandle], req: VcpuRequest) -> Result<Duration, IntegrationError> {
    let t = Instant::now();
    let ids = handles
        .iter()
        .map(|h| h.send(req))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| guest_err(format!("{req:?}: {e}")))?;
    for (h, id) in handles.iter().zip(ids) {
        let reply = h
            .wait_reply(id, ACK_TIMEOUT)
            .map_err(|e| guest_err(format!("{req:?}: {e}")))?;
        if !reply.is_ok() {
            return Err(guest_err(format!(
                "vCPU {} refused {req:?}: {:?}",
                h.id(),
                reply.outcome
            )));
        }
    }
    Ok(t.elapsed())
}

fn actor_idle(n: u32, iters: u32) -> Result<(Vec<f64>, Vec<f64>), IntegrationError> {
    let (vm, fds) = idle_vm(n)?;
    let handler = Arc::new(CountingHandler::default());
    let mut handles = Vec::with_capacity(fds.len());
    for (i, fd) in fds.into_iter().enumerate() {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| guest_err(format!("eventfd: {e}")))?;
        let h = VcpuActor::spawn(
            i as u32 + 1,
            fd,
            vm.vcpu_mmap_size(),
            Arc::clone(&handler) as Arc<dyn ExitHandler>,
            evt,
            VcpuOptions::default(),
        )
        .map_err(|e| guest_err(format!("spawning vCPU actor {}: {e}", i + 1)))?;
        handles.push(h);
    }
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        resume.push(all(&handles, VcpuRequest::Resume)?.as_secs_f64());
        // Let every vCPU get into KVM_RUN.
        std::thread::sleep(Duration::from_millis(5));
        pause.push(all(&handles, VcpuRequest::Pause)?.as_secs_f64());
    }
    for h in handles {
        let _ = h.request(VcpuRequest::Exit, ACK_TIMEOUT);
        h.join(ACK_TIMEOUT)
            .map_err(|e| guest_err(format!("joining a vCPU actor: {e}")))?;
    }
    Ok((pause, resume))
}

extern "C" fn bare_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn bare_signal() -> Result<libc::c_int, IntegrationError> {
    static INSTALL: Once = Once::new();
    let signal = vmm_sys_util::signal::SIGRTMIN() + BARE_SIGNAL_OFFSET;
    let mut installed = Ok(());
    INSTALL.call_once(|| {
        installed = vmm_sys_util::signal::register_signal_handler(signal, bare_kick)
            .map_err(|e| guest_err(format!("installing the bare kick signal handler: {e}")));
    });
    installed.map(|()| signal)
}

struct BareThread {
    pthread: libc::pthread_t,
    /// The vCPU's `kvm_run` mapping, alive as long as the fd the thread owns.
    run: *mut kvm_run,
    go: SyncSender<()>,
    join: JoinHandle<()>,
}

fn bare_thread(mut fd: VcpuFd, go: Receiver<()>, ack: Sender<()>, out: Sender<()>) {
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
        let _ = out.send(());
    }
}

fn bare_idle(n: u32, iters: u32) -> Result<(Vec<f64>, Vec<f64>), IntegrationError> {
    let signal = bare_signal()?;
    let (vm, fds) = idle_vm(n)?;
    let (ack_tx, ack_rx) = channel();
    let (out_tx, out_rx) = channel();
    let mut threads = Vec::with_capacity(fds.len());
    for fd in fds {
        let mut fd = fd;
        let run: *mut kvm_run = fd.get_kvm_run();
        let (go, go_rx) = sync_channel(1);
        let (ack, out) = (ack_tx.clone(), out_tx.clone());
        let join = std::thread::Builder::new()
            .name("bare-idle".into())
            .spawn(move || bare_thread(fd, go_rx, ack, out))
            .map_err(|e| guest_err(format!("spawning a bare vCPU thread: {e}")))?;
        threads.push(BareThread {
            pthread: join.as_pthread_t(),
            run,
            go,
            join,
        });
    }
    let wait = |rx: &Receiver<()>, what: &str| -> Result<(), IntegrationError> {
        for _ in 0..n {
            rx.recv_timeout(ACK_TIMEOUT)
                .map_err(|e| guest_err(format!("bare vCPU {what}: {e}")))?;
        }
        Ok(())
    };
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        for th in &threads {
            th.go
                .send(())
                .map_err(|_| guest_err("a bare vCPU thread ended"))?;
        }
        wait(&ack_rx, "resume acknowledgement")?;
        resume.push(t.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        for th in &threads {
            // SAFETY: `run` is the live kvm_run mapping of a vCPU fd owned by a thread not
            // yet joined; immediate_exit is a byte KVM reads on entry, written atomically.
            unsafe {
                (*std::ptr::addr_of_mut!((*th.run).immediate_exit).cast::<AtomicU8>())
                    .store(1, Ordering::SeqCst)
            };
            // SAFETY: the thread is not joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(th.pthread, signal) };
        }
        wait(&out_rx, "out of KVM_RUN")?;
        pause.push(t.elapsed().as_secs_f64());
    }
    for th in threads {
        drop(th.go);
        let _ = th.join.join();
    }
    drop(vm);
    Ok((pause, resume))
}

/// Measures [`IdleLatency`] for `n` vCPUs over `iters` pause/resume pairs (at least one).
pub fn idle_pause_resume(n: u32, iters: u32) -> Result<IdleLatency, IntegrationError> {
    let iters = iters.max(1);
    let (bp, br) = bare_idle(n, iters)?;
    let (ap, ar) = actor_idle(n, iters)?;
    let d = |v: Vec<f64>| Duration::from_secs_f64(median(v));
    Ok(IdleLatency {
        vcpus: n,
        pause_actor: d(ap),
        pause_bare: d(bp),
        resume_actor: d(ar),
        resume_bare: d(br),
    })
}

/// The rows of [`crate::cmd_bench::table`] for these measurements, in milliseconds: the exit
/// rate as time per exit (`1000 / rate`), so that every ratio reads "ours / bare, lower is
/// better".
pub fn bench_lines(exits: Option<&ExitRate>, idle: &[IdleLatency]) -> Vec<BenchLine> {
    let mut out = Vec::new();
    if let Some(e) = exits {
        let per_exit = |rate: f64| 1e3 / rate.max(1e-9);
        out.push(BenchLine {
            benchmark: "pio_exit",
            detail: "time per port-I/O exit of a CPL-3 out loop: vCPU actor vs bare \
                     VcpuFd::run loop, same handler",
            vcpus: 1,
            ours_ms: per_exit(e.actor),
            bare_ms: per_exit(e.bare),
            ratio: 1.0 / e.ratio.max(1e-9),
        });
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    for l in idle {
        out.push(BenchLine {
            benchmark: "pause_idle",
            detail: "vCPU actors vs bare threads, vCPUs blocked in KVM_RUN (APs without \
                     INIT/SIPI): kick until all out of KVM_RUN and acknowledged",
            vcpus: l.vcpus,
            ours_ms: ms(l.pause_actor),
            bare_ms: ms(l.pause_bare),
            ratio: ratio(l.pause_actor, l.pause_bare),
        });
        out.push(BenchLine {
            benchmark: "resume_idle",
            detail: "vCPU actors vs bare threads, back into KVM_RUN, all acknowledged",
            vcpus: l.vcpus,
            ours_ms: ms(l.resume_actor),
            bare_ms: ms(l.resume_bare),
            ratio: ratio(l.resume_actor, l.resume_bare),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_nothing_is_zero_and_of_some_the_middle() {
        assert_eq!(median(Vec::new()), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn counting_handler_counts_writes_only() {
        let h = CountingHandler::default();
        let mut b = [1u8; 2];
        h.pio_read(0, 1, &mut b).unwrap();
        assert_eq!(b, [0, 0]);
        h.pio_write(0, 1, &b).unwrap();
        h.mmio_write(0, 1, &b).unwrap();
        assert_eq!(h.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bench_lines_read_ours_over_bare() {
        let e = ExitRate {
            actor: 10_000.0,
            bare: 20_000.0,
            ratio: 0.5,
        };
        let ms = Duration::from_millis;
        let idle = IdleLatency {
            vcpus: 8,
            pause_actor: ms(2),
            pause_bare: ms(1),
            resume_actor: ms(1),
            resume_bare: ms(1),
        };
        let l = bench_lines(Some(&e), &[idle]);
        assert_eq!(l.len(), 3);
        assert_eq!((l[0].ours_ms, l[0].bare_ms, l[0].ratio), (0.1, 0.05, 2.0));
        assert_eq!((l[1].vcpus, l[1].ratio), (8, 2.0));
        assert_eq!(l[2].benchmark, "resume_idle");
        assert!(bench_lines(None, &[]).is_empty());
    }

    #[test]
    fn both_sides_measure_on_real_kvm() {
        if crate::kvm_or_skip("actor_bench::both_sides_measure_on_real_kvm").is_none() {
            return;
        }
        let e = exit_rate(Duration::from_millis(30), 1).unwrap();
        assert!(e.actor > 0.0 && e.bare > 0.0 && e.ratio > 0.0, "{e:?}");
        let l = idle_pause_resume(3, 2).unwrap();
        assert_eq!(l.vcpus, 3);
        assert!(!l.pause_actor.is_zero() && !l.pause_bare.is_zero(), "{l:?}");
        eprintln!("{e:?}\n{l:?}");
    }
}
