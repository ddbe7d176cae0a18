//! `vcpuctl bench`: every benchmark of [`crate::bench`] in one table (or JSON document), ours
//! next to bare KVM.

use std::time::Duration;

use super::{open_kvm, print_json, CliError, Out, VmSpec};
use crate::bench::bare::bare_create;
use crate::bench::hotplug::{bench_resize, hotplug_lines, ResizeBenchOptions};
use crate::bench::{actor, manager, table, BenchReport};

/// What `vcpuctl bench` measures.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// vCPU counts for startup and pause/resume.
    pub vcpus: Vec<u32>,
    /// vCPUs hot-added (then removed) at once, each from 1 vCPU.
    pub hotplug: Vec<u32>,
    /// Pause/resume rounds per count.
    pub rounds: u32,
    /// A smoke run: 1 and 8 vCPUs, 3 rounds, hot-add of 1 and 7.
    pub quick: bool,
}

/// Runs every benchmark and returns the report (progress on `out`).
pub fn bench(spec: &VmSpec, out: &Out, options: BenchOptions) -> Result<BenchReport, CliError> {
    let kvm = open_kvm()?;
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
    let report = {
        let _p = out.progress(format!("hot-add and hot-remove of {hot:?} vCPUs"));
        let options = ResizeBenchOptions {
            steps: hot.clone(),
            rounds: hot_rounds,
            logger: spec.logger.clone(),
        };
        bench_resize(kvm, &options)?
    };
    let bare = hot
        .iter()
        .map(|&n| bare_create(n))
        .collect::<Result<Vec<_>, _>>()?;
    lines.extend(hotplug_lines(&report, &hot, &bare));
    Ok(BenchReport {
        lines,
        rounds,
        hotplug: report.samples,
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
    Ok(())
}
