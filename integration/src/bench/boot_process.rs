//! The `boot_process` row: `vcpuctl boot --kernel <tiny.elf> --smp N` as a child process,
//! exec to exit, the way other VMMs are compared (each booting the same tiny guest whose BSP
//! writes the shutdown port at once, see [`super::tiny_elf`]).
//!
//! - Runs for every N are interleaved (N1, N2, N3, N1, N2, ...) after one untimed warm-up
//!   round, so that a slow spell of the host hits every N alike; each N's figure is a median.
//! - The child starts with fds 0-2 only. The standard library opens every fd with
//!   `O_CLOEXEC`, but this process may have inherited fds without it (a shell or a CI runner
//!   passing a high fd): those would be inherited by the child, and a child that starts with a
//!   high fd already has a big fd table, which hides what growing it costs (see
//!   `vmm_core::vm::reserve_fd_table`). So every fd from 3 up of this process is marked
//!   close-on-exec before the first run ([`close_inherited_fds_on_exec`]).
//! - Peak RSS is the child's own `VmHWM` (the kernel's high-water mark of its resident memory),
//!   which `vcpuctl boot --peak-rss` prints once the VM has stopped. Not `ru_maxrss` from
//!   `wait4`: Linux carries the high-water mark of the memory a process had before `exec`
//!   into it, and a child spawned by this process starts as a copy of (or, with
//!   `posix_spawn`, shares) this process's memory, tens of MiB after the other rows, so
//!   `ru_maxrss` would report the parent's peak, not the child's.
//!
//! The table's line for N shows t(N) as "ours" and t(1) as "bare", so its ratio is t(N)/t(1).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{median, median_by, tiny_elf, BenchLine};
use crate::cmd::boot::PEAK_RSS_PREFIX;
use crate::IntegrationError;

/// What the row measures.
#[derive(Clone, Debug)]
pub struct BootProcessOptions {
    /// The `vcpuctl` executable to run (usually `std::env::current_exe()`).
    pub exe: PathBuf,
    /// vCPU counts (the first one is the reference of the ratios; 1 by default).
    pub vcpus: Vec<u32>,
    /// Timed runs per count.
    pub runs: u32,
}

/// One child run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BootProcessSample {
    /// N.
    pub vcpus: u32,
    /// From spawning the child to reaping it.
    pub wall: Duration,
    /// The child's peak resident memory, KiB.
    pub max_rss_kib: u64,
}

/// The medians for one N.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BootProcessRow {
    /// N.
    pub vcpus: u32,
    /// Median time, exec to exit, ms.
    pub median_ms: f64,
    /// Fastest run, ms.
    pub min_ms: f64,
    /// Slowest run, ms.
    pub max_ms: f64,
    /// t(N) / t(first N).
    pub ratio_to_first: f64,
    /// Median peak RSS, KiB.
    pub max_rss_kib: u64,
    /// (RSS(N) - RSS(first N)) / (N - first N), KiB; NaN (JSON `null`) for the first N.
    pub rss_per_added_vcpu_kib: f64,
}

/// The whole row: the medians and every sample.
#[derive(Clone, Debug, Serialize)]
pub struct BootProcessReport {
    /// One row per N, in the order asked.
    pub rows: Vec<BootProcessRow>,
    /// Every timed run, in the order taken.
    pub samples: Vec<BootProcessSample>,
}

impl BootProcessReport {
    /// The table's lines: t(N) as "ours", t(first N) as "bare".
    pub fn lines(&self) -> Vec<BenchLine> {
        let first = self.rows.first().map(|r| r.median_ms);
        self.rows
            .iter()
            .map(|r| BenchLine {
                benchmark: "boot_process",
                detail:
                    "`vcpuctl boot --kernel tiny.elf --smp N` as a child process, exec to exit \
                         (BSP writes port 0x600); bare column: the same with the first N, so \
                         ratio = t(N)/t(1)",
                vcpus: r.vcpus,
                ours_ms: r.median_ms,
                bare_ms: first.unwrap_or(f64::NAN),
                ratio: r.ratio_to_first,
            })
            .collect()
    }

