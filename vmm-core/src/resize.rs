//! vCPU hot-add and hot-remove over upcall: [`VcpuManager::resize_vcpus`].
//!
//! Growing takes the lowest free vCPU indices, creates them (reusing a kept KVM vCPU fd when
//! that APIC ID existed before), configures them and starts their threads, which wait in
//! `KVM_RUN` for INIT/SIPI; then it sends `ADD_CPU` with their topology APIC IDs and the MP
//! table's APIC version, and the guest onlines them itself. Shrinking takes the highest
//! indices first, never vCPU 0, sends `DEL_CPU`, and only once the guest has offlined them
//! exits their threads (the fds are kept for reuse).
//!
//! Whatever fails, the present vCPUs stay as they were: a failed, timed-out or reset `ADD_CPU`
//! exits the new threads again; a failed `DEL_CPU` leaves every vCPU running. When the upcall
//! outcome is unknown (timeout, reset, a reply that does not match), the guest may have acted
//! on part of the request; the error says so ([`VmmError::HotplugFailed`]).
//!
//! One resize at a time: the method takes `&mut self`, and the [`hotplug::UpcallClient`]
//! answers `Busy` to a second request on the same channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use slog::{info, warn};

use crate::{VcpuManager, VmmError};

/// A vCPU by index and APIC ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VcpuSlot {
    /// The vCPU index (creation order).
    pub index: u32,
    /// Its APIC ID (= KVM vCPU id).
    pub apic_id: u32,
}

/// What [`VcpuManager::resize_vcpus`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResizeOutcome {
    /// Present vCPUs before.
    pub from: u32,
    /// Present vCPUs after.
    pub to: u32,
    /// The vCPUs added (growing).
    pub added: Vec<VcpuSlot>,
    /// The vCPUs removed (shrinking).
    pub removed: Vec<VcpuSlot>,
    /// Time spent creating, configuring and starting (growing) or exiting (shrinking) vCPUs.
    pub vcpu_work: Duration,
    /// Time spent in the upcall round trip (the guest onlining/offlining the vCPUs).
    pub upcall: Duration,
    /// The whole resize.
    pub total: Duration,
}

impl VcpuManager {
    /// Sets the upcall client [`resize_vcpus`](Self::resize_vcpus) asks the guest with.
    pub fn set_upcall_client(&mut self, client: Arc<hotplug::UpcallClient>) {
        self.upcall = Some(client);
    }

    /// Grows or shrinks the present vCPUs to `target`, in `[1, max_vcpu_count]`, asking the
    /// guest over upcall to online or offline them (see the [module](self) docs).
    pub fn resize_vcpus(&mut self, target: u32) -> Result<ResizeOutcome, VmmError> {
        let max = self.config().max_vcpu_count;
        if target == 0 || target > max {
            return Err(VmmError::ResizeOutOfRange { target, max });
        }
        let client = self.upcall.clone().ok_or(VmmError::NoUpcallClient)?;
        let started = Instant::now();
        let present: Vec<u32> = self.present_vcpus().iter().map(|v| v.index).collect();
        let from = present.len() as u32;
        let mut outcome = ResizeOutcome {
            from,
            to: from,
            added: Vec::new(),
            removed: Vec::new(),
            vcpu_work: Duration::ZERO,
            upcall: Duration::ZERO,
            total: Duration::ZERO,
        };
        if target > from {
            let indices: Vec<u32> = (0..max)
                .filter(|i| !present.contains(i))
                .take((target - from) as usize)
                .collect();
            outcome.added = self.grow(
                &client,
                &indices,
                &mut outcome.vcpu_work,
                &mut outcome.upcall,
            )?;
        } else if target < from {
            // Highest indices first, never vCPU 0.
            let indices: Vec<u32> = present
                .iter()
                .rev()
                .copied()
                .filter(|i| *i != 0)
                .take((from - target) as usize)
                .collect();
            outcome.removed = self.shrink(
                &client,
                &indices,
                &mut outcome.vcpu_work,
                &mut outcome.upcall,
            )?;
        }
        outcome.to = self.present_vcpu_count();
        outcome.total = started.elapsed();
        info!(self.logger, "vCPUs resized"; "from" => from, "to" => outcome.to,
              "upcall_us" => outcome.upcall.as_micros() as u64,
              "total_us" => outcome.total.as_micros() as u64);
        Ok(outcome)
    }

