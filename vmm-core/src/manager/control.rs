//! Starting, pausing, resuming and exiting present vCPUs.

use std::time::Instant;

use slog::{debug, info, warn};
use vcpu_actor::{VcpuError, VcpuHandle, VcpuReply, VcpuRequest};

use super::VcpuManager;
use crate::error::{ManagerOp, VcpuControlError};
use crate::state::{Refusal, Transition};

impl VcpuManager {
    pub(crate) fn check_running_allowed(&self, op: ManagerOp) -> Result<(), VcpuControlError> {
        self.state()
            .check(Transition::Run, self.exit_flag_set())
            .map_err(|refusal| control_refused(op, refusal))
    }

    /// Moves the state machine by `t` (refused: `op` is not done), then sends `req` to every
    /// present vCPU. The state lock is held until every reply came (at most `ack_timeout`), so
    /// that concurrent pauses and resumes end in the state of the requests sent last.
    fn request_all_as(
        &self,
        op: ManagerOp,
        t: Transition,
        req: VcpuRequest,
    ) -> Result<(), VcpuControlError> {
        let mut state = self.state();
        state
            .transition(t, self.exit_flag_set())
            .map_err(|refusal| control_refused(op, refusal))?;
        self.request_all(req)
    }

    /// Starts every present vCPU together: all are sent `Resume` first, then every
    /// acknowledgement is awaited.
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::InvalidState`] if the VM is stopping;
    /// [`VcpuControlError::VcpusDidNotAnswer`] or [`VcpuControlError::VcpuRefused`] if some
    /// vCPU did not acknowledge in time or refused.
    pub fn start_boot_vcpus(&self) -> Result<(), VcpuControlError> {
        self.request_all_as(
            ManagerOp::StartBootVcpus,
            Transition::Run,
            VcpuRequest::Resume,
        )
    }

    /// Starts the given present vCPUs (e.g. after hot-add). The VM's [`VmRunState`](crate::VmRunState) does not
    /// change.
    ///
    /// # Errors
    ///
    /// As [`start_boot_vcpus`](Self::start_boot_vcpus), and
    /// [`VcpuControlError::InvalidState`] for an index that is not present.
    pub fn start_vcpus(&self, indices: &[u32]) -> Result<(), VcpuControlError> {
        self.check_running_allowed(ManagerOp::StartVcpus)?;
        self.request_some(indices, VcpuRequest::Resume)
    }

    /// Pauses every present vCPU and waits for every acknowledgement (see
    /// [`VcpuManagerOptions::ack_timeout`](crate::VcpuManagerOptions::ack_timeout)). The VM is [`VmRunState::Paused`](crate::VmRunState::Paused) from then on.
    ///
    /// With a resize in flight, this does not wait for the resize: it pauses the vCPUs present
    /// now, the resize's new ones included (see [`crate::resize`]).
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::InvalidState`] if the VM is stopping or stopped;
    /// [`VcpuControlError::VcpusDidNotAnswer`] or [`VcpuControlError::VcpuRefused`] if some
    /// vCPU did not acknowledge in time or refused.
    pub fn pause_all(&self) -> Result<(), VcpuControlError> {
        self.request_all_as(
            ManagerOp::Send(VcpuRequest::Pause),
            Transition::Pause,
            VcpuRequest::Pause,
        )
    }

    /// Resumes every present vCPU and waits for every acknowledgement.
    ///
    /// # Errors
    ///
    /// As [`start_boot_vcpus`](Self::start_boot_vcpus).
    pub fn resume_all(&self) -> Result<(), VcpuControlError> {
        self.request_all_as(ManagerOp::ResumeAll, Transition::Run, VcpuRequest::Resume)
    }

    fn request_all(&self, req: VcpuRequest) -> Result<(), VcpuControlError> {
        let indices: Vec<u32> = self.vcpus.keys().copied().collect();
        self.request_some(&indices, req)
    }

    /// Sends `req` to each of `handles`, then waits for each reply until one deadline
    /// (`ack_timeout` from the last send; a timeout too large for an `Instant`, e.g.
    /// `Duration::MAX`, means no deadline). For each handle, in order: `Err` if the request
    /// could not be sent, else the reply or why none came.
    pub(crate) fn ask<'a>(
        &self,
        handles: &[&'a VcpuHandle],
        req: VcpuRequest,
    ) -> Vec<(&'a VcpuHandle, Asked)> {
        let timeout = self.options.ack_timeout;
        let sent: Vec<_> = handles.iter().map(|&h| (h, h.send(req))).collect();
        let deadline = Instant::now().checked_add(timeout);
        sent.into_iter()
            .map(|(handle, sent)| {
                let asked = sent.map(|id| {
                    let left =
                        deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                    handle.wait_reply(id, left)
                });
                (handle, asked)
            })
            .collect()
    }

    /// Sends `req` to every vCPU in `indices`, then waits for every reply until one deadline
    /// ([`ask`](Self::ask)).
    pub(crate) fn request_some(
        &self,
        indices: &[u32],
        req: VcpuRequest,
    ) -> Result<(), VcpuControlError> {
        let timeout = self.options.ack_timeout;
        let handles = indices
            .iter()
            .map(|index| {
                self.vcpus
                    .get(index)
                    .ok_or_else(|| VcpuControlError::InvalidState {
                        op: ManagerOp::Send(req),
                        reason: format!("vCPU index {index} is not present"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let asked = self.ask(&handles, req);
        let mut no_answer = Vec::new();
        // The vCPUs that could not be asked first, then those that refused or failed.
        let mut refused: Vec<(u32, String)> = asked
            .iter()
            .filter_map(|(handle, a)| a.as_ref().err().map(|e| (handle.id(), e.to_string())))
            .collect();
        for (handle, answer) in asked {
            match answer {
                Err(_) => {}
                Ok(Ok(reply)) => {
                    if let Some(refusal) = reply.refusal() {
                        refused.push((handle.id(), refusal.to_string()));
                    }
                }
                Ok(Err(VcpuError::ReplyTimeout { .. })) => no_answer.push(handle.id()),
                Ok(Err(e)) => refused.push((handle.id(), e.to_string())),
            }
        }
        for (id, why) in &refused {
            warn!(self.logger, "vCPU refused a request"; "vcpu_id" => id, "request" => %req,
                  "reason" => why);
        }
        if !no_answer.is_empty() {
            return Err(VcpuControlError::VcpusDidNotAnswer {
                request: req,
                vcpu_ids: no_answer,
                timeout,
            });
        }
        if let Some((vcpu_id, reason)) = refused.into_iter().next() {
            return Err(VcpuControlError::VcpuRefused {
                vcpu_id,
                request: req,
                reason,
            });
        }
        Ok(())
    }

    /// Exits every present vCPU, joins every thread and keeps the KVM vCPU fds for reuse.
    /// Afterwards no vCPU is present, and the VM is [`VmRunState::Created`](crate::VmRunState::Created) (boot vCPUs can be
    /// created again), or [`VmRunState::Stopped`](crate::VmRunState::Stopped) when a stop is under way.
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::Join`] for the first vCPU thread that could not be joined (the
    /// others are still joined).
    pub fn exit_all(&mut self) -> Result<(), VcpuControlError> {
        let indices: Vec<u32> = self.vcpus.keys().copied().collect();
        let exited = self.exit_vcpus(&indices);
        let exit_flag = self.exit_flag_set();
        self.state().apply(Transition::AllExited, exit_flag);
        exited
    }

    /// Exits the given present vCPUs (e.g. after a hot-remove), joins their threads and keeps
    /// their KVM vCPU fds for reuse by [`create_vcpu`](Self::create_vcpu).
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::InvalidState`] if an index is not present (nothing is done);
    /// [`VcpuControlError::Join`] for the first vCPU thread that could not be joined.
    pub fn exit_vcpus(&mut self, indices: &[u32]) -> Result<(), VcpuControlError> {
        if let Some(index) = indices.iter().find(|i| !self.vcpus.contains_key(i)) {
            return Err(VcpuControlError::InvalidState {
                op: ManagerOp::ExitVcpus,
                reason: format!("vCPU index {index} is not present"),
            });
        }
        let asked = self.request_some(indices, VcpuRequest::Exit);
        let mut unjoined = Vec::new();
        let mut first_error = None;
        for index in indices {
            let Some(handle) = self.vcpus.remove(index) else {
                continue;
            };
            let id = handle.id();
            match handle.join(self.options.join_timeout) {
                Ok(fd) => {
                    self.kept_fds.insert(id, fd);
                }
                Err(e) => {
                    unjoined.push(id);
                    first_error.get_or_insert(VcpuControlError::Join {
                        vcpu_id: id,
                        source: e,
                    });
                }
            }
        }
        info!(self.logger, "vCPUs exited"; "indices" => ?indices,
              "kept_fds" => self.kept_fds.len(), "unjoined" => ?unjoined);
        if let Some(e) = first_error {
            return Err(e);
        }
        // Every thread ended, so a refused or unanswered Exit does not matter any more.
        if let Err(e) = asked {
            debug!(self.logger, "exit acknowledgements incomplete, threads joined anyway";
                   "error" => %e);
        }
        Ok(())
    }
}

/// What [`VcpuManager::ask`] got from one vCPU: `Err` if the request could not be sent,
/// else the reply or why none came.
pub(crate) type Asked = Result<Result<VcpuReply, VcpuError>, VcpuError>;

/// The `InvalidState` error of `op`, refused by the state machine.
fn control_refused(op: ManagerOp, refusal: Refusal) -> VcpuControlError {
    VcpuControlError::InvalidState {
        op,
        reason: refusal.to_string(),
    }
}
