//! hwloc's CPUID dump format, so that hwloc (an independent decoder) can check what a guest
//! would see.
//!
//! `HWLOC_CPUID_PATH=DIR HWLOC_COMPONENTS=x86,stop lstopo-no-graphics --of xml -` builds a
//! topology from `DIR/hwloc-cpuid-info` (`Architecture: x86`) and one file `DIR/puN` per
//! logical processor, each line one CPUID query:
//!
//! ```text
//! # mask e[abcd]x => e[abcd]x
//! 1 0 0 0 0 => 1f 756e6547 6c65746e 49656e69
//! 5 b 0 1 0 => 3 c 201 8
//! ```
//!
//! `mask` says which inputs matter (1: EAX, 5: EAX and ECX), then the inputs EAX EBX ECX EDX,
//! then the outputs, all in hex. The `integration` crate feeds this with what guest code
//! actually read on each vCPU: ask the guest to execute [`topology_queries`] and write the
//! results with [`write_hwloc_dump_results`].

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cpuid::field::CACHE_EAX_TYPE;
use crate::cpuid::{leaf, leaf_has_subleaves};
use crate::cpuid_entry::{find_entry, CpuidEntry};

/// The file hwloc reads to accept a dump directory.
pub const CPUID_INFO_FILE: &str = "hwloc-cpuid-info";

/// Its (only required) contents.
pub const CPUID_INFO_CONTENTS: &str = "Architecture: x86\n";

/// The most subleaves [`topology_queries`] lists for one leaf (bounds garbage input).
pub const MAX_QUERIED_SUBLEAVES: u32 = 64;

/// hwloc dump input mask bit: EAX is an input.
pub const MASK_EAX: u32 = 0x1;
/// hwloc dump input mask bit: ECX is an input.
pub const MASK_ECX: u32 = 0x4;

/// One executed CPUID query (leaf, subleaf) and the registers it returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuidResult {
    /// Input EAX.
    pub leaf: u32,
    /// Input ECX.
    pub subleaf: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

impl From<(u32, u32, u32, u32, u32, u32)> for CpuidResult {
    /// From `(leaf, subleaf, eax, ebx, ecx, edx)`.
    fn from((leaf, subleaf, eax, ebx, ecx, edx): (u32, u32, u32, u32, u32, u32)) -> Self {
        Self {
            leaf,
            subleaf,
            eax,
            ebx,
            ecx,
            edx,
        }
    }
}

impl CpuidResult {
    /// Which inputs select this result, as hwloc's mask: EAX, plus ECX for leaves with
    /// subleaves ([`leaf_has_subleaves`]).
    pub fn input_mask(&self) -> u32 {
        if leaf_has_subleaves(self.leaf) {
            MASK_EAX | MASK_ECX
        } else {
            MASK_EAX
        }
    }

    /// The line of a `puN` file for this query (without the newline).
    pub fn to_hwloc_line(&self) -> String {
        let in_ecx = if self.input_mask() & MASK_ECX != 0 {
            self.subleaf
        } else {
            0
        };
        format!(
            "{:x} {:x} 0 {:x} 0 => {:x} {:x} {:x} {:x}",
            self.input_mask(),
            self.leaf,
            in_ecx,
            self.eax,
            self.ebx,
            self.ecx,
            self.edx
        )
    }
}

