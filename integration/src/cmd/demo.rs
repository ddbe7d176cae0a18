//! `vcpuctl demo`: boot vCPUs of the guest agent, show what the guest reads from CPUID,
//! pause/resume all with proof from the guests' counters, hotplug over upcall or ACPI
//! (`--hotplug upcall|acpi`), stop.

use std::time::{Duration, Instant};

use serde::Serialize;
use vcpu_actor::VcpuMetricsSnapshot;
use vmm_core::VmStopReason;

use super::cpuid::{agent_views, location_table, VcpuCpuidView};
use super::{micros, millis, open_kvm, print_json, CliError, ExitCode, Out, VmSpec, GUEST_TIMEOUT};
use crate::guest::agent::{
    attach_acpi, attach_upcall, AgentAcpiOptions, AgentUpcallOptions, AgentVm, ApMode, GuestAgent,
};

pub use crate::guest::agent::HotplugChannel;
use crate::IntegrationError;

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

/// What the vCPUs one resize added did, once running.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AddedVcpus {
    /// What each added vCPU's guest code read from CPUID leaf 0xB EDX (its x2APIC ID), in
    /// the order of `added`: equal to the APIC IDs the VMM gave them.
    pub guest_reported_apic_ids: Vec<u32>,
    /// What the added vCPUs' guest code read from CPUID.
    pub added: Vec<VcpuCpuidView>,
    /// Progress counters of the added vCPUs once each had moved (they run guest code).
    pub added_counters: Vec<u64>,
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
    /// The part spent in the guest round trip (upcall or ACPI: the guest acting on the CPUs).
    pub upcall_ms: f64,
    /// The hotplug channel (`upcall` or `acpi`).
    pub hotplug: HotplugChannel,
    /// The APIC IDs of the present vCPUs afterwards.
    pub present_apic_ids: Vec<u32>,
    /// The APIC IDs the guest's BSP sent INIT/SIPI to during this step.
    pub woken_by_guest: Vec<u32>,
    /// The APIC IDs the guest's BSP parked (INIT) during this step.
    pub parked_by_guest: Vec<u32>,
    /// What the added vCPUs did (empty when shrinking).
    #[serde(flatten)]
    pub added: AddedVcpus,
    /// Progress counters of the removed vCPUs (by APIC ID) after the step, and 50 ms later
    /// (equal: they stopped).
    pub removed_counters: [Vec<u64>; 2],
    /// APIC IDs whose KVM vCPU fd is kept for reuse afterwards.
    pub kept_fds: Vec<u32>,
}

/// One vCPU thread the demo ran, and its seccomp mode as the kernel shows it.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuThreadReport {
    /// The vCPU's APIC ID.
    pub apic_id: u32,
    /// The thread's Linux thread id.
    pub tid: i32,
    /// `Seccomp:` of `/proc/self/task/TID/status`: 0 none, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    /// The same as a word: `disabled`, `strict` or `filter`.
    pub seccomp_mode_name: String,
}

/// The `Seccomp:` line of thread `tid` of this process (0 none, 1 strict, 2 filter).
fn thread_seccomp_mode(tid: i32) -> Result<u32, CliError> {
    let path = format!("/proc/self/task/{tid}/status");
    let failure = |message| CliError {
        code: ExitCode::Failure,
        message,
    };
    let status = std::fs::read_to_string(&path)
        .map_err(|e| failure(format!("cannot read {path} (vCPU thread {tid}): {e}")))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            failure(format!(
                "{path} has no Seccomp: line; this kernel lacks CONFIG_SECCOMP"
            ))
        })
}

/// The word for a `Seccomp:` value.
fn seccomp_mode_name(mode: u32) -> &'static str {
    match mode {
        0 => "disabled",
        1 => "strict",
        2 => "filter",
        _ => "unknown",
    }
}

