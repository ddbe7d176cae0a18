//! `vcpuctl cpuid` for ten topologies (non-powers of two among them), checked with hwloc's
//! `lstopo` (an independent decoder) reading the dumps of what guest code read on each vCPU:
//! Package, Core and PU counts and which PUs share a package and a core equal the
//! configuration; every vCPU's leaf 0xB EDX equals its APIC ID, computed here from the
//! topology rules (thread, core, die, socket fields of `ceil(log2(n))` bits each).
//!
//! Die objects: hwloc makes them from leaf 0x1F, which it reads on Intel only, so they are
//! checked on Intel hosts only (this project's machines are AMD).
//!
//! Needs `/dev/kvm` (skipped loudly without, fails under `VCPU_REQUIRE_KVM=1`) and
//! `lstopo-no-graphics` (Debian package `hwloc`; fails under `CI=true` or
//! `VCPU_REQUIRE_KVM=1` when missing, skipped loudly otherwise).

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command as Process;

use assert_cmd::Command;
use serde_json::Value;

const LSTOPO: &str = "lstopo-no-graphics";

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

/// One `<object>` of lstopo's XML.
#[derive(Debug)]
struct XmlObject {
    kind: String,
    os_index: Option<u32>,
    parent: Option<usize>,
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// A minimal parser for lstopo's XML: the tree of `<object type=.. os_index=..>` elements.
fn parse_objects(xml: &str) -> Vec<XmlObject> {
    let mut objects: Vec<XmlObject> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut rest = xml;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        let tag = &rest[open..open + close + 1];
        rest = &rest[open + close + 1..];
        if tag.starts_with("</object") {
            stack.pop();
        } else if tag.starts_with("<object ") {
            objects.push(XmlObject {
                kind: attr(tag, "type").unwrap_or_default().to_string(),
                os_index: attr(tag, "os_index").and_then(|v| v.parse().ok()),
                parent: stack.last().copied(),
            });
            if !tag.ends_with("/>") {
                stack.push(objects.len() - 1);
            }
        }
    }
    objects
}

fn count(objects: &[XmlObject], kind: &str) -> usize {
    objects.iter().filter(|o| o.kind == kind).count()
}

/// The PUs (by OS index) grouped by their nearest ancestor of type `kind`.
fn partition_by(objects: &[XmlObject], kind: &str) -> BTreeSet<BTreeSet<u32>> {
    let mut m: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for pu in objects.iter().filter(|o| o.kind == "PU") {
        let mut at = pu.parent;
        while let Some(i) = at {
            if objects[i].kind == kind {
                break;
            }
            at = objects[i].parent;
        }
        if let (Some(a), Some(os)) = (at, pu.os_index) {
            m.entry(a).or_default().insert(os);
        }
    }
    m.into_values().collect()
}

/// The vCPU indices grouped by a key of their configured location.
fn expected_partition<K: Ord>(
    shape: (u32, u32, u32, u32),
    key: impl Fn((u32, u32, u32, u32)) -> K,
) -> BTreeSet<BTreeSet<u32>> {
    let (s, d, c, t) = shape;
    let mut m: BTreeMap<K, BTreeSet<u32>> = BTreeMap::new();
    for i in 0..s * d * c * t {
        m.entry(key(location(shape, i))).or_default().insert(i);
    }
    m.into_values().collect()
}

fn lstopo_required() -> bool {
    std::env::var("VCPU_REQUIRE_KVM").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// lstopo's XML for a dump directory; `None` when lstopo is not installed.
fn lstopo_xml(dir: &Path) -> Option<String> {
    let out = Process::new(LSTOPO)
        .args(["--of", "xml", "-"])
        .env("HWLOC_CPUID_PATH", dir)
        .env("HWLOC_COMPONENTS", "x86,stop")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run {LSTOPO}: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{LSTOPO} failed: {stderr}");
    assert!(
        !stderr.contains("Couldn't find") && !stderr.contains("Ignoring dumped cpuid"),
        "{LSTOPO} did not take the dump as complete: {stderr}"
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
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
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = Command::cargo_bin("vcpuctl")
        .expect("the vcpuctl binary")
        .args(["cpuid", "--json", "--smp", &smp, "--hwloc-dir"])
        .arg(dir.path())
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .expect("running vcpuctl");
    assert!(
        out.status.success(),
        "vcpuctl cpuid --smp {smp} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let vcpus: Value = serde_json::from_slice(&out.stdout).expect("vcpuctl cpuid --json output");
    let vcpus = vcpus.as_array().expect("a JSON array of vCPUs");
    assert_eq!(vcpus.len(), max as usize, "{smp}: one record per vCPU");
    for (i, v) in vcpus.iter().enumerate() {
        let want = u64::from(apic_id(shape, i as u32));
        assert_eq!(v["index"], i as u64, "{smp}: records in index order");
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

    let Some(xml) = lstopo_xml(dir.path()) else {
        return false;
    };
    let objects = parse_objects(&xml);
    assert_eq!(count(&objects, "PU"), max as usize, "{smp}: PUs\n{xml}");
    assert_eq!(
        count(&objects, "Core"),
        (s * d * c) as usize,
        "{smp}: cores\n{xml}"
    );
    assert_eq!(
        count(&objects, "Package"),
        s as usize,
        "{smp}: packages\n{xml}"
    );
    if intel && d > 1 {
        assert_eq!(
            count(&objects, "Die"),
            (s * d) as usize,
            "{smp}: dies\n{xml}"
        );
    }
    assert_eq!(
        partition_by(&objects, "Package"),
        expected_partition(shape, |l| l.0),
        "{smp}: PUs per package"
    );
    assert_eq!(
        partition_by(&objects, "Core"),
        expected_partition(shape, |l| (l.0, l.1, l.2)),
        "{smp}: PUs per core"
    );
    true
}

#[test]
fn hwloc_sees_the_configured_topology_in_what_guest_code_read() {
    if integration::kvm_or_skip("hwloc_sees_the_configured_topology_in_what_guest_code_read")
        .is_none()
    {
        return;
    }
    for &shape in SHAPES {
        if !check(shape) {
            assert!(
                !lstopo_required(),
                "{LSTOPO} not found but CI=true or VCPU_REQUIRE_KVM=1: apt-get install hwloc"
            );
            eprintln!("SKIPPED (no {LSTOPO}; apt-get install hwloc): hwloc check of vcpuctl cpuid");
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
