//! The vCPU manager next to bare KVM: the `create`, `startup`, `pause_all` and `resume_all`
//! rows.
//!
//! - Startup: [`vmm_core::VcpuManager::create_boot_vcpus`] +
//!   [`vmm_core::VcpuManager::start_boot_vcpus`] for N vCPUs (create, CPUID from topology +
//!   vPMU, MSRs, LAPIC, FPU, registers, actor thread, start) next to bare `KVM_CREATE_VCPU` +
//!   `KVM_SET_CPUID2` of KVM's supported CPUID ([`bare_create`]).
//! - Pause/resume: [`vmm_core::VcpuManager::pause_all`] / [`vmm_core::VcpuManager::resume_all`]
//!   of N vCPUs that spin at CPL 3 (the smp_counter guest), next to the bare kick harness
//!   ([`KickedVcpus`]) running N vCPUs that spin at CPL 3 (the spin guest). Both sides wait for
//!   every thread's acknowledgement.

use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_core::{VcpuConfig, VcpuManagerOptions, VmOptions};

use super::bare::{bare_create, BareVm, KickedVcpus};
use super::{pause_resume_rounds, BenchLine, PauseResume, ACK_TIMEOUT};
use crate::guest::{self, build_with_program, GuestVm};
use crate::IntegrationError;

/// One row of measurements for N vCPUs (four lines of the table).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BenchRow {
    /// N.
    pub vcpus: u32,
    /// Manager: create + configure + start N vCPUs.
    pub startup_manager: Duration,
    /// The create + configure part of it (including spawning the actor threads).
    pub create_manager: Duration,
    /// Bare: `KVM_CREATE_VCPU` + `KVM_SET_CPUID2`, N times.
    pub startup_bare: Duration,
    /// Manager: `pause_all` (median).
    pub pause_manager: Duration,
    /// Bare: kick N threads out of `KVM_RUN`, all acknowledged (median).
    pub pause_bare: Duration,
    /// Manager: `resume_all` (median).
    pub resume_manager: Duration,
    /// Bare: wake N blocked threads, all acknowledged (median).
    pub resume_bare: Duration,
}

impl BenchRow {
    /// The table's lines: `create`, `startup`, `pause_all`, `resume_all`.
    pub fn lines(&self) -> Vec<BenchLine> {
        let n = self.vcpus;
        vec![
            BenchLine::new(
                "create",
                "ours: create+configure vCPUs+actor threads; bare: KVM_CREATE_VCPU+KVM_SET_CPUID2",
                n,
                self.create_manager,
                Some(self.startup_bare),
            ),
            BenchLine::new(
                "startup",
                "ours: create+configure+start; bare: KVM_CREATE_VCPU+KVM_SET_CPUID2",
                n,
                self.startup_manager,
                Some(self.startup_bare),
            ),
            BenchLine::new(
                "pause_all",
                "vCPUs spinning at CPL 3 out of KVM_RUN, all acknowledged",
                n,
                self.pause_manager,
                Some(self.pause_bare),
            ),
            BenchLine::new(
                "resume_all",
                "paused vCPUs back in KVM_RUN, all acknowledged",
                n,
                self.resume_manager,
                Some(self.resume_bare),
            ),
        ]
    }
}

/// What [`manager_run`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct ManagerSamples {
    /// create + configure + start.
    pub startup: Duration,
    /// create + configure (including the actor threads).
    pub create: Duration,
    /// The pause/resume rounds.
    pub rounds: Vec<PauseResume>,
}

/// The manager side for `n` vCPUs: startup time, then `rounds` pause/resume pairs.
pub fn manager_run(n: u32, rounds: u32) -> Result<ManagerSamples, IntegrationError> {
    let options = VcpuManagerOptions {
        ack_timeout: ACK_TIMEOUT,
        join_timeout: ACK_TIMEOUT,
        ..Default::default()
    };
    let config = VcpuConfig::with_counts(n, n)?;
    let (vm, mut vcpus, entry) = build_with_program(
        crate::open_kvm()?,
        &guest::smp_counter(),
        config,
        VmOptions::default(),
        options,
    )?;
    let t = Instant::now();
    vcpus.create_boot_vcpus(entry)?;
    let create = t.elapsed();
    vcpus.start_boot_vcpus()?;
    let startup = t.elapsed();
    let mut g = GuestVm {
        vm,
        vcpus,
        reports: Default::default(),
    };
    // Let the BSP wake everyone (the reports go nowhere: no device is registered here).
    if !crate::poll_until(ACK_TIMEOUT, Duration::from_millis(1), || {
        !g.counters().contains(&0)
    }) {
        return Err(IntegrationError::Guest(format!(
            "not every vCPU started counting within {ACK_TIMEOUT:?}: {:?}",
            g.counters()
        )));
    }
    let samples = pause_resume_rounds(
        rounds,
        Duration::ZERO,
        || Ok(g.vcpus.pause_all()?),
        || Ok(g.vcpus.resume_all()?),
    )?;
    g.vcpus.exit_all()?;
    Ok(ManagerSamples {
        startup,
        create,
        rounds: samples,
    })
}

/// The bare side for `n` vCPUs: `rounds` (pause, resume) pairs of the kick harness running
/// the spin guest.
pub fn bare_pause_resume(n: u32, rounds: u32) -> Result<Vec<PauseResume>, IntegrationError> {
    let bare = BareVm::new()?;
    let fds = bare.runnable_vcpus(&guest::spin(), n)?;
    let kicked = KickedVcpus::spawn(bare, fds)?;
    kicked.resume()?;
    pause_resume_rounds(
        rounds,
        Duration::ZERO,
        || kicked.pause(),
        || kicked.resume(),
    )
}

/// One row: both sides for `n` vCPUs.
pub fn bench_vcpus(n: u32, rounds: u32) -> Result<BenchRow, IntegrationError> {
    let startup_bare = bare_create(n)?;
    let manager = manager_run(n, rounds)?;
    let ours = PauseResume::medians(&manager.rounds);
    let bare = PauseResume::medians(&bare_pause_resume(n, rounds)?);
    Ok(BenchRow {
        vcpus: n,
        startup_manager: manager.startup,
        create_manager: manager.create,
        startup_bare,
        pause_manager: ours.pause,
        pause_bare: bare.pause,
        resume_manager: ours.resume,
        resume_bare: bare.resume,
    })
}
