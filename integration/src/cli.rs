//! What `vcpuctl` does, as functions the binary calls (and tests can call too).
//!
//! Exit codes of `vcpuctl`: see [`ExitCode`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raw_cpuid::{CpuId, CpuIdReader, CpuIdResult, TopologyType};
use serde::Serialize;
use topology::hwloc::{topology_queries, write_hwloc_dump_results, CpuidResult};
use topology::SmpConfig;
use vcpu_actor::VcpuMetricsSnapshot;
use vmm_core::{VcpuConfig, VcpuManagerOptions, VmOptions, VmStopReason, VmmError};
use vpmu::VpmuFeatureLevel;

use crate::guest::GuestVm;
use crate::probe::{cpuid_probe, read_results, request_guest_shutdown, write_queries};
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

/// A CPUID source that answers from what guest code read (zeros for what it did not ask).
#[derive(Clone)]
struct GuestRead(Arc<Vec<CpuidResult>>);

impl CpuIdReader for GuestRead {
    fn cpuid2(&self, eax: u32, ecx: u32) -> CpuIdResult {
        // Leaves without subleaves were read with ECX = 0.
        let hit = self
            .0
            .iter()
            .find(|r| r.leaf == eax && r.subleaf == ecx)
            .or_else(|| self.0.iter().find(|r| r.leaf == eax && r.subleaf == 0));
        hit.map_or(
            CpuIdResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
            |r| CpuIdResult {
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
            },
        )
    }
}

