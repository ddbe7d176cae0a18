//! The per-vCPU metrics as OpenMetrics text (what Prometheus scrapes), built with the
//! `prometheus-client` crate.
//!
//! Every sample has the label `cpu_id`: the vCPU's index (the CPU number a Linux guest gives
//! it, as in Kata's metrics). The families:
//!
//! | family | type | labels | what |
//! | --- | --- | --- | --- |
//! | `vcpu_exits_total` | counter | `cpu_id`, `reason` | `KVM_RUN` outcomes by kind (`io_in`, `io_out`, `mmio_read`, `mmio_write`, `hlt`, `shutdown`, `system_event`, `internal_error`, `fail_entry`, `unknown`, `eintr`, `eagain`) |
//! | `vcpu_pauses_total` | counter | `cpu_id` | running -> paused |
//! | `vcpu_resumes_total` | counter | `cpu_id` | paused -> running |
//! | `vcpu_run_seconds_total` | counter (seconds) | `cpu_id` | time inside `KVM_RUN` |
//! | `vcpu_device_errors_total` | counter | `cpu_id` | errors of the exit handler (devices) |
//! | `kata_hypervisor_vcpu` | gauge | `cpu_id`, `item` | Kata's name and items: `exit_io_in`, `exit_io_out`, `exit_mmio_read`, `exit_mmio_write`, `failures` (device errors, internal errors and failed entries) |
//!
//! Kata scrapes `kata_hypervisor_vcpu{item=...}` per sandbox; here each vCPU has its own
//! sample, told apart by `cpu_id`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use vcpu_actor::VcpuMetricsSnapshot;

type Labels = Vec<(String, String)>;

fn cpu(index: u32) -> Labels {
    vec![("cpu_id".to_string(), index.to_string())]
}

fn cpu_and(index: u32, key: &str, value: &str) -> Labels {
    vec![
        ("cpu_id".to_string(), index.to_string()),
        (key.to_string(), value.to_string()),
    ]
}

/// Gauges hold i64: a counter beyond that (never in practice) saturates.
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// OpenMetrics text of `metrics`, (vCPU index, its counters) as
/// [`VcpuManager::vcpu_metrics`](crate::VcpuManager::vcpu_metrics) gives them; ends with
/// `# EOF`.
pub fn encode_vcpu_metrics(metrics: &[(u32, VcpuMetricsSnapshot)]) -> String {
    let mut registry = Registry::default();
    let exits_family = Family::<Labels, Counter>::default();
    let pauses = Family::<Labels, Counter>::default();
    let resumes = Family::<Labels, Counter>::default();
    let run = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let device_errors = Family::<Labels, Counter>::default();
    let kata = Family::<Labels, Gauge>::default();
    for (index, m) in metrics {
        let index = *index;
        for (reason, n) in m.exits.named() {
            exits_family
                .get_or_create(&cpu_and(index, "reason", reason))
                .inc_by(n);
        }
        pauses.get_or_create(&cpu(index)).inc_by(m.pauses);
        resumes.get_or_create(&cpu(index)).inc_by(m.resumes);
        run.get_or_create(&cpu(index))
            .inc_by(m.run_time_ns as f64 / 1e9);
        device_errors
            .get_or_create(&cpu(index))
            .inc_by(m.device_errors);
        let failures = m
            .device_errors
            .saturating_add(m.exits.internal_error)
            .saturating_add(m.exits.fail_entry);
        for (item, n) in [
            ("exit_io_in", m.exits.io_in),
            ("exit_io_out", m.exits.io_out),
            ("exit_mmio_read", m.exits.mmio_read),
            ("exit_mmio_write", m.exits.mmio_write),
            ("failures", failures),
        ] {
            kata.get_or_create(&cpu_and(index, "item", item))
                .set(gauge_value(n));
        }
    }
    registry.register(
        "vcpu_exits",
        "KVM_RUN outcomes of each vCPU, by kind",
        exits_family,
    );
    registry.register(
        "vcpu_pauses",
        "Transitions of each vCPU from running to paused",
        pauses,
    );
    registry.register(
        "vcpu_resumes",
        "Transitions of each vCPU from paused to running",
        resumes,
    );
    registry.register_with_unit(
        "vcpu_run",
        "Time each vCPU spent inside KVM_RUN",
        Unit::Seconds,
        run,
    );
    registry.register(
        "vcpu_device_errors",
        "Errors the VMM's devices returned on each vCPU's exits",
        device_errors,
    );
    registry.register(
        "kata_hypervisor_vcpu",
        "Hypervisor metrics specific to VCPUs' mode of functioning",
        kata,
    );
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sample_per_vcpu_per_counter() {
        let mut a = VcpuMetricsSnapshot::default();
        a.exits.io_out = 5;
        a.pauses = 2;
        a.run_time_ns = 1_500_000_000;
        let b = VcpuMetricsSnapshot {
            resumes: 3,
            ..Default::default()
        };
        let text = encode_vcpu_metrics(&[(0, a), (1, b)]);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("vcpu_exits_total{cpu_id=\"0\",reason=\"io_out\"} 5"),
            "{text}"
        );
        assert!(text.contains("vcpu_pauses_total{cpu_id=\"0\"} 2"), "{text}");
        assert!(
            text.contains("vcpu_resumes_total{cpu_id=\"1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("vcpu_run_seconds_total{cpu_id=\"0\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("kata_hypervisor_vcpu{cpu_id=\"0\",item=\"exit_io_out\"} 5"),
            "{text}"
        );
        for cpu in ["0", "1"] {
            let n = text
                .lines()
                .filter(|l| {
                    l.starts_with("vcpu_pauses_total{") && l.contains(&format!("cpu_id=\"{cpu}\""))
                })
                .count();
            assert_eq!(n, 1, "{text}");
        }
    }
}