/// What CPUID(`leaf`, `subleaf`) returns with `entries` loaded: the matching entry, or
/// zeros when there is none (as KVM answers for an absent entry).
pub fn lookup(entries: &[CpuidEntry], leaf: u32, subleaf: u32) -> CpuidResult {
    let e = find_entry(entries, leaf, subleaf)
        .copied()
        .unwrap_or_default();
    CpuidResult {
        leaf,
        subleaf,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// The CPUID queries a topology tool (hwloc's x86 backend; Linux reads a subset) executes on
/// a CPU with `entries`, as (leaf, subleaf), in order and without duplicates:
///
/// - 0x0, 0x1, 0x7/0 (feature flags), 0x8000_0000, 0x8000_0001 ..= 0x8000_0008 (AMD
///   features, brand string, legacy caches, address sizes), each when the highest leaf
///   covers it;
/// - every subleaf of 0x4 and 0x8000_001D up to and including the first with cache type 0;
/// - every subleaf of 0xB and 0x1F up to and including the first with EAX = EBX = 0;
/// - 0x1A/0 (hybrid) and 0x8000_001E (AMD topology) when covered.
///
/// Which subleaves come depends on the answers, so compute this from the entries the guest
/// is expected to see, then have the guest execute exactly these queries.
pub fn topology_queries(entries: &[CpuidEntry]) -> Vec<(u32, u32)> {
    let max_basic = lookup(entries, leaf::VENDOR, 0).eax;
    let max_ext = lookup(entries, leaf::EXT_MAX, 0).eax;
    let mut q = vec![(leaf::VENDOR, 0), (leaf::FEATURES, 0)];
    if max_basic >= leaf::EXT_FEATURES {
        q.push((leaf::EXT_FEATURES, 0));
    }
    q.push((leaf::EXT_MAX, 0));
    for l in leaf::EXT_FEATURES_AMD..=max_ext.min(leaf::ADDRESS_SIZES) {
        q.push((l, 0));
    }
    // The rest, in hwloc's order: a leaf with subleaves is read up to its terminator.
    let cache_end: fn(&CpuidResult) -> bool = |r| CACHE_EAX_TYPE.get(r.eax) == 0;
    let topo_end: fn(&CpuidResult) -> bool = |r| r.eax == 0 && r.ebx == 0;
    for (l, until) in [
        (leaf::CACHE_PARAMS, Some(cache_end)),
        (leaf::EXT_TOPOLOGY, Some(topo_end)),
        (leaf::HYBRID, None),
        (leaf::EXT_TOPOLOGY_V2, Some(topo_end)),
        (leaf::AMD_CACHE_PARAMS, Some(cache_end)),
        (leaf::AMD_TOPOLOGY, None),
    ] {
        let highest = if l >= leaf::EXT_MAX {
            max_ext
        } else {
            max_basic
        };
        match until {
            _ if highest < l => {}
            Some(is_last) => subleaves_until(entries, l, is_last, &mut q),
            None => q.push((l, 0)),
        }
    }
    q
}

fn subleaves_until(
    entries: &[CpuidEntry],
    leaf: u32,
    is_last: impl Fn(&CpuidResult) -> bool,
    out: &mut Vec<(u32, u32)>,
) {
    for subleaf in 0..MAX_QUERIED_SUBLEAVES {
        out.push((leaf, subleaf));
        if is_last(&lookup(entries, leaf, subleaf)) {
            break;
        }
    }
}

/// Answers `queries` from `entries` (see [`lookup`]).
pub fn answer_queries(entries: &[CpuidEntry], queries: &[(u32, u32)]) -> Vec<CpuidResult> {
    queries
        .iter()
        .map(|&(l, s)| lookup(entries, l, s))
        .collect()
}

/// The body of a `puN` file: a header comment and one line per result.
pub fn hwloc_pu_file(results: &[CpuidResult]) -> String {
    let mut s = String::from("# mask e[abcd]x => e[abcd]x\n");
    for r in results {
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{}", r.to_hwloc_line());
    }
    s
}

/// Writes an hwloc CPUID dump of executed queries to `dir` (created if missing):
/// `hwloc-cpuid-info` and `pu0` .. `pu{n-1}`, one per element of `per_cpu`. Stale `puN`
/// files with `N >= n` (from an earlier, larger dump) are removed, since hwloc reads every
/// `puN` file of the directory.
///
/// # Errors
///
/// The I/O error of the first file operation that fails.
pub fn write_hwloc_dump_results(dir: &Path, per_cpu: &[Vec<CpuidResult>]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(CPUID_INFO_FILE), CPUID_INFO_CONTENTS)?;
    for (i, results) in per_cpu.iter().enumerate() {
        fs::write(dir.join(format!("pu{i}")), hwloc_pu_file(results))?;
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let stale = name
            .to_str()
            .and_then(|n| n.strip_prefix("pu"))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<usize>().ok())
            .is_some_and(|idx| idx >= per_cpu.len());
        if stale {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Writes an hwloc CPUID dump for vCPUs with these CPUID entry sets (one set per vCPU, in
/// vCPU index order): each vCPU's [`topology_queries`] answered from its entries.
///
/// # Errors
///
/// As [`write_hwloc_dump_results`].
pub fn write_hwloc_dump(dir: &Path, per_cpu: &[Vec<CpuidEntry>]) -> io::Result<()> {
    let results: Vec<Vec<CpuidResult>> = per_cpu
        .iter()
        .map(|entries| answer_queries(entries, &topology_queries(entries)))
        .collect();
    write_hwloc_dump_results(dir, &results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format_matches_hwloc() {
        let r = CpuidResult {
            leaf: 0xb,
            subleaf: 1,
            eax: 3,
            ebx: 0xc,
            ecx: 0x201,
            edx: 8,
        };
        assert_eq!(r.to_hwloc_line(), "5 b 0 1 0 => 3 c 201 8");
        let r = CpuidResult {
            leaf: 1,
            subleaf: 7,
            ..Default::default()
        };
        assert_eq!(r.to_hwloc_line(), "1 1 0 0 0 => 0 0 0 0");
    }

    #[test]
    fn dump_round_trips_and_removes_stale_files() {
        let t = crate::CpuTopology::new(1, 1, 3, 1).unwrap();
        let base = crate::host::synthetic_amd();
        let per_cpu: Vec<Vec<CpuidEntry>> = (0..3)
            .map(|i| crate::build_vcpu_cpuid(&base, crate::CpuVendor::Amd, &t, i).unwrap())
            .collect();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pu9"), "stale").unwrap();
        fs::write(dir.path().join("pu1.bak"), "not a pu file").unwrap();
        write_hwloc_dump(dir.path(), &per_cpu).unwrap();
        assert!(!dir.path().join("pu9").exists());
        assert!(dir.path().join("pu1.bak").exists());
        let info = fs::read_to_string(dir.path().join(CPUID_INFO_FILE)).unwrap();
        assert_eq!(info, "Architecture: x86\n");
        let back = crate::host::read_host_file(&dir.path().join("pu2")).unwrap();
        for (l, s) in topology_queries(&per_cpu[2]) {
            assert_eq!(lookup(&back, l, s), lookup(&per_cpu[2], l, s), "{l:#x}/{s}");
        }
        let r: CpuidResult = (0x8000_001e, 0, 2, 2, 0, 0).into();
        assert_eq!(r, lookup(&per_cpu[2], 0x8000_001e, 0));
    }

    #[test]
    fn queries_stop_at_terminators() {
        let entries = [
            CpuidEntry::leaf(0, 0xb, 0, 0, 0),
            CpuidEntry::subleaf(4, 0, 0x121, 0, 0, 0),
            CpuidEntry::subleaf(0xb, 0, 1, 1, 0x100, 0),
        ];
        let q = topology_queries(&entries);
        assert_eq!(
            q,
            [
                (0, 0),
                (1, 0),
                (7, 0),
                (0x8000_0000, 0),
                (4, 0),
                (4, 1),
                (0xb, 0),
                (0xb, 1)
            ]
        );
    }
}
