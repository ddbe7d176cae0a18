//! What `vcpuctl` does, as functions the binary calls (and tests can call too).
//!
//! Exit codes of `vcpuctl`: see [`ExitCode`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use topology::hwloc::{write_hwloc_dump_results, CpuidResult};
use topology::SmpConfig;
use vcpu_actor::VcpuMetricsSnapshot;
use vmm_core::{VcpuConfig, VcpuManagerOptions, VmOptions, VmStopReason, VmmError};
use vpmu::VpmuFeatureLevel;

use crate::agent::{
    attach_upcall, AgentUpcallOptions, AgentVm, AgentVmOptions, ApMode, GuestAgent,
};
use crate::IntegrationError;

/// How long a guest may take to do what it was asked before we give up (generous: CPL-0 code
/// is emulated on PVM hosts).
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

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
    fn usage(message: String) -> Self {
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
            IntegrationError::Kvm { .. } => ExitCode::NoKvm,
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

impl From<VmmError> for CliError {
    fn from(e: VmmError) -> Self {
        IntegrationError::Vmm(e).into()
    }
}

fn vmm_exit_code(e: &VmmError) -> ExitCode {
    match e {
        VmmError::KvmOpen(_) => ExitCode::NoKvm,
        VmmError::MissingKvmCapability { .. } | VmmError::VpmuUnsupported { .. } => {
            ExitCode::HostLacks
        }
        VmmError::ZeroBootVcpus
        | VmmError::BootExceedsMax { .. }
        | VmmError::MaxVcpusOverKvmLimit { .. }
        | VmmError::ApicIdOverKvmLimit { .. }
        | VmmError::TopologyMismatch { .. }
        | VmmError::Topology(_)
        | VmmError::ApicIdTooLargeForInterruptMode { .. }
        | VmmError::InvalidMemorySize { .. } => ExitCode::Usage,
        _ => ExitCode::Failure,
    }
}

/// Opens `/dev/kvm`, with an error a person can act on.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, CliError> {
    kvm_ioctls::Kvm::new().map_err(|e| CliError {
        code: ExitCode::NoKvm,
        message: format!(
            "cannot open /dev/kvm: {e}. Is KVM enabled on this host (modprobe kvm_intel or \
             kvm_amd) and is your user allowed to use it (the kvm group, or root)?"
        ),
    })
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
}

impl VmSpec {
    /// The vCPU config, with `boot` vCPUs at start.
    pub fn vcpu_config(&self, boot: u32) -> VcpuConfig {
        VcpuConfig {
            boot_vcpu_count: boot,
            max_vcpu_count: self.smp.max_cpus,
            topology: self.smp.topology,
            vpmu: self.vpmu,
        }
    }
}

/// A location as decoded by `raw-cpuid` from what guest code read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GuestLocation {
    /// x2APIC ID (leaf 0xB/0x1F EDX).
    pub x2apic_id: u32,
    /// Package.
    pub socket: u32,
    /// Die within the package (0 when the guest sees no die level).
    pub die: u32,
    /// Core within the die.
    pub core: u32,
    /// Thread within the core.
    pub thread: u32,
}

/// Decodes a vCPU's location with `raw-cpuid` from the leaves guest code read: leaf 0x1F if
/// it has levels (it has the die level), else leaf 0xB ([`crate::cpuid_view`]). `None` if
/// neither has a topology. Whatever the guest wrote, this does not panic.
pub fn decode_location(read: &[CpuidResult]) -> Option<GuestLocation> {
    let l = crate::cpuid_view::decode_location(read).ok()?;
    Some(GuestLocation {
        x2apic_id: l.x2apic_id,
        socket: l.socket,
        die: l.die,
        core: l.core,
        thread: l.thread,
    })
}

impl VcpuCpuidView {
    /// The view of vCPU `index` (APIC ID `apic_id`) from what its guest code read.
    pub fn new(index: u32, apic_id: u32, registers: Vec<CpuidResult>) -> Self {
        Self {
            index,
            apic_id,
            leaf1_apic_id: registers
                .iter()
                .find(|r| r.leaf == 1 && r.subleaf == 0)
                .map(|r| r.ebx >> 24),
            location: decode_location(&registers),
            registers,
        }
    }
}

