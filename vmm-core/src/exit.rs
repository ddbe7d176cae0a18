//! The exit path: every vCPU actor shares one exit EventFd (an `Arc`, not a duplicate fd per
//! vCPU) and writes it when it reaches `waiting_exit`; an API caller can write a second "stop requested" EventFd. An
//! [`ExitMonitor`] blocks on both with epoll (no polling, no sleeps).

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slog::{debug, info};
use vcpu_actor::{VcpuExitReason, VcpuState};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{OsError, OsOp, VcpuControlError};
use crate::manager::VcpuManager;

const TOKEN_VCPU_EXIT: u64 = 1;
const TOKEN_STOP_REQUEST: u64 = 2;

/// What woke an [`ExitMonitor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitSignal {
    /// At least one vCPU wrote the exit EventFd (it is in `waiting_exit`, or its thread ended).
    VcpuExit,
    /// Someone called [`ExitMonitor::request_stop`].
    StopRequested,
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopCause {
    /// A vCPU stopped for this reason (triple fault, shutdown port, KVM error ...).
    VcpuExit(VcpuExitReason),
    /// A vCPU thread ended without a reason (it panicked or its mailbox broke).
    VcpuThreadEnded,
    /// The VMM's API asked for the stop.
    StopRequested,
}

/// What [`crate::VcpuManager::run_until_exit`] returns: which vCPU stopped the VM and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStopReason {
    /// The vCPU (KVM vCPU id = APIC ID) that stopped the VM; `None` for an API request.
    pub vcpu_id: Option<u32>,
    /// Its index (creation order).
    pub vcpu_index: Option<u32>,
    /// Why.
    pub reason: StopCause,
    /// Other vCPUs that were in `waiting_exit` at the same time, with their reasons.
    pub also_stopped: Vec<VcpuExitReason>,
}

impl fmt::Display for VmStopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            StopCause::VcpuExit(r) => write!(f, "the VM stopped: {r}")?,
            StopCause::VcpuThreadEnded => write!(
                f,
                "the VM stopped: the thread of vCPU {} ended unexpectedly",
                self.vcpu_id.unwrap_or(u32::MAX)
            )?,
            StopCause::StopRequested => write!(f, "the VM stopped: stop requested")?,
        }
        if !self.also_stopped.is_empty() {
            write!(f, " (and {} more vCPUs)", self.also_stopped.len())?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Events {
    epoll: Epoll,
    /// Shared with every vCPU actor of the VM: one fd for all of them.
    vcpu_exit: Arc<EventFd>,
    stop_request: EventFd,
}

/// Waits for the exit EventFd and the stop-request EventFd. Cheap to clone; usable from any
/// thread.
#[derive(Clone, Debug)]
pub struct ExitMonitor {
    events: Arc<Events>,
}

impl ExitMonitor {
    /// Creates both EventFds and the epoll set.
    ///
    /// # Errors
    ///
    /// [`OsError`] if an EventFd or the epoll set cannot be made.
    pub fn new() -> Result<Self, OsError> {
        let os = OsError::of;
        let vcpu_exit = EventFd::new(EFD_NONBLOCK).map_err(os(OsOp::CreateExitEventFd))?;
        let stop_request =
            EventFd::new(EFD_NONBLOCK).map_err(os(OsOp::CreateStopRequestEventFd))?;
        let epoll = Epoll::new().map_err(os(OsOp::EpollCreate))?;
        for (fd, token) in [
            (vcpu_exit.as_raw_fd(), TOKEN_VCPU_EXIT),
            (stop_request.as_raw_fd(), TOKEN_STOP_REQUEST),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(os(OsOp::EpollCtl))?;
        }
        Ok(Self {
            events: Arc::new(Events {
                epoll,
                vcpu_exit: Arc::new(vcpu_exit),
                stop_request,
            }),
        })
    }

    /// The exit EventFd, shared by every vCPU actor of the VM. It is the monitor's own
    /// EventFd behind an `Arc`, not a duplicate: a vCPU costs the process no fd for it (see
    /// [`VcpuManager::create_vcpus`] on why fds per vCPU matter).
    pub fn vcpu_exit_eventfd(&self) -> Arc<EventFd> {
        Arc::clone(&self.events.vcpu_exit)
    }

    /// The fd [`request_stop`](Self::request_stop) writes: device handlers may call it from
    /// vCPU threads, whose seccomp filter must allow that `write`.
    pub(crate) fn stop_request_fd(&self) -> std::os::fd::RawFd {
        self.events.stop_request.as_raw_fd()
    }

    /// Asks whoever waits on this monitor to stop the VM.
    ///
    /// # Errors
    ///
    /// [`OsError`] with [`OsOp::WriteStopRequest`] if the EventFd cannot be written.
    pub fn request_stop(&self) -> Result<(), OsError> {
        self.events
            .stop_request
            .write(1)
            .map_err(OsError::of(OsOp::WriteStopRequest))
    }

    /// Blocks until a vCPU exits or a stop is requested, or `timeout` passes (`None`: no
    /// limit). Consumes the signal it returns. A vCPU exit wins over a stop request.
    ///
    /// # Errors
    ///
    /// [`OsError`] if `epoll_wait` or reading an EventFd fails (other than by a signal or
    /// because another waiter took the event).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<ExitSignal>, OsError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut events = [EpollEvent::default(); 2];
        loop {
            let ms = match (timeout, deadline) {
                (None, _) | (Some(_), None) => -1,
                (Some(_), Some(d)) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a sub-millisecond remainder does not spin.
                    i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
                }
            };
            let n = match self.events.epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(OsError {
                        op: OsOp::EpollWait,
                        source: e,
                    })
                }
            };
            if n == 0 {
                if deadline.is_some_and(|d| Instant::now() < d) {
                    continue;
                }
                return Ok(None);
            }
            let ready = |token| events[..n].iter().any(|e| e.data() == token);
            // Read (reset) the EventFd we report; EAGAIN means another waiter took it.
            let take = |evt: &EventFd| match evt.read() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(OsError {
                    op: OsOp::ReadExitEventFd,
                    source: e,
                }),
            };
            if ready(TOKEN_VCPU_EXIT) && take(&self.events.vcpu_exit)? {
                return Ok(Some(ExitSignal::VcpuExit));
            }
            if ready(TOKEN_STOP_REQUEST) && take(&self.events.stop_request)? {
                return Ok(Some(ExitSignal::StopRequested));
            }
        }
    }
}

