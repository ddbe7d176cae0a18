//! Phase 1 of a resize: check, mark in flight, pick the vCPUs, create and start new ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Begun, PendingResize, ResizeOutcome, VcpuSlot};
use crate::error::{HotplugOp, ResizeError, VcpuSetupError};
use crate::hotplug_backend::HotplugBackend;
use crate::state::{Refusal, ResizeInFlight};
use crate::ManagerOp;
use crate::VcpuManager;

impl VcpuManager {
    /// Phase 1: validate, mark in flight, create and start new vCPUs.
    pub(super) fn resize_begin(&mut self, target: u32) -> Result<Begun, ResizeError> {
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
            self.add_vcpus(&indices, &mut outcome)?;
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
        outcome: &mut ResizeOutcome,
    ) -> Result<(), ResizeError> {
        let t = Instant::now();
        // Asked first: the new threads enter KVM_RUN as soon as they are ready, and wait
        // there for the guest's INIT/SIPI.
        self.check_running_allowed(ManagerOp::StartVcpus)?;
        // One batch: every thread started before waiting for any, each configuring its
        // vCPU. All or nothing: on an error no vCPU of the batch is present and every fd is
        // kept.
        let spawned = self.create_running_aps(indices)?;
        outcome.vcpu_work = t.elapsed();
        outcome.vcpu_create = spawned.saturating_duration_since(t);
        outcome.vcpu_start = outcome.vcpu_work.saturating_sub(outcome.vcpu_create);
        Ok(())
    }
}
