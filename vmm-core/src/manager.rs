//! The vCPU manager: creates, configures, starts, pauses, resumes and exits the vCPUs of a
//! VM, and turns a vCPU's `waiting_exit` into a stop of the whole VM.
//!
//! Naming: a vCPU's *index* is its creation order (`0..max_vcpu_count`, thread fastest, then
//! core, die, socket); its *id* is its KVM vCPU id, which is its APIC ID from the topology.
//! The vCPU actors, the exit handler and [`VcpuExitReason`](vcpu_actor::VcpuExitReason) use the id.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use slog::{debug, info, o, warn, Logger};
use topology::{CpuVendor, CpuidEntry};
use vcpu_actor::{
    ExitHandler, VcpuHandle, VcpuMetricsSnapshot, VcpuOptions, VcpuParts, VcpuRequest, VcpuState,
};

use crate::arch::x86_64::{self, cpuid};
use crate::config::{InterruptMode, KvmLimits, VcpuConfig};
use crate::error::{KvmOp, ManagerOp, VcpuControlError, VcpuSetupError, VmmError};
use crate::exit::ExitMonitor;
use crate::pmu::{apply_pmu_actions, PmuActionsReport};
use crate::vm::Vm;
use crate::BootEntry;

/// How a [`VcpuManager`] behaves.
#[derive(Clone, Debug)]
pub struct VcpuManagerOptions {
    /// Logger (each vCPU actor adds its id).
    pub logger: Logger,
    /// The interrupt mode, which bounds the APIC IDs (see [`InterruptMode`]).
    pub interrupt_mode: InterruptMode,
    /// Options for every vCPU actor (seccomp, kick signal, stack size). Its logger is
    /// replaced by this manager's.
    pub vcpu: VcpuOptions,
    /// How long pause/resume/start/exit wait for every acknowledgement.
    pub ack_timeout: Duration,
    /// How long exiting waits for each vCPU thread to end.
    pub join_timeout: Duration,
}

impl Default for VcpuManagerOptions {
    fn default() -> Self {
        Self {
            logger: Logger::root(slog::Discard, o!()),
            interrupt_mode: InterruptMode::default(),
            vcpu: VcpuOptions::default(),
            ack_timeout: Duration::from_secs(5),
            join_timeout: Duration::from_secs(5),
        }
    }
}

/// One present vCPU, as [`VcpuManager::present_vcpus`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    /// Creation order.
    pub index: u32,
    /// APIC ID = KVM vCPU id.
    pub apic_id: u32,
    /// The actor's state.
    pub state: VcpuState,
    /// Linux thread id of the vCPU thread.
    pub tid: Option<i32>,
}

/// All vCPUs of one VM. See the crate documentation for an example.
pub struct VcpuManager {
    vm: Arc<Vm>,
    config: VcpuConfig,
    options: VcpuManagerOptions,
    vendor: CpuVendor,
    supported_cpuid: Vec<CpuidEntry>,
    pmu_report: PmuActionsReport,
    boot_entry: Option<Arc<dyn BootEntry>>,
    /// Present vCPUs (a live actor), by index.
    pub(crate) vcpus: BTreeMap<u32, VcpuHandle>,
    /// KVM vCPU fds whose thread has ended, by APIC ID: KVM cannot destroy a vCPU, so a later
    /// vCPU with the same id reuses the fd.
    kept_fds: BTreeMap<u32, VcpuFd>,
    pub(crate) exit_monitor: ExitMonitor,
    pub(crate) exit_flag: Arc<AtomicBool>,
    /// The upcall client [`resize_vcpus`](Self::resize_vcpus) asks the guest with.
    pub(crate) upcall: Option<Arc<hotplug::UpcallClient>>,
    pub(crate) logger: Logger,
}

