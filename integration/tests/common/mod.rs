//! Helpers shared by the integration tests: running `vcpuctl` and other tools and checking
//! that they succeeded, and reading this process's own resource usage from `/proc/self`.
//!
//! Each test binary includes this module with `mod common;` and uses only some of it.
#![allow(dead_code)]

pub mod linux;

use std::fmt::Display;
use std::io::{self, ErrorKind};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;
use vmm_core::{VcpuManager, VcpuManagerOptions, Vm, VmOptions, VmmError};

/// The `vcpuctl` binary Cargo built for this test run.
pub fn vcpuctl() -> Command {
    Command::cargo_bin("vcpuctl").expect("the vcpuctl binary")
}

/// The output of a process that ran (`out`) and exited with success; panics naming `what`,
/// the exit status and the process's stderr and stdout otherwise.
pub fn succeeded(what: impl Display, out: io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}\nstdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Runs `cmd`, which must succeed (see [`succeeded`]).
pub fn run_ok(cmd: &mut Command) -> Output {
    succeeded(format!("{cmd:?}"), cmd.output())
}

/// The JSON `what` printed on stdout; panics showing stdout when it is not JSON.
pub fn stdout_json(what: impl Display, out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `vcpuctl args`, which must succeed, and returns the JSON it printed.
pub fn run_json(args: &[&str]) -> Value {
    let what = format!("vcpuctl {args:?}");
    let out = succeeded(&what, vcpuctl().args(args).output());
    stdout_json(&what, &out)
}

/// Runs `vcpuctl args`, killed after `limit`, which must succeed, and returns the JSON it
/// printed.
pub fn run_json_within(args: &[&str], limit: Duration) -> Value {
    let what = format!("vcpuctl {args:?}");
    let out = succeeded(
        &what,
        assert_cmd::Command::cargo_bin("vcpuctl")
            .expect("the vcpuctl binary")
            .args(args)
            .timeout(limit)
            .output(),
    );
    stdout_json(&what, &out)
}

/// Runs `vcpuctl args dir_flag DIR`, DIR a new temporary directory, like
/// [`run_json_within`]; returns DIR (with what `vcpuctl` wrote there) and the JSON.
pub fn run_json_into_tempdir(
    args: &[&str],
    dir_flag: &str,
    limit: Duration,
) -> (tempfile::TempDir, Value) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let dir_arg = dir.path().to_str().expect("a UTF-8 temporary directory");
    let mut args = args.to_vec();
    args.extend([dir_flag, dir_arg]);
    let json = run_json_within(&args, limit);
    (dir, json)
}

/// Restores the snapshot in `dir` on a new VM (a new `/dev/kvm` handle), with default VM
/// and manager options.
pub fn restore_with_defaults(dir: &Path) -> Result<(Arc<Vm>, VcpuManager), VmmError> {
    VcpuManager::restore_from(
        kvm_ioctls::Kvm::new().expect("/dev/kvm"),
        dir,
        VmOptions::default(),
        VcpuManagerOptions::default(),
    )
}

/// Whether `tool` (of Debian's `acpica-tools`) is installed; prints SKIPPED for `test` when
/// it is not, and panics under `CI=true`, where it must be.
pub fn have_acpica_tool(tool: &str, test: &str) -> bool {
    match Command::new(tool).arg("-v").output() {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{tool} not found but CI=true: apt-get install acpica-tools"
            );
            eprintln!("SKIPPED (no {tool}; apt-get install acpica-tools): {test}");
            false
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    }
}

/// This process's resident memory, open fds and threads, from `/proc/self`.
#[derive(Debug, PartialEq, Eq)]
pub struct Usage {
    /// `VmRSS` in KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/self/fd`.
    pub fds: usize,
    /// `Threads` of `/proc/self/status`.
    pub threads: u64,
}

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
}

/// This process's usage now.
pub fn usage() -> Usage {
    Usage {
        rss_kib: status_field("VmRSS:"),
        fds: std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .count(),
        threads: status_field("Threads:"),
    }
}

impl Usage {
    /// Asserts that nothing leaked since `before`: the same open fds and threads, and RSS
    /// grown by at most `rss_slack_kib`.
    pub fn assert_kept_since(&self, before: &Usage, rss_slack_kib: u64) {
        assert_eq!(self.fds, before.fds, "open fds");
        assert_eq!(self.threads, before.threads, "threads");
        assert!(
            self.rss_kib <= before.rss_kib + rss_slack_kib,
            "RSS grew from {} KiB to {} KiB",
            before.rss_kib,
            self.rss_kib
        );
    }
}

