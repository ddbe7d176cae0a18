//! How the vCPU manager asks the guest to online and offline CPUs: the [`HotplugBackend`]
//! trait, and [`UpcallBackend`], its implementation over the upcall client of the `hotplug`
//! crate. The manager holds an `Arc<dyn HotplugBackend>`, never a concrete client; the other
//! implementation is ACPI CPU hotplug ([`crate::acpi_hotplug::AcpiBackend`]).
//!
//! # What a backend promises
//!
//! - [`add`](HotplugBackend::add) is called once the vCPUs exist and wait for INIT/SIPI. On
//!   failure it need not know how far the guest got: the manager looks at which new vCPUs
//!   left wait-for-SIPI (`KVM_GET_MP_STATE`) and keeps exactly those.
//! - [`remove`](HotplugBackend::remove) must say exactly which CPUs the guest confirmed
//!   offline ([`HotplugFailure::confirmed`]) and which may or may not be
//!   ([`HotplugFailure::uncertain`]): the manager exits the threads of the confirmed ones
//!   only, and there is nothing it can observe to learn more. [`UpcallBackend`] sends one
//!   APIC ID per `DEL_CPU` request for that reason.
//! - Neither call is made while the manager is locked, and both must return within a bound
//!   (the upcall client's write and reply timeouts): a resize waits for them, nothing else
//!   does.

use std::sync::Arc;
use std::time::Duration;

use hotplug::{HotplugError, StepwiseError, UpcallClient};

use crate::error::HotplugOp;

/// The channel through which the VMM asks the guest to online or offline CPUs.
pub trait HotplugBackend: Send + Sync + std::fmt::Debug {
    /// A short name for messages (`"upcall"`).
    fn name(&self) -> &'static str;

    /// The largest APIC ID this backend can carry, if it has a limit.
    fn max_apic_id(&self) -> Option<u32>;

    /// Asks the guest to online the CPUs with these APIC IDs, in this order. Their vCPUs exist
    /// and wait for INIT/SIPI.
    ///
    /// # Errors
    ///
    /// A [`HotplugFailure`]; for a hot-add the manager decides from the vCPUs' MP states
    /// which of them the guest brought up.
    fn add(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure>;

    /// Asks the guest to offline the CPUs with these APIC IDs, in this order.
    ///
    /// # Errors
    ///
    /// A [`HotplugFailure`] that names exactly the APIC IDs the guest confirmed offline and
    /// those whose state is unknown.
    fn remove(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure>;

    /// Whether a successful [`add`](Self::add) must be confirmed by the manager: it then
    /// reads each new vCPU's MP state (`KVM_GET_MP_STATE`) and counts the hot-add done only if
    /// every one left wait-for-SIPI; the others are exited and the resize fails with
    /// [`BackendError::NotWoken`]. A backend whose guest acknowledges before it has started
    /// the CPUs (ACPI) says `true`; upcall's reply comes after the guest onlined them.
    fn confirm_wake_by_mp_state(&self) -> bool {
        false
    }

    /// Called at the end of every resize that reached the guest (success or not, the VM still
    /// running or paused) with the APIC IDs present afterwards, so that a backend with its
    /// own view of the CPUs (the ACPI controller's present bits) says what the manager has.
    fn sync_present(&self, present_apic_ids: &[u32]) {
        let _ = present_apic_ids;
    }
}

/// What a successful [`HotplugBackend`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotplugAck {
    /// How many requests went to the guest.
    pub requests: u32,
}

/// A [`HotplugBackend`] call that did not complete.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct HotplugFailure {
    /// The APIC IDs the guest confirmed (online after an add, offline after a remove), in
    /// order.
    pub confirmed: Vec<u32>,
    /// The APIC IDs the guest may or may not have acted on (a lost answer, or a batch whose
    /// failed reply does not say how far the guest got). The others of the request were
    /// certainly not acted on.
    pub uncertain: Vec<u32>,
    /// Why.
    #[source]
    pub source: BackendError,
}

