//! vCPU hot-add and hot-remove: [`VcpuManager::resize_vcpus`] and
//! [`VcpuManager::resize_shared`], through the manager's [`HotplugBackend`].
//!
//! # A resize is a transaction in three phases
//!
//! 1. **Under the manager** (`&mut VcpuManager`, or its lock): check the target, the backend and
//!    the state machine (the VM must be [`VmRunState::Running`] and no other resize in flight,
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
//!   wait-for-SIPI state (`KVM_GET_MP_STATE` is not `UNINITIALIZED`) was brought up by the
//!   guest: it stays present (and keeps running, unless the VM is paused). The others are
//!   exited (their fds kept). To read the MP state, the new vCPUs are paused first (a vCPU
//!   inside `KVM_RUN` holds its fd), through a duplicate of each new vCPU's fd that the manager
//!   keeps.
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

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVMIO, KVM_MP_STATE_UNINITIALIZED};
use serde::Serialize;
use slog::{info, warn};
use vcpu_actor::{VcpuRequest, VcpuState};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_ior_nr;

use crate::error::{HotplugOp, KvmOp, ResizeError, VcpuSetupError};
use crate::hotplug_backend::{
    BackendError, HotplugAck, HotplugBackend, HotplugFailure, UpcallBackend,
};
use crate::state::{Refusal, ResizeInFlight, VmRunState};
use crate::VcpuManager;