    /// One line of text per N: range of times and peak RSS.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for r in &self.rows {
            s.push_str(&format!(
                "boot_process {:>4} vCPUs: median {:.1} ms (range {:.1}-{:.1}), t(N)/t(1) {:.2}, \
                 peak RSS {} KiB",
                r.vcpus, r.median_ms, r.min_ms, r.max_ms, r.ratio_to_first, r.max_rss_kib
            ));
            if r.rss_per_added_vcpu_kib.is_finite() {
                s.push_str(&format!(
                    ", {:.1} KiB per added vCPU",
                    r.rss_per_added_vcpu_kib
                ));
            }
            s.push('\n');
        }
        s
    }
}

/// Marks every fd of this process from 3 up close-on-exec, so that children start with fds
/// 0-2 only. Returns how many had to be marked (fds this process inherited without
/// `O_CLOEXEC`).
///
/// # Errors
///
/// [`IntegrationError::Guest`] if `/proc/self/fd` cannot be read or an fd not be marked.
pub fn close_inherited_fds_on_exec() -> Result<usize, IntegrationError> {
    let err = |what: String| IntegrationError::Guest(format!("closing inherited fds: {what}"));
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| err(format!("/proc/self/fd: {e}")))?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    let mut marked = 0;
    for fd in fds {
        // SAFETY: F_GETFD only reads the descriptor's flags; an fd that closed meanwhile (the
        // directory's own) fails with EBADF, which is skipped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        // SAFETY: F_SETFD only changes the descriptor's close-on-exec flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(err(format!("fd {fd}: {}", std::io::Error::last_os_error())));
        }
        marked += 1;
    }
    Ok(marked)
}

/// Runs `exe boot --kernel elf --smp n` once; the child must exit 0 and say that the
/// shutdown port stopped the VM.
fn run_once(exe: &Path, elf: &Path, n: u32) -> Result<BootProcessSample, IntegrationError> {
    let fail = |what: String| IntegrationError::Guest(format!("boot_process, {n} vCPUs: {what}"));
    let t = Instant::now();
    let mut child = Command::new(exe)
        .arg("boot")
        .arg("--kernel")
        .arg(elf)
        .arg("--smp")
        .arg(n.to_string())
        .arg("--peak-rss")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", exe.display())))?;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)
            .map_err(|e| fail(format!("reading its stderr: {e}")))?;
    }
    let status = child
        .wait()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    let wall = t.elapsed();
    if !status.success() {
        return Err(fail(format!(
            "the child failed ({status}): {}",
            stderr.trim()
        )));
    }
    if !stderr.contains("a device asked the VM to stop") {
        return Err(fail(format!(
            "the VM did not stop through the shutdown port: {}",
            stderr.trim()
        )));
    }
    let max_rss_kib = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix(PEAK_RSS_PREFIX)?
                .strip_suffix(" KiB")?
                .parse()
                .ok()
        })
        .ok_or_else(|| fail(format!("no peak RSS in its stderr: {}", stderr.trim())))?;
    Ok(BootProcessSample {
        vcpus: n,
        wall,
        max_rss_kib,
    })
}

/// Runs the row: writes the tiny ELF to a temporary file, one untimed warm-up round, then
/// `runs` interleaved rounds.
///
/// # Errors
///
/// [`IntegrationError::Guest`] if the ELF cannot be written or a child run fails.
pub fn bench_boot_process(
    options: &BootProcessOptions,
) -> Result<BootProcessReport, IntegrationError> {
    close_inherited_fds_on_exec()?;
    let elf = std::env::temp_dir().join(format!("vcpuctl-tiny-{}.elf", std::process::id()));
    tiny_elf::write(&elf)
        .map_err(|e| IntegrationError::Guest(format!("writing {}: {e}", elf.display())))?;
    let result = measure(options, &elf);
    let _ = std::fs::remove_file(&elf);
    result
}

