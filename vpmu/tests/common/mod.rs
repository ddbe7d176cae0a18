//! Shared test helpers: fixture loading and a raw-cpuid reader over a CPUID entry set.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::PathBuf;

use raw_cpuid::{CpuId, CpuIdResult};
use topology::{find_entry, CpuVendor, CpuidEntry};
use vpmu::{apply_cpuid, check_host_support, VpmuFeatureLevel};

/// The Intel fixture (bare metal Kaby Lake).
pub const INTEL_G4600: &str = "intel_pentium_g4600_kaby_lake.txt";
/// The AMD fixture (bare metal Zen 3).
pub const AMD_5600G: &str = "amd_ryzen5_5600g_zen3.txt";
/// This project's CI host, KVM-supported CPUID without a vPMU.
pub const CI_HOST_NO_PMU: &str = "ci_host_amd_epyc_milan_kvm_no_pmu.txt";

fn parse_u32(word: &str, file: &str, line_no: usize) -> u32 {
    let hex = word
        .strip_prefix("0x")
        .unwrap_or_else(|| panic!("{file}:{line_no}: `{word}` is not 0x-prefixed hex"));
    u32::from_str_radix(hex, 16)
        .unwrap_or_else(|e| panic!("{file}:{line_no}: `{word}` is not hex: {e}"))
}

/// Loads `tests/fixtures/<name>`: lines `leaf subleaf eax ebx ecx edx`, `#` comments.
pub fn load_fixture(name: &str) -> Vec<CpuidEntry> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.len(),
            6,
            "{name}:{}: expected 6 columns: {line}",
            i + 1
        );
        let r: Vec<u32> = [0, 2, 3, 4, 5]
            .iter()
            .map(|&k| parse_u32(words[k], name, i + 1))
            .collect();
        let entry = if words[1] == "-" {
            CpuidEntry::leaf(r[0], r[1], r[2], r[3], r[4])
        } else {
            let sub: u32 = words[1]
                .parse()
                .unwrap_or_else(|e| panic!("{name}:{}: bad subleaf: {e}", i + 1));
            CpuidEntry::subleaf(r[0], sub, r[1], r[2], r[3], r[4])
        };
        entries.push(entry);
    }
    entries
}

/// A raw-cpuid decoder that answers CPUID from `entries` (zeros for absent leaves, as KVM
/// answers a leaf missing from its table).
pub fn decoder(entries: &[CpuidEntry]) -> CpuId<impl Fn(u32, u32) -> CpuIdResult + Clone> {
    let entries = entries.to_vec();
    CpuId::with_cpuid_reader(move |leaf: u32, subleaf: u32| {
        match find_entry(&entries, leaf, subleaf) {
            Some(e) => CpuIdResult {
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            },
            None => CpuIdResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            },
        }
    })
}

/// The registers of `leaf`/`subleaf` (zeros if absent), for raw comparisons.
pub fn regs(entries: &[CpuidEntry], leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    find_entry(entries, leaf, subleaf).map_or((0, 0, 0, 0), |e| (e.eax, e.ebx, e.ecx, e.edx))
}

/// Replaces (or adds) the entry for `entry`'s leaf/subleaf.
pub fn set_entry(entries: &mut Vec<CpuidEntry>, entry: CpuidEntry) {
    match entries
        .iter_mut()
        .find(|e| e.function == entry.function && e.index == entry.index)
    {
        Some(e) => *e = entry,
        None => entries.push(entry),
    }
}

/// Every entry except those of `leaves`, to check that nothing else changed.
pub fn without_leaves(entries: &[CpuidEntry], leaves: &[u32]) -> Vec<CpuidEntry> {
    entries
        .iter()
        .filter(|e| !leaves.contains(&e.function))
        .copied()
        .collect()
}

/// `host` after [`apply_cpuid`] for `level` on `vendor`; panics (naming both) on an error.
pub fn transformed(
    level: VpmuFeatureLevel,
    vendor: CpuVendor,
    host: &[CpuidEntry],
) -> Vec<CpuidEntry> {
    let mut entries = host.to_vec();
    apply_cpuid(level, vendor, &mut entries)
        .unwrap_or_else(|e| panic!("apply_cpuid({level}, {vendor:?}): {e}"));
    entries
}

/// Asserts that `host` refuses `level`: the message names the level and each of `parts`,
/// and [`apply_cpuid`] fails without editing anything.
pub fn assert_refused(
    level: VpmuFeatureLevel,
    vendor: CpuVendor,
    host: &[CpuidEntry],
    parts: &[&str],
) {
    let msg = check_host_support(level, vendor, host)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&format!("`{level}`")), "{msg}");
    for part in parts {
        assert!(msg.contains(part), "{msg} should name {part:?}");
    }
    let mut entries = host.to_vec();
    assert!(apply_cpuid(level, vendor, &mut entries).is_err());
    assert_eq!(entries, host, "{level}: a refused level edits nothing");
}
