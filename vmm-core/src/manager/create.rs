//! Creating and configuring vCPUs in batches: the building block of boot and hot-add.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd};
use slog::{debug, o, warn, Logger};
use topology::CpuidEntry;
use vcpu_actor::{
    ExitHandler, PendingVcpu, SpawnFailure, VcpuError, VcpuHandle, VcpuParts, VcpuRequest,
    VcpuSetup,
};

use super::snapshot::ManagerStateSaver;
use super::{VcpuManager, FD_TABLE_SLACK};
use crate::arch::x86_64::{self, cpuid};
use crate::config::InterruptMode;
use crate::error::{KvmOp, ManagerOp, VcpuSetupError};
use crate::template::CpuTemplate;
use crate::vm::{reserve_fd_table, Vm};
use crate::BootEntry;

impl VcpuManager {
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
    /// Pipelined, so that a batch costs little more than its `KVM_CREATE_VCPU` calls:
    /// 1. this thread creates each KVM vCPU (KVM serialises creation per VM anyway), builds its
    ///    CPUID, and starts its actor thread ([`PendingVcpu::start_with_setup`]) at once,
    ///    without waiting for it;
    /// 2. each new thread configures its own vCPU (CPUID, MSRs, LAPIC, FPU, registers, MP
    ///    state, as `VcpuPlan::apply` says) and installs its seccomp filter, in parallel with the
    ///    creation of the next vCPUs and with each other;
    /// 3. once every vCPU is created, every thread's ready signal is awaited.
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
    /// is listed twice (nothing is done then), or for the BSP without a boot entry;
    /// [`VcpuSetupError::IndexOutOfRange`]; [`VcpuSetupError::Kvm`] (and the other setup
    /// errors) if KVM refuses to create or configure a vCPU; [`VcpuSetupError::Spawn`] if a
    /// thread cannot start. The first error of the batch is returned.
    pub fn create_vcpus(&mut self, indices: &[u32]) -> Result<(), VcpuSetupError> {
        self.create_batch(indices, Start::Paused).map(|_| ())
    }

    /// [`create_vcpus`](Self::create_vcpus) for application processors (no index 0) that
    /// their setup leaves waiting for INIT/SIPI: each thread enters `KVM_RUN` as soon as it
    /// is ready (see [`PendingVcpu::start_running_with_setup`]), so that a hot-add costs no
    /// `Resume` round trip per vCPU. All or nothing as `create_vcpus`. Returns the instant
    /// the last thread was spawned (after it, the manager only waited for the threads).
    ///
    /// [`PendingVcpu::start_running_with_setup`]: vcpu_actor::PendingVcpu::start_running_with_setup
    pub(crate) fn create_running_aps(
        &mut self,
        indices: &[u32],
    ) -> Result<Instant, VcpuSetupError> {
        if indices.contains(&0) {
            return Err(VcpuSetupError::InvalidState {
                op: ManagerOp::CreateVcpu,
                reason: "the BSP (index 0) is not an application processor".into(),
            });
        }
        self.create_batch(indices, Start::Running)
    }

