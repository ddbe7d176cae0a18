//! Decodes the generated leaves with the `raw-cpuid` crate (an independent decoder) through
//! a custom CPUID source, for Intel and AMD bases, and checks threads per core, logical
//! processors per package, each vCPU's x2APIC ID, die membership and cache sharing.

use std::collections::BTreeSet;
use std::rc::Rc;

use raw_cpuid::{CacheType, CpuId, CpuIdReader, CpuIdResult, TopologyType};
mod common;

use common::{expected_partition, partition, shapes, synthetic_bases, this_host_base, Partition};
use topology::{build_vcpu_cpuid, host, CpuLocation, CpuTopology, CpuVendor, CpuidEntry};

/// A CPUID source answering from a vCPU's entries, the way KVM does: the entry for
/// (leaf, subleaf) if the leaf is subleaf-indexed, else the leaf's entry; zeros if none.
/// (Written here, not with the crate's lookup, so the check is independent.)
#[derive(Clone)]
struct VcpuCpuid(Rc<Vec<CpuidEntry>>);

impl CpuIdReader for VcpuCpuid {
    fn cpuid2(&self, eax: u32, ecx: u32) -> CpuIdResult {
        let hit = self.0.iter().find(|e| {
            e.function == eax && (e.flags & CpuidEntry::SIGNIFICANT_INDEX == 0 || e.index == ecx)
        });
        hit.map_or(
            CpuIdResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
            |e| CpuIdResult {
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            },
        )
    }
}

/// What one vCPU's CPUID says, as raw-cpuid decodes it.
#[derive(Debug, Default)]
struct Decoded {
    x2apic_id: u32,
    package: u32,
    /// (package, die) from leaf 0x1F.
    die: (u32, u32),
    /// (package, core-within-package) from leaf 0xB.
    core: (u32, u32),
    l3_id: u32,
    l2_id: u32,
}

