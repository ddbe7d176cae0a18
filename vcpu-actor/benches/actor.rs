//! Exit-path throughput and pause/resume latency of the vCPU actor, each next to the bare
//! cost of the same thing without the actor.
//!
//! `cargo bench -p vcpu-actor`. Add `-- --quick` for a smoke run with few iterations (also
//! what `cargo test --benches` runs), and `pio`, `idle` or `spin` to run only those parts.
//! Needs /dev/kvm (prints SKIPPED without it, fails with VCPU_REQUIRE_KVM=1).
//!
//! Rows:
//! - port-I/O exits per second: a CPL-3 guest doing one `out` per loop, through the actor
//!   (with a handler that counts) versus a bare `VcpuFd::run` loop calling the same handler,
//!   both on a fresh thread; the ratio is the median of per-round ratios. Background load
//!   moves this a few percent either way, so the CPU time each spends outside `KVM_RUN` per
//!   exit is printed too, and the share of the bare rate that this extra time leaves.
//! - pause / resume latency for 1, 8, 64 vCPUs: from sending `Pause` (`Resume`) to all until
//!   all replied, versus bare threads kicked the same way (immediate_exit through a mapping of
//!   their own + a signal) that report and block once out of `KVM_RUN` (resume: are told to
//!   go on and acknowledge). `idle` vCPUs are APs that never got INIT/SIPI, blocked inside
//!   `KVM_RUN` without using a CPU: this measures the kick and message path. `spin` vCPUs run
//!   a CPL-3 loop and compete for the host's cores: those numbers are bound by the scheduler
//!   (see shared/docs/host-kvm.md) and swing with any harness detail.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guests, kvm_or_skip, TestVm, CODE_ADDR, DATA_ADDR, TIMEOUT};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::sync::mpsc;
use vcpu_actor::{
    DeviceError, ExitHandler, IoOutcome, ReplyOutcome, VcpuActor, VcpuHandle, VcpuOptions,
    VcpuRequest,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PIO_PORT: u16 = 0x540;
const COUNTER_PORT: u16 = 0x541;

/// The least a device can do: count the access.
#[derive(Default)]
struct CountingHandler(AtomicU64);

impl ExitHandler for CountingHandler {
    fn pio_read(&self, _: u32, _: u16, d: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        d.fill(0);
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(IoOutcome::Handled)
    }
    fn pio_write(&self, _: u32, _: u16, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(IoOutcome::Handled)
    }
    fn mmio_read(&self, _: u32, _: u64, d: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        d.fill(0);
        Ok(IoOutcome::Handled)
    }
    fn mmio_write(&self, _: u32, _: u64, _: &[u8]) -> Result<IoOutcome, DeviceError> {
        Ok(IoOutcome::Handled)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn spawn_actor(vm: &TestVm, id: u32, vcpu: VcpuFd, h: Arc<CountingHandler>) -> VcpuHandle {
    let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    VcpuActor::spawn(id, vcpu, vm.mmap_size, h, evt, VcpuOptions::default()).expect("spawn")
}

fn expect_all(handles: &[VcpuHandle], req: VcpuRequest, want: ReplyOutcome) {
    let ids: Vec<_> = handles.iter().map(|h| h.send(req).expect("send")).collect();
    for (h, id) in handles.iter().zip(ids) {
        let r = h.wait_reply(id, TIMEOUT).expect("reply");
        assert_eq!(r.outcome, want);
    }
}

/// Port-I/O exits per second through the actor over `window`, and the nanoseconds per exit
/// spent outside `KVM_RUN` (the actor's own work plus the handler).
fn pio_rate_actor(kvm: Kvm, window: Duration) -> (f64, f64) {
    let vm = TestVm::new(kvm, false);
    vm.load(guests::pio(), CODE_ADDR);
    let vcpu = vm.new_cpl3_vcpu(0, CODE_ADDR, DATA_ADDR, PIO_PORT.into(), 0);
    let h = spawn_actor(&vm, 0, vcpu, Arc::default());
    expect_all(
        std::slice::from_ref(&h),
        VcpuRequest::Resume,
        ReplyOutcome::Resumed,
    );
    std::thread::sleep(Duration::from_millis(20));
    let (t0, m0) = (Instant::now(), h.metrics());
    std::thread::sleep(window);
    let (t1, m1) = (Instant::now(), h.metrics());
    h.join(TIMEOUT).expect("join");
    let exits = (m1.exits.io_out - m0.exits.io_out) as f64;
    let wall = (t1 - t0).as_nanos() as f64;
    let inside = (m1.run_time_ns - m0.run_time_ns) as f64;
    (exits * 1e9 / wall, (wall - inside) / exits)
}

/// The same for a bare `VcpuFd::run` loop on the same guest and handler.
fn pio_rate_bare(kvm: Kvm, window: Duration) -> (f64, f64) {
    let vm = TestVm::new(kvm, false);
    vm.load(guests::pio(), CODE_ADDR);
    let mut vcpu = vm.new_cpl3_vcpu(0, CODE_ADDR, DATA_ADDR, PIO_PORT.into(), 0);
    let handler = CountingHandler::default();
    let warmup = Instant::now() + Duration::from_millis(20);
    while Instant::now() < warmup {
        let _ = vcpu.run();
    }
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut inside = Duration::ZERO;
    loop {
        let t = Instant::now();
        let exit = vcpu.run();
        inside += t.elapsed();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                let _ = handler.pio_write(0, port, data);
                n += 1;
            }
            other => panic!("bare loop: unexpected exit {other:?}"),
        }
        if n % 64 == 0 && t0.elapsed() >= window {
            break;
        }
    }
    let wall = t0.elapsed().as_nanos() as f64;
    let n = n as f64;
    (n * 1e9 / wall, (wall - inside.as_nanos() as f64) / n)
}

/// What the vCPUs do while they are in `KVM_RUN`.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// APs never sent INIT/SIPI: blocked inside `KVM_RUN`, using no CPU. Measures the kick
    /// and message path itself.
    Idle,
    /// The counter guest spinning at CPL 3: every vCPU wants a core, so on a 2-core host the
    /// numbers are bound by the scheduler.
    Spin,
}

