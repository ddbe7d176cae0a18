//! `vcpuctl bench`: every benchmark of the workspace gathered in one table of
//! (benchmark, vCPUs, ours, bare KVM, ratio), in text or JSON: the vCPU manager's startup and
//! pause/resume ([`crate::bench`]), the vCPU actor's exit path and idle pause/resume
//! ([`crate::actor_bench`]), and hot-add/hot-remove over upcall ([`crate::agent::bench`]).
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

use crate::agent::bench::{ResizeBenchReport, ResizeSample};
use crate::bench::BenchRow;

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
    /// Every hot-add/hot-remove sample, in the order taken.
    pub hotplug: Vec<ResizeSample>,
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
        "{:<12} {:>6} {:>12} {:>12} {:>7}\n",
        "benchmark", "vCPUs", "ours ms", "bare KVM ms", "ratio"
    );
    let num = |v: f64, width: usize, prec: usize| {
        if v.is_finite() {
            format!("{v:>width$.prec$}")
        } else {
            format!("{:>width$}", "-")
        }
    };
    for l in lines {
        s.push_str(&format!(
            "{:<12} {:>6} {} {} {}\n",
            l.benchmark,
            l.vcpus,
            num(l.ours_ms, 12, 3),
            num(l.bare_ms, 12, 3),
            num(l.ratio, 7, 2)
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

/// The table's lines for a hot-add/hot-remove run, three per step `n` (from 1 vCPU to
/// `1 + n` and back), from the median sample (by total) of each direction:
/// - `hot_add`: request until the reply, every new vCPU having run guest code, against bare
///   `KVM_CREATE_VCPU` + `KVM_SET_CPUID2` of `n` vCPUs (`bare_create[i]` for `steps[i]`);
/// - `hot_add_vcpu`: the part of it spent creating, configuring and starting the vCPUs (the
///   rest is the upcall round trip, the guest waking them), against the same bare cost;
/// - `hot_remove`: request until the threads are gone (no bare equivalent: `-`).
pub fn hotplug_lines(
    report: &ResizeBenchReport,
    steps: &[u32],
    bare_create: &[Duration],
) -> Vec<BenchLine> {
    let mut out = Vec::new();
    for (&n, &bare) in steps.iter().zip(bare_create) {
        let to = n.saturating_add(1);
        if let Some(add) = report.median(1, to) {
            out.push(line(
                "hot_add",
                "resize_vcpus(1 -> 1+N) over upcall until every new vCPU ran guest code; bare: \
                 KVM_CREATE_VCPU+KVM_SET_CPUID2 of N vCPUs",
                n,
                add.total,
                bare,
            ));
            out.push(line(
                "hot_add_vcpu",
                "the vCPU creation/configuration/start share of hot_add (the rest is the upcall \
                 round trip); bare as hot_add",
                n,
                add.vcpu_work,
                bare,
            ));
        }
        if let Some(remove) = report.median(to, 1) {
            out.push(BenchLine {
                benchmark: "hot_remove",
                detail: "resize_vcpus(1+N -> 1) over upcall until the removed threads ended",
                vcpus: n,
                ours_ms: ms(remove.total),
                bare_ms: f64::NAN,
                ratio: f64::NAN,
            });
        }
    }
    out
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

    #[test]
    fn hotplug_lines_take_the_medians_and_leave_remove_without_bare() {
        let s = |from, to, ms: u64| ResizeSample {
            from,
            to,
            reused_fds: false,
            total: Duration::from_millis(ms),
            vcpu_work: Duration::from_millis(ms / 2),
            upcall: Duration::from_millis(ms / 2),
        };
        let report = ResizeBenchReport {
            samples: vec![
                s(1, 8, 10),
                s(8, 1, 2),
                s(1, 8, 30),
                s(8, 1, 4),
                s(1, 8, 20),
            ],
        };
        let l = hotplug_lines(&report, &[7], &[Duration::from_millis(5)]);
        assert_eq!(l.len(), 3);
        assert_eq!(
            (l[0].benchmark, l[0].vcpus, l[0].ours_ms),
            ("hot_add", 7, 20.0)
        );
        assert_eq!((l[1].ours_ms, l[1].ratio), (10.0, 2.0));
        assert_eq!(l[2].ours_ms, 4.0);
        assert!(l[2].bare_ms.is_nan());
        assert!(table(&l).contains("hot_remove"));
        assert!(table(&l)
            .lines()
            .any(|x| x.starts_with("hot_remove") && x.trim_end().ends_with('-')));
    }
}