/// Adds every present vCPU thread not in `threads` yet, with its seccomp mode.
fn sample_vcpu_threads(vm: &AgentVm, threads: &mut Vec<VcpuThreadReport>) -> Result<(), CliError> {
    for info in vm.vcpus.present_vcpus() {
        let Some(tid) = info.tid else { continue };
        if threads.iter().any(|t| t.tid == tid) {
            continue;
        }
        let mode = thread_seccomp_mode(tid)?;
        threads.push(VcpuThreadReport {
            apic_id: info.apic_id,
            tid,
            seccomp_mode: mode,
            seccomp_mode_name: seccomp_mode_name(mode).to_string(),
        });
    }
    Ok(())
}

/// Per-vCPU metrics and the vCPU index of each, as two lists of equal length.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexedMetrics {
    /// The metrics, one entry per vCPU.
    pub metrics: Vec<VcpuMetricsSnapshot>,
    /// The vCPU index of each entry of `metrics` (the `cpu_id` of the OpenMetrics output).
    pub metric_indices: Vec<u32>,
}

impl IndexedMetrics {
    /// (vCPU index, its metrics) pairs, as
    /// [`VcpuManager::vcpu_metrics`](vmm_core::VcpuManager::vcpu_metrics) gives them.
    pub fn pairs(&self) -> Vec<(u32, VcpuMetricsSnapshot)> {
        self.metric_indices
            .iter()
            .copied()
            .zip(self.metrics.iter().copied())
            .collect()
    }
}

impl FromIterator<(u32, VcpuMetricsSnapshot)> for IndexedMetrics {
    fn from_iter<I: IntoIterator<Item = (u32, VcpuMetricsSnapshot)>>(pairs: I) -> Self {
        let (metric_indices, metrics) = pairs.into_iter().unzip();
        Self {
            metrics,
            metric_indices,
        }
    }
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
    /// The hotplug channel of the resize steps.
    pub hotplug: HotplugChannel,
    /// Hotplug steps.
    pub resize: Vec<ResizeStep>,
    /// Why the VM stopped.
    pub stop: String,
    /// The stopping vCPU's APIC ID.
    pub stop_vcpu_id: Option<u32>,
    /// Per-vCPU metrics at the end.
    #[serde(flatten)]
    pub final_metrics: IndexedMetrics,
    /// Every vCPU thread the demo ran (boot and hot-added ones, sampled while present), with
    /// its seccomp mode (2, `filter`, by default).
    pub vcpu_threads: Vec<VcpuThreadReport>,
}

/// Waits until every counter of `apic_ids` is above its value in `before`.
fn wait_all_advanced(
    agent: &GuestAgent,
    apic_ids: &[u32],
    before: &[u64],
) -> Result<Vec<u64>, CliError> {
    let mut now = Vec::new();
    if crate::poll_until(GUEST_TIMEOUT, Duration::from_millis(1), || {
        now = agent.progress_of(apic_ids);
        now.iter().zip(before).all(|(n, b)| n > b)
    }) {
        return Ok(now);
    }
    Err(IntegrationError::Guest(format!(
        "the progress counters of APIC IDs {apic_ids:?} did not all advance within \
         {GUEST_TIMEOUT:?}: {before:?} -> {now:?}"
    ))
    .into())
}

