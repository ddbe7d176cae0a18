//! `vcpuctl restore --from DIR [--run-ms MS] [--json]`: restores a snapshot that `vcpuctl
//! snapshot` wrote, in this (new) process, and shows every vCPU continuing: per vCPU its
//! `index`, `apic_id`, `counter_at_restore` (read from the restored guest memory before any
//! vCPU runs) and `counter_after` (after resuming for MS ms, default 200, then pausing). Exit
//! code 0 only if every vCPU's counter went past its value at the restore; a snapshot that
//! cannot be restored (damaged, truncated, another format version, another CPU vendor ...) is
//! exit code 1 with the error.
//!
//! The configuration comes from the snapshot: `--smp`, `--vpmu` and `--memory` are ignored.
//!
//! What is restored and what is not: guest memory, every vCPU's state and the in-kernel
//! devices come from the snapshot. The agent guest's VMM-side device ([`GuestAgent`]) is
//! registered again on its ports, new: its record of which vCPUs reported online and of the
//! commands carried out is not saved, nor is the upcall connection of `--resize` (the guest
//! continues counting; a further hot-add would need a new connection). The serial console's
//! registers are not saved either.
//!
//! JSON: `{"vcpus": [{"index": 0, "apic_id": 0, "counter_at_restore": 123,
//! "counter_after": 456}, ...]}`.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use vmm_core::{VcpuManager, VcpuManagerOptions, VmOptions};

use super::{open_kvm, print_json, CliError, ExitCode, Out, VmSpec, GUEST_TIMEOUT};
use crate::guest::agent::GuestAgent;

/// One restored vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoredVcpu {
    /// Its index in the topology.
    pub index: u32,
    /// Its APIC ID.
    pub apic_id: u32,
    /// Its progress counter in the restored memory, before any vCPU ran.
    pub counter_at_restore: u64,
    /// Its progress counter after running.
    pub counter_after: u64,
}

impl RestoredVcpu {
    /// Whether it counted on from the restored value.
    pub fn continued(&self) -> bool {
        self.counter_after > self.counter_at_restore
    }
}

/// What `vcpuctl restore` prints (its JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// Every restored vCPU, by index.
    pub vcpus: Vec<RestoredVcpu>,
}

impl RestoreReport {
    /// Whether every vCPU continued.
    pub fn all_continued(&self) -> bool {
        self.vcpus.iter().all(RestoredVcpu::continued)
    }
}

/// Restores `dir`, runs it for `run` (then, if some vCPU has not counted yet, until it has or
/// 60 s passed: a loaded host may not have scheduled every vCPU thread), pauses
/// and reads the counters (see the [module](self) documentation).
pub fn restore(
    kvm: kvm_ioctls::Kvm,
    spec: &VmSpec,
    dir: &Path,
    run: Duration,
    out: &Out,
) -> Result<RestoreReport, CliError> {
    let (vm, vcpus) = {
        let _p = out.progress(format!("restoring {}", dir.display()));
        VcpuManager::restore_from(
            kvm,
            dir,
            VmOptions {
                logger: spec.logger.clone(),
                ..VmOptions::default()
            },
            VcpuManagerOptions {
                logger: spec.logger.clone(),
                ..VcpuManagerOptions::default()
            },
        )?
    };
    // The agent's ports, before anything runs (its state is the guest memory's).
    let agent = GuestAgent::new(vm.memory().clone(), spec.logger.clone());
    agent.register(vm.io_bus())?;
    let ids: Vec<(u32, u32)> = vcpus
        .present_vcpus()
        .iter()
        .map(|v| (v.index, v.apic_id))
        .collect();
    let apic_ids: Vec<u32> = ids.iter().map(|&(_, a)| a).collect();
    let at_restore = agent.progress_of(&apic_ids);
    let ran = (|| {
        vcpus.resume_all()?;
        let _p = out.progress(format!("running {} vCPUs for {run:?}", ids.len()));
        std::thread::sleep(run);
        crate::poll_until(GUEST_TIMEOUT, Duration::from_millis(1), || {
            agent
                .progress_of(&apic_ids)
                .iter()
                .zip(&at_restore)
                .all(|(now, then)| now > then)
        });
        vcpus.pause_all()
    })();
    let after = agent.progress_of(&apic_ids);
    let mut vcpus = vcpus;
    let exited = vcpus.exit_all();
    ran?;
    exited?;
    Ok(RestoreReport {
        vcpus: ids
            .iter()
            .zip(at_restore.iter().zip(&after))
            .map(|(&(index, apic_id), (&at, &after))| RestoredVcpu {
                index,
                apic_id,
                counter_at_restore: at,
                counter_after: after,
            })
            .collect(),
    })
}

/// `vcpuctl restore`: runs [`restore`], prints the vCPUs (JSON with `json`), and fails (exit
/// code 1) unless every vCPU continued.
pub fn run(spec: &VmSpec, out: &Out, dir: &Path, run_ms: u64, json: bool) -> Result<(), CliError> {
    let kvm = open_kvm()?;
    let report = restore(kvm, spec, dir, Duration::from_millis(run_ms), out)?;
    if json {
        print_json(&report)?;
    } else {
        out.line(format!(
            "restored {} vCPUs from {}:",
            report.vcpus.len(),
            dir.display()
        ));
        out.line(format!(
            "{:>6} {:>8} {:>18} {:>14}",
            "index", "apic_id", "counter_at_restore", "counter_after"
        ));
        for v in &report.vcpus {
            out.line(format!(
                "{:>6} {:>8} {:>18} {:>14}",
                v.index, v.apic_id, v.counter_at_restore, v.counter_after
            ));
        }
    }
    let stuck: Vec<u32> = report
        .vcpus
        .iter()
        .filter(|v| !v.continued())
        .map(|v| v.index)
        .collect();
    if stuck.is_empty() {
        out.line("every vCPU continued");
        Ok(())
    } else {
        Err(CliError {
            code: ExitCode::Failure,
            message: format!("the vCPUs with indices {stuck:?} did not continue counting"),
        })
    }
}
