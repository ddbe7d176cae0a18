//! CPU templates, normalisation, fingerprints and OpenMetrics end to end: what guest code
//! reads (at CPL 0, where KVM answers with the VMM's table) on every vCPU of a non-trivial
//! topology, `vcpuctl cpuid --json --template`, `vcpuctl fingerprint`, and
//! `vcpuctl demo --metrics openmetrics` read by Python's `prometheus_client` (an independent
//! parser; `.ci/run` installs it).

use std::path::PathBuf;
use std::process::Command;

mod common;

use common::{run_ok, vcpuctl};
use integration::cmd::cpuid::{cpuid, VcpuCpuidView};
use integration::cmd::VmSpec;
use integration::cpuid_view::GuestCpuidReader;
use raw_cpuid::CpuId;
use serde_json::Value;
use topology::hwloc::CpuidResult;
use vmm_core::template::VMM_OWNED_LEAVES;
use vmm_core::{CpuTemplate, VpmuFeatureLevel};

/// 2 sockets x 2 cores x 2 threads: sparse enough to have every topology level.
const SMP: &str = "8,sockets=2,cores=2,threads=2";
/// The template's own bits of 0x8000_0001 ECX: bits 0 and 12 set, bit 5 cleared.
const EXT_MASK: u32 = (1 << 12) | (1 << 5) | 1;
const EXT_BITS: u32 = (1 << 12) | 1;

fn template_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../vmm-core/tests/data/cpu_templates")
        .join(name)
}

fn spec(template: Option<CpuTemplate>) -> VmSpec {
    let mut s = VmSpec::new(
        SMP.parse().unwrap(),
        VpmuFeatureLevel::Disabled,
        64,
        slog::Logger::root(slog::Discard, slog::o!()),
    );
    s.template = template;
    s
}

fn find(r: &[CpuidResult], leaf: u32, subleaf: u32) -> Option<CpuidResult> {
    r.iter()
        .find(|x| x.leaf == leaf && x.subleaf == subleaf)
        .copied()
}

fn guest_ext_ecx(v: &VcpuCpuidView) -> u32 {
    find(&v.registers, 0x8000_0001, 0)
        .expect("the guest read 0x8000_0001")
        .ecx
}

#[test]
fn every_vcpu_reads_the_templates_bits_and_the_vmms_topology() {
    if !common::have_kvm("every_vcpu_reads_the_templates_bits") {
        return;
    }
    let template = CpuTemplate::from_file(&template_path("ext-features.json")).unwrap();
    let with = cpuid(&spec(Some(template)), None).unwrap();
    let without = cpuid(&spec(None), None).unwrap();
    assert_eq!(with.len(), 8);
    for (a, b) in with.iter().zip(&without) {
        // What guest code read at CPL 0, in a leaf these hosts do not overlay.
        let ecx = guest_ext_ecx(a);
        assert_eq!(
            ecx & EXT_MASK,
            EXT_BITS,
            "vCPU {}: guest read {ecx:#x}",
            a.slot.index
        );
        // What KVM holds.
        let kvm_ecx = find(&a.kvm_registers, 0x8000_0001, 0).unwrap().ecx;
        assert_eq!(
            kvm_ecx & EXT_MASK,
            EXT_BITS,
            "vCPU {}: KVM {kvm_ecx:#x}",
            a.slot.index
        );
        // Topology and PMU leaves as read by the guest: the template changed nothing.
        for r in a
            .registers
            .iter()
            .filter(|r| VMM_OWNED_LEAVES.contains(&r.leaf))
        {
            assert_eq!(
                Some(*r),
                find(&b.registers, r.leaf, r.subleaf),
                "vCPU {}: leaf {:#x}.{}",
                a.slot.index,
                r.leaf,
                r.subleaf
            );
        }
        assert_eq!(a.location, b.location);
        assert_eq!(a.leaf1_apic_id, b.leaf1_apic_id);
        let loc = a.location.expect("a decoded location");
        assert_eq!(loc.x2apic_id, a.slot.apic_id);
    }
}

#[test]
fn the_guest_decodes_the_brand_string_and_the_tsc_leaf() {
    if !common::have_kvm("the_guest_decodes_the_brand_string_and_the_tsc_leaf") {
        return;
    }
    let views = cpuid(&spec(None), None).unwrap();
    for v in &views {
        let id = CpuId::with_cpuid_reader(GuestCpuidReader::new(&v.registers));
        let brand = id.get_processor_brand_string().expect("a brand string");
        assert!(!brand.as_str().trim().is_empty(), "vCPU {}", v.slot.index);
        let kvm_tsc = find(&v.kvm_registers, 0x4000_0010, 0);
        let invariant =
            find(&v.kvm_registers, 0x8000_0007, 0).is_some_and(|e| e.edx & (1 << 8) != 0);
        assert_eq!(kvm_tsc.is_some(), invariant, "vCPU {}", v.slot.index);
        if let Some(t) = kvm_tsc {
            // The guest's own read of the leaf, decoded by raw-cpuid.
            let read = find(&v.registers, 0x4000_0010, 0).expect("the guest read 0x4000_0010");
            assert_eq!(read, t, "vCPU {}", v.slot.index);
            if let Some(hv) = id.get_hypervisor_info() {
                assert_eq!(hv.tsc_frequency(), Some(t.eax));
                assert_eq!(hv.apic_frequency(), Some(1_000_000));
            }
            assert!(t.eax > 100_000, "TSC {} kHz", t.eax);
        }
        // Leaf 6 cleared.
        if let Some(six) = find(&v.registers, 6, 0) {
            assert_eq!((six.eax, six.ebx, six.ecx, six.edx), (0, 0, 0, 0));
        }
    }
}

