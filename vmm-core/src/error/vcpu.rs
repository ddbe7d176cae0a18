//! Errors of the vCPU manager: setting vCPUs up, and controlling them afterwards.

use std::fmt;
use std::time::Duration;

use vcpu_actor::VcpuRequest;

use super::{KvmOp, ManagerOp, OsError};

/// Why a vCPU could not be created or configured (CPUID, MSRs, LAPIC, FPU, registers) or its
/// actor not spawned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuSetupError {
    /// A vCPU-level KVM ioctl failed.
    #[error("KVM {op} on vCPU {vcpu_id} failed: {source}")]
    Kvm {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The ioctl that failed.
        op: KvmOp,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs we set.
    #[error(
        "KVM_SET_MSRS on vCPU {vcpu_id} stopped at MSR {msr:#x} ({set} of {total} set): this \
         host's KVM does not accept it"
    )]
    MsrRejected {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The first MSR KVM did not set.
        msr: u32,
        /// How many were set.
        set: usize,
        /// How many we asked for.
        total: usize,
    },
    /// A CPUID set is larger than KVM accepts.
    #[error("a CPUID set of {count} entries is larger than KVM's maximum of {max}")]
    TooManyCpuidEntries {
        /// Number of entries.
        count: usize,
        /// `KVM_MAX_CPUID_ENTRIES`.
        max: usize,
    },
    /// Editing a vCPU's CPUID for the vPMU level failed.
    #[error("vPMU CPUID for vCPU {vcpu_id}: {source}")]
    VpmuCpuid {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// Why.
        source: vpmu::VpmuError,
    },
    /// The topology crate refused to place or describe the vCPU.
    #[error("topology: {0}")]
    Topology(#[from] topology::TopologyError),
    /// A vCPU index outside `0..max_vcpu_count`.
    #[error("vCPU index {index} is out of range: max_vcpu_count is {max}")]
    IndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// `max_vcpu_count`.
        max: u32,
    },
    /// The manager's state does not allow it now.
    #[error("cannot {op}: {reason}")]
    InvalidState {
        /// What was asked.
        op: ManagerOp,
        /// Why not now.
        reason: String,
    },
    /// The vCPU's actor (thread) could not be spawned.
    #[error("{}", naming_vcpu_once(*.vcpu_id, .source))]
    Spawn {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The actor's error.
        source: vcpu_actor::VcpuError,
    },
    /// The vCPU's exit EventFd could not be made.
    #[error(transparent)]
    Os(#[from] OsError),
}

/// Why starting, pausing, resuming, exiting or stopping vCPUs failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VcpuControlError {
    /// The manager's state does not allow it now.
    #[error("cannot {op}: {reason}")]
    InvalidState {
        /// What was asked.
        op: ManagerOp,
        /// Why not now.
        reason: String,
    },
    /// Some vCPUs did not acknowledge a request in time.
    #[error(
        "vCPUs {vcpu_ids:?} did not acknowledge {request} within {timeout:?}: they may be stuck \
         in KVM_RUN or their thread died; see their metrics"
    )]
    VcpusDidNotAnswer {
        /// The request.
        request: VcpuRequest,
        /// The vCPUs (APIC IDs) that did not answer.
        vcpu_ids: Vec<u32>,
        /// How long we waited.
        timeout: Duration,
    },
    /// A vCPU answered a request with a refusal or an error.
    #[error("vCPU {vcpu_id} refused {request}: {}", without_vcpu_prefix(*.vcpu_id, .reason))]
    VcpuRefused {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The request.
        request: VcpuRequest,
        /// What it answered.
        reason: String,
    },
    /// A vCPU's thread could not be joined.
    #[error("{}", naming_vcpu_once(*.vcpu_id, .source))]
    Join {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The actor's error.
        source: vcpu_actor::VcpuError,
    },
    /// Waiting on the exit monitor failed.
    #[error(transparent)]
    Os(#[from] OsError),
}

/// `inner`'s message, prefixed with `vCPU N: ` unless it starts so already (the actor's own
/// errors name their vCPU): each message names its vCPU once.
fn naming_vcpu_once(vcpu_id: u32, inner: &dyn fmt::Display) -> String {
    let text = inner.to_string();
    let prefix = format!("vCPU {vcpu_id}: ");
    if text.starts_with(&prefix) {
        text
    } else {
        prefix + &text
    }
}

/// `reason` without a leading `vCPU N: `, for a message that names the vCPU itself.
fn without_vcpu_prefix(vcpu_id: u32, reason: &str) -> &str {
    reason
        .strip_prefix(&format!("vCPU {vcpu_id}: "))
        .unwrap_or(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcpu_actor::{RequestRefused, VcpuError, VcpuState};

    fn names_vcpu_once(text: &str, id: u32) {
        assert_eq!(text.matches(&format!("vCPU {id}")).count(), 1, "{text}");
    }

    #[test]
    fn every_message_names_its_vcpu_once() {
        let join = VcpuControlError::Join {
            vcpu_id: 3,
            source: VcpuError::JoinTimeout {
                vcpu_id: 3,
                timeout: Duration::from_secs(1),
                state: VcpuState::Running,
            },
        };
        let text = crate::VmmError::from(join).to_string();
        names_vcpu_once(&text, 3);
        assert!(text.starts_with("vCPU 3: thread did not end"), "{text}");

        // The kick signal errors are process-wide: the wrapper names the vCPU.
        let spawn = VcpuSetupError::Spawn {
            vcpu_id: 5,
            source: VcpuError::InvalidKickSignal { offset: 99 },
        };
        let text = spawn.to_string();
        names_vcpu_once(&text, 5);
        assert!(text.starts_with("vCPU 5: kick signal"), "{text}");

        let refusal = RequestRefused {
            vcpu_id: 0,
            request: VcpuRequest::Resume,
            state: VcpuState::WaitingExit,
        };
        let refused = VcpuControlError::VcpuRefused {
            vcpu_id: 0,
            request: VcpuRequest::Resume,
            reason: refusal.to_string(),
        };
        let text = refused.to_string();
        names_vcpu_once(&text, 0);
        assert!(
            text.starts_with("vCPU 0 refused resume: resume is not allowed in state waiting_exit"),
            "{text}"
        );
        // A reason that does not name the vCPU is kept whole.
        let other = VcpuControlError::VcpuRefused {
            vcpu_id: 1,
            request: VcpuRequest::Pause,
            reason: "vCPU 10: gone".into(),
        };
        assert_eq!(other.to_string(), "vCPU 1 refused pause: vCPU 10: gone");
    }
}
