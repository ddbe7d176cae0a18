//! [`AcpiBackend`]: the vCPU manager's [`HotplugBackend`] over the CPU hotplug controller and
//! the GED.

use std::sync::Arc;
use std::time::Duration;

use super::ged::events;
use super::{CpuHotplugController, Ged};
use crate::error::HotplugOp;
use crate::hotplug_backend::{BackendError, HotplugAck, HotplugBackend, HotplugFailure};

/// The backend's name in messages.
const NAME: &str = "acpi";

/// Hotplug through ACPI: the controller says which CPUs were inserted or are to be removed,
/// the GED interrupts the guest, the guest acknowledges and ejects on the controller. No
/// APIC ID limit beyond KVM's.
///
/// - [`add`](HotplugBackend::add): marks the CPUs inserted (present, insert event), raises the
///   GED, and waits until the guest acknowledged every insert event; then the manager checks
///   that every new vCPU left wait-for-SIPI
///   ([`confirm_wake_by_mp_state`](HotplugBackend::confirm_wake_by_mp_state)). On timeout,
///   the inserts not acknowledged are withdrawn (the CPUs read as absent again) and the
///   manager keeps exactly the new vCPUs the guest started.
/// - [`remove`](HotplugBackend::remove): marks the CPUs for removal (remove event, eject
///   allowed), raises the GED, and waits until the guest ejected every one. On timeout, the
///   removal of the others is withdrawn (a later eject is refused); the failure names the
///   ejected CPUs as confirmed and those whose event the guest acknowledged without ejecting
///   as uncertain: the manager exits the threads of the ejected ones only.
///
/// Neither call holds anything a vCPU thread needs while it waits: it waits on the
/// controller's condition variable, which the guest's register writes signal.
#[derive(Debug)]
pub struct AcpiBackend {
    controller: Arc<CpuHotplugController>,
    ged: Arc<Ged>,
    timeout: Duration,
}

impl AcpiBackend {
    /// A backend over `controller` and `ged`, waiting at most `timeout` for the guest per
    /// request.
    pub fn new(controller: Arc<CpuHotplugController>, ged: Arc<Ged>, timeout: Duration) -> Self {
        Self {
            controller,
            ged,
            timeout,
        }
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<CpuHotplugController> {
        &self.controller
    }

    /// The GED.
    pub fn ged(&self) -> &Arc<Ged> {
        &self.ged
    }

    /// How long a request waits for the guest.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn failure(source: BackendError) -> HotplugFailure {
        HotplugFailure {
            confirmed: Vec::new(),
            uncertain: Vec::new(),
            source,
        }
    }

    /// The controller indices of `apic_ids`.
    fn indices(&self, apic_ids: &[u32]) -> Result<Vec<usize>, HotplugFailure> {
        apic_ids
            .iter()
            .map(|&apic_id| {
                self.controller.index_of(apic_id).ok_or_else(|| {
                    Self::failure(BackendError::UnknownApicId {
                        backend: NAME,
                        apic_id,
                    })
                })
            })
            .collect()
    }

    fn raise(&self) {
        // A failed irqfd write leaves the event pending: a polling guest still sees it, and an
        // interrupt-driven one times out like any guest that does not answer.
        let _ = self.ged.raise(events::CPU_HOTPLUG);
    }

    fn apic_ids(&self, indices: &[usize]) -> Vec<u32> {
        indices
            .iter()
            .filter_map(|&i| self.controller.apic_ids().get(i).copied())
            .collect()
    }
}

impl HotplugBackend for AcpiBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn max_apic_id(&self) -> Option<u32> {
        None
    }

    fn confirm_wake_by_mp_state(&self) -> bool {
        true
    }

    fn sync_present(&self, present_apic_ids: &[u32]) {
        let present: Vec<usize> = present_apic_ids
            .iter()
            .filter_map(|&id| self.controller.index_of(id))
            .collect();
        self.controller.sync_present(&present);
    }

    fn add(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        let indices = self.indices(apic_ids)?;
        self.controller.mark_inserted(&indices);
        self.raise();
        let acked = self
            .controller
            .wait_until(self.timeout, |s| indices.iter().all(|&i| !s[i].inserting));
        if acked {
            return Ok(HotplugAck { requests: 1 });
        }
        let withdrawn = self.controller.cancel_insert(&indices);
        let confirmed: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|i| !withdrawn.contains(i))
            .collect();
        Err(HotplugFailure {
            confirmed: self.apic_ids(&confirmed),
            uncertain: Vec::new(),
            source: BackendError::GuestTimeout {
                backend: NAME,
                op: HotplugOp::Add,
                apic_ids: self.apic_ids(&withdrawn),
                timeout: self.timeout,
            },
        })
    }

    fn remove(&self, apic_ids: &[u32]) -> Result<HotplugAck, HotplugFailure> {
        let indices = self.indices(apic_ids)?;
        let marked = self.controller.mark_for_removal(&indices);
        if marked.len() != indices.len() {
            self.controller.cancel_removal(&marked);
            let refused: Vec<usize> = indices
                .iter()
                .copied()
                .filter(|i| !marked.contains(i))
                .collect();
            return Err(Self::failure(BackendError::NotRemovable {
                backend: NAME,
                apic_ids: self.apic_ids(&refused),
            }));
        }
        self.raise();
        let ejected = self.controller.wait_until(self.timeout, |s| {
            indices.iter().all(|&i| !s[i].remove_requested)
        });
        if ejected {
            return Ok(HotplugAck {
                requests: u32::try_from(indices.len()).unwrap_or(u32::MAX),
            });
        }
        let (acknowledged, untouched) = self.controller.cancel_removal(&indices);
        let done: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|i| !acknowledged.contains(i) && !untouched.contains(i))
            .collect();
        let mut waiting = acknowledged.clone();
        waiting.extend(&untouched);
        Err(HotplugFailure {
            confirmed: self.apic_ids(&done),
            uncertain: self.apic_ids(&acknowledged),
            source: BackendError::GuestTimeout {
                backend: NAME,
                op: HotplugOp::Remove,
                apic_ids: self.apic_ids(&waiting),
                timeout: self.timeout,
            },
        })
    }
}
