//! Saving a paused VM ([`VcpuManager::save`], [`VmSnapshot`]) and restoring one into a new VM
//! ([`VcpuManager::restore`]).
//!
//! # Save
//!
//! Only a [`Paused`](VmRunState::Paused) VM with no resize in flight is saved (a typed
//! [`SnapshotError`] otherwise). The state machine's lock is held for the whole save, so no
//! pause, resume or resize starts meanwhile. Every present vCPU saves its own state on its
//! own thread ([`VcpuRequest::SaveState`], answered by the manager's own `VcpuStateSaver`
//! with [`state::save`]); a pause completes any pending I/O instruction first, so the saved
//! registers hold it done. Then the VM-scope state ([`vm_state::save_vm`]), the host, the
//! configuration (topology, vPMU level, boot and max counts, interrupt mode) and the present
//! indices with their APIC IDs, hot-added vCPUs included. Guest memory is not copied:
//! [`VmSnapshot`] refers to the VM's memory, and [`VmSnapshot::write`] must run while the VM is
//! still paused ([`VcpuManager::save_to`] does both under the lock).
//!
//! The MSR list ([`SaveableMsrs`]: KVM's list plus the CPU template's MSRs) is probed once per
//! VM, on the first vCPU created, before its thread exists: probing asks `/dev/kvm` (`KVM_GET_MSR_INDEX_LIST`), which the vCPU threads'
//! seccomp filter does not allow.
//!
//! # Restore
//!
//! [`VcpuManager::restore`] builds a new VM from a verified snapshot, in this order, and only
//! then creates vCPUs: [`check_host`](crate::snapshot::VerifiedSnapshot::check_host), the
//! snapshot's vCPU list against its configuration, the configuration (its CPU template
//! included, so that vCPUs added later get the template too) against this host's KVM,
//! the VM with the snapshot's memory size (and a PIT if it had one), the manager (x2APIC API and
//! vPMU actions on the VM), guest memory, the VM-scope state (clock, PICs, IOAPIC, PIT: before
//! any vCPU exists, so that none runs before `KVM_SET_CLOCK`). The vCPUs are then created as one
//! batch with their saved index and APIC ID; each gets [`state::restore`] instead of the normal
//! CPUID/MSR/boot setup, and its thread starts paused. Nothing runs until
//! [`resume_all`](VcpuManager::resume_all).
//!
//! `KVM_KVMCLOCK_CTRL` ([`state::notify_paused`]) is the last call of [`state::restore`] on each
//! vCPU: KVM latches it and applies it at that vCPU's next guest entry, and a restored vCPU
//! has none before `resume_all`, so it takes effect exactly as the vCPUs resume.
//!
//! Any failure returns an error and drops what was built (threads exited, VM closed): nothing
//! is left half-restored.
//!
//! # What is not in a snapshot
//!
//! The state of the VMM's devices on the I/O bus (the serial console's UART registers, the
//! embedder's devices) and any connection to the guest (the hotplug backend, e.g. an upcall
//! client) are not saved: the embedder registers its devices again on the restored VM (and
//! connects a hotplug backend, if it wants one) before `resume_all`. Guest memory, every
//! vCPU's state and the in-kernel devices (PICs, IOAPIC, PIT, kvmclock) are saved.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use slog::info;
use vcpu_actor::{ReplyOutcome, VcpuRequest, VcpuStateSaver};
use vm_memory::GuestMemoryMmap;

use super::{VcpuManager, VcpuManagerOptions};
use crate::arch::x86_64::state::{self, SaveableMsrs, StateCaps, X86VcpuState};
use crate::arch::x86_64::vm_state;
use crate::config::{KvmLimits, VcpuConfig};
use crate::error::{KvmOp, SnapshotError, StateError, VcpuSetupError, VmmError};
use crate::snapshot::{self, HostInfo, SnapshotConfig, SnapshotState, VcpuSnapshot};
use crate::state::{ManagerState, VmRunState};
use crate::vm::{Vm, VmOptions};

/// The manager's [`VcpuStateSaver`]: [`state::save`] on the vCPU's thread, the state kept
/// here by vCPU id for [`VcpuManager::save`] to collect (the reply's bytes stay empty: the
/// state does not go through a byte encoding).
#[derive(Debug)]
pub(crate) struct ManagerStateSaver {
    caps: StateCaps,
    msrs: OnceLock<SaveableMsrs>,
    probe_error: Mutex<Option<String>>,
    saved: Mutex<BTreeMap<u32, X86VcpuState>>,
}

