//! Creating and configuring vCPUs in batches: the building block of boot and hot-add.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_ioctls::VcpuFd;
use slog::{debug, o, warn};
use vcpu_actor::{ExitHandler, PendingVcpu, SpawnFailure, VcpuHandle, VcpuParts, VcpuRequest};

use super::{VcpuManager, FD_TABLE_SLACK};
use crate::arch::x86_64::{self, cpuid};
use crate::error::{KvmOp, ManagerOp, VcpuSetupError};
use crate::vm::reserve_fd_table;
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
    /// KVM's list plus the CPU template's MSRs) on `fd`, a vCPU whose CPUID is set and whose thread does not exist yet: probing asks
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
            None => (self.create_kvm_vcpu(apic_id)?, false),
        };
        match self.configure_vcpu(&fd, index, apic_id, reused) {
            Ok(()) => Ok(fd),
            Err(e) => {
                self.kept_fds.insert(apic_id, fd);
                Err(e)
            }
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
}
