//! vCPU hot-add and hot-remove: [`VcpuManager::resize_vcpus`] and
//! [`VcpuManager::resize_shared`], through the manager's [`HotplugBackend`].
//!
//! # A resize is a transaction in three phases
//!
//! 1. **Under the manager** (`&mut VcpuManager`, or its lock): check the target, the backend and
//!    the state machine (the VM must be [`VmRunState::Running`](crate::VmRunState::Running) and no other resize in flight,
//!    otherwise [`ResizeError::NotRunning`] or [`ResizeError::Busy`] at once); mark the resize
//!    in flight. Growing takes the lowest free indices, creates them (reusing a kept KVM vCPU
//!    fd when that APIC ID existed before), configures them and starts their threads, which
//!    wait in `KVM_RUN` for INIT/SIPI. Shrinking takes the highest present indices, never
//!    vCPU 0.
//! 2. **Without the manager**: the guest round trip ([`HotplugBackend::add`] or
//!    [`HotplugBackend::remove`]), bounded by the backend's timeouts.
//! 3. **Under the manager again**: commit or reconcile with whatever state it finds, then clear
//!    the in-flight mark.
//!
//! [`VcpuManager::resize_shared`] (and [`AsyncResizer`], which calls it on a thread) takes
//! `&Mutex<VcpuManager>` and releases the lock during phase 2. [`VcpuManager::resize_vcpus`]
//! runs the three phases in place, for a caller that owns the manager alone.
//!
//! # Meanwhile: pause, resume, stop
//!
//! While phase 2 runs, other threads lock the manager for what they need, without waiting
//! for the guest:
//!
//! - `pause_all` proceeds at once and pauses every present vCPU, the resize's new ones
//!   included. A paused guest cannot answer: unless it is resumed in time, the resize times
//!   out and is reconciled like any failed request (below).
//! - `resume_all` resumes every present vCPU, the new ones included.
//! - A stop (`stop_vm`, through the exit monitor) exits every vCPU; phase 3 then reports
//!   [`ResizeError::VmStopped`] (so does `exit_all`).
//! - A second resize is refused ([`ResizeError::Busy`]); a resize of a paused, stopping or
//!   stopped VM is refused at once ([`ResizeError::NotRunning`]).
//!
//! # Failures are reconciled, not rolled back blindly
//!
//! The guest handles the CPUs of a request in order and stops at the first it cannot handle,
//! leaving the earlier ones done, and its failure reply does not say how far it got. So:
//!
//! - **Hot-add**: the manager looks at each new vCPU itself. One that has left the
//!   wait-for-SIPI state (`KVM_GET_MP_STATE` is neither `UNINITIALIZED` nor `INIT_RECEIVED`:
//!   one that got INIT but whose SIPI never came, or was lost, ran no guest code) was brought
//!   up by the guest: it stays present (and keeps running, unless the VM is paused). The others are
//!   exited (their fds kept). To read the MP state, the new vCPUs are paused first (KVM
//!   serialises a vCPU's ioctls, and a thread inside `KVM_RUN` waits there for SIPI), then each
//!   one's own thread reads it ([`VcpuRequest::GetMpState`](vcpu_actor::VcpuRequest::GetMpState),
//!   within the manager's `ack_timeout`): no second fd per vCPU. A vCPU whose state cannot be
//!   read (it did not pause in time, its thread did not answer or has died) counts as "state
//!   unknown" and stays present.
//! - **Hot-remove**: nothing in KVM shows that a guest offlined a CPU, so the upcall backend
//!   sends one APIC ID per `DEL_CPU` request and the manager exits exactly the vCPUs the guest
//!   confirmed offline. A CPU whose answer was lost (timeout, hang-up) stays present and is
//!   reported as uncertain: a thread is never exited under a guest that may still use it.
//! - [`ResizeError::HotplugFailed`] then lists what the guest confirmed, what is uncertain,
//!   and exactly which APIC IDs are present afterwards. The manager is consistent with itself
//!   and idle again, so the next resize works.
//!
//! On success, [`ResizeOutcome`] names each vCPU added or removed and reports how long the
//! vCPU work and the guest round trip took.

mod background;
mod plan;
mod reconcile;

pub use background::{AsyncResizer, ResizeHandle};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{HotplugOp, ResizeError};
use crate::hotplug_backend::{
    BackendError, HotplugAck, HotplugBackend, HotplugFailure, UpcallBackend,
};
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
    /// Growing: creating (or reusing) the KVM vCPUs and spawning their threads, one after
    /// the other (each thread configures its vCPU, in parallel with the next spawns). Zero
    /// when shrinking.
    pub vcpu_create: Duration,
    /// Growing: after the last spawn, waiting until every new thread had configured its
    /// vCPU, installed its seccomp filter and gone on to `KVM_RUN` (where it waits for the
    /// guest's INIT/SIPI). Zero when shrinking.
    pub vcpu_start: Duration,
    /// Time spent in the upcall round trip (the guest onlining/offlining the vCPUs).
    pub upcall: Duration,
    /// The whole resize.
    pub total: Duration,
}