#[test]
fn vcpuctl_cpuid_json_has_registers_and_kvm_registers() {
    if !common::have_kvm("vcpuctl_cpuid_json_has_registers_and_kvm_registers") {
        return;
    }
    let path = template_path("ext-features.json");
    let out = run_ok(
        vcpuctl()
            .args(["cpuid", "--json", "--smp", SMP, "--template"])
            .arg(&path),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let views = v.as_array().unwrap();
    assert_eq!(views.len(), 8);
    for view in views {
        for key in ["registers", "kvm_registers"] {
            let regs = view[key].as_array().unwrap_or_else(|| panic!("{key}"));
            let ext = regs
                .iter()
                .find(|r| r["leaf"] == 0x8000_0001u32 && r["subleaf"] == 0)
                .unwrap_or_else(|| panic!("{key} lacks 0x80000001"));
            let ecx = u32::try_from(ext["ecx"].as_u64().unwrap()).unwrap();
            assert_eq!(ecx & EXT_MASK, EXT_BITS, "{key}");
        }
    }
}

#[test]
fn a_malformed_template_is_a_usage_error_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    std::fs::write(
        &path,
        r#"{"cpuid_modifiers": [{"leaf": "0x1", "modifiers": [{"register": "exx", "bitmap": "0b0"}]}]}"#,
    )
    .unwrap();
    let out = vcpuctl()
        .arg("cpuid")
        .arg("--template")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cpuid_modifiers[0]") && err.contains("exx"),
        "{err}"
    );
}

#[test]
fn fingerprints_compare_and_a_template_hides_a_difference() {
    if !common::have_kvm("fingerprints_compare") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    run_ok(vcpuctl().args(["fingerprint", "dump", "--out"]).arg(&a));
    let mut f: Value = serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
    assert!(f["kvm_cpuid"].as_array().unwrap().len() > 10);
    assert!(!f["kvm_capabilities"].as_object().unwrap().is_empty());
    // The same host twice: no difference.
    run_ok(vcpuctl().args(["fingerprint", "compare"]).arg(&a).arg(&a));
    // Another "host": bit 5 of 0x8000_0001 ECX flipped.
    let entry = f["kvm_cpuid"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["leaf"] == 0x8000_0001u32)
        .unwrap();
    let ecx = entry["ecx"].as_u64().unwrap() ^ (1 << 5);
    entry["ecx"] = ecx.into();
    std::fs::write(&b, serde_json::to_vec(&f).unwrap()).unwrap();
    let differ = vcpuctl()
        .args(["fingerprint", "compare", "--json"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(differ.status.code(), Some(1));
    let c: Value = serde_json::from_slice(&differ.stdout).unwrap();
    assert_eq!(c["unhidden"], 1);
    assert_eq!(
        c["differences"][0]["item"],
        "leaf 0x80000001 subleaf 0x0 ecx"
    );
    assert_eq!(c["differences"][0]["bits"], "0x00000020");
    // The template sets bit 5: the difference is hidden.
    let hidden = run_ok(
        vcpuctl()
            .args(["fingerprint", "compare", "--json", "--template"])
            .arg(template_path("ext-features.json"))
            .arg(&a)
            .arg(&b),
    );
    let c: Value = serde_json::from_slice(&hidden.stdout).unwrap();
    assert_eq!(c["differences"][0]["hidden_by_template"], true);
    assert_eq!(c["unhidden"], 0);
}

/// Python's prometheus_client reads the demo's OpenMetrics output: one sample per vCPU per
/// counter.
#[test]
fn demo_openmetrics_parses_with_prometheus_client() {
    if !common::have_kvm("demo_openmetrics_parses_with_prometheus_client") {
        return;
    }
    let python_has_it = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if !python_has_it {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install Python's prometheus_client (.ci/run)"
        );
        eprintln!("SKIPPED: python3 -m pip install prometheus_client to run this test");
        return;
    }
    let out = run_ok(vcpuctl().args(["demo", "--metrics", "openmetrics"]));
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.txt");
    std::fs::write(&metrics, &out.stdout).unwrap();
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
counts = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        if s.name.endswith("_created"):
            continue
        key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "cpu_id")))
        counts.setdefault(repr(key), []).append(s.labels["cpu_id"])
print(json.dumps(counts))
"#;
    let py = Command::new("python3")
        .args(["-c", script])
        .arg(&metrics)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "prometheus_client refused the output: {}\n{}",
        String::from_utf8_lossy(&py.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let counts: Value = serde_json::from_slice(&py.stdout).unwrap();
    let counts = counts.as_object().unwrap();
    // The demo ends with 12 vCPUs (it grows to maxcpus, then shrinks back to 2): the
    // counters are read before the stop, with the boot vCPUs present.
    let mut names = std::collections::BTreeSet::new();
    let mut per_vcpu = None;
    for (key, cpus) in counts {
        let cpus: Vec<&str> = cpus
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let mut unique = cpus.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), cpus.len(), "{key}: a vCPU has two samples");
        let n = *per_vcpu.get_or_insert(cpus.len());
        assert_eq!(cpus.len(), n, "{key}: one sample per vCPU");
        names.insert(key.split('\'').nth(1).unwrap().to_string());
    }
    assert!(per_vcpu.unwrap() >= 2);
    for name in [
        "vcpu_exits_total",
        "vcpu_pauses_total",
        "vcpu_resumes_total",
        "vcpu_run_seconds_total",
        "kata_hypervisor_vcpu",
    ] {
        assert!(names.contains(name), "{name} missing: {names:?}");
    }
}
