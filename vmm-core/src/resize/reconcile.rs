//! Phase 3 of a resize: commit what the guest did, or reconcile with what it left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED};
use slog::{debug, info, warn};
use vcpu_actor::{ReplyOutcome, VcpuHandle, VcpuRequest, VcpuState};

use super::{micros, PendingResize, ResizeOutcome, VcpuSlot};
use crate::error::{HotplugOp, ResizeError};
use crate::hotplug_backend::{BackendError, HotplugAck, HotplugFailure};
use crate::manager::Asked;
use crate::state::VmRunState;
use crate::VcpuManager;

impl VcpuManager {
    /// The MP state (`KVM_GET_MP_STATE`) of each present vCPU at `indices`, in order; `None`
    /// where it cannot be read. Each is read by its own thread ([`VcpuRequest::GetMpState`]),
    /// which holds the fd; only vCPUs out of `KVM_RUN` are asked (paused, waiting to exit, or
    /// exited with the request still answered): a running one's thread refuses, and one
    /// stuck elsewhere would only cost a timeout. All are asked first, then every reply is
    /// awaited until one deadline ([`ask`](Self::ask), as every request to many vCPUs).
    fn mp_states(&self, indices: &[u32]) -> Vec<Option<u32>> {
        let out_of_run: Vec<Option<&VcpuHandle>> = indices
            .iter()
            .map(|index| {
                let handle = self.vcpus.get(index)?;
                if handle.state() == VcpuState::Running {
                    debug!(self.logger, "a new vCPU is still running: MP state not read";
                           "index" => index);
                    return None;
                }
                Some(handle)
            })
            .collect();
        let handles: Vec<&VcpuHandle> = out_of_run.iter().flatten().copied().collect();
        let mut answers = self.ask(&handles, VcpuRequest::GetMpState).into_iter();
        out_of_run
            .iter()
            .map(|h| {
                h.and_then(|_| answers.next())
                    .and_then(|(handle, asked)| self.mp_state_of(handle, asked))
            })
            .collect()
    }

    /// The MP state in `asked`, the answer of `handle`'s thread to `GetMpState`; `None`
    /// (logged) when there is none.
    fn mp_state_of(&self, handle: &VcpuHandle, asked: Asked) -> Option<u32> {
        match asked {
            Ok(Ok(reply)) => match reply.outcome {
                ReplyOutcome::MpState(state) => Some(state),
                other => {
                    debug!(self.logger, "a new vCPU did not give its MP state";
                           "apic_id" => handle.id(), "reply" => ?other);
                    None
                }
            },
            Ok(Err(e)) => {
                warn!(self.logger, "no MP state from a new vCPU";
                      "apic_id" => handle.id(), "error" => %e);
                None
            }
            Err(e) => {
                debug!(self.logger, "cannot ask a new vCPU for its MP state";
                       "apic_id" => handle.id(), "error" => %e);
                None
            }
        }
    }