    fn slots(&self, indices: &[u32]) -> Result<Vec<VcpuSlot>, VmmError> {
        indices
            .iter()
            .map(|&index| {
                Ok(VcpuSlot {
                    index,
                    apic_id: self.apic_id(index)?,
                })
            })
            .collect()
    }

    /// The APIC IDs of `slots` as upcall carries them (8 bits; the config's interrupt mode
    /// already keeps them below 255, this only refuses what upcall cannot say).
    fn upcall_ids(slots: &[VcpuSlot]) -> Result<Vec<u8>, VmmError> {
        slots
            .iter()
            .map(|s| {
                u8::try_from(s.apic_id)
                    .ok()
                    .filter(|id| *id != u8::MAX)
                    .ok_or(VmmError::ApicIdTooLargeForInterruptMode {
                        index: s.index,
                        apic_id: s.apic_id,
                        mode: crate::InterruptMode::XApic,
                        limit: u32::from(u8::MAX),
                    })
            })
            .collect()
    }

    fn grow(
        &mut self,
        client: &hotplug::UpcallClient,
        indices: &[u32],
        vcpu_work: &mut Duration,
        upcall: &mut Duration,
    ) -> Result<Vec<VcpuSlot>, VmmError> {
        let slots = self.slots(indices)?;
        let ids = Self::upcall_ids(&slots)?;
        let t = Instant::now();
        let mut created = Vec::new();
        let mut setup = || -> Result<(), VmmError> {
            for &index in indices {
                self.create_vcpu(index)?;
                created.push(index);
            }
            // The new threads enter KVM_RUN and wait there for the guest's INIT/SIPI.
            self.start_vcpus(indices)
        };
        if let Err(e) = setup() {
            self.roll_back(&created);
            return Err(e);
        }
        *vcpu_work = t.elapsed();
        let t = Instant::now();
        let reply = client.add_cpus(&ids, hotplug::DEFAULT_APIC_VERSION);
        *upcall = t.elapsed();
        match reply {
            Ok(_) => Ok(slots),
            Err(source) => {
                warn!(self.logger, "hot-add failed, rolling back"; "apic_ids" => ?ids,
                      "error" => %source);
                self.roll_back(indices);
                Err(VmmError::HotplugFailed {
                    op: "hot-add",
                    apic_ids: slots.iter().map(|s| s.apic_id).collect(),
                    guest_state_unknown: source.outcome_unknown(),
                    source,
                })
            }
        }
    }

    /// Exits the threads of vCPUs that were being added (their fds are kept).
    fn roll_back(&mut self, indices: &[u32]) {
        if indices.is_empty() {
            return;
        }
        if let Err(e) = self.exit_vcpus(indices) {
            warn!(self.logger, "rolling back new vCPUs failed"; "indices" => ?indices,
                  "error" => %e);
        }
    }

    fn shrink(
        &mut self,
        client: &hotplug::UpcallClient,
        indices: &[u32],
        vcpu_work: &mut Duration,
        upcall: &mut Duration,
    ) -> Result<Vec<VcpuSlot>, VmmError> {
        let slots = self.slots(indices)?;
        let ids = Self::upcall_ids(&slots)?;
        let t = Instant::now();
        let reply = client.del_cpus(&ids);
        *upcall = t.elapsed();
        if let Err(source) = reply {
            return Err(VmmError::HotplugFailed {
                op: "hot-remove",
                apic_ids: slots.iter().map(|s| s.apic_id).collect(),
                guest_state_unknown: source.outcome_unknown(),
                source,
            });
        }
        // The guest has parked them: only now do their threads stop.
        let t = Instant::now();
        self.exit_vcpus(indices)?;
        *vcpu_work = t.elapsed();
        Ok(slots)
    }
}
