//! Messages to a vCPU actor and its replies.

use std::fmt;

use serde::{Deserialize, Serialize};

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
}

impl fmt::Display for VcpuRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VcpuRequest::Resume => "resume",
            VcpuRequest::Pause => "pause",
            VcpuRequest::Exit => "exit",
            VcpuRequest::GetTid => "get_tid",
            VcpuRequest::GetState => "get_state",
        })
    }
}

/// What came of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// The request is not allowed in the current state; the text says why.
    NotAllowed(String),
    /// The request failed; the text says why.
    Error(String),
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
    /// `Exited`, `Tid`, `State`).
    pub fn is_ok(&self) -> bool {
        !matches!(
            self.outcome,
            ReplyOutcome::NotAllowed(_) | ReplyOutcome::Error(_)
        )
    }
}