    /// Creates a batch whose actors start as `start` says; returns the instant its last
    /// thread was spawned.
    fn create_batch(&mut self, indices: &[u32], start: Start) -> Result<Instant, VcpuSetupError> {
        let slots = self.new_slots(indices)?;
        if slots.is_empty() {
            return Ok(Instant::now());
        }
        let common = self.plan_common();
        self.reserve_fds();
        let mut pending = Vec::with_capacity(slots.len());
        let mut first_error = None;
        let mut probe_msrs = !self.saver.msrs_known();
        let last = slots.len() - 1;
        for (i, &(index, apic_id)) in slots.iter().enumerate() {
            let (fd, reused) = match self.kept_fds.remove(&apic_id) {
                Some(fd) => (fd, true),
                None => match self.create_kvm_vcpu(apic_id) {
                    Ok(fd) => (fd, false),
                    Err(e) => {
                        first_error = Some(e);
                        break;
                    }
                },
            };
            // A reused fd whose CPUID a batch set already keeps it (KVM refuses changes
            // once it has run, and it would be the same).
            let cpuid_kept = reused && self.cpuid_set.contains(&apic_id);
            let cpuid = match self
                .boot_entry_check(index)
                .and_then(|()| (!cpuid_kept).then(|| self.vcpu_cpuid(index)).transpose())
            {
                Ok(cpuid) => cpuid,
                Err(e) => {
                    self.kept_fds.insert(apic_id, fd);
                    first_error = Some(e);
                    break;
                }
            };
            let plan = VcpuPlan {
                index,
                apic_id,
                reused,
                last_of_batch: i == last,
                cpuid,
                // The first vCPU of the first batch lists the MSRs a save needs.
                probe_msrs: std::mem::take(&mut probe_msrs),
                common: Arc::clone(&common),
            };
            match self.start_vcpu(index, apic_id, fd, Some((plan.into_setup(), start))) {
                Ok(p) => pending.push((index, p)),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        let spawned = Instant::now();
        self.finish_batch(pending, first_error)?;
        self.cpuid_set
            .extend(slots.iter().map(|&(_, apic_id)| apic_id));
        Ok(spawned)
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

    /// What every vCPU of a batch is configured with.
    fn plan_common(&self) -> Arc<PlanCommon> {
        Arc::new(PlanCommon {
            vm: Arc::clone(&self.vm),
            interrupt_mode: self.options.interrupt_mode,
            template: self.config.template.clone(),
            template_msrs: self.template_msr_indices(),
            boot_entry: self.boot_entry.clone(),
            saver: Arc::clone(&self.saver),
            logger: self.logger.clone(),
        })
    }

    /// The BSP (index 0) needs a boot entry.
    fn boot_entry_check(&self, index: u32) -> Result<(), VcpuSetupError> {
        if index == 0 && self.boot_entry.is_none() {
            return Err(VcpuSetupError::InvalidState {
                op: ManagerOp::ConfigureBootVcpu,
                reason: "no boot entry: use create_boot_vcpus".into(),
            });
        }
        Ok(())
    }

    /// Probes, once per VM, which MSRs a vCPU state holds ([`SaveableMsrs::probe_with`],
    /// KVM's list plus the CPU template's MSRs) on `fd`, a vCPU whose CPUID is set and whose
    /// thread's seccomp filter is not installed: probing asks `/dev/kvm` for its MSR list,
    /// which the filter forbids. A probe that fails is logged; [`save`](Self::save) then
    /// says so.
    ///
    /// [`SaveableMsrs::probe_with`]: crate::arch::x86_64::state::SaveableMsrs::probe_with
    pub(crate) fn probe_saveable_msrs(&self, fd: &VcpuFd) {
        probe_saveable_msrs(
            &self.saver,
            self.vm.kvm(),
            fd,
            &self.template_msr_indices(),
            &self.logger,
        );
    }

    /// Starts the threads of `configured` (index, APIC ID, fd: vCPUs configured already)
    /// without waiting, then waits for every one. All or nothing, as
    /// [`create_vcpus`](Self::create_vcpus) says.
    pub(crate) fn start_batch(
        &mut self,
        configured: Vec<(u32, u32, VcpuFd)>,
    ) -> Result<(), VcpuSetupError> {
        let mut first_error = None;
        let mut pending = Vec::with_capacity(configured.len());
        let mut configured = configured.into_iter();
        for (index, apic_id, fd) in configured.by_ref() {
            match self.start_vcpu(index, apic_id, fd, None) {
                Ok(p) => pending.push((index, p)),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        // After a failed start, the vCPUs not started yet keep their fds.
        self.keep_fds(configured.collect());
        self.finish_batch(pending, first_error)
    }

    /// Starts vCPU `index`'s actor thread without waiting for it; `setup`, if any, runs on
    /// that thread first, and the actor then starts paused or running. On an error the fd
    /// is kept if the thread did not take it.
    fn start_vcpu(
        &mut self,
        index: u32,
        apic_id: u32,
        fd: VcpuFd,
        setup: Option<(VcpuSetup, Start)>,
    ) -> Result<PendingVcpu, VcpuSetupError> {
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
        // The manager's own saver, whatever the options held: `save` reads what it writes.
        vcpu_options.state_saver =
            Some(Arc::clone(&self.saver) as Arc<dyn vcpu_actor::VcpuStateSaver>);
        let started = match setup {
            Some((setup, Start::Paused)) => {
                PendingVcpu::start_with_setup(parts, vcpu_options, setup)
            }
            Some((setup, Start::Running)) => {
                PendingVcpu::start_running_with_setup(parts, vcpu_options, setup)
            }
            None => PendingVcpu::start(parts, vcpu_options),
        };
        started.map_err(|failure| self.spawn_failed(apic_id, failure))
    }

    /// Waits for every started thread of a batch, even after an error (none is left
    /// behind); with an error (`first_error`, or a thread that did not get ready), ends the
    /// threads that did get ready and keeps every fd.
    fn finish_batch(
        &mut self,
        pending: Vec<(u32, PendingVcpu)>,
        mut first_error: Option<VcpuSetupError>,
    ) -> Result<(), VcpuSetupError> {
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
        debug!(self.logger, "vCPUs created";
               "indices" => ?ready.iter().map(|(i, _)| *i).collect::<Vec<_>>());
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

    /// A new KVM vCPU with id `apic_id` (`KVM_CREATE_VCPU`).
    pub(crate) fn create_kvm_vcpu(&self, apic_id: u32) -> Result<VcpuFd, VcpuSetupError> {
        self.vm
            .fd()
            .create_vcpu(u64::from(apic_id))
            .map_err(|source| VcpuSetupError::Kvm {
                vcpu_id: apic_id,
                op: KvmOp::CreateVcpu,
                source,
            })
    }

    /// Keeps the fds of vCPUs that were created but will not be started.
    pub(crate) fn keep_fds(&mut self, fds: Vec<(u32, u32, VcpuFd)>) {
        for (_, apic_id, fd) in fds {
            self.kept_fds.insert(apic_id, fd);
        }
    }

    /// Keeps the fd a failed spawn gives back and turns the failure into the error: the
    /// setup's own error when the vCPU's configuration failed on its thread.
    fn spawn_failed(&mut self, apic_id: u32, failure: SpawnFailure) -> VcpuSetupError {
        if let Some(fd) = failure.vcpu {
            self.kept_fds.insert(apic_id, fd);
        }
        match failure.error {
            VcpuError::Setup { source, .. } => match source.downcast::<VcpuSetupError>() {
                Ok(e) => *e,
                Err(other) => VcpuSetupError::Spawn {
                    vcpu_id: apic_id,
                    source: VcpuError::Setup {
                        vcpu_id: apic_id,
                        source: other,
                    },
                },
            },
            error => VcpuSetupError::Spawn {
                vcpu_id: apic_id,
                source: error,
            },
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
}

/// How the actors of a batch start.
#[derive(Clone, Copy)]
enum Start {
    /// Paused, until `Resume`.
    Paused,
    /// Running once ready (application processors waiting for INIT/SIPI).
    Running,
}

/// What every vCPU of a batch is configured with.
struct PlanCommon {
    vm: Arc<Vm>,
    interrupt_mode: InterruptMode,
    template: Option<CpuTemplate>,
    template_msrs: Vec<u32>,
    /// The boot entry, if there is one (the BSP needs it).
    boot_entry: Option<Arc<dyn BootEntry>>,
    saver: Arc<ManagerStateSaver>,
    logger: Logger,
}

/// How one vCPU is configured; applied on its own thread ([`VcpuPlan::apply`]).
struct VcpuPlan {
    index: u32,
    apic_id: u32,
    /// The fd was kept from an earlier life of this vCPU.
    reused: bool,
    /// Created last in its batch (after all the others).
    last_of_batch: bool,
    /// `None`: the reused fd has it already.
    cpuid: Option<Vec<CpuidEntry>>,
    /// List the MSRs a save needs, on this vCPU (once per VM).
    probe_msrs: bool,
    common: Arc<PlanCommon>,
}

impl VcpuPlan {
    /// CPUID, then the architectural setup ([`x86_64::setup_vcpu`]: MSRs, the BSP's LINT0/LINT1,
    /// a kept fd's FPU), the CPU template's MSRs, then BSP registers (index 0) or the wait-for-SIPI state
    /// (APs); then, once per VM, the MSR probe.
    fn apply(&self, fd: &VcpuFd) -> Result<(), VcpuSetupError> {
        let (apic_id, common) = (self.apic_id, &self.common);
        if let Some(entries) = &self.cpuid {
            if cpuid::set_cpuid(fd, apic_id, entries, self.reused)?
                == cpuid::CpuidSet::KeptFromEarlierRun
            {
                debug!(common.logger, "reused vCPU keeps its CPUID"; "apic_id" => apic_id);
            }
        }
        let start = x86_64::VcpuStart {
            bsp: self.index == 0,
            fresh: !self.reused,
            last_of_batch: self.last_of_batch,
        };
        x86_64::setup_vcpu(fd, apic_id, common.interrupt_mode, start)?;
        if let Some(template) = &common.template {
            // After the VMM's boot MSRs, so that the template has the last word.
            template.apply_msrs(fd, apic_id)?;
        }
        if self.index == 0 {
            if let Some(entry) = &common.boot_entry {
                entry.setup_bsp(fd, common.vm.memory())?;
            }
        }
        // The APs wait in KVM_RUN until the guest sends INIT and SIPI.
        x86_64::set_boot_mp_state(fd, apic_id, start)?;
        if self.probe_msrs {
            let kvm = common.vm.kvm();
            probe_saveable_msrs(
                &common.saver,
                kvm,
                fd,
                &common.template_msrs,
                &common.logger,
            );
        }
        Ok(())
    }

    /// The plan as the actor's setup hook, run on the vCPU's thread.
    fn into_setup(self) -> VcpuSetup {
        Box::new(move |fd: &VcpuFd| {
            self.apply(fd)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
    }
}

/// See [`VcpuManager::probe_saveable_msrs`].
fn probe_saveable_msrs(
    saver: &ManagerStateSaver,
    kvm: &Kvm,
    fd: &VcpuFd,
    template_msrs: &[u32],
    logger: &Logger,
) {
    if let Err(e) = saver.probe_once(kvm, fd, template_msrs) {
        warn!(logger, "cannot list the MSRs to save; saving this VM will fail"; "error" => %e);
    }
}