impl Load {
    fn vm(self, kvm: Kvm) -> TestVm {
        let vm = TestVm::new(kvm, self == Load::Idle);
        vm.load(guests::counter(), CODE_ADDR);
        vm
    }

    fn vcpu(self, vm: &TestVm, i: usize) -> VcpuFd {
        match self {
            // vCPU ids from 1: none is the BSP, all stay KVM_MP_STATE_UNINITIALIZED.
            Load::Idle => vm.new_plain_vcpu(i as u64 + 1),
            Load::Spin => {
                let data = DATA_ADDR + 64 * i as u64;
                vm.new_cpl3_vcpu(i as u64, CODE_ADDR, data, COUNTER_PORT.into(), 0)
            }
        }
    }
}

/// Pause and resume latency (medians, µs) of `n` actors.
fn latency_actor(kvm: Kvm, load: Load, n: usize, iters: usize) -> (f64, f64) {
    let vm = load.vm(kvm);
    let handler = Arc::new(CountingHandler::default());
    let handles: Vec<_> = (0..n)
        .map(|i| spawn_actor(&vm, i as u32, load.vcpu(&vm, i), Arc::clone(&handler)))
        .collect();
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        expect_all(&handles, VcpuRequest::Resume, ReplyOutcome::Resumed);
        resume.push(t.elapsed().as_secs_f64() * 1e6);
        // Let every vCPU get into KVM_RUN.
        std::thread::sleep(Duration::from_millis(10));
        let t = Instant::now();
        expect_all(&handles, VcpuRequest::Pause, ReplyOutcome::Paused);
        pause.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for h in handles {
        h.join(TIMEOUT).expect("join");
    }
    (median(pause), median(resume))
}

/// The bare equivalent: threads that run the same guest and, once kicked out of `KVM_RUN`
/// (immediate_exit through the kicker's own kvm_run mapping + a signal), report and block
/// until told to go on.
fn latency_bare(kvm: Kvm, load: Load, n: usize, iters: usize, signal: i32) -> (f64, f64) {
    struct Bare {
        run: *mut u8,
        size: usize,
        pthread: libc::pthread_t,
        go: mpsc::SyncSender<()>,
    }
    let vm = load.vm(kvm);
    let (out_tx, out_rx) = mpsc::channel::<()>();
    let (ack_tx, ack_rx) = mpsc::channel::<()>();
    let mut bare = Vec::new();
    let mut joins = Vec::new();
    for i in 0..n {
        let mut vcpu = load.vcpu(&vm, i);
        // SAFETY: a shared mapping of the vCPU's kvm_run; unmapped below.
        let run = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                vm.mmap_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        assert_ne!(run, libc::MAP_FAILED);
        let (go_tx, go_rx) = mpsc::sync_channel::<()>(1);
        let (out_tx, ack_tx) = (out_tx.clone(), ack_tx.clone());
        let join = std::thread::spawn(move || {
            while go_rx.recv().is_ok() {
                vcpu.set_kvm_immediate_exit(0);
                let _ = ack_tx.send(());
                loop {
                    match vcpu.run() {
                        Err(e) if e.errno() == libc::EINTR => break,
                        Ok(_) => {}
                        Err(e) => panic!("bare vCPU: {e}"),
                    }
                }
                let _ = out_tx.send(());
            }
            vcpu
        });
        bare.push(Bare {
            run: run.cast(),
            size: vm.mmap_size,
            pthread: join.as_pthread_t(),
            go: go_tx,
        });
        joins.push(join);
    }
    let off = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..iters {
        let t = Instant::now();
        for b in &bare {
            b.go.send(()).expect("go");
        }
        for _ in 0..n {
            ack_rx.recv_timeout(TIMEOUT).expect("bare resume ack");
        }
        resume.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(10));
        let t = Instant::now();
        for b in &bare {
            // SAFETY: `off` is inside the live mapping; the byte is shared with the kernel.
            unsafe { &*b.run.add(off).cast::<AtomicU8>() }.store(1, Ordering::SeqCst);
            // SAFETY: the thread is not joined yet.
            unsafe { libc::pthread_kill(b.pthread, signal) };
        }
        for _ in 0..n {
            out_rx
                .recv_timeout(TIMEOUT)
                .expect("bare vCPU out of KVM_RUN");
        }
        pause.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for b in bare {
        drop(b.go);
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(b.run.cast(), b.size) };
    }
    for j in joins {
        j.join().expect("bare thread");
    }
    (median(pause), median(resume))
}

