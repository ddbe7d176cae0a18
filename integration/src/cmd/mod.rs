//! `vcpuctl`, one module per subcommand ([`demo`], [`cpuid`], [`bench`](mod@bench),
//! [`boot`], [`chaos`], [`acpi`], [`snapshot`](mod@snapshot), [`restore`](mod@restore),
//! [`fingerprint`]), and what they share: the VM options ([`VmSpec`]), progress output ([`Out`]) and
//! the exit codes ([`ExitCode`], [`CliError`]). `src/bin/vcpuctl.rs` parses the arguments and dispatches here.

pub mod acpi;
pub mod bench;
pub mod boot;
pub mod chaos;
pub mod cpuid;
pub mod demo;
pub mod fingerprint;
pub mod restore;
pub mod snapshot;

use std::time::{Duration, Instant};

use topology::SmpConfig;
use vmm_core::{
    ConfigError, CpuTemplate, PmuError, VcpuAffinity, VcpuConfig, VcpuManagerOptions, VmError,
    VmmError,
};
use vpmu::VpmuFeatureLevel;

use crate::guest::agent::{AgentVm, AgentVmOptions, ApMode};
use crate::IntegrationError;

/// How long a guest may take to do what it was asked before we give up (generous: CPL-0 code
/// is emulated on PVM hosts).
pub(crate) const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `vcpuctl`'s exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// Something else failed (the message says what).
    Failure = 1,
    /// Bad arguments, e.g. an `--smp` that cannot be (clap uses 2 as well).
    Usage = 2,
    /// `/dev/kvm` is missing or not accessible.
    NoKvm = 3,
    /// This host's KVM lacks a capability or vPMU level the configuration needs.
    HostLacks = 4,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// The exit code.
    pub code: ExitCode,
    /// What to tell the person.
    pub message: String,
}

impl CliError {
    pub(crate) fn usage(message: String) -> Self {
        Self {
            code: ExitCode::Usage,
            message,
        }
    }
}

impl From<IntegrationError> for CliError {
    fn from(e: IntegrationError) -> Self {
        let code = match &e {
            IntegrationError::Vmm(v) => vmm_exit_code(v),
            IntegrationError::KvmOpen(_) | IntegrationError::Kvm { .. } => ExitCode::NoKvm,
            IntegrationError::Guest(_) => ExitCode::Failure,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

impl From<topology::TopologyError> for CliError {
    fn from(e: topology::TopologyError) -> Self {
        Self::usage(e.to_string())
    }
}

/// `?` on a VMM error (the umbrella or one operation's enum) maps it to its exit code.
impl From<VmmError> for CliError {
    fn from(e: VmmError) -> Self {
        IntegrationError::Vmm(e).into()
    }
}

crate::from_each_vmm_error!(CliError);

fn vmm_exit_code(e: &VmmError) -> ExitCode {
    match e {
        VmmError::Vm(VmError::KvmOpen(_)) => ExitCode::NoKvm,
        VmmError::Pmu(PmuError::MissingKvmCapability { .. })
        | VmmError::Config(ConfigError::VpmuUnsupported { .. }) => ExitCode::HostLacks,
        VmmError::Config(_)
        | VmmError::Topology(_)
        | VmmError::Vm(VmError::InvalidMemorySize { .. }) => ExitCode::Usage,
        _ => ExitCode::Failure,
    }
}

/// Opens `/dev/kvm`, with an error a person can act on (exit code 3).
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, CliError> {
    Ok(crate::open_kvm()?)
}

/// The options every subcommand that boots vCPUs takes.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// vCPU counts and topology.
    pub smp: SmpConfig,
    /// The vPMU level.
    pub vpmu: VpmuFeatureLevel,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Logger for the VMM.
    pub logger: slog::Logger,
    /// The CPU template every vCPU gets (`--template`).
    pub template: Option<CpuTemplate>,
    /// Host CPUs per vCPU index (`--vcpu-affinity`).
    pub vcpu_affinity: VcpuAffinity,
}

impl VmSpec {
    /// A spec with no template and no affinity.
    pub fn new(
        smp: SmpConfig,
        vpmu: VpmuFeatureLevel,
        memory_mib: u64,
        logger: slog::Logger,
    ) -> Self {
        Self {
            smp,
            vpmu,
            memory_mib,
            logger,
            template: None,
            vcpu_affinity: VcpuAffinity::new(),
        }
    }

    /// The vCPU config, with `boot` vCPUs at start (and the spec's template and affinity).
    pub fn vcpu_config(&self, boot: u32) -> VcpuConfig {
        VcpuConfig {
            boot_vcpu_count: boot,
            max_vcpu_count: self.smp.max_cpus,
            topology: self.smp.topology,
            vpmu: self.vpmu,
            template: self.template.clone(),
            vcpu_affinity: self.vcpu_affinity.clone(),
        }
    }

    /// The guest agent's VM options for this spec, with APs in `mode`.
    pub(crate) fn agent_options(&self, mode: ApMode) -> AgentVmOptions {
        AgentVmOptions {
            memory_size: self.memory_mib << 20,
            ap_mode: mode,
            manager: VcpuManagerOptions {
                logger: self.logger.clone(),
                ..VcpuManagerOptions::default()
            },
        }
    }
}

/// Creates the guest agent's VM with the spec's boot vCPUs (APs counting) and starts it,
/// with a progress line while it boots.
pub(crate) fn boot_counting_agent(
    kvm: kvm_ioctls::Kvm,
    spec: &VmSpec,
    out: &Out,
) -> Result<AgentVm, CliError> {
    let boot = spec.smp.boot_cpus;
    let vm = AgentVm::create(
        kvm,
        spec.vcpu_config(boot),
        spec.agent_options(ApMode::Count),
    )?;
    {
        let _p = out.progress(format!("booting {boot} vCPUs of the agent guest"));
        vm.start(GUEST_TIMEOUT)?;
    }
    Ok(vm)
}

/// Progress and result lines of the demo (to stdout, or stderr with `--json`).
#[derive(Debug)]
pub struct Out {
    json: bool,
}

impl Out {
    /// Human output to stdout unless `json`, where it goes to stderr.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// Prints one line.
    pub fn line(&self, s: impl AsRef<str>) {
        if self.json {
            eprintln!("{}", s.as_ref());
        } else {
            println!("{}", s.as_ref());
        }
    }

    /// Announces a step (`<what>...`) and, while the returned guard lives, prints a progress
    /// line on stderr every second (`  ... <what>: 3 s`), so that nothing over a second runs
    /// silently.
    pub fn progress(&self, what: impl Into<String>) -> Progress {
        let what = what.into();
        self.line(format!("{what}..."));
        let (stop, ticks) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("vcpuctl-progress".into())
            .spawn(move || {
                let start = Instant::now();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    ticks.recv_timeout(Duration::from_secs(1))
                {
                    eprintln!("  ... {what}: {} s", start.elapsed().as_secs());
                }
            })
            .ok();
        Progress {
            stop: Some(stop),
            thread,
        }
    }
}

/// A step in progress (see [`Out::progress`]); dropping it ends the progress lines.
#[derive(Debug)]
pub struct Progress {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Dropping the sender wakes the ticker at once.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError {
        code: ExitCode::Failure,
        message: format!("cannot write JSON: {e}"),
    })?;
    println!("{text}");
    Ok(())
}

/// Microseconds.
pub(crate) fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Milliseconds.
pub(crate) fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