/// What one vCPU's guest code read and what it means.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuCpuidView {
    /// vCPU index.
    pub index: u32,
    /// APIC ID (= KVM vCPU id) the VMM gave it.
    pub apic_id: u32,
    /// The APIC ID in leaf 0x1 EBX\[31:24\] as the guest read it.
    pub leaf1_apic_id: Option<u32>,
    /// Decoded by `raw-cpuid` from what the guest read.
    pub location: Option<GuestLocation>,
    /// Every (leaf, subleaf) the guest executed, with its result.
    pub registers: Vec<CpuidResult>,
}

/// The agent VM options for `spec` with APs in `mode`.
fn agent_options(spec: &VmSpec, mode: ApMode) -> AgentVmOptions {
    AgentVmOptions {
        memory_size: spec.memory_mib << 20,
        ap_mode: mode,
        manager: VcpuManagerOptions {
            logger: spec.logger.clone(),
            ..VcpuManagerOptions::default()
        },
    }
}

/// What the present vCPUs of `vm` read from CPUID (those in `only`, if given), by index.
pub fn agent_views(vm: &AgentVm, only: Option<&[u32]>) -> Result<Vec<VcpuCpuidView>, CliError> {
    let mut views = Vec::new();
    for v in vm.vcpus.present_vcpus() {
        if only.is_some_and(|ids| !ids.contains(&v.apic_id)) {
            continue;
        }
        views.push(VcpuCpuidView::new(
            v.index,
            v.apic_id,
            vm.cpuid_results(v.apic_id)?,
        ));
    }
    Ok(views)
}

/// `vcpuctl cpuid`: boots every possible vCPU of the guest agent (APs halt once they read
/// their CPUID), returns what each read and writes hwloc dumps of it to `hwloc_dir`.
pub fn cpuid(spec: &VmSpec, hwloc_dir: Option<&PathBuf>) -> Result<Vec<VcpuCpuidView>, CliError> {
    let kvm = open_kvm()?;
    let mut vm = AgentVm::create(
        kvm,
        spec.vcpu_config(spec.smp.max_cpus),
        agent_options(spec, ApMode::Halt),
    )?;
    vm.start(GUEST_TIMEOUT)?;
    let views = agent_views(&vm, None)?;
    if let Some(dir) = hwloc_dir {
        let per_cpu: Vec<Vec<CpuidResult>> = views.iter().map(|v| v.registers.clone()).collect();
        write_hwloc_dump_results(dir, &per_cpu).map_err(|e| CliError {
            code: ExitCode::Failure,
            message: format!("writing hwloc dumps to {}: {e}", dir.display()),
        })?;
    }
    vm.vcpus.exit_all()?;
    Ok(views)
}

/// The demo's record of one pause or resume.
#[derive(Clone, Debug, Serialize)]
pub struct PauseResumeStep {
    /// `pause_all` latency.
    pub pause_us: f64,
    /// Guest counters right after the pause.
    pub counters_paused: Vec<u64>,
    /// Guest counters 50 ms later (equal: the guests stopped).
    pub counters_still: Vec<u64>,
    /// `resume_all` latency.
    pub resume_us: f64,
    /// Guest counters once every one advanced again.
    pub counters_resumed: Vec<u64>,
}

/// The demo's record of one resize.
#[derive(Clone, Debug, Serialize)]
pub struct ResizeStep {
    /// From this many vCPUs.
    pub from: u32,
    /// To this many.
    pub to: u32,
    /// Request to reply (and, when growing, every new vCPU running guest code).
    pub latency_ms: f64,
    /// The part spent creating/configuring/starting (or exiting) vCPU threads.
    pub vcpu_work_ms: f64,
    /// The part spent in the upcall round trip (the guest acting on the CPUs).
    pub upcall_ms: f64,
    /// The APIC IDs of the present vCPUs afterwards.
    pub present_apic_ids: Vec<u32>,
    /// The APIC IDs the guest's BSP sent INIT/SIPI to during this step.
    pub woken_by_guest: Vec<u32>,
    /// The APIC IDs the guest's BSP parked (INIT) during this step.
    pub parked_by_guest: Vec<u32>,
    /// What the added vCPUs' guest code read from CPUID.
    pub added: Vec<VcpuCpuidView>,
    /// Progress counters of the added vCPUs once each had moved (they run guest code).
    pub added_counters: Vec<u64>,
    /// Progress counters of the removed vCPUs (by APIC ID) after the step, and 50 ms later
    /// (equal: they stopped).
    pub removed_counters: [Vec<u64>; 2],
    /// APIC IDs whose KVM vCPU fd is kept for reuse afterwards.
    pub kept_fds: Vec<u32>,
}