impl std::fmt::Debug for VcpuManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuManager")
            .field("config", &self.config)
            .field("present", &self.vcpus.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl VcpuManager {
    /// Validates `config` against `limits` (this host's KVM, queried once with
    /// [`KvmLimits::query`]), then applies the vPMU level's KVM actions to the VM. Call before
    /// any vCPU of `vm` exists.
    ///
    /// # Errors
    ///
    /// [`VmmError::Config`] if `config` does not fit `limits`, [`VmmError::Pmu`] if a vPMU
    /// KVM action fails, [`VmmError::Os`] if the exit monitor's EventFds cannot be made.
    pub fn new(
        vm: Arc<Vm>,
        config: VcpuConfig,
        limits: KvmLimits,
        options: VcpuManagerOptions,
    ) -> Result<Self, VmmError> {
        config.validate(&limits, options.interrupt_mode)?;
        Self::with_valid_config(vm, config, limits, options)
    }

    /// [`new`](Self::new) for a `config` already validated against `limits`.
    fn with_valid_config(
        vm: Arc<Vm>,
        config: VcpuConfig,
        limits: KvmLimits,
        mut options: VcpuManagerOptions,
    ) -> Result<Self, VmmError> {
        // From here on the options hold the resolved mode (xAPIC or x2APIC, never Auto).
        options.interrupt_mode = config.interrupt_mode(options.interrupt_mode)?;
        x86_64::x2apic::enable_x2apic_api(vm.fd(), options.interrupt_mode)?;
        let vendor = limits.vendor()?;
        let logger = options.logger.new(o!("component" => "vcpu_manager"));
        let actions = vpmu::kvm_actions(config.vpmu, vendor);
        let pmu_report =
            apply_pmu_actions(vm.fd(), &actions, vendor, &limits.supported_cpuid, &logger)?;
        info!(logger, "vCPU manager ready";
              "boot" => config.boot_vcpu_count, "max" => config.max_vcpu_count,
              "vpmu" => %config.vpmu);
        Ok(Self {
            vm,
            config,
            options,
            vendor,
            supported_cpuid: limits.supported_cpuid,
            pmu_report,
            boot_entry: None,
            vcpus: BTreeMap::new(),
            kept_fds: BTreeMap::new(),
            exit_monitor: ExitMonitor::new()?,
            exit_flag: Arc::new(AtomicBool::new(false)),
            upcall: None,
            logger,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VcpuConfig {
        &self.config
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    /// The interrupt mode the VM runs in: xAPIC or x2APIC (`Auto` resolved, see
    /// [`InterruptMode::resolve`]).
    pub fn interrupt_mode(&self) -> InterruptMode {
        self.options.interrupt_mode
    }

    /// What the vPMU KVM actions did.
    pub fn pmu_report(&self) -> PmuActionsReport {
        self.pmu_report
    }

    /// The CPU vendor KVM reports.
    pub fn vendor(&self) -> CpuVendor {
        self.vendor
    }

    /// The APIC ID (= KVM vCPU id) of vCPU `index`.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::IndexOutOfRange`] if `index` is not below `max_vcpu_count`.
    pub fn apic_id(&self, index: u32) -> Result<u32, VcpuSetupError> {
        self.check_index(index)?;
        Ok(self.config.topology.apic_id(index)?)
    }

    fn check_index(&self, index: u32) -> Result<(), VcpuSetupError> {
        if index >= self.config.max_vcpu_count {
            return Err(VcpuSetupError::IndexOutOfRange {
                index,
                max: self.config.max_vcpu_count,
            });
        }
        Ok(())
    }

    /// `None` while the VM may run; otherwise why `op` may not be done: the reason of an
    /// `InvalidState` error.
    fn stopping(&self) -> Option<String> {
        self.exit_flag
            .load(Ordering::Acquire)
            .then(|| "the VM is stopping (its exit flag is set)".into())
    }

    fn check_setup_allowed(&self, op: ManagerOp) -> Result<(), VcpuSetupError> {
        match self.stopping() {
            Some(reason) => Err(VcpuSetupError::InvalidState { op, reason }),
            None => Ok(()),
        }
    }

    fn check_running_allowed(&self, op: ManagerOp) -> Result<(), VcpuControlError> {
        match self.stopping() {
            Some(reason) => Err(VcpuControlError::InvalidState { op, reason }),
            None => Ok(()),
        }
    }

    /// The CPUID set vCPU `index` gets: the topology leaves over KVM's supported CPUID, then
    /// the vPMU level's edits, then (x2APIC mode) KVM's MSI extended destination ID flag.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::IndexOutOfRange`] for an index not below `max_vcpu_count`;
    /// [`VcpuSetupError::Topology`] or [`VcpuSetupError::VpmuCpuid`] if the CPUID cannot be
    /// built.
    pub fn vcpu_cpuid(&self, index: u32) -> Result<Vec<CpuidEntry>, VcpuSetupError> {
        let apic_id = self.apic_id(index)?;
        let mut entries = topology::build_vcpu_cpuid(
            &self.supported_cpuid,
            self.vendor,
            &self.config.topology,
            index,
        )?;
        vpmu::apply_cpuid(self.config.vpmu, self.vendor, &mut entries).map_err(|source| {
            VcpuSetupError::VpmuCpuid {
                vcpu_id: apic_id,
                source,
            }
        })?;
        x86_64::x2apic::apply_cpuid(self.options.interrupt_mode, &mut entries);
        Ok(entries)
    }

    /// Creates (or reuses) and configures the boot vCPUs `0..boot_vcpu_count`. The BSP is set
    /// up by `entry`; the APs wait for INIT/SIPI. Nothing runs until
    /// [`start_boot_vcpus`](Self::start_boot_vcpus).
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::InvalidState`] if the VM is stopping or vCPUs are already present;
    /// otherwise the first error of [`create_vcpu`](Self::create_vcpu).
    pub fn create_boot_vcpus(&mut self, entry: Arc<dyn BootEntry>) -> Result<(), VcpuSetupError> {
        self.check_setup_allowed(ManagerOp::CreateBootVcpus)?;
        if !self.vcpus.is_empty() {
            return Err(VcpuSetupError::InvalidState {
                op: ManagerOp::CreateBootVcpus,
                reason: format!("{} vCPUs are already present", self.vcpus.len()),
            });
        }
        self.boot_entry = Some(entry);
        for index in 0..self.config.boot_vcpu_count {
            self.create_vcpu(index)?;
        }
        Ok(())
    }

    /// Creates vCPU `index` (reusing its kept KVM fd if it existed before), configures it and
    /// spawns its actor, paused. The building block for boot and for hot-add.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::InvalidState`] if the VM is stopping or the vCPU is present;
    /// [`VcpuSetupError::IndexOutOfRange`]; [`VcpuSetupError::Kvm`] (and the other setup
    /// errors) if KVM refuses to create or configure it; [`VcpuSetupError::Spawn`] if its
    /// thread cannot start. The KVM vCPU fd is kept for reuse whatever fails.
    pub fn create_vcpu(&mut self, index: u32) -> Result<(), VcpuSetupError> {
        self.check_setup_allowed(ManagerOp::CreateVcpu)?;
        let apic_id = self.apic_id(index)?;
        if self.vcpus.contains_key(&index) {
            return Err(VcpuSetupError::InvalidState {
                op: ManagerOp::CreateVcpu,
                reason: format!("vCPU index {index} (APIC ID {apic_id}) is already present"),
            });
        }
        let (fd, reused) = match self.kept_fds.remove(&apic_id) {
            Some(fd) => (fd, true),
            None => (
                self.vm
                    .fd()
                    .create_vcpu(u64::from(apic_id))
                    .map_err(|source| VcpuSetupError::Kvm {
                        vcpu_id: apic_id,
                        op: KvmOp::CreateVcpu,
                        source,
                    })?,
                false,
            ),
        };
        if let Err(e) = self.configure_vcpu(&fd, index, apic_id, reused) {
            self.kept_fds.insert(apic_id, fd);
            return Err(e);
        }
        let mut vcpu_options = self.options.vcpu.clone();
        vcpu_options.logger = self.logger.new(o!("vcpu_index" => index));
        let exit_evt = match self.exit_monitor.vcpu_exit_eventfd() {
            Ok(evt) => evt,
            Err(e) => {
                self.kept_fds.insert(apic_id, fd);
                return Err(e.into());
            }
        };
        // KVM cannot destroy a vCPU: a failed spawn hands the fd back to keep for reuse.
        let parts = VcpuParts {
            id: apic_id,
            vcpu: fd,
            vcpu_mmap_size: self.vm.vcpu_mmap_size(),
            handler: Arc::clone(self.vm.io_bus()) as Arc<dyn ExitHandler>,
            exit_evt,
        };
        let handle = VcpuHandle::spawn(parts, vcpu_options).map_err(|failure| {
            if let Some(fd) = failure.vcpu {
                self.kept_fds.insert(apic_id, fd);
            }
            VcpuSetupError::Spawn {
                vcpu_id: apic_id,
                source: failure.error,
            }
        })?;
        debug!(self.logger, "vCPU created"; "index" => index, "apic_id" => apic_id);
        self.vcpus.insert(index, handle);
        Ok(())
    }

    /// CPUID, then the architectural setup ([`x86_64::setup_vcpu`]: MSRs, LAPIC LINT0/LINT1,
    /// FPU), then BSP registers (index 0) or the wait-for-SIPI state (APs).
    fn configure_vcpu(
        &self,
        fd: &VcpuFd,
        index: u32,
        apic_id: u32,
        reused: bool,
    ) -> Result<(), VcpuSetupError> {
        let cpuid = self.vcpu_cpuid(index)?;
        if cpuid::set_cpuid(fd, apic_id, &cpuid, reused)? == cpuid::CpuidSet::KeptFromEarlierRun {
            debug!(self.logger, "reused vCPU keeps its CPUID"; "apic_id" => apic_id);
        }
        x86_64::setup_vcpu(fd, apic_id, self.options.interrupt_mode)?;
        if index == 0 {
            let entry = self
                .boot_entry
                .as_ref()
                .ok_or_else(|| VcpuSetupError::InvalidState {
                    op: ManagerOp::ConfigureBootVcpu,
                    reason: "no boot entry: use create_boot_vcpus".into(),
                })?;
            entry.setup_bsp(fd, self.vm.memory())?;
        }
        // The APs wait in KVM_RUN until the guest sends INIT and SIPI.
        x86_64::set_boot_mp_state(fd, apic_id, index == 0)
    }

    /// Starts every present vCPU together: all are sent `Resume` first, then every
    /// acknowledgement is awaited.
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::InvalidState`] if the VM is stopping;
    /// [`VcpuControlError::VcpusDidNotAnswer`] or [`VcpuControlError::VcpuRefused`] if some
    /// vCPU did not acknowledge in time or refused.
    pub fn start_boot_vcpus(&self) -> Result<(), VcpuControlError> {
        self.check_running_allowed(ManagerOp::StartBootVcpus)?;
        self.request_all(VcpuRequest::Resume)
    }

    /// Starts the given present vCPUs (e.g. after hot-add).
    ///
    /// # Errors
    ///
    /// As [`start_boot_vcpus`](Self::start_boot_vcpus), and
    /// [`VcpuControlError::InvalidState`] for an index that is not present.
    pub fn start_vcpus(&self, indices: &[u32]) -> Result<(), VcpuControlError> {
        self.check_running_allowed(ManagerOp::StartVcpus)?;
        self.request_some(indices, VcpuRequest::Resume)
    }

    /// Pauses every present vCPU and waits for every acknowledgement (see
    /// [`VcpuManagerOptions::ack_timeout`]).
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::VcpusDidNotAnswer`] or [`VcpuControlError::VcpuRefused`] if some
    /// vCPU did not acknowledge in time or refused.
    pub fn pause_all(&self) -> Result<(), VcpuControlError> {
        self.request_all(VcpuRequest::Pause)
    }

    /// Resumes every present vCPU and waits for every acknowledgement.
    ///
    /// # Errors
    ///
    /// As [`start_boot_vcpus`](Self::start_boot_vcpus).
    pub fn resume_all(&self) -> Result<(), VcpuControlError> {
        self.check_running_allowed(ManagerOp::ResumeAll)?;
        self.request_all(VcpuRequest::Resume)
    }

    fn request_all(&self, req: VcpuRequest) -> Result<(), VcpuControlError> {
        let indices: Vec<u32> = self.vcpus.keys().copied().collect();
        self.request_some(&indices, req)
    }

    /// Sends `req` to every vCPU in `indices`, then waits for every reply until one deadline.
    fn request_some(&self, indices: &[u32], req: VcpuRequest) -> Result<(), VcpuControlError> {
        let timeout = self.options.ack_timeout;
        let mut sent = Vec::with_capacity(indices.len());
        let mut no_answer = Vec::new();
        let mut refused: Vec<(u32, String)> = Vec::new();
        for index in indices {
            let handle = self
                .vcpus
                .get(index)
                .ok_or_else(|| VcpuControlError::InvalidState {
                    op: ManagerOp::Send(req),
                    reason: format!("vCPU index {index} is not present"),
                })?;
            match handle.send(req) {
                Ok(id) => sent.push((handle, id)),
                Err(e) => refused.push((handle.id(), e.to_string())),
            }
        }
        // A timeout too large for an Instant (e.g. Duration::MAX) means no deadline.
        let deadline = Instant::now().checked_add(timeout);
        for (handle, id) in sent {
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            match handle.wait_reply(id, left) {
                Ok(reply) => {
                    if let Some(refusal) = reply.refusal() {
                        refused.push((handle.id(), refusal.to_string()));
                    }
                }
                Err(vcpu_actor::VcpuError::ReplyTimeout { .. }) => no_answer.push(handle.id()),
                Err(e) => refused.push((handle.id(), e.to_string())),
            }
        }
        for (id, why) in &refused {
            warn!(self.logger, "vCPU refused a request"; "vcpu_id" => id, "request" => %req,
                  "reason" => why);
        }
        if !no_answer.is_empty() {
            return Err(VcpuControlError::VcpusDidNotAnswer {
                request: req,
                vcpu_ids: no_answer,
                timeout,
            });
        }
        if let Some((vcpu_id, reason)) = refused.into_iter().next() {
            return Err(VcpuControlError::VcpuRefused {
                vcpu_id,
                request: req,
                reason,
            });
        }
        Ok(())
    }

    /// Exits every present vCPU, joins every thread and keeps the KVM vCPU fds for reuse.
    /// Afterwards no vCPU is present.
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::Join`] for the first vCPU thread that could not be joined (the
    /// others are still joined).
    pub fn exit_all(&mut self) -> Result<(), VcpuControlError> {
        let indices: Vec<u32> = self.vcpus.keys().copied().collect();
        self.exit_vcpus(&indices)
    }

    /// Exits the given present vCPUs (e.g. after a hot-remove), joins their threads and keeps
    /// their KVM vCPU fds for reuse by [`create_vcpu`](Self::create_vcpu).
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::InvalidState`] if an index is not present (nothing is done);
    /// [`VcpuControlError::Join`] for the first vCPU thread that could not be joined.
    pub fn exit_vcpus(&mut self, indices: &[u32]) -> Result<(), VcpuControlError> {
        if let Some(index) = indices.iter().find(|i| !self.vcpus.contains_key(i)) {
            return Err(VcpuControlError::InvalidState {
                op: ManagerOp::ExitVcpus,
                reason: format!("vCPU index {index} is not present"),
            });
        }
        let asked = self.request_some(indices, VcpuRequest::Exit);
        let mut unjoined = Vec::new();
        let mut first_error = None;
        for index in indices {
            let Some(handle) = self.vcpus.remove(index) else {
                continue;
            };
            let id = handle.id();
            match handle.join(self.options.join_timeout) {
                Ok(fd) => {
                    self.kept_fds.insert(id, fd);
                }
                Err(e) => {
                    unjoined.push(id);
                    first_error.get_or_insert(VcpuControlError::Join {
                        vcpu_id: id,
                        source: e,
                    });
                }
            }
        }
        info!(self.logger, "vCPUs exited"; "indices" => ?indices,
              "kept_fds" => self.kept_fds.len(), "unjoined" => ?unjoined);
        if let Some(e) = first_error {
            return Err(e);
        }
        // Every thread ended, so a refused or unanswered Exit does not matter any more.
        if let Err(e) = asked {
            debug!(self.logger, "exit acknowledgements incomplete, threads joined anyway";
                   "error" => %e);
        }
        Ok(())
    }

    /// The present vCPUs (a live actor), by index.
    pub fn present_vcpus(&self) -> Vec<VcpuInfo> {
        self.vcpus
            .iter()
            .map(|(index, h)| VcpuInfo {
                index: *index,
                apic_id: h.id(),
                state: h.state(),
                tid: h.tid(),
            })
            .collect()
    }

    /// The number of present vCPUs.
    pub fn present_vcpu_count(&self) -> u32 {
        // Keyed by index below `max_vcpu_count`, a `u32`: the count fits.
        u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX)
    }

    /// The indices of the vCPUs that may be hot-removed: present vCPUs beyond the boot
    /// vCPUs, highest index first (the order to remove them in).
    pub fn removable_vcpus(&self) -> Vec<u32> {
        self.vcpus
            .keys()
            .rev()
            .copied()
            .filter(|i| *i >= self.config.boot_vcpu_count)
            .collect()
    }

    /// The APIC IDs whose KVM vCPU fd is kept for reuse (their thread has ended).
    pub fn kept_vcpu_fds(&self) -> Vec<u32> {
        self.kept_fds.keys().copied().collect()
    }

    /// Linux thread ids of the present vCPUs: (index, tid).
    pub fn vcpu_tids(&self) -> Vec<(u32, Option<i32>)> {
        self.vcpus.iter().map(|(i, h)| (*i, h.tid())).collect()
    }

    /// Counters of every present vCPU, by index.
    pub fn vcpu_metrics(&self) -> Vec<(u32, VcpuMetricsSnapshot)> {
        self.vcpus.iter().map(|(i, h)| (*i, h.metrics())).collect()
    }

    /// A monitor to wait on (with a timeout) from any thread, and to request a stop with.
    pub fn exit_monitor(&self) -> ExitMonitor {
        self.exit_monitor.clone()
    }

    /// Whether the exit flag is set (a stop is under way or done).
    pub fn exit_requested(&self) -> bool {
        self.exit_flag.load(Ordering::Acquire)
    }
}

impl Drop for VcpuManager {
    fn drop(&mut self) {
        if !self.vcpus.is_empty() {
            if let Err(e) = self.exit_all() {
                warn!(self.logger, "exiting the vCPUs on drop failed"; "error" => %e);
            }
        }
    }
}

/// Builds a VM and its vCPU manager, checking `config` before any KVM VM exists. KVM's limits
/// and supported CPUID are queried once, here.
///
/// # Errors
///
/// [`VmmError::Vm`] if KVM cannot be queried or the VM not created, [`VmmError::Config`] if
/// `config` does not fit this host's KVM (checked first), and the errors of
/// [`VcpuManager::new`].
pub fn build_vm(
    kvm: kvm_ioctls::Kvm,
    vm_options: crate::vm::VmOptions,
    config: VcpuConfig,
    options: VcpuManagerOptions,
) -> Result<(Arc<Vm>, VcpuManager), VmmError> {
    let limits = KvmLimits::query(&kvm)?;
    config.validate(&limits, options.interrupt_mode)?;
    let vm = Arc::new(Vm::new(kvm, vm_options)?);
    let manager = VcpuManager::with_valid_config(Arc::clone(&vm), config, limits, options)?;
    Ok((vm, manager))
}
