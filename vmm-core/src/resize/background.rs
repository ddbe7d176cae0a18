//! Resizes on a background thread: [`AsyncResizer`] and its [`ResizeHandle`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ResizeOutcome;
use crate::error::ResizeError;
use crate::VcpuManager;

/// Runs resizes of a shared [`VcpuManager`] in the background
/// ([`VcpuManager::resize_shared`] on a thread: the manager's lock is not held while the guest
/// answers), one at a time: a second [`start`](Self::start) while one runs is
/// [`ResizeError::Busy`] at once.
///
/// Cloning gives another handle on the same manager and the same one-at-a-time rule. Two
/// resizers made with [`new`](Self::new) on the same manager do not see each other in
/// [`start`](Self::start), but the manager's state machine still allows one resize at a time:
/// the second one's outcome is [`ResizeError::Busy`].
#[derive(Clone)]
pub struct AsyncResizer {
    manager: Arc<Mutex<VcpuManager>>,
    /// The target of the resize in flight, or [`IDLE`].
    in_flight: Arc<AtomicU64>,
}

/// No resize in flight (outside the range of any `u32` target).
const IDLE: u64 = u64::MAX;

impl std::fmt::Debug for AsyncResizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResizer")
            .field("in_flight", &self.in_flight_target())
            .finish_non_exhaustive()
    }
}

/// Clears the in-flight marker when the worker ends, whatever happens in it.
struct InFlightGuard(Arc<AtomicU64>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::SeqCst);
    }
}

impl AsyncResizer {
    /// A resizer for `manager` (shared with whoever else uses it; a resize holds the lock
    /// only for its first and last phase).
    pub fn new(manager: Arc<Mutex<VcpuManager>>) -> Self {
        Self {
            manager,
            in_flight: Arc::new(AtomicU64::new(IDLE)),
        }
    }

    /// The shared manager.
    pub fn manager(&self) -> &Arc<Mutex<VcpuManager>> {
        &self.manager
    }

    /// The target of the resize running now, if any.
    pub fn in_flight_target(&self) -> Option<u32> {
        u32::try_from(self.in_flight.load(Ordering::SeqCst)).ok()
    }

    /// Starts [`VcpuManager::resize_shared`]`(manager, target)` on a background thread and returns at
    /// once; wait for the outcome with [`ResizeHandle::wait_timeout`].
    ///
    /// # Errors
    ///
    /// [`ResizeError::Busy`] while another resize of this resizer runs,
    /// [`ResizeError::Thread`] if the thread cannot be started.
    pub fn start(&self, target: u32) -> Result<ResizeHandle, ResizeError> {
        if let Err(in_flight) = self.in_flight.compare_exchange(
            IDLE,
            u64::from(target),
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            return Err(ResizeError::Busy {
                target,
                in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
            });
        }
        let guard = InFlightGuard(Arc::clone(&self.in_flight));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let manager = Arc::clone(&self.manager);
        std::thread::Builder::new()
            .name(format!("vcpu-resize-{target}"))
            .spawn(move || {
                // The manager's lock is held for phases 1 and 3 only.
                let outcome = VcpuManager::resize_shared(&manager, target);
                // Idle again, and this thread's share of the manager released, before the
                // outcome is seen: the waiter may start the next one (or take the manager back)
                // at once. A panic above also clears the marker, through the guard's drop.
                drop(manager);
                drop(guard);
                // The handle may be gone: nobody waits, the outcome is dropped.
                let _ = tx.send(outcome);
            })
            // The closure (and the guard in it) is dropped on failure: the marker is cleared.
            .map_err(|source| ResizeError::Thread { source })?;
        Ok(ResizeHandle { target, rx })
    }
}

/// A resize running in the background ([`AsyncResizer::start`]).
#[derive(Debug)]
pub struct ResizeHandle {
    target: u32,
    rx: crossbeam_channel::Receiver<Result<ResizeOutcome, ResizeError>>,
}

impl ResizeHandle {
    /// The target vCPU count of this resize.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Waits at most `timeout` for the outcome.
    ///
    /// # Errors
    ///
    /// The resize's own error; [`ResizeError::StillRunning`] if it has not finished (wait
    /// again later); [`ResizeError::OutcomeGone`] if an earlier wait already took it.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ResizeOutcome, ResizeError> {
        match self.rx.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(ResizeError::StillRunning {
                target: self.target,
                waited: timeout,
            }),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(ResizeError::OutcomeGone {
                    target: self.target,
                })
            }
        }
    }
}
