//! Hotplug latency on the agent guest: [`bench_resize`], and the `hot_add`, `hot_add_vcpu`
//! and `hot_remove` rows ([`hotplug_lines`]), over upcall and over ACPI (the same rows with
//! an `_acpi` suffix).
//!
//! Each step is one [`VcpuManager::resize_vcpus`](vmm_core::VcpuManager::resize_vcpus),
//! timed from the request until every new vCPU ran guest code and reported its APIC ID:
//! - over upcall the resize returns only then (the agent's callback waits for the reports
//!   before the guest server replies);
//! - over ACPI the resize returns once the guest acknowledged every insert on the hotplug
//!   controller and the manager saw every new vCPU leave wait-for-SIPI; the wait for the
//!   reports after it is added to the sample's total (and to its guest round trip).
//!
//! The outcome splits the time into vCPU creation/start (or exit, when removing) and the
//! guest round trip.

use std::time::Duration;

use serde::Serialize;
use vmm_core::{VcpuConfig, VcpuManagerOptions};

use super::{median_by, BenchLine};
use crate::guest::agent::{
    attach_acpi, attach_upcall, AgentAcpiOptions, AgentUpcallOptions, AgentVm, AgentVmOptions,
    ApMode, HotplugChannel,
};
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
    /// Upcall or ACPI.
    pub channel: HotplugChannel,
}

impl Default for ResizeBenchOptions {
    fn default() -> Self {
        Self {
            steps: vec![1, 7],
            rounds: 3,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            channel: HotplugChannel::Upcall,
        }
    }
}

/// One timed resize.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResizeSample {
    /// The hotplug channel.
    pub channel: HotplugChannel,
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
    /// The guest round trip (for an add: until every new vCPU ran guest code).
    pub upcall: Duration,
}

/// Every sample of [`bench_resize`], in the order taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ResizeBenchReport {
    /// The hotplug channel of every sample.
    pub channel: HotplugChannel,
    /// The samples: per round and step, the add, then the remove.
    pub samples: Vec<ResizeSample>,
}

impl ResizeBenchReport {
    /// The samples of the resizes from `from` to `to`, in the order taken.
    fn resizes(&self, from: u32, to: u32) -> impl Iterator<Item = &ResizeSample> {
        self.samples
            .iter()
            .filter(move |s| s.from == from && s.to == to)
    }

    /// The median sample (by total) of the resizes from `from` to `to`, if any ran.
    pub fn median(&self, from: u32, to: u32) -> Option<&ResizeSample> {
        median_by(self.resizes(from, to).collect(), |a, b| {
            a.total.cmp(&b.total)
        })
    }

    /// The median vCPU work of the resizes from `from` to `to` (its own median, not the
    /// median-by-total sample's: the two vary apart), if any ran.
    pub fn median_vcpu_work(&self, from: u32, to: u32) -> Option<Duration> {
        let v: Vec<Duration> = self.resizes(from, to).map(|s| s.vcpu_work).collect();
        (!v.is_empty()).then(|| super::median(v))
    }
}

