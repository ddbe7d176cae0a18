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
//! on part of the request; the error says so ([`ResizeError::HotplugFailed`]).
//!
//! One resize at a time: the method takes `&mut self`, and the [`hotplug::UpcallClient`]
//! answers `Busy` to a second request on the same channel. [`AsyncResizer`] runs a resize of
//! a shared manager on a background thread; the caller waits on its [`ResizeHandle`] with a
//! timeout, and a second start while one runs is [`ResizeError::Busy`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use slog::{info, warn};

use crate::error::{HotplugOp, ResizeError, VcpuSetupError};
use crate::VcpuManager;

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
    /// Time spent creating, configuring and starting (growing) or exiting (shrinking) vCPUs:
    /// [`vcpu_create`](Self::vcpu_create) + [`vcpu_start`](Self::vcpu_start) when growing.
    pub vcpu_work: Duration,
    /// Growing: creating (or reusing) and configuring the KVM vCPUs and spawning their
    /// threads, one after the other. Zero when shrinking.
    pub vcpu_create: Duration,
    /// Growing: starting the new threads (every `Resume` sent, then every acknowledgement
    /// awaited). Zero when shrinking.
    pub vcpu_start: Duration,
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
    /// guest over upcall to online or offline them (see the [module](crate::resize) docs).
    ///
    /// # Errors
    ///
    /// [`ResizeError::OutOfRange`], [`ResizeError::NoUpcallClient`],
    /// [`ResizeError::HotplugFailed`] if the guest did not act (rolled back), or the error of
    /// creating, starting or exiting the vCPUs ([`ResizeError::VcpuSetup`],
    /// [`ResizeError::VcpuControl`]).
    pub fn resize_vcpus(&mut self, target: u32) -> Result<ResizeOutcome, ResizeError> {
        let max = self.config().max_vcpu_count;
        if target == 0 || target > max {
            return Err(ResizeError::OutOfRange { target, max });
        }
        let client = self.upcall.clone().ok_or(ResizeError::NoUpcallClient)?;
        let started = Instant::now();
        let present: Vec<u32> = self.present_vcpus().iter().map(|v| v.index).collect();
        let from = self.present_vcpu_count();
        let mut outcome = ResizeOutcome {
            from,
            to: from,
            added: Vec::new(),
            removed: Vec::new(),
            vcpu_work: Duration::ZERO,
            vcpu_create: Duration::ZERO,
            vcpu_start: Duration::ZERO,
            upcall: Duration::ZERO,
            total: Duration::ZERO,
        };
        if target > from {
            let indices: Vec<u32> = (0..max)
                .filter(|i| !present.contains(i))
                .take((target - from) as usize)
                .collect();
            let plan = self.plan(client, indices)?;
            self.grow(&plan, &mut outcome)?;
            outcome.added = plan.slots;
        } else if target < from {
            // Highest indices first, never vCPU 0.
            let indices: Vec<u32> = present
                .iter()
                .rev()
                .copied()
                .filter(|i| *i != 0)
                .take((from - target) as usize)
                .collect();
            let plan = self.plan(client, indices)?;
            self.shrink(&plan, &mut outcome)?;
            outcome.removed = plan.slots;
        }
        outcome.to = self.present_vcpu_count();
        outcome.total = started.elapsed();
        info!(self.logger, "vCPUs resized"; "from" => from, "to" => outcome.to,
              "vcpu_create_us" => micros(outcome.vcpu_create),
              "vcpu_start_us" => micros(outcome.vcpu_start),
              "vcpu_work_us" => micros(outcome.vcpu_work),
              "upcall_us" => micros(outcome.upcall),
              "total_us" => micros(outcome.total));
        Ok(outcome)
    }

    fn slots(&self, indices: &[u32]) -> Result<Vec<VcpuSlot>, VcpuSetupError> {
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

    /// The plan to add or remove the vCPUs at `indices` with `client`.
    fn plan(
        &self,
        client: Arc<hotplug::UpcallClient>,
        indices: Vec<u32>,
    ) -> Result<Plan, ResizeError> {
        let slots = self.slots(&indices)?;
        let ids = upcall_ids(&slots)?;
        Ok(Plan {
            client,
            indices,
            slots,
            ids,
        })
    }

    /// Creates and starts the vCPUs of `plan`, then asks the guest to online them; records
    /// the times in `outcome`.
    fn grow(&mut self, plan: &Plan, outcome: &mut ResizeOutcome) -> Result<(), ResizeError> {
        let indices = plan.indices.as_slice();
        let t = Instant::now();
        let mut created = Vec::new();
        let mut create = || -> Result<(), ResizeError> {
            for &index in indices {
                self.create_vcpu(index)?;
                created.push(index);
            }
            Ok(())
        };
        let setup = create().and_then(|()| {
            outcome.vcpu_create = t.elapsed();
            // The new threads enter KVM_RUN and wait there for the guest's INIT/SIPI.
            Ok(self.start_vcpus(indices)?)
        });
        if let Err(e) = setup {
            self.roll_back(&created);
            return Err(e);
        }
        outcome.vcpu_work = t.elapsed();
        outcome.vcpu_start = outcome.vcpu_work.saturating_sub(outcome.vcpu_create);
        let t = Instant::now();
        let reply = plan
            .client
            .add_cpus(&plan.ids, hotplug::DEFAULT_APIC_VERSION);
        outcome.upcall = t.elapsed();
        match reply {
            Ok(_) => Ok(()),
            Err(source) => {
                warn!(self.logger, "hot-add failed, rolling back"; "apic_ids" => ?plan.ids,
                      "error" => %source);
                self.roll_back(indices);
                Err(hotplug_failed(HotplugOp::Add, &plan.slots, source))
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

    /// Asks the guest to offline the vCPUs of `plan`, then exits their threads; records the
    /// times in `outcome`.
    fn shrink(&mut self, plan: &Plan, outcome: &mut ResizeOutcome) -> Result<(), ResizeError> {
        let t = Instant::now();
        let reply = plan.client.del_cpus(&plan.ids);
        outcome.upcall = t.elapsed();
        if let Err(source) = reply {
            return Err(hotplug_failed(HotplugOp::Remove, &plan.slots, source));
        }
        // The guest has parked them: only now do their threads stop.
        let t = Instant::now();
        self.exit_vcpus(&plan.indices)?;
        outcome.vcpu_work = t.elapsed();
        Ok(())
    }
}

/// The vCPUs one resize adds or removes, and whom it asks.
struct Plan {
    /// The upcall client.
    client: Arc<hotplug::UpcallClient>,
    /// Their indices.
    indices: Vec<u32>,
    /// Their indices and APIC IDs.
    slots: Vec<VcpuSlot>,
    /// Their APIC IDs as upcall carries them.
    ids: Vec<u8>,
}

/// The APIC IDs of `slots` as upcall carries them (8 bits; the config's interrupt mode
/// already keeps them below 255, this only refuses what upcall cannot say).
fn upcall_ids(slots: &[VcpuSlot]) -> Result<Vec<u8>, ResizeError> {
    slots
        .iter()
        .map(|s| {
            u8::try_from(s.apic_id)
                .ok()
                .filter(|id| *id != u8::MAX)
                .ok_or(ResizeError::ApicIdTooLargeForUpcall {
                    index: s.index,
                    apic_id: s.apic_id,
                    limit: u32::from(u8::MAX),
                })
        })
        .collect()
}

/// `d` in whole microseconds, for the log (saturating: no resize takes 584 000 years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The error of a failed upcall request about `slots`.
fn hotplug_failed(op: HotplugOp, slots: &[VcpuSlot], source: hotplug::HotplugError) -> ResizeError {
    ResizeError::HotplugFailed {
        op,
        apic_ids: slots.iter().map(|s| s.apic_id).collect(),
        guest_state_unknown: source.outcome_unknown(),
        source,
    }
}

/// Runs resizes of a shared [`VcpuManager`] in the background, one at a time: a second
/// [`start`](Self::start) while one runs is [`ResizeError::Busy`].
///
/// Cloning gives another handle on the same manager and the same one-at-a-time rule. Make one
/// resizer per manager and clone it: two made with [`new`](Self::new) on the same manager do
/// not see each other's resize (the second one's thread waits for the manager's lock instead
/// of its start failing with [`ResizeError::Busy`]).
#[derive(Clone)]
pub struct AsyncResizer {
    manager: Arc<Mutex<VcpuManager>>,
    /// The target of the resize in flight, or [`IDLE`].
    in_flight: Arc<AtomicU64>,
}

/// No resize in flight (outside the range of any `u32` target).
const IDLE: u64 = u64::MAX;

impl std::fmt::Debug for AsyncResizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResizer")
            .field("in_flight", &self.in_flight_target())
            .finish_non_exhaustive()
    }
}

/// Clears the in-flight marker when the worker ends, whatever happens in it.
struct InFlightGuard(Arc<AtomicU64>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.store(IDLE, Ordering::SeqCst);
    }
}