impl ManagerStateSaver {
    /// A saver for the vCPUs of `vm`.
    pub(crate) fn new(vm: &VmFd) -> Self {
        Self {
            caps: StateCaps::query(vm),
            msrs: OnceLock::new(),
            probe_error: Mutex::new(None),
            saved: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether the MSR list is known (probed on an earlier vCPU).
    pub(crate) fn msrs_known(&self) -> bool {
        self.msrs.get().is_some()
    }

    /// Probes the MSR list on `vcpu` unless it is known already; `extra` (the CPU template's
    /// MSRs) is added to KVM's list.
    pub(crate) fn probe_once(
        &self,
        kvm: &Kvm,
        vcpu: &VcpuFd,
        extra: &[u32],
    ) -> Result<(), StateError> {
        if self.msrs.get().is_some() {
            return Ok(());
        }
        match SaveableMsrs::probe_with(kvm, vcpu, extra) {
            Ok(list) => {
                let _ = self.msrs.set(list);
                Ok(())
            }
            Err(e) => {
                *lock(&self.probe_error) = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// The MSR list, or why there is none.
    fn msrs(&self) -> Result<&SaveableMsrs, SnapshotError> {
        self.msrs
            .get()
            .ok_or_else(|| SnapshotError::MsrListUnavailable {
                reason: lock(&self.probe_error)
                    .clone()
                    .unwrap_or_else(|| "no vCPU was created yet".into()),
            })
    }

    fn take(&self, vcpu_id: u32) -> Option<X86VcpuState> {
        lock(&self.saved).remove(&vcpu_id)
    }

    fn clear(&self) {
        lock(&self.saved).clear();
    }
}

impl VcpuStateSaver for ManagerStateSaver {
    fn save(&self, vcpu_id: u32, vcpu: &VcpuFd) -> Result<Vec<u8>, String> {
        let msrs = self.msrs().map_err(|e| e.to_string())?;
        let saved = state::save(vcpu, &self.caps, msrs).map_err(|e| e.to_string())?;
        lock(&self.saved).insert(vcpu_id, saved);
        Ok(Vec::new())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is one insert, remove or replace: a panic leaves it consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A saved VM: its state (vCPUs, VM scope, configuration, host) and its guest memory.
///
/// The memory is the VM's own (not a copy): write the snapshot with [`VmSnapshot::write`]
/// before the VM runs again, or use [`VcpuManager::save_to`], which writes it before it
/// returns.
#[derive(Clone)]
pub struct VmSnapshot {
    state: SnapshotState,
    memory: GuestMemoryMmap,
}

impl std::fmt::Debug for VmSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSnapshot")
            .field("config", &self.state.config)
            .field(
                "vcpus",
                &self
                    .state
                    .vcpus
                    .iter()
                    .map(|v| (v.index, v.apic_id))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl VmSnapshot {
    /// The saved state: host, configuration, every present vCPU (by index), VM scope.
    pub fn state(&self) -> &SnapshotState {
        &self.state
    }

    /// The saved state, taken out.
    pub fn into_state(self) -> SnapshotState {
        self.state
    }

    /// The (index, APIC ID) of every saved vCPU, in index order.
    pub fn vcpu_ids(&self) -> Vec<(u32, u32)> {
        self.state
            .vcpus
            .iter()
            .map(|v| (v.index, v.apic_id))
            .collect()
    }

    /// Writes the snapshot directory `dir` ([`snapshot::write`]: the state file and the
    /// guest memory file, each checksummed). Call it while the VM is still paused.
    ///
    /// # Errors
    ///
    /// As [`snapshot::write`].
    pub fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        snapshot::write(dir, &self.state, &self.memory)
    }
}

impl VcpuManager {
    /// Saves the paused VM: every present vCPU's state (each saved on its own thread), the
    /// VM-scope state, the configuration and the present indices with their APIC IDs. See
    /// the [module](self) documentation.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::NotPaused`] unless the VM is paused; [`SnapshotError::ResizeInFlight`]
    /// while a resize waits for the guest; [`SnapshotError::NoVcpus`];
    /// [`SnapshotError::MsrListUnavailable`]; [`SnapshotError::VcpuSave`] naming a vCPU that
    /// refused, failed or did not answer within the ack timeout;
    /// [`SnapshotError::VmState`] if the VM-scope state cannot be read. Nothing changes in
    /// the VM either way.
    pub fn save(&self) -> Result<VmSnapshot, SnapshotError> {
        let guard = self.state();
        self.save_locked(&guard)
    }

    /// [`save`](Self::save), then [`VmSnapshot::write`] into `dir`, with the state machine
    /// locked throughout, so that nothing resumes the VM before its memory is written.
    ///
    /// # Errors
    ///
    /// As [`save`](Self::save) and [`snapshot::write`].
    pub fn save_to(&self, dir: &Path) -> Result<VmSnapshot, SnapshotError> {
        let guard = self.state();
        let saved = self.save_locked(&guard)?;
        saved.write(dir)?;
        Ok(saved)
    }

    fn save_locked(&self, guard: &ManagerState) -> Result<VmSnapshot, SnapshotError> {
        let t = Instant::now();
        match guard.run_state(self.exit_flag_set()) {
            VmRunState::Paused => {}
            state => return Err(SnapshotError::NotPaused { state }),
        }
        if let Some(resize) = guard.resize_in_flight() {
            return Err(SnapshotError::ResizeInFlight {
                target: resize.target,
            });
        }
        if self.vcpus.is_empty() {
            return Err(SnapshotError::NoVcpus);
        }
        self.saver.msrs()?;
        let vcpus = self.save_vcpus()?;
        let vm = vm_state::save_vm(self.vm.fd())?;
        let config = SnapshotConfig {
            interrupt_mode: self.options.interrupt_mode,
            ..SnapshotConfig::from(&self.config)
        };
        info!(self.logger, "VM saved"; "vcpus" => vcpus.len(),
              "ms" => t.elapsed().as_secs_f64() * 1e3);
        Ok(VmSnapshot {
            state: SnapshotState {
                host: HostInfo::this_host(self.vm.kvm()),
                config,
                vcpus,
                vm,
            },
            memory: self.vm.memory().clone(),
        })
    }

    /// Sends `SaveState` to every present vCPU, then collects every reply until one deadline
    /// (the ack timeout) and the states the saver kept.
    fn save_vcpus(&self) -> Result<Vec<VcpuSnapshot>, SnapshotError> {
        self.saver.clear();
        let timeout = self.options.ack_timeout;
        let mut sent = Vec::with_capacity(self.vcpus.len());
        let mut first_error = None;
        for (&index, handle) in &self.vcpus {
            match handle.send(VcpuRequest::SaveState) {
                Ok(id) => sent.push((index, handle, id)),
                Err(e) => {
                    first_error.get_or_insert(SnapshotError::VcpuSave {
                        index,
                        apic_id: handle.id(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let deadline = Instant::now().checked_add(timeout);
        let mut vcpus = Vec::with_capacity(sent.len());
        for (index, handle, id) in sent {
            let apic_id = handle.id();
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            let failed = |reason: String| SnapshotError::VcpuSave {
                index,
                apic_id,
                reason,
            };
            let outcome = match handle.wait_reply(id, left) {
                Ok(reply) => match (reply.refusal(), reply.outcome) {
                    (Some(refused), _) => Err(failed(refused.to_string())),
                    (None, ReplyOutcome::StateSaved(_)) => match self.saver.take(apic_id) {
                        Some(state) => Ok(VcpuSnapshot {
                            index,
                            apic_id,
                            state,
                        }),
                        None => Err(failed("the saver kept no state".into())),
                    },
                    (None, ReplyOutcome::SaveFailed(e)) => Err(failed(e.to_string())),
                    (None, other) => Err(failed(format!("unexpected reply {other:?}"))),
                },
                Err(e) => Err(failed(e.to_string())),
            };
            match outcome {
                Ok(v) => vcpus.push(v),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.saver.clear();
        match first_error {
            Some(e) => Err(e),
            None => Ok(vcpus),
        }
    }

    /// Reads and verifies the snapshot in `dir` ([`snapshot::read`]) and restores it
    /// ([`restore`](Self::restore)).
    ///
    /// # Errors
    ///
    /// [`VmmError::Snapshot`] for a damaged, foreign or incompatible snapshot (every
    /// [`snapshot::read`] error), and the errors of [`restore`](Self::restore).
    pub fn restore_from(
        kvm: Kvm,
        dir: &Path,
        vm_options: VmOptions,
        options: VcpuManagerOptions,
    ) -> Result<(Arc<Vm>, VcpuManager), VmmError> {
        let verified = snapshot::read(dir)?;
        Self::restore(kvm, &verified, vm_options, options)
    }

    /// A new VM and manager from `snapshot`, with every saved vCPU present (same index and
    /// APIC ID) and paused: call [`resume_all`](Self::resume_all) to continue the guest,
    /// after registering the VMM's devices on the new VM. See the [module](self)
    /// documentation for the order and for what is not restored.
    ///
    /// `vm_options`' memory size and PIT are replaced by the snapshot's; `options`' interrupt
    /// mode by the one the snapshot was taken in (unless the snapshot does not record it).
    ///
    /// # Errors
    ///
    /// [`VmmError::Snapshot`] if this host cannot restore it
    /// ([`check_host`](crate::snapshot::VerifiedSnapshot::check_host)), its vCPU list does not
    /// fit its configuration ([`SnapshotError::InvalidVcpus`]), memory or VM state cannot be
    /// restored, or a vCPU's state ([`SnapshotError::VcpuState`]); [`VmmError::Config`] if the
    /// configuration does not fit this host's KVM; [`VmmError::Vm`], [`VmmError::Pmu`],
    /// [`VmmError::VcpuSetup`] if the VM or a vCPU cannot be created. Whatever was built is
    /// dropped on an error.
    pub fn restore(
        kvm: Kvm,
        snapshot: &snapshot::VerifiedSnapshot,
        vm_options: VmOptions,
        mut options: VcpuManagerOptions,
    ) -> Result<(Arc<Vm>, VcpuManager), VmmError> {
        let t = Instant::now();
        let saved = snapshot.state();
        snapshot.check_host(&HostInfo::this_host(&kvm), &kvm)?;
        check_vcpu_list(saved)?;
        let config = VcpuConfig::from(saved.config.clone());
        let limits = KvmLimits::query(&kvm)?;
        if saved.config.interrupt_mode != crate::InterruptMode::Auto {
            options.interrupt_mode = saved.config.interrupt_mode;
        }
        config.validate(&limits, options.interrupt_mode)?;
        let memory_size: u64 = snapshot.file.memory.regions.iter().map(|r| r.size).sum();
        let vm_options = VmOptions {
            memory_size,
            create_pit: saved.vm.pit.is_some(),
            ..vm_options
        };
        let vm = Arc::new(Vm::new(kvm, vm_options)?);
        let mut manager = Self::with_valid_config(Arc::clone(&vm), config, limits, options)?;
        snapshot.restore_memory(vm.memory())?;
        // The VM scope before any vCPU exists: no vCPU may run before the clock and the
        // interrupt controllers are back (see vm_state's documentation).
        vm_state::restore_vm(vm.fd(), &saved.vm).map_err(SnapshotError::VmState)?;
        manager.create_restored_vcpus(&saved.vcpus)?;
        info!(manager.logger, "VM restored"; "vcpus" => saved.vcpus.len(),
              "ms" => t.elapsed().as_secs_f64() * 1e3);
        Ok((vm, manager))
    }

    /// The restore variant of [`create_vcpus`](Self::create_vcpus): each vCPU is created with
    /// its saved APIC ID and given its saved state ([`state::restore`]) instead of the normal
    /// setup, then the batch's threads start, paused. All or nothing.
    fn create_restored_vcpus(&mut self, vcpus: &[VcpuSnapshot]) -> Result<(), VmmError> {
        let indices: Vec<u32> = vcpus.iter().map(|v| v.index).collect();
        let slots = self.new_slots(&indices)?;
        if let Some((v, (_, apic_id))) = vcpus.iter().zip(&slots).find(|(v, s)| v.apic_id != s.1) {
            return Err(SnapshotError::InvalidVcpus {
                reason: format!(
                    "vCPU {} has APIC ID {}, its topology gives {apic_id}",
                    v.index, v.apic_id
                ),
            }
            .into());
        }
        self.reserve_fds();
        let caps = self.saver.caps;
        let mut configured: Vec<(u32, u32, VcpuFd)> = Vec::with_capacity(vcpus.len());
        for v in vcpus {
            let fd = match self.vm.fd().create_vcpu(u64::from(v.apic_id)) {
                Ok(fd) => fd,
                Err(source) => {
                    self.keep_fds(configured);
                    return Err(VcpuSetupError::Kvm {
                        vcpu_id: v.apic_id,
                        op: KvmOp::CreateVcpu,
                        source,
                    }
                    .into());
                }
            };
            let restored = state::restore(&fd, &caps, &v.state);
            configured.push((v.index, v.apic_id, fd));
            if let Err(source) = restored {
                self.keep_fds(configured);
                return Err(SnapshotError::VcpuState {
                    index: v.index,
                    source,
                }
                .into());
            }
            if let Some((_, _, fd)) = configured.last() {
                self.probe_saveable_msrs(fd);
            }
        }
        Ok(self.start_batch(configured)?)
    }
}

/// The snapshot's vCPUs against its configuration: at least one, indices in range and
/// unique, each APIC ID its index's in the topology.
fn check_vcpu_list(saved: &SnapshotState) -> Result<(), SnapshotError> {
    let invalid = |reason: String| SnapshotError::InvalidVcpus { reason };
    if saved.vcpus.is_empty() {
        return Err(invalid("it has no vCPU".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in &saved.vcpus {
        if v.index >= saved.config.max_vcpu_count {
            return Err(invalid(format!(
                "vCPU index {} is not below max_vcpu_count {}",
                v.index, saved.config.max_vcpu_count
            )));
        }
        if !seen.insert(v.index) {
            return Err(invalid(format!("vCPU index {} is listed twice", v.index)));
        }
        let apic_id = saved
            .config
            .topology
            .apic_id(v.index)
            .map_err(|e| invalid(e.to_string()))?;
        if apic_id != v.apic_id {
            return Err(invalid(format!(
                "vCPU {} has APIC ID {}, its topology gives {apic_id}",
                v.index, v.apic_id
            )));
        }
    }
    Ok(())
}
