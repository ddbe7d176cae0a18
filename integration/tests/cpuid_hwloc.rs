//! `vcpuctl cpuid` for eleven topologies (non-powers of two among them, and one of 288 vCPUs
//! with APIC IDs above 255, which runs in x2APIC mode), checked with hwloc's
//! `lstopo` (an independent decoder) reading the dumps of what guest code read on each vCPU:
//! Package, Core and PU counts and which PUs share a package, a core and an L3 cache (per die)
//! equal the configuration; every vCPU's leaf 0xB EDX equals its APIC ID, computed here from the
//! topology rules (thread, core, die, socket fields of `ceil(log2(n))` bits each).
//!
//! Die objects: hwloc makes them from leaf 0x1F, which it reads on Intel only, so they are
//! checked on Intel hosts only (this project's machines are AMD).
//!
//! Needs `/dev/kvm` (skipped loudly without, fails under `VCPU_REQUIRE_KVM=1`) and
//! `lstopo-no-graphics` (Debian package `hwloc`; fails under `CI=true` or
//! `VCPU_REQUIRE_KVM=1` when missing, skipped loudly otherwise).

use std::collections::BTreeMap;
use std::time::Duration;

mod common;

use assert_cmd::Command;
use integration::lstopo::{lstopo_dump, skip_without_lstopo};
use serde_json::Value;

/// (sockets, dies per socket, cores per die, threads per core).
const SHAPES: &[(u32, u32, u32, u32)] = &[
    (2, 1, 3, 2), // 2 sockets x 3 cores x 2 threads
    (1, 3, 3, 1), // 3 dies x 3 cores
    (3, 1, 5, 1), // 3 sockets x 5 cores
    (1, 1, 7, 1), // 7 cores
    (5, 1, 1, 1), // 5 sockets
    (2, 2, 3, 2),
    (1, 1, 5, 3), // 5 cores x 3 threads
    (2, 3, 2, 1), // 2 sockets x 3 dies x 2 cores
    (3, 1, 1, 2), // 3 sockets x 2 threads
    (1, 1, 1, 1),
    (3, 1, 48, 2), // 288 vCPUs, APIC IDs up to 351: x2APIC mode, leaf 1 has the low 8 bits
];

/// Bits a level with `n` members takes in the APIC ID.
fn bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// vCPU index -> (socket, die, core, thread): thread fastest, then core, die, socket.
fn location(shape: (u32, u32, u32, u32), i: u32) -> (u32, u32, u32, u32) {
    let (_, d, c, t) = shape;
    (i / (t * c * d), (i / (t * c)) % d, (i / t) % c, i % t)
}

fn apic_id(shape: (u32, u32, u32, u32), i: u32) -> u32 {
    let (_, d, c, t) = shape;
    let (so, di, co, th) = location(shape, i);
    let (tw, cw, dw) = (bits(t), bits(c), bits(d));
    so << (tw + cw + dw) | di << (tw + cw) | co << tw | th
}

/// The vCPU indices grouped by a key of their configured location (each group sorted,
/// groups sorted, as `HwlocTopology::groups_of_pus` gives them).
fn expected_groups<K: Ord>(
    shape: (u32, u32, u32, u32),
    key: impl Fn((u32, u32, u32, u32)) -> K,
) -> Vec<Vec<u32>> {
    let (s, d, c, t) = shape;
    let mut m: BTreeMap<K, Vec<u32>> = BTreeMap::new();
    for i in 0..s * d * c * t {
        m.entry(key(location(shape, i))).or_default().push(i);
    }
    let mut groups: Vec<Vec<u32>> = m.into_values().collect();
    groups.sort();
    groups
}

/// The register of one query in a vCPU's JSON record.
fn reg(vcpu: &Value, leaf: u64, subleaf: u64, name: &str) -> Option<u64> {
    vcpu["registers"]
        .as_array()?
        .iter()
        .find(|r| r["leaf"] == leaf && r["subleaf"] == subleaf)?[name]
        .as_u64()
}