impl HotplugFailure {
    /// The guest's errno, when it answered with a refusal.
    pub fn guest_errno(&self) -> Option<i32> {
        self.source.guest_errno()
    }

    /// Whether an answer was lost, so that the guest may have acted on the request.
    pub fn outcome_unknown(&self) -> bool {
        self.source.outcome_unknown()
    }
}

/// Why a [`HotplugBackend`] call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The upcall client's error (with the guest's errno when it refused).
    #[error(transparent)]
    Upcall(#[from] HotplugError),
    /// An APIC ID the backend cannot carry.
    #[error(
        "APIC ID {apic_id} cannot be carried by the {backend} hotplug backend (at most \
         {limit}): use fewer vCPUs or a denser topology"
    )]
    ApicIdTooLarge {
        /// The backend.
        backend: &'static str,
        /// The APIC ID.
        apic_id: u32,
        /// The largest it carries.
        limit: u32,
    },
    /// The guest did not answer in time: it did not acknowledge these insertions, or did not
    /// eject these CPUs.
    #[error(
        "the guest did not {what} the CPUs with APIC IDs {apic_ids:?} within {timeout:?} \
         ({backend} hotplug): does the guest handle ACPI CPU hotplug (GED interrupt, \
         processor driver)?",
        what = match op { HotplugOp::Add => "acknowledge the insertion of", HotplugOp::Remove => "eject" }
    )]
    GuestTimeout {
        /// The backend.
        backend: &'static str,
        /// Add or remove.
        op: HotplugOp,
        /// The CPUs the guest did not act on in time.
        apic_ids: Vec<u32>,
        /// How long the backend waited.
        timeout: Duration,
    },
    /// The guest acknowledged a hot-add but these vCPUs are still waiting for INIT/SIPI.
    #[error(
        "the guest acknowledged the CPUs with APIC IDs {apic_ids:?} but did not start them \
         (they still wait for INIT/SIPI; {backend} hotplug): check the guest's CPU bring-up"
    )]
    NotWoken {
        /// The backend.
        backend: &'static str,
        /// The vCPUs that did not leave wait-for-SIPI.
        apic_ids: Vec<u32>,
    },
    /// An APIC ID the backend has no CPU for.
    #[error("the {backend} hotplug backend has no CPU with APIC ID {apic_id}")]
    UnknownApicId {
        /// The backend.
        backend: &'static str,
        /// The APIC ID.
        apic_id: u32,
    },
    /// CPUs the backend cannot ask the guest to remove (the boot CPU, or one it does not
    /// list as present).
    #[error("the {backend} hotplug backend cannot remove the CPUs with APIC IDs {apic_ids:?}")]
    NotRemovable {
        /// The backend.
        backend: &'static str,
        /// The CPUs.
        apic_ids: Vec<u32>,
    },
    /// The backend panicked; what it did is unknown.
    #[error("the {backend} hotplug backend panicked: {message}")]
    Panicked {
        /// The backend.
        backend: &'static str,
        /// The panic's message, if it had one.
        message: String,
    },
}

impl BackendError {
    /// The guest's errno, when it answered with a refusal.
    pub fn guest_errno(&self) -> Option<i32> {
        match self {
            BackendError::Upcall(e) => e.guest_errno(),
            _ => None,
        }
    }

    /// Whether the answer was lost, so that the guest may have acted on the request.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            BackendError::Upcall(e) => e.outcome_unknown(),
            BackendError::ApicIdTooLarge { .. }
            | BackendError::GuestTimeout { .. }
            | BackendError::NotWoken { .. }
            | BackendError::UnknownApicId { .. }
            | BackendError::NotRemovable { .. } => false,
            BackendError::Panicked { .. } => true,
        }
    }

    /// The upcall error, if this came from the upcall backend.
    pub fn upcall(&self) -> Option<&HotplugError> {
        match self {
            BackendError::Upcall(e) => Some(e),
            _ => None,
        }
    }
}