extern "C" fn bare_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn row(what: &str, ours: f64, bare: f64, unit: &str) {
    println!(
        "{what:<34} {ours:>12.1} {bare:>12.1} {unit:<8} {:>7.3}",
        ours / bare
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; run as a test (`cargo test --benches`), it does not:
    // then only the quick smoke run.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    // Positional words pick the parts to run: `pio`, `idle`, `spin` (default: all).
    // (cargo bench passes `--bench`; it and other flags are ignored.)
    let parts: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let wants = |p: &str| parts.is_empty() || parts.contains(&p);
    let Some(_) = kvm_or_skip("vcpu-actor bench") else {
        return;
    };
    let kvm = || Kvm::new().expect("/dev/kvm");
    let (window, rounds, iters) = if quick {
        (Duration::from_millis(200), 1, 3)
    } else {
        (Duration::from_millis(500), 9, 15)
    };
    // The bare kick uses its own signal, distinct from the actor's (SIGRTMIN + 0).
    let bare_signal = vmm_sys_util::signal::SIGRTMIN() + 1;
    vmm_sys_util::signal::register_signal_handler(bare_signal, bare_kick).expect("handler");

    println!(
        "vcpu-actor bench ({} mode; medians)",
        if quick { "quick" } else { "full" }
    );
    println!(
        "{:<34} {:>12} {:>12} {:<8} {:>7}",
        "", "actor", "bare", "unit", "ratio"
    );
    if wants("pio") {
        // Alternate the two so that background load hits both alike; the ratio is the
        // median of the per-round ratios.
        let (mut ours, mut bare, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            // Both run on a fresh thread (the actor's is its vCPU thread).
            let k = kvm();
            let b = std::thread::spawn(move || pio_rate_bare(k, window))
                .join()
                .expect("bare thread");
            let o = pio_rate_actor(kvm(), window);
            ratios.push(o.0 / b.0);
            bare.push(b);
            ours.push(o);
        }
        let col = |v: &[(f64, f64)], i: usize| {
            median(v.iter().map(|r| if i == 0 { r.0 } else { r.1 }).collect())
        };
        let (rate_o, rate_b) = (col(&ours, 0), col(&bare, 0));
        let (out_o, out_b) = (col(&ours, 1), col(&bare, 1));
        println!(
            "{:<34} {rate_o:>12.1} {rate_b:>12.1} {:<8} {:>7.3}",
            "port-I/O exits per second",
            "exits/s",
            median(ratios)
        );
        row("  time outside KVM_RUN per exit", out_o, out_b, "ns");
        // What the actor's own work per exit costs, as a share of a bare exit's round trip:
        // a figure that background load on the host does not move much.
        let kept = 1.0 - (out_o - out_b) * 1e-9 * rate_b;
        println!(
            "  rate kept, from the extra time per exit: {:.1}%",
            kept * 100.0
        );
    }
    for (load, name) in [(Load::Idle, "idle"), (Load::Spin, "spin")] {
        if !wants(name) {
            continue;
        }
        for n in [1, 8, 64] {
            let (bp, br) = latency_bare(kvm(), load, n, iters, bare_signal);
            let (ap, ar) = latency_actor(kvm(), load, n, iters);
            row(&format!("pause, {n} {name} vCPUs"), ap, bp, "us");
            row(&format!("resume, {n} {name} vCPUs"), ar, br, "us");
        }
    }
}
