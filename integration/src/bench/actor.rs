//! The vCPU actor's own costs, next to bare KVM, through public APIs only (`vcpuctl bench`
//! is the one place these are measured): the `pio_exit`, `pause_idle` and `resume_idle` rows.
//!
//! - [`exit_rate`]: port-I/O exits per second of one vCPU running a CPL-3 `out` loop
//!   ([`crate::guest::pio_loop`]) through a vCPU actor ([`VcpuHandle`]) with a counting [`ExitHandler`],
//!   next to a bare `VcpuFd::run` loop calling the same handler on its own thread. Rounds
//!   alternate the two so that background load hits both alike.
//! - [`idle_pause_resume`]: pause-all and resume-all latency of N actors whose vCPUs are APs
//!   that never got INIT/SIPI (blocked inside `KVM_RUN`, using no CPU: this is the kick and
//!   message path itself), next to the bare kick harness ([`KickedVcpus`]) on the same kind of
//!   vCPUs.
//!
//! Numbers are medians; nothing here asserts on time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::Serialize;
use vcpu_actor::{
    DeviceError, ExitHandler, IoOutcome, ReplyOutcome, VcpuHandle, VcpuOptions, VcpuParts,
    VcpuRequest,
};
use vmm_core::Vm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bare::{BareVm, KickedVcpus};
use super::{median_by, pause_resume_rounds, BenchLine, PauseResume, ACK_TIMEOUT};
use crate::IntegrationError;

/// Pause of idle vCPUs only once they are back in `KVM_RUN`.
const IDLE_SETTLE: Duration = Duration::from_millis(5);

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

fn guest_err(msg: impl Into<String>) -> IntegrationError {
    IntegrationError::Guest(msg.into())
}

fn median(v: Vec<f64>) -> f64 {
    median_by(v, f64::total_cmp).unwrap_or(0.0)
}

/// A VM whose vCPU 0 runs the port-I/O loop at CPL 3 (KVM's supported CPUID, loader
/// registers).
fn pio_vm() -> Result<(BareVm, VcpuFd), IntegrationError> {
    let bare = BareVm::new()?;
    let mut fds = bare.runnable_vcpus(&crate::guest::pio_loop(), 1)?;
    let fd = fds
        .pop()
        .ok_or_else(|| guest_err("no vCPU for the port-I/O loop"))?;
    Ok((bare, fd))
}

/// A vCPU actor over `fd` with `handler`, spawned paused.
fn spawn_actor(
    vm: &Vm,
    id: u32,
    fd: VcpuFd,
    handler: Arc<dyn ExitHandler>,
) -> Result<VcpuHandle, IntegrationError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| guest_err(format!("eventfd: {e}")))?;
    let parts = VcpuParts {
        id,
        vcpu: fd,
        vcpu_mmap_size: vm.vcpu_mmap_size(),
        handler,
        exit_evt: Arc::new(evt),
    };
    VcpuHandle::spawn(parts, VcpuOptions::default())
        .map_err(|e| guest_err(format!("spawning vCPU actor {id}: {}", e.error)))
}

/// Asks the actor to exit and joins it.
fn exit_actor(handle: VcpuHandle) -> Result<(), IntegrationError> {
    let _ = handle.request(VcpuRequest::Exit, ACK_TIMEOUT);
    handle
        .join(ACK_TIMEOUT)
        .map(drop)
        .map_err(|e| guest_err(format!("joining a vCPU actor: {e}")))
}

/// Exits per second through an actor over `window` (after a short warm-up).
fn actor_rate(window: Duration) -> Result<f64, IntegrationError> {
    let (bare, fd) = pio_vm()?;
    let handle = spawn_actor(bare.vm(), 0, fd, Arc::new(CountingHandler::default()))?;
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
    exit_actor(handle)?;
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

/// Sends `req` to every actor, then waits for every reply.
fn all(handles: &[VcpuHandle], req: VcpuRequest) -> Result<(), IntegrationError> {
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
    Ok(())
}

/// `iters` pause/resume rounds of `n` actors on idle vCPUs.
fn actor_idle(n: u32, iters: u32) -> Result<Vec<PauseResume>, IntegrationError> {
    let bare = BareVm::new()?;
    let handler: Arc<dyn ExitHandler> = Arc::new(CountingHandler::default());
    let handles = bare
        .idle_vcpus(n)?
        .into_iter()
        .zip(1..)
        .map(|(fd, id)| spawn_actor(bare.vm(), id, fd, Arc::clone(&handler)))
        .collect::<Result<Vec<_>, _>>()?;
    all(&handles, VcpuRequest::Resume)?;
    let samples = pause_resume_rounds(
        iters,
        IDLE_SETTLE,
        || all(&handles, VcpuRequest::Pause),
        || all(&handles, VcpuRequest::Resume),
    )?;
    for h in handles {
        exit_actor(h)?;
    }
    Ok(samples)
}

/// `iters` pause/resume rounds of the bare kick harness on `n` idle vCPUs.
fn bare_idle(n: u32, iters: u32) -> Result<Vec<PauseResume>, IntegrationError> {
    let bare = BareVm::new()?;
    let fds = bare.idle_vcpus(n)?;
    let kicked = KickedVcpus::spawn(bare, fds)?;
    kicked.resume()?;
    pause_resume_rounds(iters, IDLE_SETTLE, || kicked.pause(), || kicked.resume())
}

/// Measures [`IdleLatency`] for `n` vCPUs over `iters` pause/resume pairs (at least one).
pub fn idle_pause_resume(n: u32, iters: u32) -> Result<IdleLatency, IntegrationError> {
    let iters = iters.max(1);
    let bare = PauseResume::medians(&bare_idle(n, iters)?);
    let actor = PauseResume::medians(&actor_idle(n, iters)?);
    Ok(IdleLatency {
        vcpus: n,
        pause_actor: actor.pause,
        pause_bare: bare.pause,
        resume_actor: actor.resume,
        resume_bare: bare.resume,
    })
}

/// The rows of [`super::table`] for these measurements, in milliseconds: the exit
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
    for l in idle {
        out.push(BenchLine::new(
            "pause_idle",
            "vCPU actors vs bare threads, vCPUs blocked in KVM_RUN (APs without INIT/SIPI): \
             kick until all out of KVM_RUN and acknowledged",
            l.vcpus,
            l.pause_actor,
            Some(l.pause_bare),
        ));
        out.push(BenchLine::new(
            "resume_idle",
            "vCPU actors vs bare threads, back into KVM_RUN, all acknowledged",
            l.vcpus,
            l.resume_actor,
            Some(l.resume_bare),
        ));
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
        if crate::kvm_or_skip("bench::actor::both_sides_measure_on_real_kvm").is_none() {
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