/// Runs `vcpuctl cpuid` for one shape and checks it; `false` when lstopo is missing.
fn check(shape: (u32, u32, u32, u32)) -> bool {
    let (s, d, c, t) = shape;
    let max = s * d * c * t;
    let smp = format!("1,maxcpus={max},sockets={s},dies={d},cores={c},threads={t}");
    let (dir, vcpus) = common::run_json_into_tempdir(
        &["cpuid", "--json", "--smp", &smp],
        "--hwloc-dir",
        Duration::from_secs(120),
    );
    let vcpus = vcpus.as_array().expect("a JSON array of vCPUs");
    assert_eq!(vcpus.len(), max as usize, "{smp}: one record per vCPU");
    for (i, v) in (0u32..).zip(vcpus) {
        let want = u64::from(apic_id(shape, i));
        assert_eq!(v["index"], u64::from(i), "{smp}: records in index order");
        assert_eq!(v["apic_id"], want, "{smp}: vCPU {i} APIC ID");
        assert_eq!(
            reg(v, 0xb, 0, "edx"),
            Some(want),
            "{smp}: vCPU {i} leaf 0xB EDX"
        );
        assert_eq!(
            v["leaf1_apic_id"],
            want & 0xff,
            "{smp}: vCPU {i} leaf 0x1 APIC ID"
        );
    }
    // "Genu" in leaf 0 EBX: Intel, whose leaf 0x1F hwloc reads for Die objects.
    let intel = reg(&vcpus[0], 0, 0, "ebx") == Some(0x756e_6547);

    let hw = match lstopo_dump(dir.path()) {
        Ok(Some(hw)) => hw,
        Ok(None) => return false,
        Err(e) => panic!("{smp}: {e}"),
    };
    let xml = &hw.xml;
    assert!(
        hw.from_x86_backend(),
        "{smp}: not hwloc's x86 backend\n{xml}"
    );
    assert_eq!(hw.pus(), (0..max).collect::<Vec<_>>(), "{smp}: PUs\n{xml}");
    assert_eq!(
        hw.count("Core"),
        (s * d * c) as usize,
        "{smp}: cores\n{xml}"
    );
    assert_eq!(hw.count("Package"), s as usize, "{smp}: packages\n{xml}");
    if intel {
        assert_eq!(hw.count("Die"), (s * d) as usize, "{smp}: dies\n{xml}");
    }
    assert_eq!(
        hw.groups_of_pus("Package"),
        expected_groups(shape, |l| l.0),
        "{smp}: PUs per package"
    );
    assert_eq!(
        hw.groups_of_pus("Core"),
        expected_groups(shape, |l| (l.0, l.1, l.2)),
        "{smp}: PUs per core"
    );
    // The L3 cache is per die (leaves 0x4 / 0x8000_001D): how hwloc shows dies on AMD.
    assert_eq!(
        hw.groups_of_pus("L3Cache"),
        expected_groups(shape, |l| (l.0, l.1)),
        "{smp}: PUs per L3 (die)"
    );
    true
}

#[test]
fn hwloc_sees_the_configured_topology_in_what_guest_code_read() {
    if !common::have_kvm("hwloc_sees_the_configured_topology_in_what_guest_code_read") {
        return;
    }
    for &shape in SHAPES {
        if !check(shape) {
            skip_without_lstopo("hwloc check of vcpuctl cpuid");
            return;
        }
    }
}

#[test]
fn a_bad_smp_exits_2_naming_the_token() {
    let out = Command::cargo_bin("vcpuctl")
        .expect("the vcpuctl binary")
        .args([
            "cpuid",
            "--smp",
            "2,maxcpus=12,sockets=2,cores=3,threads=2,wheels=4",
        ])
        .output()
        .expect("running vcpuctl");
    assert_eq!(out.status.code(), Some(2), "exit code for a bad --smp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wheels"),
        "the error names the bad token: {stderr}"
    );
}