/// [`HotplugBackend`] over an [`UpcallClient`]: `ADD_CPU` with every APIC ID in one request,
/// `DEL_CPU` one APIC ID per request (so that a failure says exactly which CPUs went
/// offline). Upcall carries 8-bit APIC IDs below 255.
#[derive(Debug, Clone)]
pub struct UpcallBackend {
    client: Arc<UpcallClient>,
}

/// The largest APIC ID upcall carries (255 is the broadcast ID).
pub const UPCALL_MAX_APIC_ID: u32 = 254;

impl UpcallBackend {
    /// A backend asking the guest through `client`.
    pub fn new(client: Arc<UpcallClient>) -> Self {
        Self { client }
    }

    /// The upcall client.
    pub fn client(&self) -> &Arc<UpcallClient> {
        &self.client
    }

    fn ids(&self, apic_ids: &[u32]) -> Result<Vec<u8>, HotplugFailure> {
        apic_ids
            .iter()
            .map(|&apic_id| {
                u8::try_from(apic_id)
                    .ok()
                    .filter(|id| u32::from(*id) <= UPCALL_MAX_APIC_ID)
                    .ok_or(HotplugFailure {
                        confirmed: Vec::new(),
                        uncertain: Vec::new(),
                        source: BackendError::ApicIdTooLarge {
                            backend: self.name(),
                            apic_id,
                            limit: UPCALL_MAX_APIC_ID,
                        },
                    })
            })
            .collect()
    }
}

impl HotplugBackend for UpcallBackend {
    fn name(&self) -> &'static str {
        "upcall"
    }

    fn max_apic_id(&self) -> Option<u32> {
        Some(UPCALL_MAX_APIC_ID)
    }

    fn add(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        let ids = self.ids(apic_ids)?;
        match self.client.add_cpus(&ids, hotplug::DEFAULT_APIC_VERSION) {
            Ok(_) => Ok(HotplugAck { requests: 1 }),
            Err(source) => {
                // The guest may have onlined any prefix before failing (its reply does not say
                // how far it got), unless nothing was sent at all.
                let sent = source.outcome_unknown() || source.guest_errno().is_some();
                Err(HotplugFailure {
                    confirmed: Vec::new(),
                    uncertain: if sent { apic_ids.to_vec() } else { Vec::new() },
                    source: source.into(),
                })
            }
        }
    }

    fn remove(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        let ids = self.ids(apic_ids)?;
        match self.client.del_cpus_one_by_one(&ids) {
            Ok(()) => Ok(HotplugAck {
                requests: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            }),
            Err(e) => Err(stepwise_failure(e)),
        }
    }
}

/// A one-APIC-ID-per-request failure: the confirmed IDs, and the failed one when its answer
/// was lost.
fn stepwise_failure(e: StepwiseError) -> HotplugFailure {
    let uncertain = match e.failed {
        Some(id) if !e.failed_state_known() => vec![u32::from(id)],
        _ => Vec::new(),
    };
    HotplugFailure {
        confirmed: e.done.iter().copied().map(u32::from).collect(),
        uncertain,
        source: e.source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotplug::{CpuOp, Phase};
    use std::time::Duration;

    #[test]
    fn stepwise_failures_name_the_confirmed_and_the_uncertain_ids() {
        let refused = StepwiseError {
            op: CpuOp::Del,
            done: vec![5, 4],
            failed: Some(3),
            not_sent: vec![2],
            source: HotplugError::GuestError { errno: 5 },
        };
        let f = stepwise_failure(refused);
        assert_eq!((f.confirmed, f.uncertain), (vec![5, 4], vec![]));
        assert_eq!(f.source.guest_errno(), Some(5));
        assert!(!f.source.outcome_unknown());

        let lost = StepwiseError {
            op: CpuOp::Del,
            done: vec![5],
            failed: Some(4),
            not_sent: vec![],
            source: HotplugError::Timeout {
                during: Phase::Reply,
                timeout: Duration::from_millis(1),
            },
        };
        let f = stepwise_failure(lost);
        assert_eq!((f.confirmed, f.uncertain), (vec![5], vec![4]));
        assert!(f.source.outcome_unknown());
    }
}
