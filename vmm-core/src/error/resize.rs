//! Errors of vCPU hotplug.

use super::{HotplugOp, VcpuControlError, VcpuSetupError};
use crate::hotplug_backend::HotplugFailure;
use crate::state::VmRunState;

/// Why a resize ([`VcpuManager::resize_vcpus`](crate::VcpuManager::resize_vcpus),
/// [`VcpuManager::resize_shared`](crate::VcpuManager::resize_shared),
/// [`AsyncResizer`](crate::AsyncResizer)) failed. Unless the message says otherwise
/// ([`ResizeError::HotplugFailed`] says what is present after), the present vCPUs are as
/// before.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResizeError {
    /// A resize target outside `[1, max_vcpu_count]`.
    #[error("cannot resize to {target} vCPUs: the target must be in [1, {max}] (max_vcpu_count)")]
    OutOfRange {
        /// The target asked for.
        target: u32,
        /// `max_vcpu_count`.
        max: u32,
    },
    /// Resizing needs a hotplug backend.
    #[error(
        "cannot resize: no hotplug backend; connect an upcall client to the guest's upcall \
         server and pass it to VcpuManager::set_upcall_client (or give another backend to \
         VcpuManager::set_hotplug_backend)"
    )]
    NoHotplugBackend,
    /// A vCPU's APIC ID does not fit what the hotplug backend carries (upcall: 8 bits, below
    /// 255, the broadcast ID). The VM itself may have larger IDs (x2APIC mode); only this
    /// backend cannot name them.
    #[error(
        "vCPU index {index} has APIC ID {apic_id}, which the {backend} hotplug backend cannot \
         carry (APIC IDs must be at most {limit}, even in x2APIC mode): hot-plug only vCPUs \
         whose APIC IDs fit (fewer vCPUs or a denser topology), or boot this vCPU instead of \
         hot-adding it"
    )]
    ApicIdTooLarge {
        /// The vCPU index.
        index: u32,
        /// Its APIC ID.
        apic_id: u32,
        /// The largest APIC ID the backend carries.
        limit: u32,
        /// The backend's name.
        backend: &'static str,
    },
    /// The VM is not running (created, paused, stopping or stopped): a guest that does not run
    /// cannot answer, so the resize is refused at once and nothing changes.
    #[error("cannot resize to {target} vCPUs: the VM is {state}; {hint}", hint = match state {
        VmRunState::Paused => "resume it first",
        VmRunState::Created => "start it first",
        _ => "it cannot run again",
    })]
    NotRunning {
        /// The target asked for.
        target: u32,
        /// The VM's state.
        state: VmRunState,
    },
    /// The guest did not do all of the request. The manager reconciled: after a hot-add the
    /// new vCPUs the guest brought up (they left wait-for-SIPI) stay present and the others
    /// were exited; after a hot-remove exactly the vCPUs the guest confirmed offline were
    /// exited. `present_after` is the result.
    #[error(
        "{op} of vCPUs {apic_ids:?} (APIC IDs) failed: {source}; {}",
        reconciled(*op, &source.confirmed, &source.uncertain, present_after)
    )]
    HotplugFailed {
        /// Adding or removing.
        op: HotplugOp,
        /// The APIC IDs of the request.
        apic_ids: Vec<u32>,
        /// The APIC IDs of the present vCPUs afterwards, in index order.
        present_after: Vec<u32>,
        /// Whether the guest's state may differ from what the manager knows: `source.uncertain`
        /// is not empty, or (after a hot-add) the answer was lost (timeout, hang-up, mismatched
        /// reply), so the guest may still be working on the request. A vCPU exited before the
        /// guest started it cannot come up, so the guest fails it and stays consistent with
        /// `present_after`. The next resize works either way.
        guest_state_unknown: bool,
        /// What the guest did, as reconciled, and the backend's error (with the guest's errno
        /// where it refused):
        /// - `source.confirmed`: the APIC IDs of the request the guest acted on: brought up
        ///   after an add (they left wait-for-SIPI; they stay present), confirmed offline
        ///   after a remove (their threads were exited);
        /// - `source.uncertain`: the APIC IDs whose state the manager could not establish:
        ///   after a remove, the one whose answer was lost; after an add, a new vCPU whose MP
        ///   state could not be read. Their vCPUs stay present (a thread is never exited under
        ///   a guest that may use it): find out from the guest, then exit the ones it does not
        ///   use with [`VcpuManager::exit_vcpus`](crate::VcpuManager::exit_vcpus).
        ///
        /// Boxed to keep `ResizeError` small.
        #[source]
        source: Box<HotplugFailure>,
    },
    /// The VM was stopped (or every vCPU exited with `exit_all`) while the resize waited for
    /// the guest: no vCPU of the resize is left to reconcile.
    #[error(
        "the resize to {target} vCPUs ended because the VM stopped (or all its vCPUs were \
         exited) while the guest was being asked"
    )]
    VmStopped {
        /// The target of the resize.
        target: u32,
    },
    /// Creating the new vCPUs failed (they were rolled back).
    #[error(transparent)]
    VcpuSetup(#[from] VcpuSetupError),
    /// Starting the new vCPUs or exiting the removed ones failed.
    #[error(transparent)]
    VcpuControl(#[from] VcpuControlError),
    /// A resize was asked for while another one is still in flight (one at a time).
    #[error(
        "cannot start a resize to {target} vCPUs: a resize to {in_flight} vCPUs is still in \
         flight; wait for it (its ResizeHandle, or its call's return) and retry"
    )]
    Busy {
        /// The target asked for.
        target: u32,
        /// The target of the resize in flight.
        in_flight: u32,
    },
    /// A background resize did not finish within the wait; it goes on.
    #[error(
        "the resize to {target} vCPUs has not finished after {waited:?}; it goes on in the \
         background: wait on its ResizeHandle again"
    )]
    StillRunning {
        /// The target of the resize.
        target: u32,
        /// How long this wait lasted.
        waited: std::time::Duration,
    },
    /// The outcome of a background resize was already taken, or its thread ended without one.
    #[error(
        "the outcome of the resize to {target} vCPUs is gone (already taken by an earlier wait, \
         or its thread ended abnormally): check VcpuManager::present_vcpus"
    )]
    OutcomeGone {
        /// The target of the resize.
        target: u32,
    },
    /// The thread of a background resize could not be started.
    #[error("cannot start the background resize thread: {source}")]
    Thread {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The part of [`ResizeError::HotplugFailed`]'s message that says what the manager did.
fn reconciled(
    op: HotplugOp,
    confirmed: &[u32],
    uncertain: &[u32],
    present_after: &[u32],
) -> String {
    let did = match op {
        HotplugOp::Add => format!(
            "the guest brought up {confirmed:?}, which stay; the other new vCPUs were rolled \
             back (exited, their fds kept)"
        ),
        HotplugOp::Remove => format!(
            "the guest confirmed {confirmed:?} offline, whose threads were exited; the others \
             stay"
        ),
    };
    let unknown = if uncertain.is_empty() {
        String::new()
    } else {
        format!(
            "; the guest's state of {uncertain:?} is unknown (the answer was lost): they stay \
             present, check the guest before exiting them"
        )
    };
    format!("{did}; present vCPUs now (APIC IDs): {present_after:?}{unknown}")
}
