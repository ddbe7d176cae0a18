//! How the vCPU thread answers requests: the state table applied, replies stored for
//! `wait_reply`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use slog::{debug, warn};

use crate::channel::RecvError;
use crate::handle::{Envelope, MAX_UNCLAIMED_REPLIES};
use crate::state::{transition, Event, Transition};
use crate::thread::{guarded, VcpuThread};
use crate::{ReplyOutcome, SaveStateError, VcpuReply, VcpuRequest, VcpuState};

/// How long a pause must last before the resume tells the guest's kvmclock about it
/// (`KVM_KVMCLOCK_CTRL`). The guest's watchdogs count in seconds (Linux: soft lockup after
/// 2 x `watchdog_thresh` = 20 s, RCU stalls after 21 s), so a shorter pause cannot trip them,
/// and pausing and resuming many vCPUs (a resize, a snapshot) saves one vCPU ioctl each.
pub(crate) const KVMCLOCK_NOTICE_AFTER: Duration = Duration::from_secs(1);

impl VcpuThread {
    /// Handles every queued request (T2 of the kick protocol).
    pub(crate) fn drain_mailbox(&mut self) {
        loop {
            match self.mailbox.try_recv() {
                Ok(env) => self.handle(env),
                Err(RecvError::Timeout) => return,
                Err(RecvError::Disconnected) => {
                    self.set_state(VcpuState::Exited);
                    return;
                }
            }
        }
    }

    /// Answers one request.
    pub(crate) fn handle(&mut self, env: Envelope) {
        let outcome = match env.request {
            VcpuRequest::GetTid => ReplyOutcome::Tid(self.shared.tid.load(Ordering::Relaxed)),
            VcpuRequest::GetState => ReplyOutcome::State(self.state),
            VcpuRequest::Resume => self.apply(Event::Resume, env.request, ReplyOutcome::Resumed),
            VcpuRequest::Pause => self.apply(Event::Pause, env.request, ReplyOutcome::Paused),
            VcpuRequest::Exit => self.apply(Event::Exit, env.request, ReplyOutcome::Exited),
            VcpuRequest::SaveState => match transition(self.state, Event::SaveState) {
                Transition::To(_) => self.save_state(),
                Transition::NotAllowed => ReplyOutcome::NotAllowed {
                    request: env.request,
                    state: self.state,
                },
            },
            VcpuRequest::GetMpState => match transition(self.state, Event::GetMpState) {
                Transition::To(_) => self.mp_state(),
                Transition::NotAllowed => ReplyOutcome::NotAllowed {
                    request: env.request,
                    state: self.state,
                },
            },
        };
        self.reply(env, outcome);
        if std::mem::take(&mut self.kvmclock_due) {
            // After the reply and before the next KVM_RUN: tell the guest's kvmclock that it
            // was stopped on purpose, so that its watchdogs do not report the lost time. A
            // guest without kvmclock makes this fail: that is fine.
            if let Err(e) = self.vcpu.kvmclock_ctrl() {
                debug!(self.logger, "KVM_KVMCLOCK_CTRL not applied"; "error" => %e);
            }
        }
    }

    /// `Paused` to `Running` without a request (a thread started running).
    pub(crate) fn start_running(&mut self) {
        self.apply(Event::Resume, VcpuRequest::Resume, ReplyOutcome::Resumed);
    }

    fn apply(&mut self, event: Event, request: VcpuRequest, ok: ReplyOutcome) -> ReplyOutcome {
        let from = self.state;
        match transition(from, event) {
            Transition::NotAllowed => ReplyOutcome::NotAllowed {
                request,
                state: from,
            },
            Transition::To(to) => {
                if from == VcpuState::Running && to == VcpuState::Paused {
                    // Paused means the registers hold whole instructions (see
                    // complete_pending_io); a stop found on the way wins over the pause.
                    if let Some(end) = self.complete_pending_io() {
                        self.enter_waiting_exit(end);
                        return ReplyOutcome::NotAllowed {
                            request,
                            state: self.state,
                        };
                    }
                    self.shared.metrics.count_pause();
                    self.paused_at = Some(Instant::now());
                }
                if from == VcpuState::Paused && to == VcpuState::Running {
                    self.shared.metrics.count_resume();
                    // The guest only sees the "stopped" flag at its next entry, so it is set
                    // on resume, and only after a pause its watchdogs could notice.
                    self.kvmclock_due = self
                        .paused_at
                        .take()
                        .is_some_and(|t| t.elapsed() >= KVMCLOCK_NOTICE_AFTER);
                }
                if from != to {
                    debug!(self.logger, "state change"; "from" => %from, "to" => %to);
                    self.set_state(to);
                }
                ok
            }
        }
    }

    /// Runs the VMM's saver on this thread (the vCPU is paused: no pending I/O).
    fn save_state(&self) -> ReplyOutcome {
        let Some(saver) = &self.state_saver else {
            return ReplyOutcome::SaveFailed(SaveStateError::NoSaver);
        };
        match guarded(|| saver.save(self.shared.id, &self.vcpu)) {
            Ok(Ok(bytes)) => ReplyOutcome::StateSaved(bytes.into()),
            Ok(Err(reason)) => ReplyOutcome::SaveFailed(SaveStateError::Failed(reason)),
            Err(panic) => {
                warn!(self.logger, "the state saver panicked"; "message" => &panic);
                ReplyOutcome::SaveFailed(SaveStateError::Failed(format!(
                    "the saver panicked: {panic}"
                )))
            }
        }
    }

    /// `KVM_GET_MP_STATE` on this thread's own fd: the thread is out of `KVM_RUN` here (it
    /// handles requests only between runs), so the ioctl does not wait behind one.
    fn mp_state(&self) -> ReplyOutcome {
        match self.vcpu.get_mp_state() {
            Ok(s) => ReplyOutcome::MpState(s.mp_state),
            Err(e) => {
                warn!(self.logger, "KVM_GET_MP_STATE failed"; "error" => %e);
                ReplyOutcome::MpStateFailed { errno: e.errno() }
            }
        }
    }

    fn reply(&self, env: Envelope, outcome: ReplyOutcome) {
        let reply = VcpuReply {
            vcpu_id: self.shared.id,
            request_id: env.id,
            request: env.request,
            outcome,
        };
        let mut replies = self.shared.lock_replies();
        // Only a waiter for this very reply needs waking: one registers under this lock
        // before it looks, so a reply stored without a waiter is found by the next
        // `wait_reply` without sleeping; a discarded reply is never one that is waited for.
        // Skipping the wake saves a futex call per reply nobody waits for yet (most replies
        // of a pause or resume of many vCPUs).
        let wake = replies.is_waited_for(env.id.0);
        if let Some(old) = replies.insert(reply) {
            warn!(self.logger, "too many unclaimed replies, discarding the oldest unclaimed one";
                  "request" => old, "limit" => MAX_UNCLAIMED_REPLIES);
        }
        drop(replies);
        if wake {
            self.shared.reply_ready.notify_all();
        }
    }
}
