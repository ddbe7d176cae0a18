//! Every benchmark of the workspace, each measurement implemented once, each next to bare KVM
//! measured in the same run, gathered by `vcpuctl bench` into one table of (benchmark, vCPUs,
//! ours, bare KVM, ratio):
//!
//! | rows | ours | bare | module |
//! | --- | --- | --- | --- |
//! | `create`, `startup`, `pause_all`, `resume_all` | the vCPU manager, vCPUs spinning at CPL 3 | [`bare`] | [`manager`] |
//! | `pio_exit`, `pause_idle`, `resume_idle` | the vCPU actor alone | [`bare`] | [`actor`] |
//! | `hot_add`, `hot_add_vcpu`, `hot_remove` | `resize_vcpus` over upcall on the guest agent | [`bare::bare_create`] | [`hotplug`] |
//! | `boot_process` | `vcpuctl boot --kernel <tiny ELF> --smp N` as a child process, exec to exit | the same with 1 vCPU (ratio = t(N)/t(1)) | [`boot_process`], [`tiny_elf`] |
//!
//! Every number is a median over the rounds. No thresholds: these are for reading.
//!
//! ```
//! use std::time::Duration;
//! use integration::bench::manager::BenchRow;
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
//! let lines = row.lines();
//! assert_eq!(lines.len(), 4);
//! assert_eq!(lines[0].ratio, 1.5);
//! assert!(integration::bench::table(&lines).contains("pause_all"));
//! ```

pub mod actor;
pub mod bare;
pub mod boot_process;
pub mod hotplug;
pub mod manager;
pub mod snapshot;
pub mod tiny_elf;

use std::cmp::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::IntegrationError;

/// How long to wait for any acknowledgement before calling it a hang.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// Bare KVM, milliseconds (NaN, printed `-` and `null`, where there is no bare equivalent).
    pub bare_ms: f64,
    /// ours / bare.
    pub ratio: f64,
}

impl BenchLine {
    /// A line from two durations.
    pub fn new(
        benchmark: &'static str,
        detail: &'static str,
        vcpus: u32,
        ours: Duration,
        bare: Option<Duration>,
    ) -> Self {
        let (bare_ms, ratio) = match bare {
            Some(b) => (ms(b), ours.as_secs_f64() / b.as_secs_f64().max(1e-9)),
            None => (f64::NAN, f64::NAN),
        };
        Self {
            benchmark,
            detail,
            vcpus,
            ours_ms: ms(ours),
            bare_ms,
            ratio,
        }
    }
}

/// The whole `vcpuctl bench --json` document.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Every measurement.
    pub lines: Vec<BenchLine>,
    /// Pause/resume rounds per vCPU count.
    pub rounds: u32,
    /// Every hot-add/hot-remove sample, in the order taken.
    pub hotplug: Vec<hotplug::ResizeSample>,
    /// The `boot_process` row's medians, peak RSS and samples (`null` when skipped).
    pub boot_process: Option<boot_process::BootProcessReport>,
}

/// Milliseconds.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The middle element by `cmp` (the upper one of an even count), `None` for none.
pub(crate) fn median_by<T: Copy>(mut v: Vec<T>, cmp: impl FnMut(&T, &T) -> Ordering) -> Option<T> {
    v.sort_by(cmp);
    v.get(v.len() / 2).copied()
}

/// The median duration (zero for none).
pub(crate) fn median(v: Vec<Duration>) -> Duration {
    median_by(v, Ord::cmp).unwrap_or_default()
}

/// One pause and the resume after it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PauseResume {
    /// Until every vCPU acknowledged the pause.
    pub pause: Duration,
    /// Until every vCPU acknowledged the resume.
    pub resume: Duration,
}

impl PauseResume {
    /// The medians of the pauses and of the resumes.
    pub fn medians(samples: &[PauseResume]) -> PauseResume {
        PauseResume {
            pause: median(samples.iter().map(|s| s.pause).collect()),
            resume: median(samples.iter().map(|s| s.resume).collect()),
        }
    }
}

/// `rounds` timed (pause, resume) pairs of running vCPUs, each pause `settle` after the
/// previous resume (time for idle vCPUs to get back into `KVM_RUN`). The one loop of every
/// pause/resume row, ours and bare.
pub(crate) fn pause_resume_rounds(
    rounds: u32,
    settle: Duration,
    mut pause: impl FnMut() -> Result<(), IntegrationError>,
    mut resume: impl FnMut() -> Result<(), IntegrationError>,
) -> Result<Vec<PauseResume>, IntegrationError> {
    let mut samples = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        std::thread::sleep(settle);
        let t = Instant::now();
        pause()?;
        let p = t.elapsed();
        let t = Instant::now();
        resume()?;
        samples.push(PauseResume {
            pause: p,
            resume: t.elapsed(),
        });
    }
    Ok(samples)
}

/// The table as text, one line per measurement, then what each benchmark compares.
pub fn table(lines: &[BenchLine]) -> String {
    // The benchmark column fits the longest name (`hot_add_vcpu_acpi`).
    let w = lines
        .iter()
        .map(|l| l.benchmark.len())
        .max()
        .unwrap_or(0)
        .max(12);
    let mut s = format!(
        "{:<w$} {:>6} {:>12} {:>12} {:>7}\n",
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
            "{:<w$} {:>6} {} {} {}\n",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_bare_time_gives_a_finite_ratio() {
        let z = Duration::ZERO;
        let l = BenchLine::new("x", "y", 1, Duration::from_millis(1), Some(z));
        assert!(l.ratio.is_finite());
    }

    #[test]
    fn median_of_nothing_is_zero_and_of_some_the_middle() {
        assert_eq!(median(Vec::new()), Duration::ZERO);
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(median_by(vec![3.0, 1.0, 2.0], f64::total_cmp), Some(2.0));
    }

    #[test]
    fn no_bare_equivalent_prints_a_dash() {
        let l = BenchLine::new("hot_remove", "y", 1, Duration::from_millis(1), None);
        assert!(l.bare_ms.is_nan() && l.ratio.is_nan());
        assert!(table(&[l])
            .lines()
            .any(|x| x.starts_with("hot_remove") && x.trim_end().ends_with('-')));
    }
}
