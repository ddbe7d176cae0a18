//! Messages to a vCPU actor and its replies.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::save::SaveStateError;
use crate::state::VcpuState;

/// Identifies one request sent through a [`VcpuHandle`](crate::VcpuHandle); unique per handle,
/// increasing in send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A message to a vCPU actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuRequest {
    /// Run the guest (`Paused` -> `Running`; idempotent while `Running`).
    Resume,
    /// Stop running the guest (`Running` -> `Paused`; idempotent while `Paused`). The reply comes
    /// once the thread is out of `KVM_RUN`.
    Pause,
    /// End the thread; allowed in every state.
    Exit,
    /// Ask for the Linux thread id of the vCPU thread.
    GetTid,
    /// Ask for the state, as seen by the vCPU thread itself.
    GetState,
    /// Save the vCPU's state with the configured
    /// [`VcpuStateSaver`](crate::VcpuStateSaver), on the vCPU's own thread; allowed only
    /// while `Paused` (the state does not change).
    SaveState,
    /// Read the vCPU's multiprocessing state (`KVM_GET_MP_STATE`) on the vCPU's own thread:
    /// answered with [`ReplyOutcome::MpState`], e.g. `KVM_MP_STATE_UNINITIALIZED` for an AP
    /// still waiting for INIT/SIPI. Allowed whenever the thread holds the fd out of
    /// `KVM_RUN`: `Paused`, `WaitingExit`, and `Exited` for a request queued before the
    /// thread ended (the state does not change). Refused while `Running` (pause first): the
    /// guest changes the MP state under the reader, so the answer would be stale at once.
    GetMpState,
}

impl fmt::Display for VcpuRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VcpuRequest::Resume => "resume",
            VcpuRequest::Pause => "pause",
            VcpuRequest::Exit => "exit",
            VcpuRequest::GetTid => "get_tid",
            VcpuRequest::GetState => "get_state",
            VcpuRequest::SaveState => "save_state",
            VcpuRequest::GetMpState => "get_mp_state",
        })
    }
}

/// What came of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplyOutcome {
    /// The vCPU is running (it was resumed, or already running).
    Resumed,
    /// The vCPU is paused and out of `KVM_RUN` (it was paused, or already paused).
    Paused,
    /// The thread is leaving its loop; `join` gives the vCPU fd back.
    Exited,
    /// The Linux thread id of the vCPU thread.
    Tid(i32),
    /// The state of the vCPU.
    State(VcpuState),
    /// The vCPU's state, as the [`VcpuStateSaver`](crate::VcpuStateSaver) wrote it.
    StateSaved(Arc<[u8]>),
    /// A `SaveState` that was allowed (the vCPU is paused) but could not be done.
    SaveFailed(SaveStateError),
    /// The vCPU's MP state, as `KVM_GET_MP_STATE` returned it: the raw `kvm_mp_state.mp_state`
    /// (`kvm_bindings::KVM_MP_STATE_*`).
    MpState(u32),
    /// A `GetMpState` that was allowed but whose `KVM_GET_MP_STATE` failed with `errno`.
    MpStateFailed {
        /// The error number the ioctl returned.
        errno: i32,
    },
    /// `request` is not allowed in `state` (see [`transition`](crate::state::transition));
    /// nothing changed. [`VcpuReply::refusal`] makes it an error with a message.
    NotAllowed {
        /// The request that was refused.
        request: VcpuRequest,
        /// The state the vCPU was in.
        state: VcpuState,
    },
}

/// A request the vCPU refused because its state does not allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("vCPU {vcpu_id}: {request} is not allowed in state {state}{}", refusal_hint(*state))]
pub struct RequestRefused {
    /// The vCPU that refused.
    pub vcpu_id: u32,
    /// The request.
    pub request: VcpuRequest,
    /// The state the vCPU was in.
    pub state: VcpuState,
}

fn refusal_hint(state: VcpuState) -> &'static str {
    match state {
        VcpuState::WaitingExit => "; only exit and queries are (the guest stopped)",
        VcpuState::Exited => "; the vCPU thread has ended",
        VcpuState::Paused | VcpuState::Running => "",
    }
}

/// The reply to one request; `request_id` and `request` match it to what was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuReply {
    /// The vCPU that answered.
    pub vcpu_id: u32,
    /// The id [`VcpuHandle::send`](crate::VcpuHandle::send) returned for the request.
    pub request_id: RequestId,
    /// The request this answers.
    pub request: VcpuRequest,
    /// What came of it.
    pub outcome: ReplyOutcome,
}

impl VcpuReply {
    /// True for the outcomes that mean the request did what it asked (`Resumed`, `Paused`,
    /// `Exited`, `Tid`, `State`, `StateSaved`, `MpState`); false for `NotAllowed`,
    /// `SaveFailed` and `MpStateFailed`.
    pub fn is_ok(&self) -> bool {
        !matches!(
            self.outcome,
            ReplyOutcome::NotAllowed { .. }
                | ReplyOutcome::SaveFailed(_)
                | ReplyOutcome::MpStateFailed { .. }
        )
    }

    /// The refusal, for a [`ReplyOutcome::NotAllowed`] outcome.
    pub fn refusal(&self) -> Option<RequestRefused> {
        match self.outcome {
            ReplyOutcome::NotAllowed { request, state } => Some(RequestRefused {
                vcpu_id: self.vcpu_id,
                request,
                state,
            }),
            _ => None,
        }
    }
}
