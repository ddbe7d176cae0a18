//! [`AgentVm`]: a VM running the agent program.

use std::sync::Arc;
use std::time::{Duration, Instant};

use topology::hwloc::{topology_queries, CpuidResult};
use vmm_core::{VcpuConfig, VcpuManager, VcpuManagerOptions, Vm, VmOptions};

use super::{agent_program, ApMode, GuestAgent, MIN_MEMORY_SIZE};
use crate::guest::vm::build_with_program;
use crate::IntegrationError;

/// How to build an [`AgentVm`].
#[derive(Debug)]
pub struct AgentVmOptions {
    /// Guest RAM in bytes (at least [`MIN_MEMORY_SIZE`]).
    pub memory_size: u64,
    /// What APs do once they reported.
    pub ap_mode: ApMode,
    /// The vCPU manager's options (its logger is used for the VM and the agent too).
    pub manager: VcpuManagerOptions,
}

impl Default for AgentVmOptions {
    fn default() -> Self {
        Self {
            memory_size: 64 << 20,
            ap_mode: ApMode::Count,
            manager: VcpuManagerOptions::default(),
        }
    }
}

/// A VM running the agent program: the VM, its vCPU manager, the agent device, and the CPUID
/// queries every vCPU executes.
pub struct AgentVm {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its vCPUs (boot vCPUs created, not started, after [`AgentVm::create`]).
    pub vcpus: VcpuManager,
    /// The agent device.
    pub agent: Arc<GuestAgent>,
    /// The CPUID queries ([`topology_queries`] of vCPU 0's CPUID set).
    pub queries: Vec<(u32, u32)>,
}

impl std::fmt::Debug for AgentVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentVm")
            .field("present_vcpus", &self.vcpus.present_vcpu_count())
            .field("agent", &self.agent)
            .field("queries", &self.queries.len())
            .finish_non_exhaustive()
    }
}

impl AgentVm {
    /// Builds the VM for `config`, loads the agent program, registers the agent device and
    /// creates the boot vCPUs.
    pub fn create(
        kvm: kvm_ioctls::Kvm,
        config: VcpuConfig,
        options: AgentVmOptions,
    ) -> Result<Self, IntegrationError> {
        if options.memory_size < MIN_MEMORY_SIZE {
            return Err(IntegrationError::Guest(format!(
                "{} MiB of guest memory is too little for the agent program: use at least {} MiB",
                options.memory_size >> 20,
                MIN_MEMORY_SIZE >> 20
            )));
        }
        let logger = options.manager.logger.clone();
        let vm_options = VmOptions {
            memory_size: options.memory_size,
            logger: logger.clone(),
            ..VmOptions::default()
        };
        let (vm, mut vcpus, entry) =
            build_with_program(kvm, &agent_program(), config, vm_options, options.manager)?;
        let queries = topology_queries(&vcpus.vcpu_cpuid(0)?);
        let agent = GuestAgent::new(vm.memory().clone(), logger);
        agent.register(vm.io_bus())?;
        agent.write_queries(&queries)?;
        agent.set_ap_mode(options.ap_mode)?;
        vcpus.create_boot_vcpus(entry)?;
        Ok(Self {
            vm,
            vcpus,
            agent,
            queries,
        })
    }

    /// The APIC IDs of the present vCPUs, in index order.
    pub fn present_apic_ids(&self) -> Vec<u32> {
        self.vcpus
            .present_vcpus()
            .iter()
            .map(|v| v.apic_id)
            .collect()
    }

    /// Starts the boot vCPUs and waits until every one reported online. Returns how long it
    /// took.
    pub fn start(&self, timeout: Duration) -> Result<Duration, IntegrationError> {
        let t = Instant::now();
        self.vcpus.start_boot_vcpus()?;
        self.agent.wait_online(&self.present_apic_ids(), timeout)?;
        Ok(t.elapsed())
    }

    /// What the vCPU with APIC ID `apic_id` read from CPUID.
    pub fn cpuid_results(&self, apic_id: u32) -> Result<Vec<CpuidResult>, IntegrationError> {
        self.agent.cpuid_results(apic_id, &self.queries)
    }
}
