//! `vcpuctl bench`: the routines of [`crate::bench`] gathered in one table of
//! (benchmark, vCPUs, ours, bare KVM, ratio), in text or JSON.
//!
//! ```
//! use std::time::Duration;
//! use integration::bench::BenchRow;
//! let ms = Duration::from_millis;
//! let row = BenchRow {
//!     vcpus: 8,
//!     startup_manager: ms(4),
//!     create_manager: ms(3),
//!     startup_bare: ms(2),
//!     pause_manager: ms(1),
//!     pause_bare: ms(1),
//!     resume_manager: ms(1),
//!     resume_bare: ms(2),
//! };
//! let lines = integration::cmd_bench::lines(&[row]);
//! assert_eq!(lines.len(), 4);
//! assert_eq!(lines[0].ratio, 1.5);
//! assert!(integration::cmd_bench::table(&lines).contains("pause_all"));
//! ```

use std::time::Duration;

use serde::Serialize;

use crate::bench::BenchRow;

/// Where the benchmark of guest exits through the actor vs bare `VcpuFd::run` lives: it is a
/// private routine of the `vcpu-actor` crate's benchmark, not repeated here.
pub const EXIT_RATE_NOTE: &str = "exit rate (actor vs bare VcpuFd::run): \
    cargo bench -p vcpu-actor --bench actor";

/// One line of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchLine {
    /// What was measured.
    pub benchmark: &'static str,
    /// What "ours" and "bare" each mean.
    pub detail: &'static str,
    /// vCPU count.
    pub vcpus: u32,
    /// The vCPU manager, milliseconds (a median where there are rounds).
    pub ours_ms: f64,
    /// Bare KVM, milliseconds.
    pub bare_ms: f64,
    /// ours / bare.
    pub ratio: f64,
}

/// The whole `vcpuctl bench --json` document.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Every measurement.
    pub lines: Vec<BenchLine>,
    /// Pause/resume rounds per vCPU count.
    pub rounds: u32,
    /// Benchmarks that exist elsewhere and are not run here.
    pub not_run_here: Vec<&'static str>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn line(
    benchmark: &'static str,
    detail: &'static str,
    vcpus: u32,
    ours: Duration,
    bare: Duration,
) -> BenchLine {
    BenchLine {
        benchmark,
        detail,
        vcpus,
        ours_ms: ms(ours),
        bare_ms: ms(bare),
        ratio: ours.as_secs_f64() / bare.as_secs_f64().max(1e-9),
    }
}

/// The table's lines for [`crate::bench::bench_vcpus`] rows, four per row.
pub fn lines(rows: &[BenchRow]) -> Vec<BenchLine> {
    let mut out = Vec::with_capacity(rows.len() * 4);
    for r in rows {
        out.push(line(
            "create",
            "ours: create+configure vCPUs+actor threads; bare: KVM_CREATE_VCPU+KVM_SET_CPUID2",
            r.vcpus,
            r.create_manager,
            r.startup_bare,
        ));
        out.push(line(
            "startup",
            "ours: create+configure+start; bare: KVM_CREATE_VCPU+KVM_SET_CPUID2",
            r.vcpus,
            r.startup_manager,
            r.startup_bare,
        ));
        out.push(line(
            "pause_all",
            "vCPUs spinning at CPL 3 out of KVM_RUN, all acknowledged",
            r.vcpus,
            r.pause_manager,
            r.pause_bare,
        ));
        out.push(line(
            "resume_all",
            "paused vCPUs back in KVM_RUN, all acknowledged",
            r.vcpus,
            r.resume_manager,
            r.resume_bare,
        ));
    }
    out
}

/// The table as text, one line per measurement, then what each benchmark compares.
pub fn table(lines: &[BenchLine]) -> String {
    let mut s = format!(
        "{:<11} {:>6} {:>12} {:>12} {:>7}\n",
        "benchmark", "vCPUs", "ours ms", "bare KVM ms", "ratio"
    );
    for l in lines {
        s.push_str(&format!(
            "{:<11} {:>6} {:>12.3} {:>12.3} {:>7.2}\n",
            l.benchmark, l.vcpus, l.ours_ms, l.bare_ms, l.ratio
        ));
    }
    let mut seen: Vec<&str> = Vec::new();
    for l in lines {
        if !seen.contains(&l.benchmark) {
            seen.push(l.benchmark);
            s.push_str(&format!("  {}: {}\n", l.benchmark, l.detail));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_bare_time_gives_a_finite_ratio() {
        let z = Duration::ZERO;
        let l = line("x", "y", 1, Duration::from_millis(1), z);
        assert!(l.ratio.is_finite());
    }
}
