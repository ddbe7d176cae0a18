//! The vCPU manager: creates, configures, starts, pauses, resumes and exits the vCPUs of a
//! VM, and turns a vCPU's `waiting_exit` into a stop of the whole VM.
//!
//! Naming: a vCPU's *index* is its creation order (`0..max_vcpu_count`, thread fastest, then
//! core, die, socket); its *id* is its KVM vCPU id, which is its APIC ID from the topology.
//! The vCPU actors, the exit handler and [`VcpuExitReason`](vcpu_actor::VcpuExitReason) use the id.

mod control;
mod create;
mod info;
pub mod snapshot;

pub(crate) use control::Asked;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use slog::{info, o, warn, Logger};
use topology::{CpuVendor, CpuidEntry};
use vcpu_actor::{VcpuHandle, VcpuOptions, VcpuState};

use crate::arch::x86_64::{self, cpuid};
use crate::config::{InterruptMode, KvmLimits, VcpuConfig};
use crate::error::{ManagerOp, VcpuSetupError, VmmError};
use crate::exit::ExitMonitor;
use crate::hotplug_backend::HotplugBackend;
use crate::pmu::{apply_pmu_actions, PmuActionsReport};
use crate::state::{ManagerState, ResizeInFlight, Transition, VmRunState};
use crate::vm::Vm;
use crate::BootEntry;

use snapshot::ManagerStateSaver;
pub use snapshot::VmSnapshot;

/// Fds beyond one per possible vCPU that the fd table is sized for up front (the VMM's
/// other fds: devices, sockets, logs).
const FD_TABLE_SLACK: usize = 64;

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
    /// The host CPUs the kernel lets the vCPU thread run on (`sched_getaffinity` of its
    /// TID, read from the caller's thread); `None` when it cannot be read.
    #[serde(default)]
    pub affinity: Option<Vec<usize>>,
}

/// All vCPUs of one VM. See the crate documentation for an example.
///
/// The manager is a state machine ([`VmRunState`], the table in [`crate::state`]). To pause,
/// resume or stop the VM while a resize waits for the guest, share it as
/// `Arc<Mutex<VcpuManager>>` and resize with [`VcpuManager::resize_shared`] (or
/// [`AsyncResizer`](crate::AsyncResizer)), which does not hold the lock during the guest round
/// trip.
pub struct VcpuManager {
    vm: Arc<Vm>,
    config: VcpuConfig,
    pub(crate) options: VcpuManagerOptions,
    vendor: CpuVendor,
    supported_cpuid: Vec<CpuidEntry>,
    /// KVM's supported CPUID with the template and the normalisation applied: what every
    /// vCPU's CPUID is built from ([`vcpu_cpuid`](Self::vcpu_cpuid)).
    base_cpuid: Vec<CpuidEntry>,
    pmu_report: PmuActionsReport,
    boot_entry: Option<Arc<dyn BootEntry>>,
    /// Present vCPUs (a live actor), by index.
    pub(crate) vcpus: BTreeMap<u32, VcpuHandle>,
    /// KVM vCPU fds whose thread has ended, by APIC ID: KVM cannot destroy a vCPU, so a later
    /// vCPU with the same id reuses the fd.
    pub(crate) kept_fds: BTreeMap<u32, VcpuFd>,
    /// APIC IDs whose KVM vCPU has the CPUID this manager builds for it (set by a batch that
    /// succeeded). Never shrinks: the KVM vCPU lives as long as the VM, and its CPUID
    /// depends only on the manager's configuration, so a kept fd of one of these is reused
    /// without building and setting its CPUID again.
    pub(crate) cpuid_set: BTreeSet<u32>,
    pub(crate) exit_monitor: ExitMonitor,
    pub(crate) exit_flag: Arc<AtomicBool>,
    /// The state machine (see [`crate::state`]); its own small lock, so that `&self`
    /// operations (pause, resume) can move it.
    state: Mutex<ManagerState>,
    /// What [`resize_vcpus`](Self::resize_vcpus) asks the guest with.
    pub(crate) backend: Option<Arc<dyn HotplugBackend>>,
    /// Answers `SaveState` on every vCPU thread (see [`VcpuManager::save`]); holds the
    /// MSR list, probed once on the first vCPU created, before its thread starts.
    pub(crate) saver: Arc<ManagerStateSaver>,
    pub(crate) logger: Logger,
}

