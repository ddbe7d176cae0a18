//! What a restored guest sees, on real KVM, through the vCPU manager's `save_to` and
//! `restore_from`:
//!
//! - a snapshot taken while the vCPU sits in the middle of a port-I/O exit (the device's
//!   handler holds it there until the pause was sent): the restored guest has the interrupted
//!   `in` or `out` completed exactly once (the guest's sum of the values read, its iteration
//!   count and the sequence numbers the devices saw before and after the restore all agree);
//! - the BSP's LAPIC timer, armed by the guest in periodic mode, is still armed and running
//!   after the restore (its current count keeps reloading).

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod common;

use integration::guest::lapic::{LVT_TIMER_OFFSET, LVT_TIMER_PERIODIC, TMICT_OFFSET};
use integration::guest::{
    build_with_program, lapic_timer, pio_count, ports, GuestCode, LAPIC_TIMER_ADDR, PIO_COUNT_ADDR,
    TIMER_INITIAL_COUNT, TIMER_VECTOR,
};
use integration::kvm_or_skip;
use integration::loader::memory_map::DEFAULT_LOAD_ADDR;
use integration::loader::LoadedProgram;
use vcpu_actor::{DeviceError, IoOutcome};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::arch::x86_64::lapic::read_register;
use vmm_core::devices::le_value;
use vmm_core::{
    BusAccess, BusDevice, BusSpace, VcpuConfig, VcpuManager, VcpuManagerOptions, Vm, VmOptions,
};

/// Long enough for a loaded 2-core host; only reached when something is wrong.
const TIMEOUT: Duration = Duration::from_secs(60);
const MEMORY: u64 = 16 << 20;

/// One vCPU (one socket, die, core and thread), no vPMU.
fn one_vcpu() -> VcpuConfig {
    VcpuConfig::with_counts(1, 1).expect("one vCPU")
}

/// `code` loaded into a VM of [`MEMORY`] with [`one_vcpu`] (the vCPU not created yet).
fn one_vcpu_vm(
    kvm: kvm_ioctls::Kvm,
    code: &GuestCode,
) -> (Arc<Vm>, VcpuManager, Arc<LoadedProgram>) {
    build_with_program(
        kvm,
        code,
        one_vcpu(),
        VmOptions {
            memory_size: MEMORY,
            ..VmOptions::default()
        },
        VcpuManagerOptions::default(),
    )
    .unwrap()
}

fn read_u64(vm: &Vm, addr: u64) -> u64 {
    vm.memory().read_obj::<u64>(GuestAddress(addr)).unwrap()
}

/// Polls `cond` every millisecond until it holds or [`TIMEOUT`] passes; whether it held.
fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    In,
    Out,
}

#[derive(Debug, Default)]
struct PortState {
    /// The value the next `in` returns (1, 2, 3 ... across the devices of one guest).
    next_value: u64,
    /// Every value returned, in order.
    reads: Vec<u64>,
    /// Every value written, in order.
    writes: Vec<u64>,
    /// Hold the vCPU inside the next access of this kind.
    armed: Option<Access>,
    /// (reads, writes) when a handler held the vCPU.
    held_at: Option<(usize, usize)>,
    release: bool,
}

/// The device on [`ports::COUNT`]: answers each `in` with the next value, logs every `out`,
/// and can hold the vCPU inside one access (on the vCPU's thread) until the test lets it go.
#[derive(Debug)]
struct CountPort {
    state: Mutex<PortState>,
    changed: Condvar,
}