/// The ioctl number, kept private: the macro makes a public function without docs.
mod ioctl {
    use super::{ioctl_ior_nr, kvm_mp_state, KVMIO};
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
}
use ioctl::KVM_GET_MP_STATE;
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

    /// Phase 1: validate, mark in flight, create and start new vCPUs.
    fn resize_begin(&mut self, target: u32) -> Result<Begun, ResizeError> {
        let max = self.config().max_vcpu_count;
        if target == 0 || target > max {
            return Err(ResizeError::OutOfRange { target, max });
        }
        let backend = self.backend.clone().ok_or(ResizeError::NoHotplugBackend)?;
        let from = self.present_vcpu_count();
        let op = if target >= from {
            HotplugOp::Add
        } else {
            HotplugOp::Remove
        };
        let exit_flag = self.exit_flag_set();
        self.state()
            .begin_resize(ResizeInFlight { target, op }, exit_flag)
            .map_err(|refusal| match refusal {
                Refusal::ResizeInFlight(other) => ResizeError::Busy {
                    target,
                    in_flight: other.target,
                },
                Refusal::State(state) => ResizeError::NotRunning { target, state },
            })?;
        let begun = self.resize_plan(target, from, op, backend);
        if !matches!(begun, Ok(Begun::AskGuest(_))) {
            self.state().end_resize();
        }
        begun
    }

    fn resize_plan(
        &mut self,
        target: u32,
        from: u32,
        op: HotplugOp,
        backend: Arc<dyn HotplugBackend>,
    ) -> Result<Begun, ResizeError> {
        let started = Instant::now();
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
        if target == from {
            return Ok(Begun::Done(outcome));
        }
        let present: Vec<u32> = self.vcpus.keys().copied().collect();
        let max = self.config().max_vcpu_count;
        let indices: Vec<u32> = match op {
            HotplugOp::Add => (0..max)
                .filter(|i| !present.contains(i))
                .take((target - from) as usize)
                .collect(),
            // Highest indices first, never vCPU 0.
            HotplugOp::Remove => present
                .iter()
                .rev()
                .copied()
                .filter(|i| *i != 0)
                .take((from - target) as usize)
                .collect(),
        };
        let slots = self.slots(&indices)?;
        if let Some(limit) = backend.max_apic_id() {
            if let Some(s) = slots.iter().find(|s| s.apic_id > limit) {
                return Err(ResizeError::ApicIdTooLarge {
                    index: s.index,
                    apic_id: s.apic_id,
                    limit,
                    backend: backend.name(),
                });
            }
        }
        if op == HotplugOp::Add {
            self.add_vcpus(&indices, &slots, &mut outcome)?;
        }
        Ok(Begun::AskGuest(PendingResize {
            target,
            op,
            slots,
            backend,
            started,
            outcome,
        }))
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

    /// Creates and starts the vCPUs at `indices` (waiting for INIT/SIPI); records the times in
    /// `outcome`. On failure the ones created are exited again.
    fn add_vcpus(
        &mut self,
        indices: &[u32],
        slots: &[VcpuSlot],
        outcome: &mut ResizeOutcome,
    ) -> Result<(), ResizeError> {
        let t = Instant::now();
        for slot in slots {
            self.ensure_mp_probe(slot.apic_id)?;
        }
        // One batch: every vCPU created and configured before any thread starts, then every
        // thread started before waiting for any. All or nothing: on an error no vCPU of the
        // batch is present and every fd is kept.
        self.create_vcpus(indices)?;
        outcome.vcpu_create = t.elapsed();
        // The new threads enter KVM_RUN and wait there for the guest's INIT/SIPI.
        if let Err(e) = self.start_vcpus(indices) {
            self.exit_present(indices);
            return Err(e.into());
        }
        outcome.vcpu_work = t.elapsed();
        outcome.vcpu_start = outcome.vcpu_work.saturating_sub(outcome.vcpu_create);
        Ok(())
    }

    /// Makes sure the manager can read the MP state of the vCPU with `apic_id` while its
    /// thread owns its fd: the KVM vCPU is created now if it never existed (kept for
    /// [`create_vcpu`](Self::create_vcpu), which takes kept fds first), and a duplicate of its
    /// fd is kept. A duplicate that cannot be made is logged; the vCPU then counts as
    /// "state unknown" if its hot-add fails.
    fn ensure_mp_probe(&mut self, apic_id: u32) -> Result<(), VcpuSetupError> {
        if self.mp_probes.contains_key(&apic_id) {
            return Ok(());
        }
        if !self.kept_fds.contains_key(&apic_id) {
            let fd = self
                .vm()
                .fd()
                .create_vcpu(u64::from(apic_id))
                .map_err(|source| VcpuSetupError::Kvm {
                    vcpu_id: apic_id,
                    op: KvmOp::CreateVcpu,
                    source,
                })?;
            self.kept_fds.insert(apic_id, fd);
        }
        let Some(fd) = self.kept_fds.get(&apic_id) else {
            return Ok(());
        };
        // SAFETY: the fd belongs to `fd`, a live `VcpuFd` borrowed for this statement only.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        match borrowed.try_clone_to_owned() {
            Ok(dup) => {
                self.mp_probes.insert(apic_id, dup);
            }
            Err(e) => warn!(self.logger, "cannot duplicate a vCPU fd to read its MP state";
                            "apic_id" => apic_id, "error" => %e),
        }
        Ok(())
    }

    /// The MP state of the vCPU with `apic_id`, read through its duplicate fd. Call only while
    /// its thread is out of `KVM_RUN` (paused, waiting to exit, or gone): KVM serialises vCPU
    /// ioctls, so this would wait for `KVM_RUN` to return.
    fn mp_state(&self, apic_id: u32) -> Option<u32> {
        let fd = self.mp_probes.get(&apic_id)?;
        let mut state = kvm_mp_state::default();
        // SAFETY: `fd` is a vCPU fd; KVM_GET_MP_STATE writes one `kvm_mp_state`, which `state`
        // is and which outlives the call.
        let ret = unsafe { ioctl_with_mut_ref(fd, KVM_GET_MP_STATE(), &mut state) };
        (ret == 0).then_some(state.mp_state)
    }

    /// Exits those of `indices` that are still present (a stop may have exited them).
    fn exit_present(&mut self, indices: &[u32]) -> Duration {
        let t = Instant::now();
        let present: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|i| self.vcpus.contains_key(i))
            .collect();
        if !present.is_empty() {
            if let Err(e) = self.exit_vcpus(&present) {
                warn!(self.logger, "exiting vCPUs after a resize failed"; "indices" => ?present,
                      "error" => %e);
            }
        }
        t.elapsed()
    }

    /// Phase 3: commit or reconcile, then clear the in-flight mark.
    fn resize_finish(
        &mut self,
        mut pending: PendingResize,
        (reply, upcall): (Result<HotplugAck, HotplugFailure>, Duration),
    ) -> Result<ResizeOutcome, ResizeError> {
        pending.outcome.upcall = upcall;
        let result = self.commit(&mut pending, reply);
        if matches!(self.run_state(), VmRunState::Running | VmRunState::Paused) {
            let present: Vec<u32> = self.present_vcpus().iter().map(|v| v.apic_id).collect();
            pending.backend.sync_present(&present);
        }
        self.state().end_resize();
        let outcome = result?;
        info!(self.logger, "vCPUs resized"; "from" => outcome.from, "to" => outcome.to,
              "vcpu_create_us" => micros(outcome.vcpu_create),
              "vcpu_start_us" => micros(outcome.vcpu_start),
              "vcpu_work_us" => micros(outcome.vcpu_work),
              "upcall_us" => micros(outcome.upcall),
              "total_us" => micros(outcome.total));
        Ok(outcome)
    }

    fn commit(
        &mut self,
        pending: &mut PendingResize,
        reply: Result<HotplugAck, HotplugFailure>,
    ) -> Result<ResizeOutcome, ResizeError> {
        if !matches!(self.run_state(), VmRunState::Running | VmRunState::Paused) {
            // A stop (or exit_all) exited every vCPU; nothing is left to reconcile.
            warn!(self.logger, "the VM stopped during a resize"; "target" => pending.target);
            return Err(ResizeError::VmStopped {
                target: pending.target,
            });
        }
        let indices: Vec<u32> = pending.slots.iter().map(|s| s.index).collect();
        let failure = match (pending.op, reply) {
            (HotplugOp::Add, Ok(_)) if pending.backend.confirm_wake_by_mp_state() => {
                // The guest's acknowledgement alone is not enough: each new vCPU must have
                // left wait-for-SIPI. Those that did not are exited (fds kept).
                let (up, unknown) = self.reconcile_add(&pending.slots);
                if up.len() == pending.slots.len() {
                    pending.outcome.added = pending.slots.clone();
                } else {
                    let not_woken = pending
                        .slots
                        .iter()
                        .map(|s| s.apic_id)
                        .filter(|id| !up.contains(id))
                        .collect();
                    let failure = HotplugFailure {
                        confirmed: up,
                        uncertain: unknown,
                        source: BackendError::NotWoken {
                            backend: pending.backend.name(),
                            apic_ids: not_woken,
                        },
                    };
                    return Err(self.hotplug_failed(pending, HotplugOp::Add, failure));
                }
                None
            }
            (HotplugOp::Add, Ok(_)) => {
                pending.outcome.added = pending.slots.clone();
                None
            }
            (HotplugOp::Remove, Ok(_)) => {
                // The guest has offlined them: only now do their threads stop.
                pending.outcome.vcpu_work = self.exit_present(&indices);
                pending.outcome.removed = pending.slots.clone();
                None
            }
            (op, Err(failure)) => Some((op, failure)),
        };
        if let Some((op, failure)) = failure {
            let ids: Vec<u32> = pending.slots.iter().map(|s| s.apic_id).collect();
            warn!(self.logger, "hotplug request failed, reconciling"; "op" => %op,
                  "apic_ids" => ?ids, "error" => %failure.source);
            let (confirmed, uncertain) = match op {
                HotplugOp::Add => self.reconcile_add(&pending.slots),
                HotplugOp::Remove => self.reconcile_remove(&pending.slots, &failure),
            };
            let failure = HotplugFailure {
                confirmed,
                uncertain,
                source: failure.source,
            };
            return Err(self.hotplug_failed(pending, op, failure));
        }
        pending.outcome.to = self.present_vcpu_count();
        pending.outcome.total = pending.started.elapsed();
        Ok(pending.outcome.clone())
    }

    /// The [`ResizeError::HotplugFailed`] of a reconciled `failure`.
    fn hotplug_failed(
        &self,
        pending: &PendingResize,
        op: HotplugOp,
        failure: HotplugFailure,
    ) -> ResizeError {
        let guest_state_unknown = !failure.uncertain.is_empty()
            || (op == HotplugOp::Add && failure.source.outcome_unknown());
        ResizeError::HotplugFailed {
            op,
            apic_ids: pending.slots.iter().map(|s| s.apic_id).collect(),
            present_after: self.present_vcpus().iter().map(|v| v.apic_id).collect(),
            guest_state_unknown,
            source: Box::new(failure),
        }
    }

    /// After a failed hot-add: keeps the new vCPUs the guest brought up (they left
    /// wait-for-SIPI), exits the others. Returns (brought up, state unknown), as APIC IDs.
    fn reconcile_add(&mut self, slots: &[VcpuSlot]) -> (Vec<u32>, Vec<u32>) {
        let timeout = self.options.ack_timeout;
        let present: Vec<VcpuSlot> = slots
            .iter()
            .copied()
            .filter(|s| {
                self.vcpus
                    .get(&s.index)
                    .is_some_and(|h| h.id() == s.apic_id)
            })
            .collect();
        // Out of KVM_RUN first: send every pause, then wait for every reply.
        let sent: Vec<(VcpuSlot, Option<vcpu_actor::RequestId>)> = present
            .iter()
            .map(|s| {
                let id = self
                    .vcpus
                    .get(&s.index)
                    .and_then(|h| h.send(VcpuRequest::Pause).ok());
                (*s, id)
            })
            .collect();
        let deadline = Instant::now().checked_add(timeout);
        let mut up = Vec::new();
        let mut unknown = Vec::new();
        let mut exit = Vec::new();
        for (slot, id) in sent {
            let Some(handle) = self.vcpus.get(&slot.index) else {
                continue;
            };
            if let Some(id) = id {
                let left =
                    deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                // The reply does not matter, only where the thread is afterwards.
                let _ = handle.wait_reply(id, left);
            }
            let out_of_run = matches!(
                handle.state(),
                VcpuState::Paused | VcpuState::WaitingExit | VcpuState::Exited
            );
            match out_of_run.then(|| self.mp_state(slot.apic_id)).flatten() {
                Some(KVM_MP_STATE_UNINITIALIZED) => exit.push(slot.index),
                Some(_) => up.push(slot),
                None => unknown.push(slot),
            }
        }
        self.exit_present(&exit);
        let keep: Vec<u32> = up.iter().chain(&unknown).map(|s| s.index).collect();
        if !keep.is_empty() && self.run_state() == VmRunState::Running {
            if let Err(e) = self.request_some(&keep, VcpuRequest::Resume) {
                warn!(self.logger, "resuming the kept new vCPUs failed"; "error" => %e);
            }
        }
        info!(self.logger, "failed hot-add reconciled";
              "brought_up" => ?up.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
              "unknown" => ?unknown.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
              "exited" => ?exit);
        (
            up.iter().map(|s| s.apic_id).collect(),
            unknown.iter().map(|s| s.apic_id).collect(),
        )
    }

    /// After a failed hot-remove: exits exactly the vCPUs the guest confirmed offline.
    /// Returns (confirmed, state unknown), as APIC IDs.
    fn reconcile_remove(
        &mut self,
        slots: &[VcpuSlot],
        failure: &HotplugFailure,
    ) -> (Vec<u32>, Vec<u32>) {
        let by_apic: BTreeMap<u32, u32> = slots.iter().map(|s| (s.apic_id, s.index)).collect();
        let confirmed: Vec<u32> = failure
            .confirmed
            .iter()
            .copied()
            .filter(|id| by_apic.contains_key(id))
            .collect();
        let indices: Vec<u32> = confirmed
            .iter()
            .filter_map(|id| by_apic.get(id))
            .copied()
            .collect();
        self.exit_present(&indices);
        (confirmed, failure.uncertain.clone())
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

/// Runs resizes of a shared [`VcpuManager`] in the background
/// ([`VcpuManager::resize_shared`] on a thread: the manager's lock is not held while the guest
/// answers), one at a time: a second [`start`](Self::start) while one runs is
/// [`ResizeError::Busy`] at once.
///
/// Cloning gives another handle on the same manager and the same one-at-a-time rule. Two
/// resizers made with [`new`](Self::new) on the same manager do not see each other in
/// [`start`](Self::start), but the manager's state machine still allows one resize at a time:
/// the second one's outcome is [`ResizeError::Busy`].
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
    /// A resizer for `manager` (shared with whoever else uses it; a resize holds the lock
    /// only for its first and last phase).
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

    /// Starts [`VcpuManager::resize_shared`]`(manager, target)` on a background thread and returns at
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
                // The manager's lock is held for phases 1 and 3 only.
                let outcome = VcpuManager::resize_shared(&manager, target);
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