impl VcpuManager {
    /// Sets the upcall client resizes ask the guest with (wrapped in an [`UpcallBackend`]).
    pub fn set_upcall_client(&mut self, client: Arc<hotplug::UpcallClient>) {
        self.backend = Some(Arc::new(UpcallBackend::new(client)));
    }

    /// Sets the hotplug backend resizes ask the guest with.
    pub fn set_hotplug_backend(&mut self, backend: Arc<dyn HotplugBackend>) {
        self.backend = Some(backend);
    }

    /// The hotplug backend, if one is set.
    pub fn hotplug_backend(&self) -> Option<&Arc<dyn HotplugBackend>> {
        self.backend.as_ref()
    }

    /// Grows or shrinks the present vCPUs to `target`, in `[1, max_vcpu_count]`, asking the
    /// guest through the hotplug backend to online or offline them (see the
    /// [module](crate::resize) docs). The three phases run in place: nobody else can use the
    /// manager meanwhile. To pause, resume or stop during the guest round trip, share the
    /// manager and use [`resize_shared`](Self::resize_shared).
    ///
    /// # Errors
    ///
    /// [`ResizeError::OutOfRange`], [`ResizeError::NoHotplugBackend`],
    /// [`ResizeError::NotRunning`], [`ResizeError::Busy`], [`ResizeError::ApicIdTooLarge`]
    /// (nothing done); [`ResizeError::HotplugFailed`] if the guest did not do all of it
    /// (reconciled: the error says what is present); [`ResizeError::VmStopped`]; or the error
    /// of creating, starting or exiting the vCPUs ([`ResizeError::VcpuSetup`],
    /// [`ResizeError::VcpuControl`]).
    pub fn resize_vcpus(&mut self, target: u32) -> Result<ResizeOutcome, ResizeError> {
        let pending = match self.resize_begin(target)? {
            Begun::Done(outcome) => return Ok(outcome),
            Begun::AskGuest(pending) => pending,
        };
        let reply = pending.ask_guest();
        self.resize_finish(pending, reply)
    }

    /// [`resize_vcpus`](Self::resize_vcpus) on a shared manager, holding its lock only for
    /// the first and last phase: during the guest round trip other threads can pause, resume
    /// or stop the VM (see the [module](crate::resize) docs for what then happens).
    ///
    /// # Errors
    ///
    /// As [`resize_vcpus`](Self::resize_vcpus).
    pub fn resize_shared(
        manager: &Mutex<VcpuManager>,
        target: u32,
    ) -> Result<ResizeOutcome, ResizeError> {
        let lock = || manager.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = match lock().resize_begin(target)? {
            Begun::Done(outcome) => return Ok(outcome),
            Begun::AskGuest(pending) => pending,
        };
        let reply = pending.ask_guest();
        lock().resize_finish(pending, reply)
    }
}

/// What phase 1 decided.
enum Begun {
    /// Nothing to ask the guest (same size).
    Done(ResizeOutcome),
    /// Phase 2 and 3 follow.
    AskGuest(PendingResize),
}

/// A resize between phase 1 and phase 3.
struct PendingResize {
    target: u32,
    op: HotplugOp,
    /// The vCPUs added (already created and started) or to remove.
    slots: Vec<VcpuSlot>,
    backend: Arc<dyn HotplugBackend>,
    started: Instant,
    outcome: ResizeOutcome,
}

impl PendingResize {
    /// Phase 2: the guest round trip (no manager held). A panicking backend is an unknown
    /// outcome, not a panic of the resize.
    fn ask_guest(&self) -> (Result<HotplugAck, HotplugFailure>, Duration) {
        let ids: Vec<u32> = self.slots.iter().map(|s| s.apic_id).collect();
        let t = Instant::now();
        let reply = catch_unwind(AssertUnwindSafe(|| match self.op {
            HotplugOp::Add => self.backend.add(&ids),
            HotplugOp::Remove => self.backend.remove(&ids),
        }))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(HotplugFailure {
                confirmed: Vec::new(),
                uncertain: ids.clone(),
                source: BackendError::Panicked {
                    backend: self.backend.name(),
                    message,
                },
            })
        });
        (reply, t.elapsed())
    }
}

/// `d` in whole microseconds, for the log (saturating: no resize takes 584 000 years).
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
