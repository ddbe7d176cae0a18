//! Per-vCPU counters, written by the vCPU thread and readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The kinds of `KVM_RUN` outcome the actor counts (the discriminant indexes the counters).
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

/// How many [`ExitKind`]s there are.
const EXIT_KINDS: usize = ExitKind::Eagain as usize + 1;

/// Live counters of one vCPU, written by the vCPU thread only (relaxed atomics: each counter
/// is exact, a snapshot of several is not one instant).
#[derive(Debug, Default)]
pub(crate) struct VcpuMetrics {
    /// Indexed by `ExitKind as usize`.
    exits: [AtomicU64; EXIT_KINDS],
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
        bump(&self.exits[kind as usize])
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
        let e = |kind: ExitKind| r(&self.exits[kind as usize]);
        VcpuMetricsSnapshot {
            vcpu_id,
            exits: ExitCounts {
                io_in: e(ExitKind::IoIn),
                io_out: e(ExitKind::IoOut),
                mmio_read: e(ExitKind::MmioRead),
                mmio_write: e(ExitKind::MmioWrite),
                hlt: e(ExitKind::Hlt),
                shutdown: e(ExitKind::Shutdown),
                system_event: e(ExitKind::SystemEvent),
                internal_error: e(ExitKind::InternalError),
                fail_entry: e(ExitKind::FailEntry),
                unknown: e(ExitKind::Unknown),
                eintr: e(ExitKind::Eintr),
                eagain: e(ExitKind::Eagain),
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
    /// Every counter with its field's name, in declaration order (`("io_in", n)` ...
    /// `("eagain", n)`): for exporters that label exits by kind.
    pub fn named(&self) -> [(&'static str, u64); EXIT_KINDS] {
        [
            ("io_in", self.io_in),
            ("io_out", self.io_out),
            ("mmio_read", self.mmio_read),
            ("mmio_write", self.mmio_write),
            ("hlt", self.hlt),
            ("shutdown", self.shutdown),
            ("system_event", self.system_event),
            ("internal_error", self.internal_error),
            ("fail_entry", self.fail_entry),
            ("unknown", self.unknown),
            ("eintr", self.eintr),
            ("eagain", self.eagain),
        ]
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_exit_kind_has_its_own_counter() {
        let m = VcpuMetrics::default();
        let kinds = [
            ExitKind::IoIn,
            ExitKind::IoOut,
            ExitKind::MmioRead,
            ExitKind::MmioWrite,
            ExitKind::Hlt,
            ExitKind::Shutdown,
            ExitKind::SystemEvent,
            ExitKind::InternalError,
            ExitKind::FailEntry,
            ExitKind::Unknown,
            ExitKind::Eintr,
            ExitKind::Eagain,
        ];
        assert_eq!(kinds.len(), EXIT_KINDS);
        // Kind number i is counted i + 1 times.
        for (i, kind) in kinds.into_iter().enumerate() {
            for _ in 0..=i {
                m.count_exit(kind);
            }
        }
        let e = m.snapshot(7).exits;
        let got = e.named().map(|(_, n)| n);
        assert_eq!(got, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!((e.io_in, e.mmio_write, e.eagain), (1, 4, 12));
        let names = e.named().map(|(name, _)| name);
        assert_eq!(
            (names[0], names[3], names[11]),
            ("io_in", "mmio_write", "eagain")
        );
        assert_eq!(e.guest_exits(), (1..=10).sum::<u64>());
    }
}