fn decode(vendor: CpuVendor, t: &CpuTopology, index: u32, entries: Vec<CpuidEntry>) -> Decoded {
    let ctx = format!("{vendor:?} {t} vCPU {index}");
    let apic_id = t.apic_id(index).unwrap();
    let loc = t.location(index).unwrap();
    let threads_per_package = t.threads_per_socket();
    let cpuid = CpuId::with_cpuid_reader(VcpuCpuid(Rc::new(entries)));

    // Leaf 0x1.
    let f = cpuid.get_feature_info().expect("leaf 1");
    assert_eq!(
        u32::from(f.initial_local_apic_id()),
        apic_id & 0xff,
        "{ctx}: leaf 1 APIC ID"
    );
    let addressable = u32::from(f.max_logical_processor_ids());
    assert!(
        addressable >= threads_per_package.min(255),
        "{ctx}: leaf 1 count {addressable}"
    );
    assert!(
        addressable.is_power_of_two() || addressable == 255,
        "{ctx}: {addressable}"
    );
    assert_eq!(f.has_htt(), addressable > 1, "{ctx}: HTT");

    // Leaf 0xB: SMT then Core; EDX the x2APIC ID in each.
    let levels: Vec<_> = cpuid
        .get_extended_topology_info()
        .expect("leaf 0xB")
        .collect();
    assert_eq!(levels.len(), 2, "{ctx}: leaf 0xB levels {levels:?}");
    assert_eq!(levels[0].level_type(), TopologyType::SMT, "{ctx}");
    assert_eq!(levels[1].level_type(), TopologyType::Core, "{ctx}");
    assert_eq!(
        u32::from(levels[0].processors()),
        t.threads(),
        "{ctx}: threads per core"
    );
    assert_eq!(
        u32::from(levels[1].processors()),
        threads_per_package,
        "{ctx}: logical processors per package"
    );
    for l in &levels {
        assert_eq!(l.x2apic_id(), apic_id, "{ctx}: x2APIC ID in leaf 0xB");
        assert_eq!(
            l.level_number() as usize,
            levels.iter().position(|x| x == l).unwrap()
        );
    }
    let smt_shift = levels[0].shift_right_for_next_apic_id();
    let pkg_shift = levels[1].shift_right_for_next_apic_id();
    let package = apic_id >> pkg_shift;
    assert_eq!(package, loc.socket, "{ctx}: package from leaf 0xB");
    assert_eq!(
        apic_id & ((1 << smt_shift) - 1),
        loc.thread,
        "{ctx}: thread from leaf 0xB"
    );
    let core_in_pkg = (apic_id >> smt_shift) & ((1 << (pkg_shift - smt_shift)) - 1);

    // Leaf 0x1F: SMT, Core, Die (raw-cpuid only reads it if leaf 0 covers it).
    let v2: Vec<_> = cpuid
        .get_extended_topology_info_v2()
        .expect("leaf 0x1F")
        .collect();
    let types: Vec<_> = v2.iter().map(|l| l.level_type()).collect();
    assert_eq!(
        types,
        [TopologyType::SMT, TopologyType::Core, TopologyType::Die],
        "{ctx}"
    );
    assert_eq!(u32::from(v2[0].processors()), t.threads(), "{ctx}");
    assert_eq!(
        u32::from(v2[1].processors()),
        t.cores() * t.threads(),
        "{ctx}"
    );
    assert_eq!(u32::from(v2[2].processors()), threads_per_package, "{ctx}");
    assert!(
        v2.iter().all(|l| l.x2apic_id() == apic_id),
        "{ctx}: x2APIC ID in leaf 0x1F"
    );
    assert_eq!(v2[0].shift_right_for_next_apic_id(), smt_shift, "{ctx}");
    assert_eq!(
        v2[2].shift_right_for_next_apic_id(),
        pkg_shift,
        "{ctx}: same package shift"
    );
    let die_shift = v2[1].shift_right_for_next_apic_id();
    let die = (apic_id >> die_shift) & ((1 << (pkg_shift - die_shift)) - 1);
    assert_eq!(die, loc.die, "{ctx}: die from leaf 0x1F");

    // Caches: leaf 0x4 (Intel) or 0x8000_001D (AMD), as raw-cpuid picks by vendor.
    let caches: Vec<_> = cpuid.get_cache_parameters().expect("cache leaf").collect();
    assert!(caches.len() >= 3, "{ctx}: caches {caches:?}");
    let mut l2_id = None;
    let mut l3_id = None;
    for c in &caches {
        let sharing = u32::try_from(c.max_cores_for_cache()).expect("cache sharing fits u32");
        assert!(
            sharing.is_power_of_two(),
            "{ctx}: L{} sharing {sharing}",
            c.level()
        );
        let id = apic_id / sharing;
        match c.level() {
            1 | 2 => assert_eq!(sharing, 1 << smt_shift, "{ctx}: L{} per core", c.level()),
            _ => assert_eq!(sharing, 1 << die_shift, "{ctx}: L3 per die"),
        }
        if c.level() == 2 && c.cache_type() == CacheType::Unified {
            l2_id = Some(id);
        }
        if c.level() == 3 {
            l3_id = Some(id);
        }
        if vendor == CpuVendor::Intel {
            let core_ids = 1u32 << (pkg_shift - smt_shift);
            assert_eq!(
                c.max_cores_for_package(),
                core_ids.min(64) as usize,
                "{ctx}"
            );
        }
    }

    if vendor.is_amd_compatible() {
        let ext = cpuid
            .get_extended_processor_and_feature_identifiers()
            .expect("leaf 0x8000_0001");
        assert!(ext.has_topology_extensions(), "{ctx}: TopoExt");
        assert_eq!(
            ext.has_cmp_legacy(),
            threads_per_package > 1,
            "{ctx}: CmpLegacy"
        );

        let cap = cpuid
            .get_processor_capacity_feature_info()
            .expect("leaf 0x8000_0008");
        assert_eq!(
            cap.num_phys_threads(),
            threads_per_package as usize,
            "{ctx}: NC + 1"
        );
        assert_eq!(
            u32::from(cap.apic_id_size()),
            pkg_shift,
            "{ctx}: ApicIdSize"
        );
        assert_eq!(
            apic_id >> cap.apic_id_size(),
            loc.socket,
            "{ctx}: package from 0x8000_0008"
        );

        let topo = cpuid
            .get_processor_topology_info()
            .expect("leaf 0x8000_001E");
        assert_eq!(
            topo.x2apic_id(),
            apic_id,
            "{ctx}: 0x8000_001E extended APIC ID"
        );
        assert_eq!(u32::from(topo.threads_per_core()), t.threads(), "{ctx}");
        assert_eq!(
            u32::from(topo.core_id()),
            core_in_pkg,
            "{ctx}: 0x8000_001E core ID"
        );
        assert_eq!(
            u32::from(topo.nodes_per_processor()),
            t.dies(),
            "{ctx}: nodes"
        );
        assert_eq!(
            u32::from(topo.node_id()),
            loc.socket * t.dies() + loc.die,
            "{ctx}: node ID"
        );
    }

    Decoded {
        x2apic_id: apic_id,
        package,
        die: (package, die),
        core: (package, core_in_pkg),
        l3_id: l3_id.expect("an L3"),
        l2_id: l2_id.expect("an L2"),
    }
}