/// Boots the agent guest with 1 vCPU of at most `1 + max(steps)` (APs halt once online, so
/// that idle vCPUs use no host CPU), attaches the upcall or ACPI channel, and for each round
/// and step `n` resizes 1 -> 1+n and back, timing each.
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
    let (_upcall, _acpi) = match options.channel {
        HotplugChannel::Upcall => {
            let upcall = attach_upcall(
                &mut vm,
                AgentUpcallOptions::with_logger(options.logger.clone()),
            )?;
            (Some(upcall), None)
        }
        HotplugChannel::Acpi => (
            None,
            Some(attach_acpi(&mut vm, AgentAcpiOptions::default())?),
        ),
    };
    let mut report = ResizeBenchReport {
        channel: options.channel,
        samples: Vec::new(),
    };
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
                let t = std::time::Instant::now();
                let out = vm.vcpus.resize_vcpus(to)?;
                let added: Vec<u32> = out.added.iter().map(|s| s.apic_id).collect();
                let removed: Vec<u32> = out.removed.iter().map(|s| s.apic_id).collect();
                // Over ACPI the new vCPUs may still be on their way to the report.
                let (mut total, mut upcall) = (out.total, out.upcall);
                if options.channel == HotplugChannel::Acpi {
                    let t_wait = std::time::Instant::now();
                    vm.agent.wait_online(&added, Duration::from_secs(60))?;
                    vm.agent.mark_parked(&removed);
                    upcall += t_wait.elapsed();
                    total = t.elapsed();
                }
                report.samples.push(ResizeSample {
                    channel: options.channel,
                    from: out.from,
                    to: out.to,
                    reused_fds: reused,
                    total,
                    vcpu_work: out.vcpu_work,
                    upcall,
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
///   rest is the upcall round trip, the guest waking them), its own median over the rounds
///   (the first round creates the KVM vCPUs, the others reuse the kept fds), against the
///   same bare cost;
/// - `hot_remove`: request until the threads are gone (no bare equivalent: `-`).
pub fn hotplug_lines(
    report: &ResizeBenchReport,
    steps: &[u32],
    bare_create: &[Duration],
) -> Vec<BenchLine> {
    let (add_row, vcpu_row, remove_row, add_what, vcpu_what, remove_what) = match report.channel {
        HotplugChannel::Upcall => (
            "hot_add",
            "hot_add_vcpu",
            "hot_remove",
            "resize_vcpus(1 -> 1+N) over upcall until every new vCPU ran guest code; bare: \
             KVM_CREATE_VCPU+KVM_SET_CPUID2 of N vCPUs",
            "the vCPU creation/configuration/start share of hot_add (the rest is the upcall \
             round trip), median over the rounds (the first creates the KVM vCPUs, the others \
             reuse the kept fds); bare as hot_add",
            "resize_vcpus(1+N -> 1) over upcall until the removed threads ended",
        ),
        HotplugChannel::Acpi => (
            "hot_add_acpi",
            "hot_add_vcpu_acpi",
            "hot_remove_acpi",
            "resize_vcpus(1 -> 1+N) over ACPI (GED + hotplug controller, the guest polls) until \
             every new vCPU ran guest code; bare: KVM_CREATE_VCPU+KVM_SET_CPUID2 of N vCPUs",
            "the vCPU creation/configuration/start share of hot_add_acpi (the rest is the guest \
             round trip and the MP-state check), median over the rounds as hot_add_vcpu; bare \
             as hot_add_acpi",
            "resize_vcpus(1+N -> 1) over ACPI until the guest ejected them and their threads \
             ended",
        ),
    };
    let mut out = Vec::new();
    for (&n, &bare) in steps.iter().zip(bare_create) {
        let to = n.saturating_add(1);
        if let Some(add) = report.median(1, to) {
            out.push(BenchLine::new(add_row, add_what, n, add.total, Some(bare)));
        }
        if let Some(work) = report.median_vcpu_work(1, to) {
            out.push(BenchLine::new(vcpu_row, vcpu_what, n, work, Some(bare)));
        }
        if let Some(remove) = report.median(to, 1) {
            out.push(BenchLine::new(
                remove_row,
                remove_what,
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
            channel: HotplugChannel::Upcall,
            from,
            to,
            reused_fds: false,
            total: Duration::from_millis(ms),
            vcpu_work: Duration::ZERO,
            upcall: Duration::ZERO,
        };
        let r = ResizeBenchReport {
            channel: HotplugChannel::Upcall,
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
    fn the_vcpu_row_is_its_own_median_not_the_median_totals() {
        let s = |total, work| ResizeSample {
            channel: HotplugChannel::Upcall,
            from: 1,
            to: 8,
            reused_fds: false,
            total: Duration::from_millis(total),
            vcpu_work: Duration::from_millis(work),
            upcall: Duration::ZERO,
        };
        let report = ResizeBenchReport {
            channel: HotplugChannel::Upcall,
            samples: vec![s(10, 9), s(20, 1), s(30, 2)],
        };
        let l = hotplug_lines(&report, &[7], &[Duration::from_millis(1)]);
        assert_eq!((l[0].benchmark, l[0].ours_ms), ("hot_add", 20.0));
        assert_eq!((l[1].benchmark, l[1].ours_ms), ("hot_add_vcpu", 2.0));
        assert_eq!(report.median_vcpu_work(8, 1), None);
    }

    #[test]
    fn hotplug_lines_take_the_medians_and_leave_remove_without_bare() {
        let s = |from, to, ms: u64| ResizeSample {
            channel: HotplugChannel::Upcall,
            from,
            to,
            reused_fds: false,
            total: Duration::from_millis(ms),
            vcpu_work: Duration::from_millis(ms / 2),
            upcall: Duration::from_millis(ms / 2),
        };
        let mut report = ResizeBenchReport {
            channel: HotplugChannel::Upcall,
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
        report.channel = HotplugChannel::Acpi;
        let l = hotplug_lines(&report, &[7], &[Duration::from_millis(5)]);
        let names: Vec<&str> = l.iter().map(|x| x.benchmark).collect();
        assert_eq!(
            names,
            ["hot_add_acpi", "hot_add_vcpu_acpi", "hot_remove_acpi"]
        );
        assert!(l[0].detail.contains("ACPI"));
    }
}