fn measure(
    options: &BootProcessOptions,
    elf: &Path,
) -> Result<BootProcessReport, IntegrationError> {
    for &n in &options.vcpus {
        run_once(&options.exe, elf, n)?;
    }
    let mut samples = Vec::new();
    for _ in 0..options.runs {
        for &n in &options.vcpus {
            samples.push(run_once(&options.exe, elf, n)?);
        }
    }
    Ok(BootProcessReport {
        rows: rows(&options.vcpus, &samples),
        samples,
    })
}

/// The medians per N; ratios and RSS per added vCPU against the first N.
pub fn rows(vcpus: &[u32], samples: &[BootProcessSample]) -> Vec<BootProcessRow> {
    let stats = |n: u32| {
        let of_n: Vec<&BootProcessSample> = samples.iter().filter(|s| s.vcpus == n).collect();
        let walls: Vec<Duration> = of_n.iter().map(|s| s.wall).collect();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let min = walls.iter().min().copied().unwrap_or_default();
        let max = walls.iter().max().copied().unwrap_or_default();
        let rss = median_by(of_n.iter().map(|s| s.max_rss_kib).collect(), Ord::cmp);
        (ms(median(walls)), ms(min), ms(max), rss.unwrap_or(0))
    };
    let first = vcpus.first().map(|&n| (n, stats(n)));
    vcpus
        .iter()
        .map(|&n| {
            let (median_ms, min_ms, max_ms, rss) = stats(n);
            let (ratio, per_vcpu) = match first {
                Some((n0, (t0, _, _, rss0))) if n != n0 => {
                    let added = f64::from(n) - f64::from(n0);
                    #[allow(clippy::cast_precision_loss)] // KiB counts far below 2^52
                    let per = (rss as f64 - rss0 as f64) / added;
                    (median_ms / t0.max(1e-9), per)
                }
                _ => (1.0, f64::NAN),
            };
            BootProcessRow {
                vcpus: n,
                median_ms,
                min_ms,
                max_ms,
                ratio_to_first: ratio,
                max_rss_kib: rss,
                rss_per_added_vcpu_kib: per_vcpu,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_medians_against_the_first_count() {
        let ms = Duration::from_millis;
        let s = |vcpus, wall, rss| BootProcessSample {
            vcpus,
            wall: ms(wall),
            max_rss_kib: rss,
        };
        let samples = [
            s(1, 10, 1000),
            s(33, 12, 1320),
            s(1, 20, 1000),
            s(33, 30, 1330),
            s(1, 11, 1010),
            s(33, 13, 1330),
        ];
        let rows = rows(&[1, 33], &samples);
        assert_eq!(rows[0].median_ms, 11.0);
        assert_eq!(rows[0].ratio_to_first, 1.0);
        assert!(rows[0].rss_per_added_vcpu_kib.is_nan());
        assert_eq!(
            (rows[1].min_ms, rows[1].median_ms, rows[1].max_ms),
            (12.0, 13.0, 30.0)
        );
        assert_eq!(rows[1].max_rss_kib, 1330);
        // (median 1330 - median 1000) / 32 added vCPUs.
        assert_eq!(rows[1].rss_per_added_vcpu_kib, 10.3125);
        let report = BootProcessReport {
            rows,
            samples: samples.to_vec(),
        };
        let lines = report.lines();
        assert_eq!(lines[1].bare_ms, 11.0);
        assert!(report.summary().contains("10.3 KiB per added vCPU"));
    }

    #[test]
    fn fds_above_2_end_up_close_on_exec() {
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&evt);
        // SAFETY: clearing the flags of an fd this test owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        assert!(close_inherited_fds_on_exec().unwrap() >= 1);
        // SAFETY: reading the flags of an fd this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }
}