/// Decodes a vCPU's location with `raw-cpuid` from the leaves guest code read: leaf 0x1F if
/// present (it has the die level), else leaf 0xB. `None` if neither has a topology.
pub fn decode_location(read: &[CpuidResult]) -> Option<GuestLocation> {
    let cpuid = CpuId::with_cpuid_reader(GuestRead(Arc::new(read.to_vec())));
    let levels: Vec<(TopologyType, u32, u32)> = cpuid
        .get_extended_topology_info_v2()
        .map(|it| it.collect::<Vec<_>>())
        .filter(|l| !l.is_empty())
        .or_else(|| cpuid.get_extended_topology_info().map(|it| it.collect()))?
        .iter()
        .map(|l| {
            (
                l.level_type(),
                l.shift_right_for_next_apic_id(),
                l.x2apic_id(),
            )
        })
        .collect();
    let x2apic_id = levels.first()?.2;
    let shift_of = |t: TopologyType| levels.iter().find(|l| l.0 == t).map(|l| l.1);
    let smt = shift_of(TopologyType::SMT).unwrap_or(0);
    let core = shift_of(TopologyType::Core).unwrap_or(smt);
    let die = shift_of(TopologyType::Die).unwrap_or(core);
    let field = |lo: u32, hi: u32| (x2apic_id >> lo) & ((1u32 << (hi - lo)) - 1);
    Some(GuestLocation {
        x2apic_id,
        socket: x2apic_id >> die,
        die: field(core, die),
        core: field(smt, core),
        thread: field(0, smt),
    })
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

/// A VM running the CPUID probe guest.
pub struct ProbeVm {
    /// The VM and its vCPUs.
    pub guest: GuestVm,
    /// The queries the vCPUs execute.
    pub queries: Vec<(u32, u32)>,
}

impl ProbeVm {
    /// Builds the VM with `boot` vCPUs running the probe, starts them and waits until every
    /// one has read its CPUID.
    pub fn boot(kvm: kvm_ioctls::Kvm, spec: &VmSpec, boot: u32) -> Result<Self, CliError> {
        let options = VcpuManagerOptions {
            logger: spec.logger.clone(),
            ..VcpuManagerOptions::default()
        };
        let vm_options = VmOptions {
            memory_size: spec.memory_mib << 20,
            logger: spec.logger.clone(),
            ..VmOptions::default()
        };
        let guest = GuestVm::create(
            kvm,
            cpuid_probe(),
            spec.vcpu_config(boot),
            vm_options,
            options,
        )?;
        let queries = topology_queries(&guest.vcpus.vcpu_cpuid(0)?);
        write_queries(guest.vm.memory(), &queries)?;
        guest.vcpus.start_boot_vcpus()?;
        let probe = Self { guest, queries };
        probe.wait_reports(boot as usize)?;
        Ok(probe)
    }

    /// Waits until `n` vCPUs reported.
    pub fn wait_reports(&self, n: usize) -> Result<(), CliError> {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        while self.guest.reports.complete() < n {
            if Instant::now() > deadline {
                return Err(IntegrationError::Guest(format!(
                    "only {} of {n} vCPUs reported their CPUID within {GUEST_TIMEOUT:?}",
                    self.guest.reports.complete()
                ))
                .into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// What each present vCPU's guest code read, decoded.
    pub fn views(&self) -> Result<Vec<VcpuCpuidView>, CliError> {
        let reports = self.guest.reports.reports();
        let mut views = Vec::new();
        for v in self.guest.vcpus.present_vcpus() {
            let registers = read_results(self.guest.vm.memory(), v.apic_id, &self.queries)?;
            let report = reports.iter().find(|r| r.vcpu_id == v.apic_id);
            views.push(VcpuCpuidView {
                index: v.index,
                apic_id: v.apic_id,
                leaf1_apic_id: report.and_then(|r| r.leaf1_apic_id()),
                location: decode_location(&registers),
                registers,
            });
        }
        Ok(views)
    }
}

/// `vcpuctl cpuid`: boots every possible vCPU, returns what each read; writes hwloc dumps.
pub fn cpuid(spec: &VmSpec, hwloc_dir: Option<&PathBuf>) -> Result<Vec<VcpuCpuidView>, CliError> {
    let kvm = open_kvm()?;
    let mut probe = ProbeVm::boot(kvm, spec, spec.smp.max_cpus)?;
    let views = probe.views()?;
    if let Some(dir) = hwloc_dir {
        let per_cpu: Vec<Vec<CpuidResult>> = views.iter().map(|v| v.registers.clone()).collect();
        write_hwloc_dump_results(dir, &per_cpu).map_err(|e| CliError {
            code: ExitCode::Failure,
            message: format!("writing hwloc dumps to {}: {e}", dir.display()),
        })?;
    }
    probe.guest.vcpus.exit_all()?;
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
    /// The APIC IDs of the present vCPUs afterwards.
    pub present_apic_ids: Vec<u32>,
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

fn wait_all_advanced(guest: &GuestVm, before: &[u64]) -> Result<Vec<u64>, CliError> {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let now = guest.counters();
        if now.iter().zip(before).all(|(n, b)| n > b) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err(IntegrationError::Guest(format!(
                "guest counters did not all advance within {GUEST_TIMEOUT:?}: {before:?} -> {now:?}"
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
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
    out.line(format!(
        "booting {} of {} vCPUs (CPUID probe guest)...",
        smp.boot_cpus, smp.max_cpus
    ));
    let mut probe = ProbeVm::boot(kvm, spec, smp.boot_cpus)?;
    let boot_vcpus = probe.views()?;
    out.line("what guest code read from CPUID, decoded with raw-cpuid:");
    out.line(location_table(&boot_vcpus));

    // Pause and resume, with proof from the guests' own counters.
    let guest = &probe.guest;
    wait_all_advanced(guest, &vec![0; guest.counters().len()])?;
    let t = Instant::now();
    guest.vcpus.pause_all()?;
    let pause = t.elapsed();
    let counters_paused = guest.counters();
    std::thread::sleep(Duration::from_millis(50));
    let counters_still = guest.counters();
    let t = Instant::now();
    guest.vcpus.resume_all()?;
    let resume = t.elapsed();
    let counters_resumed = wait_all_advanced(guest, &counters_still)?;
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

    let resize = crate::hotplug_demo::demo_resize(&mut probe, spec, out)?;

    // The counters end with the vCPUs' threads: read them while the vCPUs are present.
    let metrics: Vec<VcpuMetricsSnapshot> = probe
        .guest
        .vcpus
        .vcpu_metrics()
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    out.line("guest asks to shut down (BSP writes the shutdown port at CPL 3)...");
    request_guest_shutdown(probe.guest.vm.memory())?;
    let stop: VmStopReason = probe.guest.vcpus.run_until_exit()?;
    out.line(format!("VM stopped through the exit event: {stop}"));
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
