//! `vcpuctl snapshot --smp SPEC [--resize N] --to DIR [--json]`: boots the agent guest (every
//! vCPU counts in guest memory, see [`crate::guest::agent`]), grows it to N vCPUs over upcall
//! if asked, waits until every vCPU counts, pauses, saves into DIR
//! ([`VcpuManager::save_to`](vmm_core::VcpuManager::save_to)) and prints, per vCPU, its
//! `index`, `apic_id` and `counter` (read from guest memory at the save). `vcpuctl restore`
//! continues it in another process.
//!
//! JSON: `{"vcpus": [{"index": 0, "apic_id": 0, "counter": 123}, ...]}`.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::{boot_counting_agent, open_kvm, print_json, CliError, Out, VmSpec, GUEST_TIMEOUT};
use crate::guest::agent::{attach_upcall, AgentUpcallOptions, GuestAgent};
use crate::IntegrationError;

/// One saved vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotVcpu {
    /// Its index in the topology.
    pub index: u32,
    /// Its APIC ID.
    pub apic_id: u32,
    /// Its progress counter in guest memory at the save.
    pub counter: u64,
}

/// What `vcpuctl snapshot` prints (its JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotReport {
    /// Every saved vCPU, by index.
    pub vcpus: Vec<SnapshotVcpu>,
}

/// Waits until the counter of every APIC ID in `apic_ids` advanced.
pub(crate) fn wait_counting(agent: &GuestAgent, apic_ids: &[u32]) -> Result<(), CliError> {
    let before = agent.progress_of(apic_ids);
    let moved = crate::poll_until(GUEST_TIMEOUT, Duration::from_millis(1), || {
        agent
            .progress_of(apic_ids)
            .iter()
            .zip(&before)
            .all(|(now, then)| now > then)
    });
    if moved {
        return Ok(());
    }
    let stuck: Vec<u32> = apic_ids
        .iter()
        .zip(agent.progress_of(apic_ids).iter().zip(&before))
        .filter(|(_, (now, then))| now <= then)
        .map(|(id, _)| *id)
        .collect();
    Err(IntegrationError::Guest(format!(
        "the vCPUs with APIC IDs {stuck:?} did not count within {GUEST_TIMEOUT:?}"
    ))
    .into())
}

/// Boots, optionally grows to `resize` vCPUs, pauses and saves into `dir` (see the
/// [module](self) documentation).
pub fn snapshot(
    kvm: kvm_ioctls::Kvm,
    spec: &VmSpec,
    resize: Option<u32>,
    dir: &Path,
    out: &Out,
) -> Result<SnapshotReport, CliError> {
    let boot = spec.smp.boot_cpus;
    let max = spec.smp.max_cpus;
    if let Some(n) = resize {
        if n <= boot || n > max {
            return Err(CliError::usage(format!(
                "--resize {n}: the target must be above the boot count {boot} and at most \
                 maxcpus {max}"
            )));
        }
    }
    let mut vm = boot_counting_agent(kvm, spec, out)?;
    // Kept until the save: the upcall connection is not part of the snapshot.
    let _upcall = match resize {
        Some(n) => {
            let upcall = attach_upcall(
                &mut vm,
                AgentUpcallOptions::with_logger(spec.logger.clone()),
            )?;
            let _p = out.progress(format!("hot-adding vCPUs over upcall: {boot} -> {n}"));
            vm.vcpus.resize_vcpus(n)?;
            Some(upcall)
        }
        None => None,
    };
    let apic_ids = vm.present_apic_ids();
    {
        let _p = out.progress(format!("waiting for {} vCPUs to count", apic_ids.len()));
        wait_counting(&vm.agent, &apic_ids)?;
    }
    vm.vcpus.pause_all()?;
    let saved = {
        let _p = out.progress(format!("saving into {}", dir.display()));
        vm.vcpus.save_to(dir)
    };
    let report = saved.map(|saved| SnapshotReport {
        vcpus: saved
            .vcpu_ids()
            .into_iter()
            .map(|(index, apic_id)| SnapshotVcpu {
                index,
                apic_id,
                counter: vm.agent.progress(apic_id),
            })
            .collect(),
    });
    let exited = vm.vcpus.exit_all();
    let report = report?;
    exited?;
    Ok(report)
}

/// `vcpuctl snapshot`: runs [`snapshot`] and prints the vCPUs (JSON with `json`).
pub fn run(
    spec: &VmSpec,
    out: &Out,
    resize: Option<u32>,
    dir: &Path,
    json: bool,
) -> Result<(), CliError> {
    let kvm = open_kvm()?;
    let report = snapshot(kvm, spec, resize, dir, out)?;
    if json {
        return print_json(&report);
    }
    out.line(format!(
        "saved {} vCPUs into {}:",
        report.vcpus.len(),
        dir.display()
    ));
    out.line(format!("{:>6} {:>8} {:>14}", "index", "apic_id", "counter"));
    for v in &report.vcpus {
        out.line(format!("{:>6} {:>8} {:>14}", v.index, v.apic_id, v.counter));
    }
    Ok(())
}