impl AsyncResizer {
    /// A resizer for `manager` (shared with whoever else uses it; a resize holds the lock for
    /// its whole duration).
    pub fn new(manager: Arc<Mutex<VcpuManager>>) -> Self {
        Self {
            manager,
            in_flight: Arc::new(AtomicU64::new(IDLE)),
        }
    }

    /// The shared manager.
    pub fn manager(&self) -> &Arc<Mutex<VcpuManager>> {
        &self.manager
    }

    /// The target of the resize running now, if any.
    pub fn in_flight_target(&self) -> Option<u32> {
        u32::try_from(self.in_flight.load(Ordering::SeqCst)).ok()
    }

    /// Starts [`VcpuManager::resize_vcpus`]`(target)` on a background thread and returns at
    /// once; wait for the outcome with [`ResizeHandle::wait_timeout`].
    ///
    /// # Errors
    ///
    /// [`ResizeError::Busy`] while another resize of this resizer runs,
    /// [`ResizeError::Thread`] if the thread cannot be started.
    pub fn start(&self, target: u32) -> Result<ResizeHandle, ResizeError> {
        if let Err(in_flight) = self.in_flight.compare_exchange(
            IDLE,
            u64::from(target),
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            return Err(ResizeError::Busy {
                target,
                in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
            });
        }
        let guard = InFlightGuard(Arc::clone(&self.in_flight));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let manager = Arc::clone(&self.manager);
        std::thread::Builder::new()
            .name(format!("vcpu-resize-{target}"))
            .spawn(move || {
                let outcome = manager
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .resize_vcpus(target);
                // Idle again, and this thread's share of the manager released, before the
                // outcome is seen: the waiter may start the next one (or take the manager back)
                // at once. A panic above also clears the marker, through the guard's drop.
                drop(manager);
                drop(guard);
                // The handle may be gone: nobody waits, the outcome is dropped.
                let _ = tx.send(outcome);
            })
            // The closure (and the guard in it) is dropped on failure: the marker is cleared.
            .map_err(|source| ResizeError::Thread { source })?;
        Ok(ResizeHandle { target, rx })
    }
}

/// A resize running in the background ([`AsyncResizer::start`]).
#[derive(Debug)]
pub struct ResizeHandle {
    target: u32,
    rx: crossbeam_channel::Receiver<Result<ResizeOutcome, ResizeError>>,
}

impl ResizeHandle {
    /// The target vCPU count of this resize.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// Waits at most `timeout` for the outcome.
    ///
    /// # Errors
    ///
    /// The resize's own error; [`ResizeError::StillRunning`] if it has not finished (wait
    /// again later); [`ResizeError::OutcomeGone`] if an earlier wait already took it.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ResizeOutcome, ResizeError> {
        match self.rx.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(ResizeError::StillRunning {
                target: self.target,
                waited: timeout,
            }),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(ResizeError::OutcomeGone {
                    target: self.target,
                })
            }
        }
    }
}