impl CountPort {
    /// A device whose first `in` returns `first_value`.
    fn new(first_value: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PortState {
                next_value: first_value,
                ..PortState::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PortState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(self: &Arc<Self>, vm: &Vm) {
        vm.io_bus()
            .register(
                BusSpace::Pio,
                u64::from(ports::COUNT),
                4,
                "count-port",
                Arc::clone(self) as Arc<dyn BusDevice>,
            )
            .unwrap();
    }

    /// Holds the handler while armed for `access`; gives up after [`TIMEOUT`] so that a
    /// failing test cannot hang.
    fn maybe_hold(&self, mut s: MutexGuard<'_, PortState>, access: Access) {
        if s.armed != Some(access) {
            return;
        }
        s.armed = None;
        s.held_at = Some((s.reads.len(), s.writes.len()));
        self.changed.notify_all();
        let start = Instant::now();
        while !s.release && start.elapsed() < TIMEOUT {
            s = self
                .changed
                .wait_timeout(s, TIMEOUT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.release = false;
    }

    /// Arms the device for `access` and waits until a handler holds the vCPU there;
    /// returns (reads, writes) at that moment, the held access included.
    fn hold_next(&self, access: Access) -> (usize, usize) {
        let mut s = self.lock();
        s.held_at = None;
        s.release = false;
        s.armed = Some(access);
        let start = Instant::now();
        loop {
            if let Some(at) = s.held_at {
                return at;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "the guest did not reach its {access:?}"
            );
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn release(&self) {
        self.lock().release = true;
        self.changed.notify_all();
    }

    fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.reads.len(), s.writes.len())
    }

    fn log(&self) -> (Vec<u64>, Vec<u64>) {
        let s = self.lock();
        (s.reads.clone(), s.writes.clone())
    }
}

impl BusDevice for CountPort {
    fn read(&self, _: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        let mut s = self.lock();
        let v = s.next_value;
        s.next_value += 1;
        s.reads.push(v);
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
        self.maybe_hold(s, Access::In);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, _: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        let mut s = self.lock();
        s.writes.push(le_value(data));
        self.maybe_hold(s, Access::Out);
        Ok(IoOutcome::Handled)
    }
}

/// Pauses the VM while the vCPU is held inside its next `access` to `port`: the pause is
/// sent, then the handler returns. Returns whether the pause landed in that exit (the
/// device saw no access after the held one); `settle` is how long the pause has to be
/// enqueued before the handler returns (`pause_all` gives no signal that it has sent).
fn pause_inside(vcpus: &VcpuManager, port: &CountPort, access: Access, settle: Duration) -> bool {
    let held = port.hold_next(access);
    std::thread::scope(|s| {
        let pausing = s.spawn(|| vcpus.pause_all());
        std::thread::sleep(settle);
        port.release();
        pausing.join().unwrap().unwrap();
    });
    port.counts() == held
}

/// [`pause_inside`], retried with a longer settle time (resuming in between) until the pause
/// lands inside the exit.
fn pause_inside_exit(vcpus: &VcpuManager, port: &CountPort, access: Access) {
    let mut settle = Duration::from_millis(20);
    for _ in 0..8 {
        if pause_inside(vcpus, port, access, settle) {
            return;
        }
        vcpus.resume_all().unwrap();
        settle *= 2;
    }
    panic!("the pause never arrived while the vCPU was inside its {access:?} exit");
}

/// T(n) = 1 + 2 + ... + n: the guest's sum after adding the first n values.
fn triangle(n: u64) -> u64 {
    n * (n + 1) / 2
}

/// Saves the pio_count guest while its vCPU is inside an `access`, restores it into a new VM
/// with an equivalent device, runs it on, and checks that the interrupted instruction ran
/// exactly once.
fn snapshot_inside_an_io_exit(access: Access, dir: &Path) {
    let Some(kvm) = kvm_or_skip("snapshot_inside_an_io_exit") else {
        return;
    };
    let (code, after_in) = pio_count();
    let (vm, mut vcpus, entry) = one_vcpu_vm(kvm, &code);
    let before = CountPort::new(1);
    before.register(&vm);
    vcpus.create_boot_vcpus(entry).unwrap();
    vcpus.start_boot_vcpus().unwrap();
    assert!(
        wait_until(|| before.counts().1 >= 10),
        "the guest did not loop"
    );

    pause_inside_exit(&vcpus, &before, access);
    let saved = vcpus.save_to(dir).unwrap();
    let (reads, writes) = before.log();
    let sum = read_u64(&vm, PIO_COUNT_ADDR);
    let count = read_u64(&vm, PIO_COUNT_ADDR + 8);
    let regs = saved.state().vcpus[0].state.regs;
    let last_read = *reads.last().unwrap();
    match access {
        // The `in` is complete in the saved registers: RIP past it, RAX its value; the add
        // has not run.
        Access::In => {
            assert_eq!(regs.rip, DEFAULT_LOAD_ADDR + after_in);
            assert_eq!(regs.rax, last_read);
            assert_eq!(sum, triangle(last_read - 1));
            assert_eq!(count, last_read - 1);
            assert_eq!(writes.len() as u64, count);
        }
        // The `out` of the count is complete.
        Access::Out => {
            assert_eq!(sum, triangle(last_read));
            assert_eq!(count, last_read);
            assert_eq!(*writes.last().unwrap(), count);
        }
    }
    vcpus.exit_all().unwrap();
    drop(vcpus);
    drop(vm);

    // A new VM from the files; its device continues the values where the first stopped.
    let (vm, mut vcpus) = common::restore_with_defaults(dir).unwrap();
    assert_eq!(read_u64(&vm, PIO_COUNT_ADDR), sum);
    assert_eq!(read_u64(&vm, PIO_COUNT_ADDR + 8), count);
    let after = CountPort::new(last_read + 1);
    after.register(&vm);
    vcpus.resume_all().unwrap();
    assert!(
        wait_until(|| after.counts().1 >= 10),
        "the restored guest did not loop on"
    );
    // Stop at a known point: inside an `out` (its count then is the guest's).
    pause_inside_exit(&vcpus, &after, Access::Out);
    let (reads_after, writes_after) = after.log();
    let sum_end = read_u64(&vm, PIO_COUNT_ADDR);
    let count_end = read_u64(&vm, PIO_COUNT_ADDR + 8);
    vcpus.exit_all().unwrap();

    // No `in` or `out` lost or repeated across the restore: the values read are 1..=n once
    // each and all were added; the counts written are 1..=n once each.
    let all_reads: Vec<u64> = reads.iter().chain(&reads_after).copied().collect();
    let all_writes: Vec<u64> = writes.iter().chain(&writes_after).copied().collect();
    let n = count_end;
    assert!(
        all_reads.iter().copied().eq(1..=n),
        "values read: {:?} ... {:?} (count {n})",
        &all_reads[..all_reads.len().min(8)],
        &all_reads[all_reads.len().saturating_sub(8)..]
    );
    assert!(
        all_writes.iter().copied().eq(1..=n),
        "counts written: {:?} ... {:?} (count {n}); around the restore: {:?} | {:?}",
        &all_writes[..all_writes.len().min(8)],
        &all_writes[all_writes.len().saturating_sub(8)..],
        &writes[writes.len().saturating_sub(3)..],
        &writes_after[..writes_after.len().min(3)]
    );
    assert_eq!(sum_end, triangle(n), "the guest's sum of the values read");
}

#[test]
fn a_snapshot_inside_an_in_exit_completes_the_in_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    snapshot_inside_an_io_exit(Access::In, dir.path());
}

#[test]
fn a_snapshot_inside_an_out_exit_completes_the_out_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    snapshot_inside_an_io_exit(Access::Out, dir.path());
}

/// (reloads seen, TMCCT reads) of the lapic_timer guest.
fn timer_progress(vm: &Vm) -> (u64, u64) {
    (
        read_u64(vm, LAPIC_TIMER_ADDR),
        read_u64(vm, LAPIC_TIMER_ADDR + 16),
    )
}

#[test]
fn the_bsps_periodic_lapic_timer_runs_on_after_a_restore() {
    let Some(kvm) = kvm_or_skip("the_bsps_periodic_lapic_timer_runs_on_after_a_restore") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (vm, mut vcpus, entry) = one_vcpu_vm(kvm, &lapic_timer());
    vcpus.create_boot_vcpus(entry).unwrap();
    vcpus.start_boot_vcpus().unwrap();
    assert!(
        wait_until(|| timer_progress(&vm).0 >= 3),
        "the guest's timer did not reload: {:?}",
        timer_progress(&vm)
    );
    vcpus.pause_all().unwrap();
    let saved = vcpus.save_to(dir.path()).unwrap();
    let lapic = &saved.state().vcpus[0].state.lapic;
    assert_eq!(read_register(lapic, TMICT_OFFSET), TIMER_INITIAL_COUNT);
    assert_eq!(
        read_register(lapic, LVT_TIMER_OFFSET),
        LVT_TIMER_PERIODIC | TIMER_VECTOR,
        "LVT timer: periodic, not masked"
    );
    vcpus.exit_all().unwrap();
    drop(vcpus);
    drop(vm);

    let (vm, mut vcpus) = common::restore_with_defaults(dir.path()).unwrap();
    let (reloads, reads) = timer_progress(&vm);
    vcpus.resume_all().unwrap();
    // Still armed and periodic: the current count reloads again, several times.
    let ran_on = wait_until(|| {
        let (r, n) = timer_progress(&vm);
        r >= reloads + 3 && n > reads
    });
    vcpus.pause_all().unwrap();
    let again = vcpus.save().unwrap();
    assert!(
        ran_on,
        "the timer stopped after the restore: {:?} at the restore, {:?} now",
        (reloads, reads),
        timer_progress(&vm)
    );
    let lapic = &again.state().vcpus[0].state.lapic;
    assert_eq!(read_register(lapic, TMICT_OFFSET), TIMER_INITIAL_COUNT);
    drop(again);
    vcpus.exit_all().unwrap();
}