impl std::fmt::Debug for VcpuManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuManager")
            .field("config", &self.config)
            .field("present", &self.vcpus.keys().collect::<Vec<_>>())
            .field("state", &self.run_state())
            .field("resize_in_flight", &self.resize_in_flight())
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
        if let Some(t) = &config.template {
            t.check_kvm_capabilities(|n| vm.fd().check_extension_raw(u64::from(n)))
                .map_err(crate::error::ConfigError::from)?;
        }
        let base_cpuid = crate::template::guest_base_cpuid(
            &limits.supported_cpuid,
            config.template.as_ref(),
            vendor,
            &cpuid::NormalizeInputs::query(vm.fd()),
        );
        let pmu_report =
            apply_pmu_actions(vm.fd(), &actions, vendor, &limits.supported_cpuid, &logger)?;
        info!(logger, "vCPU manager ready";
              "boot" => config.boot_vcpu_count, "max" => config.max_vcpu_count,
              "vpmu" => %config.vpmu);
        let saver = Arc::new(ManagerStateSaver::new(vm.fd()));
        Ok(Self {
            vm,
            config,
            options,
            vendor,
            supported_cpuid: limits.supported_cpuid,
            base_cpuid,
            pmu_report,
            boot_entry: None,
            vcpus: BTreeMap::new(),
            kept_fds: BTreeMap::new(),
            cpuid_set: BTreeSet::new(),
            exit_monitor: ExitMonitor::new()?,
            exit_flag: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(ManagerState::new()),
            backend: None,
            saver,
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

    /// KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`), as it was queried.
    pub fn supported_cpuid(&self) -> &[CpuidEntry] {
        &self.supported_cpuid
    }

    /// KVM's supported CPUID with the configuration's CPU template and the normalisation
    /// applied: what [`vcpu_cpuid`](Self::vcpu_cpuid) builds each vCPU's CPUID from.
    pub fn base_cpuid(&self) -> &[CpuidEntry] {
        &self.base_cpuid
    }

    /// The MSRs the configuration's CPU template sets on every vCPU (empty without one): a
    /// snapshot saves them beside the VMM's own.
    pub fn template_msr_indices(&self) -> Vec<u32> {
        self.config
            .template
            .as_ref()
            .map(crate::template::CpuTemplate::msr_indices)
            .unwrap_or_default()
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

    /// The state machine, locked.
    pub(crate) fn state(&self) -> MutexGuard<'_, ManagerState> {
        // Every critical section is a single check-and-update: a panic leaves it consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the exit flag is set (a stop is under way or done).
    pub(crate) fn exit_flag_set(&self) -> bool {
        self.exit_flag.load(Ordering::Acquire)
    }

    /// What the VM is doing (see the table in [`crate::state`]).
    pub fn run_state(&self) -> VmRunState {
        self.state().run_state(self.exit_flag_set())
    }

    /// The resize between its first and last phase, if any.
    pub fn resize_in_flight(&self) -> Option<ResizeInFlight> {
        self.state().resize_in_flight()
    }

    pub(crate) fn check_setup_allowed(&self, op: ManagerOp) -> Result<(), VcpuSetupError> {
        self.state()
            .check(Transition::Create, self.exit_flag_set())
            .map_err(|refusal| VcpuSetupError::InvalidState {
                op,
                reason: refusal.to_string(),
            })
    }

    /// The CPUID set vCPU `index` gets, built in this order: KVM's supported CPUID, then the
    /// CPU template of the configuration (if any; the topology and PMU leaves stay the
    /// VMM's), then the normalisation ([`cpuid::normalize`]: brand string, leaf 6, TSC
    /// frequency leaf, ARCH_CAPABILITIES on AMD) — together [`base_cpuid`](Self::base_cpuid)
    /// — then the topology leaves, then the vPMU level's edits, then (x2APIC mode) KVM's MSI
    /// extended destination ID flag.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::IndexOutOfRange`] for an index not below `max_vcpu_count`;
    /// [`VcpuSetupError::Topology`] or [`VcpuSetupError::VpmuCpuid`] if the CPUID cannot be
    /// built.
    pub fn vcpu_cpuid(&self, index: u32) -> Result<Vec<CpuidEntry>, VcpuSetupError> {
        let apic_id = self.apic_id(index)?;
        let mut entries = topology::build_vcpu_cpuid(
            &self.base_cpuid,
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
