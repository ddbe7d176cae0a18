//! Per-vCPU counters, written by the vCPU thread and readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The kinds of `KVM_RUN` outcome the actor counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    SystemEvent,
    InternalError,
    FailEntry,
    Unknown,
    Eintr,
    Eagain,
}

/// Live counters of one vCPU, written by the vCPU thread only (relaxed atomics: each counter
/// is exact, a snapshot of several is not one instant).
#[derive(Debug, Default)]
pub(crate) struct VcpuMetrics {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    hlt: AtomicU64,
    shutdown: AtomicU64,
    system_event: AtomicU64,
    internal_error: AtomicU64,
    fail_entry: AtomicU64,
    unknown: AtomicU64,
    eintr: AtomicU64,
    eagain: AtomicU64,
    device_errors: AtomicU64,
    pauses: AtomicU64,
    resumes: AtomicU64,
    run_time_ns: AtomicU64,
}

// Only the vCPU thread writes the counters, so a load and a store keep them exact without
// the cost of a locked read-modify-write on the exit path; readers see whole values.
fn bump(c: &AtomicU64) {
    add(c, 1);
}

fn add(c: &AtomicU64, n: u64) -> u64 {
    let v = c.load(Ordering::Relaxed).wrapping_add(n);
    c.store(v, Ordering::Relaxed);
    v
}

impl VcpuMetrics {
    pub(crate) fn count_exit(&self, kind: ExitKind) {
        bump(match kind {
            ExitKind::IoIn => &self.io_in,
            ExitKind::IoOut => &self.io_out,
            ExitKind::MmioRead => &self.mmio_read,
            ExitKind::MmioWrite => &self.mmio_write,
            ExitKind::Hlt => &self.hlt,
            ExitKind::Shutdown => &self.shutdown,
            ExitKind::SystemEvent => &self.system_event,
            ExitKind::InternalError => &self.internal_error,
            ExitKind::FailEntry => &self.fail_entry,
            ExitKind::Unknown => &self.unknown,
            ExitKind::Eintr => &self.eintr,
            ExitKind::Eagain => &self.eagain,
        })
    }

    /// Counts a device error and returns the new total.
    pub(crate) fn count_device_error(&self) -> u64 {
        add(&self.device_errors, 1)
    }

    pub(crate) fn count_pause(&self) {
        bump(&self.pauses)
    }

    pub(crate) fn count_resume(&self) {
        bump(&self.resumes)
    }

    pub(crate) fn add_run_time_ns(&self, ns: u64) {
        add(&self.run_time_ns, ns);
    }

    pub(crate) fn snapshot(&self, vcpu_id: u32) -> VcpuMetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VcpuMetricsSnapshot {
            vcpu_id,
            exits: ExitCounts {
                io_in: r(&self.io_in),
                io_out: r(&self.io_out),
                mmio_read: r(&self.mmio_read),
                mmio_write: r(&self.mmio_write),
                hlt: r(&self.hlt),
                shutdown: r(&self.shutdown),
                system_event: r(&self.system_event),
                internal_error: r(&self.internal_error),
                fail_entry: r(&self.fail_entry),
                unknown: r(&self.unknown),
                eintr: r(&self.eintr),
                eagain: r(&self.eagain),
            },
            device_errors: r(&self.device_errors),
            pauses: r(&self.pauses),
            resumes: r(&self.resumes),
            run_time_ns: r(&self.run_time_ns),
        }
    }
}

/// How often each `KVM_RUN` outcome happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// `KVM_EXIT_IO`, direction in.
    pub io_in: u64,
    /// `KVM_EXIT_IO`, direction out.
    pub io_out: u64,
    /// `KVM_EXIT_MMIO` reads.
    pub mmio_read: u64,
    /// `KVM_EXIT_MMIO` writes.
    pub mmio_write: u64,
    /// `KVM_EXIT_HLT`.
    pub hlt: u64,
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    pub shutdown: u64,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    pub system_event: u64,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    pub internal_error: u64,
    /// `KVM_EXIT_FAIL_ENTRY`.
    pub fail_entry: u64,
    /// Any other exit.
    pub unknown: u64,
    /// `KVM_RUN` returned `EINTR` (a kick, or `immediate_exit`).
    pub eintr: u64,
    /// `KVM_RUN` returned `EAGAIN` (e.g. an AP woken by INIT/SIPI).
    pub eagain: u64,
}

impl ExitCounts {
    /// The sum of all exits that came back from the guest (not `EINTR`/`EAGAIN`).
    pub fn guest_exits(&self) -> u64 {
        self.io_in
            + self.io_out
            + self.mmio_read
            + self.mmio_write
            + self.hlt
            + self.shutdown
            + self.system_event
            + self.internal_error
            + self.fail_entry
            + self.unknown
    }
}

/// A copy of one vCPU's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuMetricsSnapshot {
    /// The vCPU.
    pub vcpu_id: u32,
    /// Exits by kind.
    pub exits: ExitCounts,
    /// Errors returned by the [`ExitHandler`](crate::ExitHandler).
    pub device_errors: u64,
    /// Transitions `Running` -> `Paused`.
    pub pauses: u64,
    /// Transitions `Paused` -> `Running`.
    pub resumes: u64,
    /// Nanoseconds spent inside the `KVM_RUN` ioctl.
    pub run_time_ns: u64,
}
