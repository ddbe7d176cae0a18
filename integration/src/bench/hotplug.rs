//! Hotplug latency on the agent guest: [`bench_resize`], and the `hot_add`, `hot_add_vcpu`
//! and `hot_remove` rows ([`hotplug_lines`]).
//!
//! Each step is one [`VcpuManager::resize_vcpus`](vmm_core::VcpuManager::resize_vcpus) over
//! upcall, timed from the request until the reply came back; a grow returns only once the
//! guest's BSP sent INIT/SIPI to every new vCPU and each of them ran guest code and reported
//! its APIC ID (the agent's callback waits for that before the guest server replies). The
//! outcome splits the time into vCPU creation/start (or exit, when removing) and the upcall
//! round trip.

use std::time::Duration;

use serde::Serialize;
use vmm_core::{VcpuConfig, VcpuManagerOptions};

use super::{median_by, BenchLine};
use crate::guest::agent::{attach_upcall, AgentUpcallOptions, AgentVm, AgentVmOptions, ApMode};
use crate::IntegrationError;

/// What [`bench_resize`] measures.
#[derive(Clone, Debug)]
pub struct ResizeBenchOptions {
    /// The vCPUs added (then removed) per step, e.g. `[1, 7]` or `[1, 7, 63]`. The VM boots
    /// with 1 vCPU of at most `1 + max(steps)`.
    pub steps: Vec<u32>,
    /// How many times each step is repeated (the first add of an APIC ID creates its KVM
    /// vCPU; later ones reuse the kept fd: [`ResizeSample::reused_fds`]).
    pub rounds: u32,
    /// Where the VM and the upcall channel log.
    pub logger: slog::Logger,
}

impl Default for ResizeBenchOptions {
    fn default() -> Self {
        Self {
            steps: vec![1, 7],
            rounds: 3,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
        }
    }
}

/// One timed resize.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResizeSample {
    /// vCPUs before.
    pub from: u32,
    /// vCPUs after.
    pub to: u32,
    /// Whether every added vCPU reused a kept KVM vCPU fd (always false for removals).
    pub reused_fds: bool,
    /// Request to reply, as the manager measured it.
    pub total: Duration,
    /// vCPU creation, configuration and thread start (add) or thread exit (remove).
    pub vcpu_work: Duration,
    /// The upcall round trip (for an add: until every new vCPU ran guest code).
    pub upcall: Duration,
}

/// Every sample of [`bench_resize`], in the order taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResizeBenchReport {
    /// The samples: per round and step, the add, then the remove.
    pub samples: Vec<ResizeSample>,
}

impl ResizeBenchReport {
    /// The median sample (by total) of the resizes from `from` to `to`, if any ran.
    pub fn median(&self, from: u32, to: u32) -> Option<&ResizeSample> {
        let v: Vec<&ResizeSample> = self
            .samples
            .iter()
            .filter(|s| s.from == from && s.to == to)
            .collect();
        median_by(v, |a, b| a.total.cmp(&b.total))
    }
}

/// Boots the agent guest with 1 vCPU of at most `1 + max(steps)` (APs halt once online, so
/// that idle vCPUs use no host CPU), attaches an upcall channel, and for each round and step
/// `n` resizes 1 -> 1+n and back, timing each.
pub fn bench_resize(
    kvm: kvm_ioctls::Kvm,
    options: &ResizeBenchOptions,
) -> Result<ResizeBenchReport, IntegrationError> {
    let Some(&largest) = options.steps.iter().max() else {
        return Ok(ResizeBenchReport::default());
    };
    let max = largest.checked_add(1).ok_or_else(|| {
        IntegrationError::Guest(format!("step {largest} is too large: at most u32::MAX - 1"))
    })?;
    let config = VcpuConfig::with_counts(1, max)?;
    let vm_options = AgentVmOptions {
        ap_mode: ApMode::Halt,
        manager: VcpuManagerOptions {
            logger: options.logger.clone(),
            ..VcpuManagerOptions::default()
        },
        ..AgentVmOptions::default()
    };
    let mut vm = AgentVm::create(kvm, config, vm_options)?;
    vm.start(Duration::from_secs(60))?;
    let _upcall = attach_upcall(
        &mut vm,
        AgentUpcallOptions {
            logger: options.logger.clone(),
            ..AgentUpcallOptions::default()
        },
    )?;
    let mut report = ResizeBenchReport::default();
    for _ in 0..options.rounds {
        for &n in &options.steps {
            let target = 1 + n;
            let kept = vm.vcpus.kept_vcpu_fds();
            let reused_fds = (1..target).all(|i| {
                vm.vcpus
                    .apic_id(i)
                    .is_ok_and(|id| kept.binary_search(&id).is_ok())
            });
            for (to, reused) in [(target, reused_fds), (1, false)] {
                let out = vm.vcpus.resize_vcpus(to)?;
                report.samples.push(ResizeSample {
                    from: out.from,
                    to: out.to,
                    reused_fds: reused,
                    total: out.total,
                    vcpu_work: out.vcpu_work,
                    upcall: out.upcall,
                });
            }
        }
    }
    vm.vcpus.exit_all()?;
    Ok(report)
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
            out.push(BenchLine::new(
                "hot_add",
                "resize_vcpus(1 -> 1+N) over upcall until every new vCPU ran guest code; bare: \
                 KVM_CREATE_VCPU+KVM_SET_CPUID2 of N vCPUs",
                n,
                add.total,
                Some(bare),
            ));
            out.push(BenchLine::new(
                "hot_add_vcpu",
                "the vCPU creation/configuration/start share of hot_add (the rest is the upcall \
                 round trip); bare as hot_add",
                n,
                add.vcpu_work,
                Some(bare),
            ));
        }
        if let Some(remove) = report.median(to, 1) {
            out.push(BenchLine::new(
                "hot_remove",
                "resize_vcpus(1+N -> 1) over upcall until the removed threads ended",
                n,
                remove.total,
                None,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_picks_the_middle_of_matching_samples() {
        let s = |from, to, ms| ResizeSample {
            from,
            to,
            reused_fds: false,
            total: Duration::from_millis(ms),
            vcpu_work: Duration::ZERO,
            upcall: Duration::ZERO,
        };
        let r = ResizeBenchReport {
            samples: vec![s(1, 2, 9), s(2, 1, 1), s(1, 2, 3), s(1, 2, 5)],
        };
        assert_eq!(
            r.median(1, 2).map(|m| m.total),
            Some(Duration::from_millis(5))
        );
        assert_eq!(
            r.median(2, 1).map(|m| m.total),
            Some(Duration::from_millis(1))
        );
        assert!(r.median(1, 8).is_none());
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
        assert!(super::super::table(&l).contains("hot_remove"));
        assert!(super::super::table(&l)
            .lines()
            .any(|x| x.starts_with("hot_remove") && x.trim_end().ends_with('-')));
    }
}
