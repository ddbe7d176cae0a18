//! Errors of vCPU hotplug.

use super::{HotplugOp, VcpuControlError, VcpuSetupError};

/// Why a resize ([`VcpuManager::resize_vcpus`](crate::VcpuManager::resize_vcpus),
/// [`AsyncResizer`](crate::AsyncResizer)) failed. Unless the message says otherwise, the
/// present vCPUs are as before.
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
    /// Resizing needs an upcall client.
    #[error(
        "cannot resize: no upcall client; connect one to the guest's upcall server and pass it \
         to VcpuManager::set_upcall_client"
    )]
    NoUpcallClient,
    /// A vCPU's APIC ID does not fit upcall's 8-bit IDs (0xFF is the broadcast ID). The VM
    /// itself may have larger IDs (x2APIC mode); only hotplug over upcall cannot name them.
    #[error(
        "vCPU index {index} has APIC ID {apic_id}, which hotplug over upcall cannot carry (its \
         wire format has 8-bit APIC IDs, so they must be below {limit}, even in x2APIC mode): \
         hot-plug only vCPUs whose APIC IDs are below {limit} (fewer vCPUs or a denser \
         topology), or boot this vCPU instead of hot-adding it"
    )]
    ApicIdTooLargeForUpcall {
        /// The vCPU index.
        index: u32,
        /// Its APIC ID.
        apic_id: u32,
        /// The first APIC ID upcall cannot carry.
        limit: u32,
    },
    /// The guest did not add or remove the vCPUs; the manager rolled back.
    #[error(
        "{op} of vCPUs {apic_ids:?} (APIC IDs) failed: {source}; rolled back, the present vCPUs \
         are as before{unknown}",
        unknown = if *.guest_state_unknown {
            " (the guest may have acted on part of the request: check it before retrying)"
        } else {
            ""
        }
    )]
    HotplugFailed {
        /// Adding or removing.
        op: HotplugOp,
        /// The APIC IDs of the request.
        apic_ids: Vec<u32>,
        /// Whether the guest may have acted (timeout, reset or mismatched reply).
        guest_state_unknown: bool,
        /// The upcall error (with the guest's errno where it sent one).
        #[source]
        source: hotplug::HotplugError,
    },
    /// Creating the new vCPUs failed (they were rolled back).
    #[error(transparent)]
    VcpuSetup(#[from] VcpuSetupError),
    /// Starting the new vCPUs or exiting the removed ones failed.
    #[error(transparent)]
    VcpuControl(#[from] VcpuControlError),
    /// A background resize was asked for while another one is still running.
    #[error(
        "cannot start a resize to {target} vCPUs: a resize to {in_flight} vCPUs is still running; \
         wait for its ResizeHandle and retry"
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
