//! What the independent-decoder tests (raw-cpuid, hwloc) share: the shapes they check and
//! the host CPUID base of this machine.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::{BTreeMap, BTreeSet};

use topology::{host, CpuLocation, CpuTopology, CpuVendor, CpuidEntry, SmpConfig};

/// The shapes the decoders must agree on, in `-smp` syntax: non-powers of two, 1-wide
/// levels, several dies and more than two threads per core among them.
pub const SHAPES: &[&str] = &[
    "sockets=1,cores=1,threads=1",
    "sockets=2,cores=3,threads=2",
    "dies=3,cores=3",
    "sockets=3,cores=5",
    "sockets=5",
    "cores=7",
    "sockets=2,dies=2,cores=3,threads=2",
    "cores=5,threads=3",
    "sockets=4,cores=6,threads=2",
    "sockets=2,dies=3,cores=2",
    "dies=5",
    "sockets=3,threads=2",
    "sockets=2,cores=4,threads=2",
    "sockets=2,cores=16,threads=2",
    "dies=2,cores=12,threads=4",
];

/// [`SHAPES`] as topologies.
pub fn shapes() -> Vec<CpuTopology> {
    SHAPES
        .iter()
        .map(|s| {
            let smp: SmpConfig = s.parse().unwrap_or_else(|e| panic!("-smp {s}: {e}"));
            smp.topology
        })
        .collect()
}

/// The synthetic Intel and AMD bases.
pub fn synthetic_bases() -> Vec<(CpuVendor, Vec<CpuidEntry>)> {
    vec![
        (CpuVendor::Intel, host::synthetic_intel()),
        (CpuVendor::Amd, host::synthetic_amd()),
    ]
}

/// This machine's CPUID and vendor, or `None` (with a loud SKIPPED line) where it cannot
/// be read or names a vendor we do not know.
pub fn this_host_base() -> Option<(CpuVendor, Vec<CpuidEntry>)> {
    let base = match host::this_host() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIPPED (cannot read this machine's CPUID): {e}");
            return None;
        }
    };
    let Some(vendor) = CpuVendor::from_entries(&base) else {
        eprintln!("SKIPPED (this machine's CPUID names an unknown vendor)");
        return None;
    };
    Some((vendor, base))
}

/// Sets of vCPU indexes (or PU numbers) that share something: a package, a die, a cache ...
pub type Partition = BTreeSet<BTreeSet<u32>>;

/// The members of `(member, key)` pairs grouped by key.
pub fn partition<K: Ord>(pairs: impl IntoIterator<Item = (u32, K)>) -> Partition {
    let mut m: BTreeMap<K, BTreeSet<u32>> = BTreeMap::new();
    for (member, key) in pairs {
        m.entry(key).or_default().insert(member);
    }
    m.into_values().collect()
}

/// The vCPUs of `t` grouped by a key of their configured location.
pub fn expected_partition<K: Ord>(t: &CpuTopology, key: impl Fn(CpuLocation) -> K) -> Partition {
    partition((0..t.max_vcpus()).map(|i| (i, key(t.location(i).unwrap()))))
}