    /// Exits those of `indices` that are still present (a stop may have exited them).
    pub(super) fn exit_present(&mut self, indices: &[u32]) -> Duration {
        let t = Instant::now();
        let present: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| self.vcpus.contains_key(i))
            .collect();
        if !present.is_empty() {
            if let Err(e) = self.exit_vcpus(&present) {
                warn!(self.logger, "exiting vCPUs after a resize failed"; "indices" => ?present,
                      "error" => %e);
            }
        }
        t.elapsed()
    }

    /// Phase 3: commit or reconcile, then clear the in-flight mark.
    pub(super) fn resize_finish(
        &mut self,
        mut pending: PendingResize,
        (reply, upcall): (Result<HotplugAck, HotplugFailure>, Duration),
    ) -> Result<ResizeOutcome, ResizeError> {
        pending.outcome.upcall = upcall;
        let result = self.commit(&mut pending, reply);
        if matches!(self.run_state(), VmRunState::Running | VmRunState::Paused) {
            let present: Vec<u32> = self.present_vcpus().iter().map(|v| v.apic_id).collect();
            pending.backend.sync_present(&present);
        }
        self.state().end_resize();
        let outcome = result?;
        info!(self.logger, "vCPUs resized"; "from" => outcome.from, "to" => outcome.to,
              "vcpu_create_us" => micros(outcome.vcpu_create),
              "vcpu_start_us" => micros(outcome.vcpu_start),
              "vcpu_work_us" => micros(outcome.vcpu_work),
              "upcall_us" => micros(outcome.upcall),
              "total_us" => micros(outcome.total));
        Ok(outcome)
    }

    fn commit(
        &mut self,
        pending: &mut PendingResize,
        reply: Result<HotplugAck, HotplugFailure>,
    ) -> Result<ResizeOutcome, ResizeError> {
        if !matches!(self.run_state(), VmRunState::Running | VmRunState::Paused) {
            // A stop (or exit_all) exited every vCPU; nothing is left to reconcile.
            warn!(self.logger, "the VM stopped during a resize"; "target" => pending.target);
            return Err(ResizeError::VmStopped {
                target: pending.target,
            });
        }
        match (pending.op, reply) {
            (HotplugOp::Add, Ok(_)) if pending.backend.confirm_wake_by_mp_state() => {
                self.confirm_woken(pending)?;
            }
            (HotplugOp::Add, Ok(_)) => pending.outcome.added = pending.slots.clone(),
            (HotplugOp::Remove, Ok(_)) => {
                // The guest has offlined them: only now do their threads stop.
                let indices: Vec<u32> = pending.slots.iter().map(|s| s.index).collect();
                pending.outcome.vcpu_work = self.exit_present(&indices);
                pending.outcome.removed = pending.slots.clone();
            }
            (op, Err(failure)) => return Err(self.reconcile_failed(pending, op, failure)),
        }
        pending.outcome.to = self.present_vcpu_count();
        pending.outcome.total = pending.started.elapsed();
        Ok(pending.outcome.clone())
    }

    /// After a hot-add the guest acknowledged: its acknowledgement alone is not enough, each
    /// new vCPU must have left wait-for-SIPI. Those that did not are exited (fds kept) and
    /// the resize fails.
    fn confirm_woken(&mut self, pending: &mut PendingResize) -> Result<(), ResizeError> {
        let (up, unknown) = self.reconcile_add(&pending.slots);
        if up.len() == pending.slots.len() {
            pending.outcome.added = pending.slots.clone();
            return Ok(());
        }
        let not_woken = pending
            .slots
            .iter()
            .map(|s| s.apic_id)
            .filter(|id| !up.contains(id))
            .collect();
        let failure = HotplugFailure {
            confirmed: up,
            uncertain: unknown,
            source: BackendError::NotWoken {
                backend: pending.backend.name(),
                apic_ids: not_woken,
            },
        };
        Err(self.hotplug_failed(pending, HotplugOp::Add, failure))
    }

    /// After a failed `op` request: reconciles with what the guest did and says so.
    fn reconcile_failed(
        &mut self,
        pending: &PendingResize,
        op: HotplugOp,
        failure: HotplugFailure,
    ) -> ResizeError {
        let ids: Vec<u32> = pending.slots.iter().map(|s| s.apic_id).collect();
        warn!(self.logger, "hotplug request failed, reconciling"; "op" => %op,
              "apic_ids" => ?ids, "error" => %failure.source);
        let (confirmed, uncertain) = match op {
            HotplugOp::Add => self.reconcile_add(&pending.slots),
            HotplugOp::Remove => self.reconcile_remove(&pending.slots, &failure),
        };
        let failure = HotplugFailure {
            confirmed,
            uncertain,
            source: failure.source,
        };
        self.hotplug_failed(pending, op, failure)
    }

    /// The [`ResizeError::HotplugFailed`] of a reconciled `failure`.
    fn hotplug_failed(
        &self,
        pending: &PendingResize,
        op: HotplugOp,
        failure: HotplugFailure,
    ) -> ResizeError {
        let guest_state_unknown = !failure.uncertain.is_empty()
            || (op == HotplugOp::Add && failure.source.outcome_unknown());
        ResizeError::HotplugFailed {
            op,
            apic_ids: pending.slots.iter().map(|s| s.apic_id).collect(),
            present_after: self.present_vcpus().iter().map(|v| v.apic_id).collect(),
            guest_state_unknown,
            source: Box::new(failure),
        }
    }

    /// After a failed hot-add: keeps the new vCPUs the guest brought up (they left
    /// wait-for-SIPI: their MP state is neither `UNINITIALIZED` nor `INIT_RECEIVED`), exits
    /// the others. Returns (brought up, state unknown), as APIC IDs.
    fn reconcile_add(&mut self, slots: &[VcpuSlot]) -> (Vec<u32>, Vec<u32>) {
        let present: Vec<VcpuSlot> = slots
            .iter()
            .copied()
            .filter(|s| {
                self.vcpus
                    .get(&s.index)
                    .is_some_and(|h| h.id() == s.apic_id)
            })
            .collect();
        // Out of KVM_RUN first: a thread inside it (waiting for SIPI) refuses the read. The
        // replies do not matter, only where each thread is afterwards.
        let indices: Vec<u32> = present.iter().map(|s| s.index).collect();
        if let Err(e) = self.request_some(&indices, VcpuRequest::Pause) {
            debug!(self.logger, "pausing the new vCPUs to read their MP state"; "error" => %e);
        }
        let states = self.mp_states(&indices);
        let mut up = Vec::new();
        let mut unknown = Vec::new();
        let mut exit = Vec::new();
        for (slot, &state) in present.into_iter().zip(&states) {
            match state {
                // Waiting for INIT, or for the SIPI after it: no guest code ran. (The guest
                // sends both before it answers; the MP-state read takes in what is pending.)
                Some(KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED) => {
                    exit.push(slot.index)
                }
                Some(_) => up.push(slot),
                None => unknown.push(slot),
            }
        }
        self.exit_present(&exit);
        let keep: Vec<u32> = up.iter().chain(&unknown).map(|s| s.index).collect();
        if !keep.is_empty() && self.run_state() == VmRunState::Running {
            if let Err(e) = self.request_some(&keep, VcpuRequest::Resume) {
                warn!(self.logger, "resuming the kept new vCPUs failed"; "error" => %e);
            }
        }
        // With the raw KVM_MP_STATE_* values (0 runnable, 1 uninitialized, 2 init received,
        // 3 halted, 4 SIPI received): what a disagreement with the guest needs explaining.
        warn!(self.logger, "failed hot-add reconciled";
              "indices" => ?indices, "mp_states" => ?states,
              "brought_up" => ?up.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
              "unknown" => ?unknown.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
              "exited" => ?exit);
        (
            up.iter().map(|s| s.apic_id).collect(),
            unknown.iter().map(|s| s.apic_id).collect(),
        )
    }

    /// After a failed hot-remove: exits exactly the vCPUs the guest confirmed offline.
    /// Returns (confirmed, state unknown), as APIC IDs.
    fn reconcile_remove(
        &mut self,
        slots: &[VcpuSlot],
        failure: &HotplugFailure,
    ) -> (Vec<u32>, Vec<u32>) {
        let by_apic: BTreeMap<u32, u32> = slots.iter().map(|s| (s.apic_id, s.index)).collect();
        let confirmed: Vec<u32> = failure
            .confirmed
            .iter()
            .copied()
            .filter(|id| by_apic.contains_key(id))
            .collect();
        let indices: Vec<u32> = confirmed
            .iter()
            .filter_map(|id| by_apic.get(id))
            .copied()
            .collect();
        self.exit_present(&indices);
        (confirmed, failure.uncertain.clone())
    }
}
