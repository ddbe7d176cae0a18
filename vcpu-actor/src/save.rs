//! Saving a paused vCPU's state on its own thread: the VMM's [`VcpuStateSaver`] and why a
//! save failed ([`SaveStateError`]).

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Reads a vCPU's architectural state from its fd into bytes, for
/// [`VcpuRequest::SaveState`](crate::VcpuRequest::SaveState).
///
/// The actor knows nothing of x86 state: the VMM provides this (through
/// [`VcpuOptions::state_saver`](crate::VcpuOptions::state_saver)) and decides the format. It
/// is called on the vCPU's own thread, only while the vCPU is paused, after any I/O
/// instruction of its last exit has been completed (so RIP is past it and an `in`'s data is
/// in its register). Restoring is the VMM's too: it sets the state on the fd before the actor
/// is spawned.
///
/// Runs under the vCPU thread's seccomp filter, if one is set: the filter must allow the
/// ioctls it makes.
pub trait VcpuStateSaver: Send + Sync + 'static {
    /// The state of vCPU `vcpu_id`, read from `vcpu`.
    ///
    /// # Errors
    ///
    /// A message saying which read failed; the reply is then
    /// [`ReplyOutcome::SaveFailed`](crate::ReplyOutcome::SaveFailed) with
    /// [`SaveStateError::Failed`].
    fn save(&self, vcpu_id: u32, vcpu: &VcpuFd) -> Result<Vec<u8>, String>;
}

/// Why a paused vCPU could not save its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SaveStateError {
    /// The actor was spawned without a [`VcpuStateSaver`].
    #[error("no state saver is configured: spawn the actor with VcpuOptions::state_saver set")]
    NoSaver,
    /// The saver returned an error (or panicked; the vCPU stays paused).
    #[error("the state saver failed: {0}")]
    Failed(String),
}