/// The demo's resize steps: to the maximum, then back to 3, over upcall or ACPI; the guest
/// agent wakes the new vCPUs (INIT/SIPI from the BSP) and parks the removed ones (INIT) as a
/// guest kernel would, before their threads are exited. Over ACPI the guest's BSP finds them
/// on the hotplug controller (polling the GED), takes their APIC IDs from the MADT, and ejects
/// the removed ones.
fn demo_resize(
    vm: &mut AgentVm,
    spec: &VmSpec,
    out: &Out,
    channel: HotplugChannel,
    threads: &mut Vec<VcpuThreadReport>,
) -> Result<Vec<ResizeStep>, CliError> {
    let (_upcall, acpi) = match channel {
        HotplugChannel::Upcall => {
            let upcall = attach_upcall(vm, AgentUpcallOptions::with_logger(spec.logger.clone()))?;
            (Some(upcall), None)
        }
        HotplugChannel::Acpi => {
            let acpi = attach_acpi(
                vm,
                AgentAcpiOptions {
                    guest_timeout: GUEST_TIMEOUT,
                    ..AgentAcpiOptions::default()
                },
            )?;
            out.line(format!(
                "ACPI hotplug: controller at {:#x}, GED at {:#x} (GSI {}), {} processor devices \
                 in the DSDT; the guest polls the GED",
                acpi.hotplug.layout.controller_base,
                acpi.hotplug.layout.ged_base,
                acpi.hotplug.layout.gsi,
                acpi.hotplug.controller.count()
            ));
            (None, Some(acpi))
        }
    };
    let max = spec.smp.max_cpus;
    let mut steps = Vec::new();
    for target in [max, 3.min(max)] {
        let from = vm.vcpus.present_vcpu_count();
        if target == from {
            continue;
        }
        let woken_before = vm.agent.woken_apic_ids().len();
        let parked_before = vm.agent.parked_apic_ids();
        let ejects_before = acpi
            .as_ref()
            .map_or(0, |a| a.hotplug.controller.stats().ejects);
        let outcome = {
            let _p = out.progress(format!(
                "resize {from} -> {target} vCPUs over {}",
                channel.label()
            ));
            vm.vcpus.resize_vcpus(target)?
        };
        let present = vm.present_apic_ids();
        sample_vcpu_threads(vm, threads)?;
        out.line(format!(
            "  done in {:.1} ms (vCPU threads {:.1} ms, {} round trip {:.1} ms); present \
             APIC IDs {present:?}",
            millis(outcome.total),
            millis(outcome.vcpu_work),
            channel.label(),
            millis(outcome.upcall),
        ));
        let added_ids: Vec<u32> = outcome.added.iter().map(|s| s.apic_id).collect();
        let mut removed_ids: Vec<u32> = outcome.removed.iter().map(|s| s.apic_id).collect();
        removed_ids.sort_unstable();
        if acpi.is_some() {
            // Over ACPI the BSP acts without the mailbox: what it did is what the controller
            // saw (the inserts it acknowledged, the CPUs it ejected).
            vm.agent.mark_parked(&removed_ids);
        }
        let (woken, parked): (Vec<u32>, Vec<u32>) = match &acpi {
            None => (
                vm.agent.woken_apic_ids()[woken_before..].to_vec(),
                vm.agent
                    .parked_apic_ids()
                    .into_iter()
                    .filter(|id| !parked_before.contains(id))
                    .collect(),
            ),
            Some(a) => {
                let ejected = a.hotplug.controller.stats().ejects - ejects_before;
                (
                    added_ids.clone(),
                    removed_ids
                        .iter()
                        .copied()
                        .take(usize::try_from(ejected).unwrap_or(usize::MAX))
                        .collect(),
                )
            }
        };
        let mut step = ResizeStep {
            from,
            to: target,
            latency_ms: millis(outcome.total),
            vcpu_work_ms: millis(outcome.vcpu_work),
            upcall_ms: millis(outcome.upcall),
            hotplug: channel,
            present_apic_ids: present,
            woken_by_guest: woken,
            parked_by_guest: parked,
            added: AddedVcpus::default(),
            removed_counters: [Vec::new(), Vec::new()],
            kept_fds: Vec::new(),
        };
        if !added_ids.is_empty() {
            step.added = observe_added(vm, &added_ids, out)?;
            out.line(format!(
                "  the guest's BSP sent INIT/SIPI to {:?}; what their guest code read:",
                step.woken_by_guest
            ));
            out.line(location_table(&step.added.added).trim_end());
            out.line(format!(
                "  their progress counters (they run guest code): {:?}",
                step.added.added_counters
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

/// Waits until the vCPUs `added_ids` are online and running guest code, and records what
/// their guest code read.
fn observe_added(vm: &AgentVm, added_ids: &[u32], out: &Out) -> Result<AddedVcpus, CliError> {
    vm.agent.wait_online(added_ids, GUEST_TIMEOUT)?;
    let reports = vm.agent.online_reports();
    let guest_reported_apic_ids: Vec<u32> = added_ids
        .iter()
        .filter_map(|id| reports.iter().find(|r| r.vcpu_id == *id))
        .map(|r| r.cpuid_apic_id)
        .collect();
    out.line(format!(
        "  the new vCPUs' guest code read these APIC IDs from CPUID: {guest_reported_apic_ids:?}"
    ));
    Ok(AddedVcpus {
        guest_reported_apic_ids,
        added: agent_views(vm, Some(added_ids))?,
        added_counters: wait_all_advanced(&vm.agent, added_ids, &vec![0; added_ids.len()])?,
    })
}

/// `vcpuctl demo`, hotplugging over `channel`.
pub fn demo(spec: &VmSpec, out: &Out, channel: HotplugChannel) -> Result<DemoReport, CliError> {
    let smp = &spec.smp;
    let topo = smp.topology;
    let apic_ids = topo.apic_ids();
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
            spec.agent_options(ApMode::Count),
        )?;
        let took = vm.start(GUEST_TIMEOUT)?;
        out.line(format!(
            "  every boot vCPU read its CPUID and reported in {:.1} ms",
            millis(took)
        ));
        vm
    };
    let boot_vcpus = agent_views(&vm, None)?;
    let mut vcpu_threads = Vec::new();
    sample_vcpu_threads(&vm, &mut vcpu_threads)?;
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

    let resize = demo_resize(&mut vm, spec, out, channel, &mut vcpu_threads)?;
    let filtered = vcpu_threads.iter().filter(|t| t.seccomp_mode == 2).count();
    out.line(format!(
        "seccomp: {filtered} of {} vCPU threads ran under a seccomp filter (Seccomp: 2)",
        vcpu_threads.len()
    ));

    // The counters end with the vCPUs' threads: read them while the vCPUs are present.
    let final_metrics: IndexedMetrics = vm.vcpus.vcpu_metrics().into_iter().collect();
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
    for m in &final_metrics.metrics {
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
        hotplug: channel,
        resize,
        stop: stop.to_string(),
        stop_vcpu_id: stop.vcpu_id,
        final_metrics,
        vcpu_threads,
    })
}

/// The demo's final per-vCPU metrics as OpenMetrics text ([`vmm_core::openmetrics`]).
pub fn openmetrics(report: &DemoReport) -> String {
    vmm_core::openmetrics::encode_vcpu_metrics(&report.final_metrics.pairs())
}

/// Runs `vcpuctl demo` (its JSON report on stdout with `json`). With `metrics` =
/// `openmetrics`, stdout is only the final per-vCPU metrics as OpenMetrics text: the demo's
/// lines (give `out` for stderr) and, with `json`, the JSON report go to stderr.
pub fn run(
    spec: &VmSpec,
    out: &Out,
    channel: HotplugChannel,
    json: bool,
    metrics: Option<&str>,
) -> Result<(), CliError> {
    let report = demo(spec, out, channel)?;
    match metrics {
        Some("openmetrics") => {
            if json {
                let text = serde_json::to_string_pretty(&report).map_err(|e| CliError {
                    code: ExitCode::Failure,
                    message: format!("cannot write JSON: {e}"),
                })?;
                eprintln!("{text}");
            }
            print!("{}", openmetrics(&report));
        }
        Some(other) => {
            return Err(CliError::usage(format!(
                "unknown metrics format {other:?}: use openmetrics"
            )))
        }
        None if json => print_json(&report)?,
        None => {}
    }
    Ok(())
}
