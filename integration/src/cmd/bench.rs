//! `vcpuctl bench`: every benchmark of [`crate::bench`] in one table (or JSON document), ours
//! next to bare KVM.

use std::time::Duration;

use super::{open_kvm, print_json, CliError, ExitCode, Out, VmSpec};
use crate::bench::bare::bare_create;
use crate::bench::boot_process::{bench_boot_process, BootProcessOptions, BootProcessReport};
use crate::bench::hotplug::{bench_resize, hotplug_lines, ResizeBenchOptions};
use crate::bench::snapshot::snapshot_lines;
use crate::bench::{actor, manager, table, BenchReport};
use crate::guest::agent::HotplugChannel;

/// What `vcpuctl bench` measures: its flags (the doc comments are their `--help`).
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// vCPU counts for startup and pause/resume.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 8, 64])]
    pub vcpus: Vec<u32>,
    /// vCPUs hot-added (then removed) at once, each from 1 vCPU.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 7, 63])]
    pub hotplug: Vec<u32>,
    /// Pause/resume rounds per count.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// A smoke run: 1 and 8 vCPUs, 3 rounds, hot-add of 1 and 7.
    #[arg(long)]
    pub quick: bool,
    /// vCPU counts of the boot_process row (`vcpuctl boot` of a tiny ELF as a child
    /// process); the first is the reference of its ratios.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 32, 254])]
    pub boot_vcpus: Vec<u32>,
    /// Timed runs per count of the boot_process row (0: skip the row).
    #[arg(long, default_value_t = 15)]
    pub boot_runs: u32,
    /// Only the boot_process row.
    #[arg(long)]
    pub boot_only: bool,
    /// vCPU counts of the snapshot rows (save/restore of vCPU state, and with 64 MiB of
    /// memory).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 8, 64, 254])]
    pub snapshot_vcpus: Vec<u32>,
}

impl Default for BenchOptions {
    /// What `vcpuctl bench` does without flags.
    fn default() -> Self {
        Self {
            vcpus: vec![1, 8, 64],
            hotplug: vec![1, 7, 63],
            rounds: 20,
            quick: false,
            boot_vcpus: vec![1, 32, 254],
            boot_runs: 15,
            boot_only: false,
            snapshot_vcpus: vec![1, 8, 64, 254],
        }
    }
}

/// The `boot_process` row: this executable's `vcpuctl boot` of the tiny ELF as a child
/// process, `runs` interleaved runs per count. `None` when `runs` is 0.
fn boot_process(
    out: &Out,
    vcpus: Vec<u32>,
    runs: u32,
) -> Result<Option<BootProcessReport>, CliError> {
    if runs == 0 || vcpus.is_empty() {
        return Ok(None);
    }
    let exe = std::env::current_exe().map_err(|e| CliError {
        code: ExitCode::Failure,
        message: format!("cannot find this executable to run `vcpuctl boot`: {e}"),
    })?;
    let _p = out.progress(format!(
        "boot_process: vcpuctl boot of a tiny ELF, {vcpus:?} vCPUs, {runs} interleaved runs"
    ));
    let options = BootProcessOptions { exe, vcpus, runs };
    Ok(Some(bench_boot_process(&options)?))
}

/// The snapshot rows for `counts`, with 64 MiB of guest memory, the files in a temporary
/// directory removed afterwards.
fn snapshots(out: &Out, counts: &[u32]) -> Result<Vec<crate::bench::BenchLine>, CliError> {
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let _p = out.progress(format!(
        "snapshot save and restore, {counts:?} vCPUs, 64 MiB"
    ));
    let dir = std::env::temp_dir().join(format!("vcpuctl-bench-snapshot-{}", std::process::id()));
    let lines = snapshot_lines(counts, 64 << 20, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(lines?)
}

/// Runs every benchmark and returns the report (progress on `out`).
pub fn bench(spec: &VmSpec, out: &Out, options: BenchOptions) -> Result<BenchReport, CliError> {
    let kvm = open_kvm()?;
    let (boot_vcpus, boot_runs) = if options.quick {
        (vec![1, 8], options.boot_runs.min(2))
    } else {
        (options.boot_vcpus.clone(), options.boot_runs)
    };
    // First, while this process is small and has no vCPU threads (the child is measured on
    // its own anyway).
    let boot = boot_process(out, boot_vcpus, boot_runs)?;
    if options.boot_only {
        return Ok(BenchReport {
            lines: boot.iter().flat_map(BootProcessReport::lines).collect(),
            rounds: 0,
            hotplug: Vec::new(),
            boot_process: boot,
        });
    }
    let snapshot_vcpus = if options.quick {
        vec![1, 8]
    } else {
        options.snapshot_vcpus.clone()
    };
    let (vcpus, rounds, hot, window, exit_rounds, hot_rounds) = if options.quick {
        (vec![1, 8], 3, vec![1, 7], Duration::from_millis(100), 1, 1)
    } else {
        let o = options;
        (
            o.vcpus,
            o.rounds,
            o.hotplug,
            Duration::from_millis(500),
            5,
            5,
        )
    };
    let mut lines = Vec::new();
    for &n in &vcpus {
        let _p = out.progress(format!("manager vs bare KVM, {n} vCPUs ({rounds} rounds)"));
        lines.extend(manager::bench_vcpus(n, rounds)?.lines());
    }
    let exits = {
        let _p = out.progress("port-I/O exit rate, vCPU actor vs bare loop");
        actor::exit_rate(window, exit_rounds)?
    };
    let mut idle = Vec::new();
    for &n in &vcpus {
        let _p = out.progress(format!("idle pause/resume, {n} vCPUs"));
        idle.push(actor::idle_pause_resume(n, rounds)?);
    }
    lines.extend(actor::bench_lines(Some(&exits), &idle));
    let bare = hot
        .iter()
        .map(|&n| bare_create(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut hotplug = Vec::new();
    let mut kvm = Some(kvm);
    for channel in [HotplugChannel::Upcall, HotplugChannel::Acpi] {
        let _p = out.progress(format!(
            "hot-add and hot-remove of {hot:?} vCPUs over {}",
            channel.label()
        ));
        let options = ResizeBenchOptions {
            steps: hot.clone(),
            rounds: hot_rounds,
            logger: spec.logger.clone(),
            channel,
        };
        let kvm = match kvm.take() {
            Some(kvm) => kvm,
            None => open_kvm()?,
        };
        let report = bench_resize(kvm, &options)?;
        lines.extend(hotplug_lines(&report, &hot, &bare));
        hotplug.extend(report.samples);
    }
    lines.extend(boot.iter().flat_map(BootProcessReport::lines));
    lines.extend(snapshots(out, &snapshot_vcpus)?);
    Ok(BenchReport {
        lines,
        rounds,
        hotplug,
        boot_process: boot,
    })
}

/// Runs `vcpuctl bench` and prints the table (the JSON report with `json`).
pub fn run(spec: &VmSpec, out: &Out, options: BenchOptions, json: bool) -> Result<(), CliError> {
    let report = bench(spec, out, options)?;
    if json {
        return print_json(&report);
    }
    println!("every benchmark, ours next to bare KVM (ms; ratio = ours / bare):");
    print!("{}", table(&report.lines));
    if let Some(boot) = &report.boot_process {
        print!("{}", boot.summary());
    }
    Ok(())
}
