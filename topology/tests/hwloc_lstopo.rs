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

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

mod common;

use common::{expected_partition, partition, shapes, this_host_base, Partition};
use topology::{build_vcpu_cpuid, host, hwloc, CpuTopology, CpuVendor, CpuidEntry};

const LSTOPO: &str = "lstopo-no-graphics";

/// One object of lstopo's XML: its type, OS index, and children.
#[derive(Debug, Default)]
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
            let obj = XmlObject {
                kind: attr(tag, "type").unwrap_or_default().to_string(),
                os_index: attr(tag, "os_index").and_then(|v| v.parse().ok()),
                parent: stack.last().copied(),
            };
            objects.push(obj);
            if !tag.ends_with("/>") {
                stack.push(objects.len() - 1);
            }
        }
    }
    objects
}

/// For each PU (by OS index), its nearest ancestor of type `kind`, if any.
fn ancestors_of_pus(objects: &[XmlObject], kind: &str) -> BTreeMap<u32, Option<usize>> {
    let mut out = BTreeMap::new();
    for pu in objects.iter().filter(|o| o.kind == "PU") {
        let mut at = pu.parent;
        while let Some(i) = at {
            if objects[i].kind == kind {
                break;
            }
            at = objects[i].parent;
        }
        out.insert(pu.os_index.expect("PU os_index"), at);
    }
    out
}

/// The partition of PUs by their `kind` ancestor (PUs without one are left out).
fn partition_by(objects: &[XmlObject], kind: &str) -> Partition {
    partition(
        ancestors_of_pus(objects, kind)
            .into_iter()
            .filter_map(|(pu, ancestor)| ancestor.map(|a| (pu, a))),
    )
}

fn count(objects: &[XmlObject], kind: &str) -> usize {
    objects.iter().filter(|o| o.kind == kind).count()
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
    let objects = parse_objects(&xml);
    assert!(
        xml.contains("name=\"Backend\" value=\"x86\""),
        "{ctx}: lstopo did not use the x86 backend"
    );

    let sockets = t.sockets() as usize;
    let dies = sockets * t.dies() as usize;
    let cores = dies * t.cores() as usize;
    assert_eq!(count(&objects, "PU"), t.max_vcpus() as usize, "{ctx}: PUs");
    assert_eq!(count(&objects, "Package"), sockets, "{ctx}: packages");
    assert_eq!(count(&objects, "Core"), cores, "{ctx}: cores");
    let pus: BTreeSet<u32> = objects
        .iter()
        .filter_map(|o| o.os_index.filter(|_| o.kind == "PU"))
        .collect();
    assert_eq!(
        pus,
        (0..t.max_vcpus()).collect(),
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
        assert_eq!(&partition_by(&objects, kind), expected, "{ctx}: {what}");
    }
    if vendor.is_amd_compatible() {
        // Die objects come from leaf 0x1F, which hwloc only reads on Intel; the AMD node
        // (= die) of leaf 0x8000_001E becomes a NUMA node.
        assert_eq!(
            count(&objects, "Die"),
            0,
            "{ctx}: no Die objects expected on AMD"
        );
        assert_eq!(
            count(&objects, "NUMANode"),
            dies,
            "{ctx}: NUMA nodes (dies)"
        );
    } else {
        assert_eq!(count(&objects, "Die"), dies, "{ctx}: dies");
        assert_eq!(partition_by(&objects, "Die"), by_die, "{ctx}: PUs per die");
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
    let objects = parse_objects(&xml);
    assert_ne!(
        partition_by(&objects, "Package"),
        expected_partition(&t, |l| l.socket),
        "hwloc should see the wrong packages with APIC ID = index"
    );
}

#[test]
fn xml_parser_handles_nesting_and_self_closing() {
    let xml = r#"<topology><object type="Machine" os_index="0"><info name="a" value="b"/>
        <object type="Package" os_index="3"><object type="PU" os_index="1"/>
        <object type="PU" os_index="0" cpuset="0x1"/></object></object></topology>"#;
    let o = parse_objects(xml);
    assert_eq!(o.len(), 4);
    assert_eq!(
        partition_by(&o, "Package"),
        BTreeSet::from([BTreeSet::from([0, 1])])
    );
    assert_eq!(o[1].os_index, Some(3));
}
