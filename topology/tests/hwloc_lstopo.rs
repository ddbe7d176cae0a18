//! Feeds hwloc CPUID dumps of every vCPU to `lstopo` (hwloc's x86 backend, an independent
//! decoder) and checks that it finds the configured packages, dies, cores and PUs, with
//! each PU in the right one, for many shapes (non-powers of two among them) and for Intel,
//! AMD and Hygon bases.
//!
//! hwloc's x86 backend makes Die objects from leaf 0x1F, which it reads on Intel only; on
//! AMD/Hygon the die shows as the L3 cache (per die) and, with
//! `HWLOC_X86_TOPOEXT_NUMANODES=1`, as a NUMA node from leaf 0x8000_001E: both are checked.
//!
//! Needs `lstopo-no-graphics` (Debian package `hwloc`). Without it the test fails when
//! `VCPU_REQUIRE_KVM=1` or `CI=true` (CI installs hwloc), and is skipped loudly otherwise.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

mod common;

use common::{expected_partition, shapes, this_host_base, Partition};
use topology::lstopo::HwlocTopology;
use topology::{build_vcpu_cpuid, host, hwloc, CpuTopology, CpuVendor, CpuidEntry};

const LSTOPO: &str = "lstopo-no-graphics";

/// The partition of PUs by their nearest `kind` ancestor (PUs without one are left out).
fn partition_by(hw: &HwlocTopology, kind: &str) -> Partition {
    hw.groups_of_pus(kind)
        .into_iter()
        .map(BTreeSet::from_iter)
        .collect()
}

/// Runs lstopo on a dump directory; `None` when lstopo is not installed.
fn lstopo_xml(dir: &Path) -> Option<String> {
    let out = Command::new(LSTOPO)
        .args(["--of", "xml", "-"])
        .env("HWLOC_CPUID_PATH", dir)
        .env("HWLOC_COMPONENTS", "x86,stop")
        .env("HWLOC_X86_TOPOEXT_NUMANODES", "1")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run {LSTOPO}: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{LSTOPO} failed: {stderr}");
    // hwloc complains on stderr about queries missing from the dump or a rejected dump.
    assert!(
        !stderr.contains("Couldn't find") && !stderr.contains("Ignoring dumped cpuid"),
        "{LSTOPO} did not take the dump as complete: {stderr}"
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn lstopo_required() -> bool {
    std::env::var("VCPU_REQUIRE_KVM").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Checks one shape on one base; `false` when lstopo is missing.
fn check(vendor: CpuVendor, base: &[CpuidEntry], t: &CpuTopology) -> bool {
    let ctx = format!("{vendor:?} {t}");
    let per_cpu: Vec<Vec<CpuidEntry>> = (0..t.max_vcpus())
        .map(|i| build_vcpu_cpuid(base, vendor, t, i).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    hwloc::write_hwloc_dump(dir.path(), &per_cpu).unwrap();
    let Some(xml) = lstopo_xml(dir.path()) else {
        return false;
    };
    let hw = HwlocTopology::parse(&xml);
    assert!(
        hw.from_x86_backend(),
        "{ctx}: lstopo did not use the x86 backend"
    );

    let sockets = t.sockets() as usize;
    let dies = sockets * t.dies() as usize;
    let cores = dies * t.cores() as usize;
    assert_eq!(hw.count("PU"), t.max_vcpus() as usize, "{ctx}: PUs");
    assert_eq!(hw.count("Package"), sockets, "{ctx}: packages");
    assert_eq!(hw.count("Core"), cores, "{ctx}: cores");
    assert_eq!(
        hw.pus(),
        (0..t.max_vcpus()).collect::<Vec<u32>>(),
        "{ctx}: PU OS indexes are the vCPU indexes"
    );

    let by_socket = expected_partition(t, |l| l.socket);
    let by_die = expected_partition(t, |l| (l.socket, l.die));
    let by_core = expected_partition(t, |l| (l.socket, l.die, l.core));
    for (kind, expected, what) in [
        ("Package", &by_socket, "PUs per package"),
        ("Core", &by_core, "PUs per core"),
        ("L2Cache", &by_core, "L2 per core"),
        ("L3Cache", &by_die, "L3 per die"),
    ] {
        assert_eq!(&partition_by(&hw, kind), expected, "{ctx}: {what}");
    }
    if vendor.is_amd_compatible() {
        // Die objects come from leaf 0x1F, which hwloc only reads on Intel; the AMD node
        // (= die) of leaf 0x8000_001E becomes a NUMA node.
        assert_eq!(hw.count("Die"), 0, "{ctx}: no Die objects expected on AMD");
        assert_eq!(hw.count("NUMANode"), dies, "{ctx}: NUMA nodes (dies)");
    } else {
        assert_eq!(hw.count("Die"), dies, "{ctx}: dies");
        assert_eq!(partition_by(&hw, "Die"), by_die, "{ctx}: PUs per die");
    }
    true
}

fn run_all(bases: &[(CpuVendor, Vec<CpuidEntry>)]) {
    let mut checked = 0;
    for (vendor, base) in bases {
        for t in shapes() {
            if !check(*vendor, base, &t) {
                assert!(
                    !lstopo_required(),
                    "{LSTOPO} is not installed but VCPU_REQUIRE_KVM=1 or CI=true: install it \
                     (apt-get install -y hwloc)"
                );
                eprintln!("SKIPPED (no {LSTOPO}; apt-get install -y hwloc): hwloc topology checks");
                return;
            }
            checked += 1;
        }
    }
    eprintln!("hwloc agreed on {checked} (shape, base) pairs");
}

#[test]
fn lstopo_reads_configured_topology_synthetic_bases() {
    run_all(&[
        (CpuVendor::Intel, host::synthetic_intel()),
        (CpuVendor::Amd, host::synthetic_amd()),
        (CpuVendor::Hygon, host::synthetic_hygon()),
    ]);
}

#[test]
fn lstopo_reads_configured_topology_this_host_base() {
    let Some(host_base) = this_host_base() else {
        return;
    };
    run_all(&[host_base]);
}

/// The check is not vacuous: with APIC ID = vCPU index (what the VMM we replace does),
/// hwloc sees a different shape for 2 sockets x 3 cores x 2 threads.
#[test]
fn lstopo_rejects_index_as_apic_id() {
    let t = CpuTopology::new(2, 1, 3, 2).unwrap();
    let base = host::synthetic_intel();
    let per_cpu: Vec<Vec<CpuidEntry>> = (0..t.max_vcpus())
        .map(|i| {
            let mut e = build_vcpu_cpuid(&base, CpuVendor::Intel, &t, i).unwrap();
            for x in e.iter_mut() {
                match x.function {
                    0x1 => x.ebx = (x.ebx & 0x00ff_ffff) | (i << 24),
                    0xb | 0x1f => x.edx = i,
                    _ => {}
                }
            }
            e
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    hwloc::write_hwloc_dump(dir.path(), &per_cpu).unwrap();
    let Some(xml) = lstopo_xml(dir.path()) else {
        assert!(
            !lstopo_required(),
            "{LSTOPO} is not installed: apt-get install -y hwloc"
        );
        eprintln!("SKIPPED (no {LSTOPO}; apt-get install -y hwloc)");
        return;
    };
    let hw = HwlocTopology::parse(&xml);
    assert_ne!(
        partition_by(&hw, "Package"),
        expected_partition(&t, |l| l.socket),
        "hwloc should see the wrong packages with APIC ID = index"
    );
}