/// Stopping the whole VM when a vCPU stops or a stop is requested.
impl VcpuManager {
    /// Stops the VM for `signal` (from [`ExitMonitor::wait`]): sets the exit flag, finds the
    /// vCPUs in `waiting_exit` and their reasons, exits every vCPU and returns why. Returns
    /// `Ok(None)` for a spurious vCPU signal (no vCPU stopped; nothing is done).
    ///
    /// # Errors
    ///
    /// As [`exit_all`](Self::exit_all).
    pub fn stop_vm(
        &mut self,
        signal: ExitSignal,
    ) -> Result<Option<VmStopReason>, VcpuControlError> {
        let mut stopped: Vec<(u32, u32, Option<VcpuExitReason>)> = self
            .vcpus
            .iter()
            .filter_map(|(index, h)| match h.state() {
                VcpuState::WaitingExit => Some((*index, h.id(), h.exit_reason())),
                // A thread that ended on its own (the manager has not asked any to exit).
                VcpuState::Exited => Some((*index, h.id(), None)),
                _ => None,
            })
            .collect();
        let reason = match signal {
            ExitSignal::StopRequested => VmStopReason {
                vcpu_id: None,
                vcpu_index: None,
                reason: StopCause::StopRequested,
                also_stopped: stopped.into_iter().filter_map(|s| s.2).collect(),
            },
            ExitSignal::VcpuExit => {
                if stopped.is_empty() {
                    return Ok(None);
                }
                // Prefer a vCPU with a reason, then the lowest index.
                stopped.sort_by_key(|(index, _, r)| (r.is_none(), *index));
                let (index, id, first) = stopped.remove(0);
                VmStopReason {
                    vcpu_id: Some(id),
                    vcpu_index: Some(index),
                    reason: first.map_or(StopCause::VcpuThreadEnded, StopCause::VcpuExit),
                    also_stopped: stopped.into_iter().filter_map(|s| s.2).collect(),
                }
            }
        };
        self.exit_flag.store(true, Ordering::Release);
        info!(self.logger, "stopping the VM"; "reason" => %reason);
        self.exit_all()?;
        Ok(Some(reason))
    }

    /// Waits up to `timeout` (`None`: forever) for a vCPU to stop or a stop request, then
    /// stops the VM ([`stop_vm`](Self::stop_vm)). `Ok(None)`: the time passed.
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::Os`] if waiting on the exit monitor fails; otherwise as
    /// [`stop_vm`](Self::stop_vm).
    pub fn wait_for_exit(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<VmStopReason>, VcpuControlError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let left = match (timeout, deadline) {
                (Some(_), Some(d)) => Some(d.saturating_duration_since(Instant::now())),
                _ => None,
            };
            let Some(signal) = self.exit_monitor.wait(left)? else {
                return Ok(None);
            };
            if let Some(reason) = self.stop_vm(signal)? {
                return Ok(Some(reason));
            }
            debug!(
                self.logger,
                "exit EventFd written but no vCPU stopped; waiting on"
            );
        }
    }

    /// Blocks until the VM stops (a vCPU in `waiting_exit` or a stop request), stops it and
    /// returns why.
    ///
    /// # Errors
    ///
    /// As [`wait_for_exit`](Self::wait_for_exit).
    pub fn run_until_exit(&mut self) -> Result<VmStopReason, VcpuControlError> {
        loop {
            if let Some(reason) = self.wait_for_exit(None)? {
                return Ok(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_reports_each_signal_once_and_times_out_otherwise() {
        let m = ExitMonitor::new().unwrap();
        assert_eq!(m.wait(Some(Duration::from_millis(1))).unwrap(), None);
        m.request_stop().unwrap();
        m.vcpu_exit_eventfd().write(1).unwrap();
        let other = m.clone();
        assert_eq!(other.wait(None).unwrap(), Some(ExitSignal::VcpuExit));
        assert_eq!(m.wait(None).unwrap(), Some(ExitSignal::StopRequested));
        assert_eq!(m.wait(Some(Duration::ZERO)).unwrap(), None);
        // Another thread wakes a blocked waiter.
        let t = {
            let m = m.clone();
            std::thread::spawn(move || m.wait(Some(Duration::from_secs(30))))
        };
        m.request_stop().unwrap();
        assert_eq!(t.join().unwrap().unwrap(), Some(ExitSignal::StopRequested));
    }
}