/// Everything `vcpuctl demo` shows, for `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    /// The `-smp` configuration.
    pub smp: String,
    /// The vPMU level.
    pub vpmu: String,
    /// APIC ID of every possible vCPU, by index.
    pub apic_ids: Vec<u32>,
    /// What the boot vCPUs read.
    pub boot_vcpus: Vec<VcpuCpuidView>,
    /// Pause and resume of all vCPUs.
    pub pause_resume: PauseResumeStep,
    /// Hotplug steps.
    pub resize: Vec<ResizeStep>,
    /// Why the VM stopped.
    pub stop: String,
    /// The stopping vCPU's APIC ID.
    pub stop_vcpu_id: Option<u32>,
    /// Per-vCPU metrics at the end.
    pub metrics: Vec<VcpuMetricsSnapshot>,
}

/// Progress and result lines of the demo (to stdout, or stderr with `--json`).
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

/// A table of index, APIC IDs and decoded location per vCPU.
pub fn location_table(views: &[VcpuCpuidView]) -> String {
    let mut s = String::from("  index  APIC ID  leaf1 ID  socket  die  core  thread\n");
    for v in views {
        let opt = |x: Option<u32>| x.map_or("-".to_string(), |x| x.to_string());
        let l = v.location;
        s.push_str(&format!(
            "  {:>5}  {:>7}  {:>8}  {:>6}  {:>3}  {:>4}  {:>6}\n",
            v.index,
            opt(l.map(|l| l.x2apic_id)),
            opt(v.leaf1_apic_id),
            opt(l.map(|l| l.socket)),
            opt(l.map(|l| l.die)),
            opt(l.map(|l| l.core)),
            opt(l.map(|l| l.thread)),
        ));
    }
    s
}