/// The `-smp` string `s`, parsed (a test's own constant: it must be valid).
pub fn smp(s: &str) -> topology::SmpConfig {
    s.parse().expect("a valid -smp")
}

/// Asserts that `after` holds the vCPUs of `saved` (same indices and APIC IDs, in order), each
/// with its TSC past the saved value: the restored guest ran on from the snapshot.
pub fn assert_tsc_advanced(
    saved: &[vmm_core::snapshot::VcpuSnapshot],
    after: &[vmm_core::snapshot::VcpuSnapshot],
) {
    use vmm_core::arch::x86_64::msr::IA32_TSC;
    assert_eq!(saved.len(), after.len(), "vCPUs saved, then after running");
    for (a, b) in saved.iter().zip(after) {
        assert_eq!((a.index, a.apic_id), (b.index, b.apic_id));
        let (ta, tb) = (
            a.state.msr(IA32_TSC).unwrap(),
            b.state.msr(IA32_TSC).unwrap(),
        );
        assert!(
            tb > ta,
            "vCPU {}: TSC {tb} after running, {ta} at the save",
            a.index
        );
    }
}

/// Runs `tool args` in `dir`, which must succeed; returns its stdout and stderr together.
pub fn run_tool(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

/// Whether this machine has KVM for `test`; `false` prints SKIPPED, and `VCPU_REQUIRE_KVM=1`
/// panics (see [`integration::kvm_or_skip`]).
pub fn have_kvm(test: &str) -> bool {
    integration::kvm_or_skip(test).is_some()
}

/// `/dev/kvm` for `test` when this KVM allows `vcpus` vCPUs and vCPU IDs; `None` after
/// printing SKIPPED otherwise (see [`integration::kvm_or_skip`] for a missing KVM).
pub fn kvm_allowing(test: &str, vcpus: u32) -> Option<kvm_ioctls::Kvm> {
    let kvm = integration::kvm_or_skip(test)?;
    let limits = vmm_core::KvmLimits::query(&kvm).expect("KVM's vCPU limits");
    if limits.max_vcpus < vcpus || limits.max_vcpu_id < vcpus {
        eprintln!("SKIPPED (this KVM allows fewer than {vcpus} vCPUs): {test}");
        return None;
    }
    Some(kvm)
}

/// Rewrites the snapshot file `path` as a valid file of `kind` with `content` and format
/// `version` (a header that matches `content`, then `content`).
pub fn rewrite_snapshot_file(
    path: &Path,
    kind: vmm_core::error::SnapshotFile,
    version: u32,
    content: &[u8],
) {
    let mut bytes = vmm_core::snapshot::FileHeader::for_content(kind, version, content)
        .encode()
        .to_vec();
    bytes.extend_from_slice(content);
    std::fs::write(path, bytes).unwrap();
}

/// Runs `g`'s vCPUs until the VM stops (`run_until_exit`, which blocks without a limit) on a
/// thread, so that a hang becomes a failure: panics saying `no_stop` when the VM has not
/// stopped within `limit`. Returns the VM and why it stopped.
pub fn run_until_exit_within(
    mut g: integration::guest::GuestVm,
    limit: Duration,
    no_stop: &str,
) -> (integration::guest::GuestVm, vmm_core::VmStopReason) {
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = g.vcpus.run_until_exit();
        let _ = tx.send(());
        (g, r)
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("run_until_exit did not return: {no_stop}"));
    let (g, stop) = waiter.join().expect("waiter thread");
    (g, stop.expect("event loop"))
}

/// A logger that writes warnings and errors (with their key-values) to the test's captured
/// output: shown when a test fails, to say what the VMM and the guest saw.
pub fn warnings_logger() -> slog::Logger {
    use slog::Drain;
    let decorator = slog_term::PlainSyncDecorator::new(slog_term::TestStdoutWriter);
    let drain = slog_term::FullFormat::new(decorator).build().fuse();
    let drain = slog::LevelFilter::new(drain, slog::Level::Warning).fuse();
    slog::Logger::root(drain, slog::o!())
}