/// The vCPUs grouped by a decoded key.
fn groups<K: Ord>(decoded: &[Decoded], key: impl Fn(&Decoded) -> K) -> Partition {
    partition(decoded.iter().zip(0u32..).map(|(d, i)| (i, key(d))))
}

fn check_shape(vendor: CpuVendor, base: &[CpuidEntry], t: &CpuTopology) {
    let decoded: Vec<Decoded> = (0..t.max_vcpus())
        .map(|i| decode(vendor, t, i, build_vcpu_cpuid(base, vendor, t, i).unwrap()))
        .collect();
    let ids: BTreeSet<u32> = decoded.iter().map(|d| d.x2apic_id).collect();
    assert_eq!(
        ids.len(),
        decoded.len(),
        "{vendor:?} {t}: x2APIC IDs unique"
    );

    // (what, the key decoded from CPUID, the same key from the configured location).
    type DecodedKey = fn(&Decoded) -> Vec<u32>;
    type ConfiguredKey = fn(CpuLocation) -> Vec<u32>;
    let partitions: [(&str, DecodedKey, ConfiguredKey); 5] = [
        ("packages", |d| vec![d.package], |l| vec![l.socket]),
        (
            "dies",
            |d| vec![d.die.0, d.die.1],
            |l| vec![l.socket, l.die],
        ),
        (
            "cores",
            |d| vec![d.core.0, d.core.1],
            |l| vec![l.socket, l.die, l.core],
        ),
        ("L3 per die", |d| vec![d.l3_id], |l| vec![l.socket, l.die]),
        (
            "L2 per core",
            |d| vec![d.l2_id],
            |l| vec![l.socket, l.die, l.core],
        ),
    ];
    for (what, decoded_key, configured_key) in partitions {
        assert_eq!(
            groups(&decoded, decoded_key),
            expected_partition(t, configured_key),
            "{vendor:?} {t}: {what}"
        );
    }
}

#[test]
fn raw_cpuid_decodes_configured_topology() {
    for (vendor, base) in synthetic_bases() {
        for t in shapes() {
            check_shape(vendor, &base, &t);
        }
    }
}

#[test]
fn raw_cpuid_on_this_hosts_base() {
    let Some((vendor, base)) = this_host_base() else {
        return;
    };
    for t in shapes() {
        check_shape(vendor, &base, &t);
    }
}

#[test]
fn leaves_not_owned_pass_through() {
    let mut bases = synthetic_bases();
    bases.push((CpuVendor::Hygon, host::synthetic_hygon()));
    let owned_partly = [0x0, 0x1, 0x8000_0000, 0x8000_0001, 0x8000_0008];
    let rebuilt = [0x4, 0xb, 0x1f, 0x8000_001d, 0x8000_001e];
    let t = CpuTopology::new(2, 1, 3, 2).unwrap();
    for (vendor, base) in bases {
        let out = build_vcpu_cpuid(&base, vendor, &t, 7).unwrap();
        for e in &base {
            if owned_partly.contains(&e.function) || rebuilt.contains(&e.function) {
                continue;
            }
            assert!(out.contains(e), "{vendor:?}: {e:x?} must pass through");
        }
        // Partly owned leaves keep the fields we do not own.
        let find = |set: &[CpuidEntry], f: u32| *topology::find_entry(set, f, 0).unwrap();
        let (b1, o1) = (find(&base, 1), find(&out, 1));
        assert_eq!(
            (b1.eax, b1.ecx, b1.ebx & 0xffff),
            (o1.eax, o1.ecx, o1.ebx & 0xffff)
        );
        assert_eq!(b1.edx & !(1 << 28), o1.edx & !(1 << 28));
        let (b0, o0) = (find(&base, 0), find(&out, 0));
        assert_eq!(
            (b0.ebx, b0.ecx, b0.edx, o0.eax),
            (o0.ebx, o0.ecx, o0.edx, 0x1f)
        );
    }
}