/// Waits until every counter of `apic_ids` is above its value in `before`.
fn wait_all_advanced(
    agent: &GuestAgent,
    apic_ids: &[u32],
    before: &[u64],
) -> Result<Vec<u64>, CliError> {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let now = agent.progress_of(apic_ids);
        if now.iter().zip(before).all(|(n, b)| n > b) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err(IntegrationError::Guest(format!(
                "the progress counters of APIC IDs {apic_ids:?} did not all advance within \
                 {GUEST_TIMEOUT:?}: {before:?} -> {now:?}"
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The demo's resize steps: to the maximum, then back to 3, over upcall; the guest agent wakes
/// the new vCPUs (INIT/SIPI from the BSP) and parks the removed ones (INIT) as a guest kernel
/// would, before their threads are exited.
fn demo_resize(vm: &mut AgentVm, spec: &VmSpec, out: &Out) -> Result<Vec<ResizeStep>, CliError> {
    let _upcall = attach_upcall(
        vm,
        AgentUpcallOptions {
            logger: spec.logger.clone(),
            ..AgentUpcallOptions::default()
        },
    )?;
    let max = spec.smp.max_cpus;
    let mut steps = Vec::new();
    for target in [max, 3.min(max)] {
        let from = vm.vcpus.present_vcpu_count();
        if target == from {
            continue;
        }
        let woken_before = vm.agent.woken_apic_ids().len();
        let parked_before = vm.agent.parked_apic_ids();
        let outcome = {
            let _p = out.progress(format!("resize {from} -> {target} vCPUs over upcall"));
            vm.vcpus.resize_vcpus(target)?
        };
        let present = vm.present_apic_ids();
        out.line(format!(
            "  done in {:.1} ms (vCPU threads {:.1} ms, upcall round trip {:.1} ms); present \
             APIC IDs {present:?}",
            millis(outcome.total),
            millis(outcome.vcpu_work),
            millis(outcome.upcall),
        ));
        let woken: Vec<u32> = vm.agent.woken_apic_ids()[woken_before..].to_vec();
        let parked: Vec<u32> = vm
            .agent
            .parked_apic_ids()
            .into_iter()
            .filter(|id| !parked_before.contains(id))
            .collect();
        let added_ids: Vec<u32> = outcome.added.iter().map(|s| s.apic_id).collect();
        let mut removed_ids: Vec<u32> = outcome.removed.iter().map(|s| s.apic_id).collect();
        removed_ids.sort_unstable();
        let mut step = ResizeStep {
            from,
            to: target,
            latency_ms: millis(outcome.total),
            vcpu_work_ms: millis(outcome.vcpu_work),
            upcall_ms: millis(outcome.upcall),
            present_apic_ids: present,
            woken_by_guest: woken,
            parked_by_guest: parked,
            added: Vec::new(),
            added_counters: Vec::new(),
            removed_counters: [Vec::new(), Vec::new()],
            kept_fds: Vec::new(),
        };
        if !added_ids.is_empty() {
            step.added = agent_views(vm, Some(&added_ids))?;
            step.added_counters =
                wait_all_advanced(&vm.agent, &added_ids, &vec![0; added_ids.len()])?;
            out.line(format!(
                "  the guest's BSP sent INIT/SIPI to {:?}; what their guest code read:",
                step.woken_by_guest
            ));
            out.line(location_table(&step.added).trim_end());
            out.line(format!(
                "  their progress counters (they run guest code): {:?}",
                step.added_counters
            ));
        }
        if !removed_ids.is_empty() {
            let first = vm.agent.progress_of(&removed_ids);
            std::thread::sleep(Duration::from_millis(50));
            let second = vm.agent.progress_of(&removed_ids);
            out.line(format!(
                "  the guest parked {:?} (INIT from its BSP) before their threads were exited; \
                 their counters {first:?}, 50 ms later {second:?} ({})",
                step.parked_by_guest,
                if first == second {
                    "stopped"
                } else {
                    "STILL MOVING"
                }
            ));
            step.removed_counters = [first, second];
        }
        step.kept_fds = vm.vcpus.kept_vcpu_fds();
        if !step.kept_fds.is_empty() {
            out.line(format!(
                "  KVM vCPU fds kept for reuse (KVM cannot destroy a vCPU): APIC IDs {:?}",
                step.kept_fds
            ));
        }
        steps.push(step);
    }
    Ok(steps)
}

/// `vcpuctl demo`.
pub fn demo(spec: &VmSpec, out: &Out) -> Result<DemoReport, CliError> {
    let smp = &spec.smp;
    let topo = smp.topology;
    let apic_ids = topo
        .apic_ids()
        .map_err(|e| CliError::usage(e.to_string()))?;
    out.line(format!(
        "config: -smp {smp}  vpmu={}  memory={} MiB",
        spec.vpmu, spec.memory_mib
    ));
    out.line(format!(
        "  topology {topo}; APIC IDs by vCPU index: {apic_ids:?}"
    ));
    let kvm = open_kvm()?;
    let mut vm = {
        let _p = out.progress(format!(
            "booting {} of {} vCPUs (guest agent; the BSP wakes the APs with INIT/SIPI)",
            smp.boot_cpus, smp.max_cpus
        ));
        let vm = AgentVm::create(
            kvm,
            spec.vcpu_config(smp.boot_cpus),
            agent_options(spec, ApMode::Count),
        )?;
        let took = vm.start(GUEST_TIMEOUT)?;
        out.line(format!(
            "  every boot vCPU read its CPUID and reported in {:.1} ms",
            millis(took)
        ));
        vm
    };
    let boot_vcpus = agent_views(&vm, None)?;
    out.line("what guest code read from CPUID, decoded with raw-cpuid:");
    out.line(location_table(&boot_vcpus).trim_end());

    // Pause and resume, with proof from the guests' own progress counters.
    let ids = vm.present_apic_ids();
    wait_all_advanced(&vm.agent, &ids, &vec![0; ids.len()])?;
    let t = Instant::now();
    vm.vcpus.pause_all()?;
    let pause = t.elapsed();
    let counters_paused = vm.agent.progress_of(&ids);
    std::thread::sleep(Duration::from_millis(50));
    let counters_still = vm.agent.progress_of(&ids);
    let t = Instant::now();
    vm.vcpus.resume_all()?;
    let resume = t.elapsed();
    let counters_resumed = wait_all_advanced(&vm.agent, &ids, &counters_still)?;
    out.line(format!(
        "pause all: {:.0} us; counters {counters_paused:?}, 50 ms later {counters_still:?} ({})",
        micros(pause),
        if counters_paused == counters_still {
            "stopped"
        } else {
            "STILL MOVING"
        }
    ));
    out.line(format!(
        "resume all: {:.0} us; counters advanced to {counters_resumed:?}",
        micros(resume)
    ));
    let pause_resume = PauseResumeStep {
        pause_us: micros(pause),
        counters_paused,
        counters_still,
        resume_us: micros(resume),
        counters_resumed,
    };

    let resize = demo_resize(&mut vm, spec, out)?;

    // The counters end with the vCPUs' threads: read them while the vCPUs are present.
    let metrics: Vec<VcpuMetricsSnapshot> = vm
        .vcpus
        .vcpu_metrics()
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    out.line("the guest asks to shut down (its BSP writes the shutdown port at CPL 3)...");
    vm.agent.request_shutdown()?;
    let stop: VmStopReason = vm
        .vcpus
        .wait_for_exit(Some(GUEST_TIMEOUT))?
        .ok_or_else(|| {
            IntegrationError::Guest(format!(
                "the guest did not stop the VM within {GUEST_TIMEOUT:?} of being asked"
            ))
        })?;
    out.line(format!("VM stopped, seen through the exit event: {stop}"));
    out.line("per-vCPU metrics:");
    out.line("  vCPU  io_in  io_out  mmio_r  mmio_w  eintr  eagain  pauses  resumes  run ms");
    for m in &metrics {
        out.line(format!(
            "  {:>4}  {:>5}  {:>6}  {:>6}  {:>6}  {:>5}  {:>6}  {:>6}  {:>7}  {:>6.1}",
            m.vcpu_id,
            m.exits.io_in,
            m.exits.io_out,
            m.exits.mmio_read,
            m.exits.mmio_write,
            m.exits.eintr,
            m.exits.eagain,
            m.pauses,
            m.resumes,
            m.run_time_ns as f64 / 1e6
        ));
    }
    Ok(DemoReport {
        smp: smp.to_string(),
        vpmu: spec.vpmu.to_string(),
        apic_ids,
        boot_vcpus,
        pause_resume,
        resize,
        stop: stop.to_string(),
        stop_vcpu_id: stop.vcpu_id,
        metrics,
    })
}

/// A writer that forwards to a shared writer (the console of `vcpuctl boot`).
struct SharedWriter<W: std::io::Write + Send>(Arc<std::sync::Mutex<W>>);

impl<W: std::io::Write + Send> std::io::Write for SharedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.write(buf)?;
        w.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// `vcpuctl boot`: boots a Linux kernel (bzImage or ELF vmlinux) with every possible vCPU in
/// the MP table, the console going to `console`, until the VM stops.
pub fn boot_linux<W: std::io::Write + Send + 'static>(
    spec: &VmSpec,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    console: Arc<std::sync::Mutex<W>>,
) -> Result<VmStopReason, CliError> {
    use vmm_core::boot::{load_linux, mp_cpus, LinuxBootConfig};
    let kvm = open_kvm()?;
    let config = spec.vcpu_config(spec.smp.boot_cpus);
    let vm_options = VmOptions {
        memory_size: spec.memory_mib << 20,
        serial_output: Box::new(SharedWriter(console)),
        logger: spec.logger.clone(),
        ..VmOptions::default()
    };
    let options = VcpuManagerOptions {
        logger: spec.logger.clone(),
        ..VcpuManagerOptions::default()
    };
    let (vm, mut vcpus) = vmm_core::build_vm(kvm, vm_options, config.clone(), options)?;
    let mut boot = LinuxBootConfig::new(kernel);
    boot.initrd = initrd.map(|p| p.to_path_buf());
    boot.cmdline = cmdline.to_owned();
    boot.logger = spec.logger.clone();
    let entry = load_linux(vm.memory(), &boot, &mp_cpus(&config)?)?;
    vcpus.create_boot_vcpus(Arc::new(entry))?;
    vcpus.start_boot_vcpus()?;
    Ok(vcpus.run_until_exit()?)
}
