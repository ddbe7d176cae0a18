//! The vCPU manager: creates, configures, starts, pauses, resumes and exits the vCPUs of a
//! VM, and turns a vCPU's `waiting_exit` into a stop of the whole VM.
//!
//! Naming: a vCPU's *index* is its creation order (`0..max_vcpu_count`, thread fastest, then
//! core, die, socket); its *id* is its KVM vCPU id, which is its APIC ID from the topology.
//! The vCPU actors, the exit handler and [`VcpuExitReason`](vcpu_actor::VcpuExitReason) use the id.

pub mod snapshot;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use slog::{debug, info, o, warn, Logger};
use topology::{CpuVendor, CpuidEntry};
use vcpu_actor::{
    ExitHandler, PendingVcpu, SpawnFailure, VcpuHandle, VcpuMetricsSnapshot, VcpuOptions,
    VcpuParts, VcpuRequest, VcpuState,
};

use crate::arch::x86_64::{self, cpuid};
use crate::config::{InterruptMode, KvmLimits, VcpuConfig};
use crate::error::{KvmOp, ManagerOp, VcpuControlError, VcpuSetupError, VmmError};
use crate::exit::ExitMonitor;
use crate::hotplug_backend::HotplugBackend;
use crate::pmu::{apply_pmu_actions, PmuActionsReport};
use crate::state::{ManagerState, ResizeInFlight, Transition, VmRunState};
use crate::vm::{reserve_fd_table, Vm};
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
    pub(crate) exit_monitor: ExitMonitor,
    pub(crate) exit_flag: Arc<AtomicBool>,
    /// The state machine (see [`crate::state`]); its own small lock, so that `&self`
    /// operations (pause, resume) can move it.
    state: Mutex<ManagerState>,
    /// What [`resize_vcpus`](Self::resize_vcpus) asks the guest with.
    pub(crate) backend: Option<Arc<dyn HotplugBackend>>,
    /// A duplicate of the KVM fd of each vCPU a resize added, by APIC ID, to read its MP
    /// state (`KVM_GET_MP_STATE`) while its thread owns the fd.
    pub(crate) mp_probes: BTreeMap<u32, OwnedFd>,
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
            exit_monitor: ExitMonitor::new()?,
            exit_flag: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(ManagerState::new()),
            backend: None,
            mp_probes: BTreeMap::new(),
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

    fn check_running_allowed(&self, op: ManagerOp) -> Result<(), VcpuControlError> {
        self.state()
            .check(Transition::Run, self.exit_flag_set())
            .map_err(|refusal| control_refused(op, refusal))
    }

    /// Moves the state machine by `t` (refused: `op` is not done), then sends `req` to every
    /// present vCPU. The state lock is held until every reply came (at most `ack_timeout`), so
    /// that concurrent pauses and resumes end in the state of the requests sent last.
    fn request_all_as(
        &self,
        op: ManagerOp,
        t: Transition,
        req: VcpuRequest,
    ) -> Result<(), VcpuControlError> {
        let mut state = self.state();
        state
            .transition(t, self.exit_flag_set())
            .map_err(|refusal| control_refused(op, refusal))?;
        self.request_all(req)
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

    /// Creates (or reuses) and configures the boot vCPUs `0..boot_vcpu_count` and starts
    /// their actor threads, paused, as one batch ([`create_vcpus`](Self::create_vcpus)). The
    /// BSP is set up by `entry`; the APs wait for INIT/SIPI. Nothing runs until
    /// [`start_boot_vcpus`](Self::start_boot_vcpus).
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::InvalidState`] if the VM is stopping or vCPUs are already present;
    /// otherwise the first error of [`create_vcpus`](Self::create_vcpus), after which no boot
    /// vCPU is present (their fds are kept for reuse).
    pub fn create_boot_vcpus(&mut self, entry: Arc<dyn BootEntry>) -> Result<(), VcpuSetupError> {
        self.check_setup_allowed(ManagerOp::CreateBootVcpus)?;
        if !self.vcpus.is_empty() {
            return Err(VcpuSetupError::InvalidState {
                op: ManagerOp::CreateBootVcpus,
                reason: format!("{} vCPUs are already present", self.vcpus.len()),
            });
        }
        self.boot_entry = Some(entry);
        let indices: Vec<u32> = (0..self.config.boot_vcpu_count).collect();
        self.create_vcpus(&indices)
    }

    /// Creates vCPU `index` (reusing its kept KVM fd if it existed before), configures it and
    /// spawns its actor, paused: [`create_vcpus`](Self::create_vcpus) of one vCPU.
    ///
    /// # Errors
    ///
    /// As [`create_vcpus`](Self::create_vcpus).
    pub fn create_vcpu(&mut self, index: u32) -> Result<(), VcpuSetupError> {
        self.create_vcpus(&[index])
    }

    /// Creates the vCPUs `indices` (reusing the kept KVM fd of any that existed before),
    /// configures them and starts their actors, paused, as one batch; the building block for
    /// boot and for hot-add. All or nothing: on an error no vCPU of the batch is present,
    /// no thread of it is left running, and every KVM vCPU fd of the batch is kept for reuse
    /// (KVM cannot destroy a vCPU), except one lost with a thread that panicked or did not
    /// answer (as [`vcpu_actor::SpawnFailure`] says).
    ///
    /// In three passes, so that a batch costs little more than its KVM calls:
    /// 1. every vCPU is created and configured (CPUID, MSRs, LAPIC, FPU, registers, MP
    ///    state) before any thread of the batch exists: every fd the batch needs is opened
    ///    while the process has as few threads as it will have (see below);
    /// 2. every actor thread is started ([`PendingVcpu::start`]) without waiting for it;
    /// 3. every thread's ready signal is awaited: the threads get ready in parallel instead of
    ///    one after another.
    ///
    /// Why fds matter: a vCPU costs the process one fd (its vCPU fd; `kvm_run` is mapped from
    /// it and the exit EventFd is shared). When an fd number does not fit the kernel's fd
    /// table, the kernel doubles the table (64, 128, 256, 512 ... entries), and once the
    /// process has more than one thread each growth waits for an RCU grace period
    /// (`synchronize_rcu` in `expand_fdtable`), milliseconds each. So before the first fd of
    /// a batch the table is grown once to fit every vCPU the VM may have
    /// ([`reserve_fd_table`]): then no vCPU creation, at boot or in a hot-add while other
    /// vCPU threads run, waits for a grace period.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::InvalidState`] if the VM is stopping, a vCPU is present or an index
    /// is listed twice (nothing is done then); [`VcpuSetupError::IndexOutOfRange`];
    /// [`VcpuSetupError::Kvm`] (and the other setup errors) if KVM refuses to create or
    /// configure a vCPU; [`VcpuSetupError::Spawn`] if a thread cannot start. The first error
    /// of the batch is returned.
    pub fn create_vcpus(&mut self, indices: &[u32]) -> Result<(), VcpuSetupError> {
        let slots = self.new_slots(indices)?;
        if slots.is_empty() {
            return Ok(());
        }
        self.reserve_fds();

        // 1. Create and configure every vCPU; on an error keep every fd made so far.
        let mut configured: Vec<(u32, u32, VcpuFd)> = Vec::with_capacity(slots.len());
        for &(index, apic_id) in &slots {
            match self.create_configured(index, apic_id) {
                Ok(fd) => {
                    self.probe_saveable_msrs(&fd);
                    configured.push((index, apic_id, fd));
                }
                Err(e) => {
                    self.keep_fds(configured);
                    return Err(e);
                }
            }
        }
        self.start_batch(configured)
    }

    /// The (index, APIC ID) of each of `indices`, checked: the VM is not stopping, every
    /// index is in range, none is present or listed twice.
    pub(crate) fn new_slots(&self, indices: &[u32]) -> Result<Vec<(u32, u32)>, VcpuSetupError> {
        self.check_setup_allowed(ManagerOp::CreateVcpu)?;
        let mut slots: Vec<(u32, u32)> = Vec::with_capacity(indices.len());
        for &index in indices {
            let apic_id = self.apic_id(index)?;
            if self.vcpus.contains_key(&index) || slots.iter().any(|&(i, _)| i == index) {
                return Err(VcpuSetupError::InvalidState {
                    op: ManagerOp::CreateVcpu,
                    reason: format!(
                        "vCPU index {index} (APIC ID {apic_id}) is already present or listed twice"
                    ),
                });
            }
            slots.push((index, apic_id));
        }
        Ok(slots)
    }

    /// Probes, once per VM, which MSRs a vCPU state holds ([`SaveableMsrs::probe_with`],
    /// KVM's list plus the CPU template's MSRs) on
    /// `fd`, a vCPU whose CPUID is set and whose thread does not exist yet: probing asks
    /// `/dev/kvm` for its MSR list, which the vCPU threads' seccomp filter forbids. A probe
    /// that fails is logged; [`save`](Self::save) then says so.
    ///
    /// [`SaveableMsrs::probe_with`]: crate::arch::x86_64::state::SaveableMsrs::probe_with
    pub(crate) fn probe_saveable_msrs(&self, fd: &VcpuFd) {
        let template_msrs = self.template_msr_indices();
        if let Err(e) = self.saver.probe_once(self.vm.kvm(), fd, &template_msrs) {
            warn!(self.logger, "cannot list the MSRs to save; saving this VM will fail";
                  "error" => %e);
        }
    }

    /// Passes 2 and 3 of [`create_vcpus`](Self::create_vcpus): starts the threads of
    /// `configured` (index, APIC ID, fd) without waiting, then waits for every one. All or
    /// nothing, as `create_vcpus` says.
    pub(crate) fn start_batch(
        &mut self,
        configured: Vec<(u32, u32, VcpuFd)>,
    ) -> Result<(), VcpuSetupError> {
        let indices: Vec<u32> = configured.iter().map(|&(i, _, _)| i).collect();
        // 2. Start every thread without waiting for any.
        let mut first_error: Option<VcpuSetupError> = None;
        let mut pending = Vec::with_capacity(configured.len());
        let mut configured = configured.into_iter();
        for (index, apic_id, fd) in configured.by_ref() {
            let parts = VcpuParts {
                id: apic_id,
                vcpu: fd,
                vcpu_mmap_size: self.vm.vcpu_mmap_size(),
                handler: Arc::clone(self.vm.io_bus()) as Arc<dyn ExitHandler>,
                exit_evt: self.exit_monitor.vcpu_exit_eventfd(),
            };
            let mut vcpu_options = self.options.vcpu.clone();
            vcpu_options.logger = self.logger.new(o!("vcpu_index" => index));
            if let Some(cpus) = self.config.vcpu_affinity.get(&index) {
                vcpu_options.affinity = Some(cpus.clone());
            }
            // Handled on the vCPU thread, under its seccomp filter: the serial console raises
            // its interrupt (an irqfd write), and a device may call ExitMonitor::request_stop.
            vcpu_options.seccomp = std::mem::take(&mut vcpu_options.seccomp).with_write_fds([
                self.vm.serial().irq_fd(),
                self.exit_monitor.stop_request_fd(),
            ]);
            // The manager's own saver, whatever the options held: `save` reads what it
            // writes.
            vcpu_options.state_saver =
                Some(Arc::clone(&self.saver) as Arc<dyn vcpu_actor::VcpuStateSaver>);
            match PendingVcpu::start(parts, vcpu_options) {
                Ok(p) => pending.push((index, p)),
                Err(failure) => {
                    first_error = Some(self.spawn_failed(apic_id, failure));
                    break;
                }
            }
        }
        // After a failed start, the vCPUs not started yet keep their fds.
        self.keep_fds(configured.collect());

        // 3. Wait for every started thread, even after an error: none is left behind.
        let mut ready = Vec::with_capacity(pending.len());
        for (index, p) in pending {
            let apic_id = p.id();
            match p.wait_ready() {
                Ok(handle) => ready.push((index, handle)),
                Err(failure) => {
                    let e = self.spawn_failed(apic_id, failure);
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            self.roll_back_started(ready);
            return Err(e);
        }
        debug!(self.logger, "vCPUs created"; "indices" => ?indices);
        self.vcpus.extend(ready);
        Ok(())
    }

    /// Grows the process's fd table once to fit every vCPU fd this VM may need (see
    /// [`create_vcpus`](Self::create_vcpus)).
    pub(crate) fn reserve_fds(&self) {
        let in_use = usize::try_from(self.vm.fd().as_raw_fd()).unwrap_or(0);
        let wanted = in_use
            .saturating_add(self.config.max_vcpu_count as usize)
            .saturating_add(FD_TABLE_SLACK);
        if let Err(e) = reserve_fd_table(wanted) {
            // Only slower: vCPU creation may then wait for the kernel to grow the table.
            debug!(self.logger, "cannot pre-size the fd table"; "fds" => wanted, "error" => %e);
        }
    }

    /// Creates (or takes the kept fd of) vCPU `index` and configures it. On an error, the fd
    /// (if there is one) is kept for reuse.
    fn create_configured(&mut self, index: u32, apic_id: u32) -> Result<VcpuFd, VcpuSetupError> {
        let (fd, reused) = match self.kept_fds.remove(&apic_id) {
            Some(fd) => (fd, true),
            None => {
                let fd = self
                    .vm
                    .fd()
                    .create_vcpu(u64::from(apic_id))
                    .map_err(|source| VcpuSetupError::Kvm {
                        vcpu_id: apic_id,
                        op: KvmOp::CreateVcpu,
                        source,
                    })?;
                (fd, false)
            }
        };
        match self.configure_vcpu(&fd, index, apic_id, reused) {
            Ok(()) => Ok(fd),
            Err(e) => {
                self.kept_fds.insert(apic_id, fd);
                Err(e)
            }
        }
    }

    /// Keeps the fds of vCPUs that were created but will not be started.
    pub(crate) fn keep_fds(&mut self, fds: Vec<(u32, u32, VcpuFd)>) {
        for (_, apic_id, fd) in fds {
            self.kept_fds.insert(apic_id, fd);
        }
    }

    /// Keeps the fd a failed spawn gives back and turns the failure into the error.
    fn spawn_failed(&mut self, apic_id: u32, failure: SpawnFailure) -> VcpuSetupError {
        if let Some(fd) = failure.vcpu {
            self.kept_fds.insert(apic_id, fd);
        }
        VcpuSetupError::Spawn {
            vcpu_id: apic_id,
            source: failure.error,
        }
    }

    /// Ends the threads of a failed batch that did start (all are asked first, then each is
    /// joined) and keeps their fds.
    fn roll_back_started(&mut self, started: Vec<(u32, VcpuHandle)>) {
        for (_, handle) in &started {
            let _ = handle.send(VcpuRequest::Exit);
        }
        for (index, handle) in started {
            let id = handle.id();
            match handle.join(self.options.join_timeout) {
                Ok(fd) => {
                    self.kept_fds.insert(id, fd);
                }
                Err(e) => {
                    warn!(self.logger, "a vCPU of a failed batch did not end; its fd is lost";
                          "index" => index, "apic_id" => id, "error" => %e);
                }
            }
        }
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
        if let Some(template) = &self.config.template {
            // After the VMM's boot MSRs, so that the template has the last word.
            template.apply_msrs(fd, apic_id)?;
        }
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
        self.request_all_as(
            ManagerOp::StartBootVcpus,
            Transition::Run,
            VcpuRequest::Resume,
        )
    }

    /// Starts the given present vCPUs (e.g. after hot-add). The VM's [`VmRunState`] does not
    /// change.
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
    /// [`VcpuManagerOptions::ack_timeout`]). The VM is [`VmRunState::Paused`] from then on.
    ///
    /// With a resize in flight, this does not wait for the resize: it pauses the vCPUs present
    /// now, the resize's new ones included (see [`crate::resize`]).
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::InvalidState`] if the VM is stopping or stopped;
    /// [`VcpuControlError::VcpusDidNotAnswer`] or [`VcpuControlError::VcpuRefused`] if some
    /// vCPU did not acknowledge in time or refused.
    pub fn pause_all(&self) -> Result<(), VcpuControlError> {
        self.request_all_as(
            ManagerOp::Send(VcpuRequest::Pause),
            Transition::Pause,
            VcpuRequest::Pause,
        )
    }

    /// Resumes every present vCPU and waits for every acknowledgement.
    ///
    /// # Errors
    ///
    /// As [`start_boot_vcpus`](Self::start_boot_vcpus).
    pub fn resume_all(&self) -> Result<(), VcpuControlError> {
        self.request_all_as(ManagerOp::ResumeAll, Transition::Run, VcpuRequest::Resume)
    }

    fn request_all(&self, req: VcpuRequest) -> Result<(), VcpuControlError> {
        let indices: Vec<u32> = self.vcpus.keys().copied().collect();
        self.request_some(&indices, req)
    }

    /// Sends `req` to every vCPU in `indices`, then waits for every reply until one deadline.
    pub(crate) fn request_some(
        &self,
        indices: &[u32],
        req: VcpuRequest,
    ) -> Result<(), VcpuControlError> {
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
    /// Afterwards no vCPU is present, and the VM is [`VmRunState::Created`] (boot vCPUs can be
    /// created again), or [`VmRunState::Stopped`] when a stop is under way.
    ///
    /// # Errors
    ///
    /// [`VcpuControlError::Join`] for the first vCPU thread that could not be joined (the
    /// others are still joined).
    pub fn exit_all(&mut self) -> Result<(), VcpuControlError> {
        let indices: Vec<u32> = self.vcpus.keys().copied().collect();
        let exited = self.exit_vcpus(&indices);
        let exit_flag = self.exit_flag_set();
        self.state().apply(Transition::AllExited, exit_flag);
        exited
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
                affinity: h
                    .tid()
                    .and_then(|tid| vcpu_actor::thread_affinity(tid).ok()),
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

    /// What KVM holds as the CPUID of the vCPU with APIC ID `apic_id` (`KVM_GET_CPUID2`),
    /// read from its kept fd: call it after the vCPU exited (e.g. after
    /// [`exit_all`](Self::exit_all)), when its thread has handed the fd back.
    ///
    /// # Errors
    ///
    /// [`VcpuSetupError::InvalidState`] if no fd of that APIC ID is kept,
    /// [`VcpuSetupError::Kvm`] if KVM does not answer.
    pub fn kept_vcpu_kvm_cpuid(&self, apic_id: u32) -> Result<Vec<CpuidEntry>, VcpuSetupError> {
        let fd = self
            .kept_fds
            .get(&apic_id)
            .ok_or_else(|| VcpuSetupError::InvalidState {
                op: ManagerOp::ExitVcpus,
                reason: format!(
                    "no kept KVM fd for APIC ID {apic_id}: read KVM's CPUID after the vCPU exited"
                ),
            })?;
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(crate::vcpu_kvm_error(apic_id, KvmOp::GetCpuid2))?;
        Ok(cpuid::entries_from_kvm(cpuid.as_slice()))
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
        self.exit_flag_set()
    }
}

/// The `InvalidState` error of `op`, refused by the state machine.
fn control_refused(op: ManagerOp, refusal: crate::state::Refusal) -> VcpuControlError {
    VcpuControlError::InvalidState {
        op,
        reason: refusal.to_string(),
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
