//! Host CPUID bases for [`crate::build_vcpu_cpuid`]: synthetic ones (for tests and examples),
//! this machine's CPUID, and hwloc CPUID dump files.
//!
//! In a VMM the base is `KVM_GET_SUPPORTED_CPUID`; these stand in for it where KVM is not
//! at hand.

use std::path::Path;

use crate::cpuid::cache::{CacheDescriptor, CacheKind, CacheLeafFlavor};
use crate::cpuid::{cache_leaf, leaf, leaf_has_subleaves};
use crate::cpuid_entry::CpuidEntry;
use crate::error::TopologyError;
use crate::hwloc::MASK_ECX;
use crate::topology::ApicIdLayout;
use crate::vendor::CpuVendor;

/// The most leaves of each range (basic, extended) [`this_host`] reads: bounds what a
/// strange CPU (or hypervisor) can make us read.
pub const MAX_HOST_LEAVES: u32 = 0x100;

/// The most subleaves [`this_host`] reads per leaf (leaf 0xD, the widest, has 64).
pub const MAX_HOST_SUBLEAVES: u32 = 64;

/// The three brand string leaves (0x8000_0002..=0x8000_0004) for `brand` (truncated or
/// NUL-padded to 48 bytes).
fn brand_string(brand: &str) -> [CpuidEntry; 3] {
    let mut bytes = [0u8; 48];
    for (d, s) in bytes.iter_mut().zip(brand.bytes().take(47)) {
        *d = s;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let entry = |function: u32, b: usize| {
        CpuidEntry::leaf(function, word(b), word(b + 4), word(b + 8), word(b + 12))
    };
    [
        entry(leaf::BRAND_STRING_FIRST, 0),
        entry(leaf::BRAND_STRING_FIRST + 1, 16),
        entry(leaf::BRAND_STRING_LAST, 32),
    ]
}

/// A host cache leaf as a real CPU would report it for itself (sharing sized for a big
/// package), so that the builder must rebuild the sharing.
fn host_cache_subleaves(
    leaf_no: u32,
    flavor: CacheLeafFlavor,
    caches: &[CacheDescriptor],
) -> Vec<CpuidEntry> {
    let host_layout = ApicIdLayout {
        thread_bits: 1,
        core_bits: 5,
        die_bits: 0,
        socket_bits: 1,
    };
    cache_leaf(leaf_no, flavor, caches, &host_layout)
}

/// A **synthetic** Intel host CPUID (not a real CPU; plausible values): `GenuineIntel`,
/// family 6, highest basic leaf 0x16 (so the builder must raise it), host cache leaf 0x4
/// (L1d 48 KiB, L1i 32 KiB, L2 2 MiB, L3 105 MiB), leaves 0xB as zeros (as KVM here returns
/// them), x2APIC in leaf 0x1 ECX.
pub fn synthetic_intel() -> Vec<CpuidEntry> {
    let (ebx, ecx, edx) = CpuVendor::Intel.leaf0_registers();
    let mut l3 = CacheDescriptor::new(3, CacheKind::Unified, 64, 15, 114_688);
    l3.wbinvd = true;
    l3.complex_indexing = true;
    let caches = [
        CacheDescriptor::new(1, CacheKind::Data, 64, 12, 64),
        CacheDescriptor::new(1, CacheKind::Instruction, 64, 8, 64),
        CacheDescriptor::new(2, CacheKind::Unified, 64, 16, 2048),
        l3,
    ];
    let mut v = vec![
        CpuidEntry::leaf(0x0, 0x16, ebx, ecx, edx),
        // Family 6 model 0x8F stepping 8; CLFLUSH line 64; SSE3..AVX, x2APIC (ECX[21]),
        // hypervisor (ECX[31]); FPU..SSE2 in EDX, HTT clear.
        CpuidEntry::leaf(0x1, 0x0008_06f8, 0x0000_0800, 0xf7f8_3203, 0x078b_fbff),
        CpuidEntry::leaf(0x6, 0x4, 0, 0, 0),
        CpuidEntry::subleaf(0x7, 0, 0, 0x219c_07a9, 0, 0),
        CpuidEntry::subleaf(0xb, 0, 0, 0, 0, 0),
        CpuidEntry::subleaf(0xb, 1, 0, 0, 0, 0),
        CpuidEntry::subleaf(0xd, 0, 0x7, 0x340, 0x340, 0),
        CpuidEntry::subleaf(0xd, 1, 0xf, 0, 0, 0),
        CpuidEntry::leaf(leaf::EXT_MAX, 0x8000_0008, 0, 0, 0),
        // LAHF/LZCNT/PREFETCHW; SYSCALL, NX, 1 GiB pages, RDTSCP, long mode.
        CpuidEntry::leaf(leaf::EXT_FEATURES_AMD, 0, 0, 0x121, 0x2c10_0800),
        CpuidEntry::leaf(leaf::AMD_L2_L3_CACHE, 0, 0, 0x0800_6040, 0),
        CpuidEntry::leaf(leaf::ADDRESS_SIZES, 0x3030, 0, 0, 0),
    ];
    v.extend(brand_string("Synthetic Intel base (topology crate)"));
    v.extend(host_cache_subleaves(
        leaf::CACHE_PARAMS,
        CacheLeafFlavor::Intel,
        &caches,
    ));
    v.sort_by_key(|e| (e.function, e.index));
    v
}

/// A **synthetic** AMD host CPUID (values modelled on an EPYC as KVM reports it): family
/// 0x19, highest basic leaf 0x10, highest extended leaf 0x8000_0021, TopoExt, host cache leaf
/// 0x8000_001D (L1d 32 KiB, L1i 32 KiB, L2 512 KiB, L3 32 MiB), leaf 0x4 as zeros, x2APIC.
pub fn synthetic_amd() -> Vec<CpuidEntry> {
    synthetic_amd_like(
        CpuVendor::Amd,
        0x00a0_0f11,
        "Synthetic AMD base (topology crate)",
    )
}

/// A **synthetic** Hygon host CPUID: [`synthetic_amd`] with the `HygonGenuine` vendor and
/// family 0x18.
pub fn synthetic_hygon() -> Vec<CpuidEntry> {
    synthetic_amd_like(
        CpuVendor::Hygon,
        0x0090_0f01,
        "Synthetic Hygon base (topology crate)",
    )
}

fn synthetic_amd_like(vendor: CpuVendor, signature: u32, brand: &str) -> Vec<CpuidEntry> {
    let (ebx, ecx, edx) = vendor.leaf0_registers();
    let mut l2 = CacheDescriptor::new(2, CacheKind::Unified, 64, 8, 1024);
    l2.inclusive = true;
    let mut l3 = CacheDescriptor::new(3, CacheKind::Unified, 64, 16, 32_768);
    l3.wbinvd = true;
    let caches = [
        CacheDescriptor::new(1, CacheKind::Data, 64, 8, 64),
        CacheDescriptor::new(1, CacheKind::Instruction, 64, 8, 64),
        l2,
        l3,
    ];
    let mut v = vec![
        CpuidEntry::leaf(0x0, 0x10, ebx, ecx, edx),
        // CLFLUSH line 64; SSE3..AVX, x2APIC (ECX[21]), hypervisor; FPU..SSE2, HTT clear.
        CpuidEntry::leaf(0x1, signature, 0x0000_0800, 0xf6f8_3203, 0x078b_fbff),
        CpuidEntry::subleaf(0x4, 0, 0, 0, 0, 0),
        CpuidEntry::subleaf(0x7, 0, 0, 0x219c_07ab, 0x0040_069c, 0x10),
        CpuidEntry::subleaf(0xd, 0, 0x207, 0x988, 0x988, 0),
        CpuidEntry::subleaf(0xd, 1, 0xf, 0x370, 0x1800, 0),
        CpuidEntry::leaf(leaf::EXT_MAX, 0x8000_0021, ebx, ecx, edx),
        // LAHF, CmpLegacy, ABM, SSE4A, misaligned SSE, PREFETCHW, TopoExt; SYSCALL, NX,
        // MMXEXT, FFXSR, 1 GiB pages, RDTSCP, long mode.
        CpuidEntry::leaf(
            leaf::EXT_FEATURES_AMD,
            signature,
            0,
            0x0040_01e3,
            0x2fd3_fbff,
        ),
        CpuidEntry::leaf(
            leaf::AMD_L1_CACHE,
            0xff40_ff40,
            0xff40_ff40,
            0x2008_0140,
            0x2008_0140,
        ),
        CpuidEntry::leaf(
            leaf::AMD_L2_L3_CACHE,
            0x4800_2200,
            0x6800_4200,
            0x0200_6140,
            0x0800_9140,
        ),
        CpuidEntry::leaf(0x8000_0007, 0, 0, 0, 0x100),
        // 48-bit physical/virtual addresses; host NC / ApicIdSize for a 2-CPU package.
        CpuidEntry::leaf(
            leaf::ADDRESS_SIZES,
            0x0030_3030,
            0x130a_d205,
            0x0000_7001,
            0,
        ),
        // The host's own (single-CPU) topology: the builder replaces it.
        CpuidEntry::leaf(leaf::AMD_TOPOLOGY, 1, 0x0000_0001, 0, 0),
        CpuidEntry::leaf(0x8000_0021, 0x1800_0265, 0, 0x86, 0),
    ];
    v.extend(brand_string(brand));
    v.extend(host_cache_subleaves(
        leaf::AMD_CACHE_PARAMS,
        CacheLeafFlavor::Amd,
        &caches,
    ));
    v.sort_by_key(|e| (e.function, e.index));
    v
}

/// The synthetic base of `vendor` ([`synthetic_intel`], [`synthetic_amd`] or
/// [`synthetic_hygon`]).
pub fn synthetic(vendor: CpuVendor) -> Vec<CpuidEntry> {
    match vendor {
        CpuVendor::Intel => synthetic_intel(),
        CpuVendor::Amd => synthetic_amd(),
        CpuVendor::Hygon => synthetic_hygon(),
    }
}

/// How many subleaves [`this_host`] reads for `leaf`, given a reader, and whether it keeps
/// all-zero ones. Leaves with a terminating subleaf are read up to and including it.
#[cfg(target_arch = "x86_64")]
fn host_subleaves(leaf_no: u32, read: &impl Fn(u32, u32) -> [u32; 4]) -> Vec<(u32, [u32; 4])> {
    use crate::cpuid::field::{CACHE_EAX_TYPE, TOPO_ECX_LEVEL_TYPE};
    let mut out = Vec::new();
    for sub in 0..MAX_HOST_SUBLEAVES {
        let r = read(leaf_no, sub);
        let last = match leaf_no {
            leaf::CACHE_PARAMS | leaf::AMD_CACHE_PARAMS => CACHE_EAX_TYPE.get(r[0]) == 0,
            leaf::EXT_TOPOLOGY | leaf::EXT_TOPOLOGY_V2 | leaf::AMD_EXT_TOPOLOGY => {
                TOPO_ECX_LEVEL_TYPE.get(r[2]) == 0
            }
            _ => false,
        };
        // Other leaves: keep subleaf 0 and the non-zero ones.
        if sub == 0 || last || r != [0; 4] {
            out.push((sub, r));
        }
        if last {
            break;
        }
    }
    out
}

/// This machine's CPUID (the CPU the calling thread runs on), read with the `cpuid`
/// instruction: every basic and extended leaf up to the highest (at most
/// [`MAX_HOST_LEAVES`] each), with the subleaves of leaves that have them (at most
/// [`MAX_HOST_SUBLEAVES`] each).
///
/// # Errors
///
/// None on x86_64; [`TopologyError::HostCpuidUnsupported`] elsewhere.
#[cfg(target_arch = "x86_64")]
pub fn this_host() -> Result<Vec<CpuidEntry>, TopologyError> {
    let read = read_host_cpuid;
    let mut out = Vec::new();
    for base in [0u32, leaf::EXT_MAX] {
        let max = read(base, 0)[0].clamp(base, base + MAX_HOST_LEAVES - 1);
        for l in base..=max {
            if leaf_has_subleaves(l) {
                for (s, [a, b, c, d]) in host_subleaves(l, &read) {
                    out.push(CpuidEntry::subleaf(l, s, a, b, c, d));
                }
            } else {
                let [a, b, c, d] = read(l, 0);
                out.push(CpuidEntry::leaf(l, a, b, c, d));
            }
        }
    }
    Ok(out)
}

/// This machine's CPUID: not available off x86_64.
///
/// # Errors
///
/// Always [`TopologyError::HostCpuidUnsupported`].
#[cfg(not(target_arch = "x86_64"))]
pub fn this_host() -> Result<Vec<CpuidEntry>, TopologyError> {
    Err(TopologyError::HostCpuidUnsupported)
}

/// One (leaf, subleaf) of this machine's CPUID instruction, as EAX, EBX, ECX, EDX.
#[cfg(target_arch = "x86_64")]
fn read_host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: `cpuid` is available on every x86_64 CPU and has no side effects.
    // (`__cpuid_count` is an `unsafe fn` before Rust 1.87 and safe after.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Only the given leaves (subleaf 0) of this machine's CPUID, each that exists (at most its
/// base's highest leaf, as leaf 0 or 0x8000_0000 says). For a caller that needs a few leaves:
/// on hosts where each `CPUID` exits to a hypervisor, [`this_host`]'s few hundred of them
/// take milliseconds.
///
/// # Errors
///
/// None on x86_64; [`TopologyError::HostCpuidUnsupported`] elsewhere.
#[cfg(target_arch = "x86_64")]
pub fn this_host_leaves(
    leaves: impl IntoIterator<Item = u32>,
) -> Result<Vec<CpuidEntry>, TopologyError> {
    let (max_basic, max_ext) = (
        read_host_cpuid(0, 0)[0],
        read_host_cpuid(leaf::EXT_MAX, 0)[0],
    );
    Ok(leaves
        .into_iter()
        .filter(|&l| {
            if l >= leaf::EXT_MAX {
                l <= max_ext
            } else {
                l <= max_basic
            }
        })
        .map(|l| {
            let [a, b, c, d] = read_host_cpuid(l, 0);
            CpuidEntry::leaf(l, a, b, c, d)
        })
        .collect())
}

/// Only the given leaves of this machine's CPUID: not available off x86_64.
///
/// # Errors
///
/// Always [`TopologyError::HostCpuidUnsupported`].
#[cfg(not(target_arch = "x86_64"))]
pub fn this_host_leaves(
    leaves: impl IntoIterator<Item = u32>,
) -> Result<Vec<CpuidEntry>, TopologyError> {
    let _ = leaves.into_iter();
    Err(TopologyError::HostCpuidUnsupported)
}

/// Parses CPUID entries from text in hwloc's dump format (a `puN` file, e.g. from
/// `hwloc-gather-cpuid`). Lines whose input mask has ECX (`0x4`) become subleaf entries.
/// Blank lines and `#` comments are skipped; the first line for a (leaf, subleaf) wins, as
/// in hwloc. `path` only names the source in errors.
///
/// # Errors
///
/// [`TopologyError::HostCpuidParse`] naming the line and what is wrong with it.
pub fn parse_hwloc_dump(text: &str, path: &Path) -> Result<Vec<CpuidEntry>, TopologyError> {
    let mut out: Vec<CpuidEntry> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: String| TopologyError::HostCpuidParse {
            path: path.to_path_buf(),
            line: n + 1,
            text: raw.chars().take(200).collect(),
            reason,
        };
        let tokens: Vec<&str> = line.split_whitespace().collect();
        if tokens.len() != 10 || tokens[5] != "=>" {
            return Err(err(format!(
                "expected 10 fields with `=>` as the 6th, found {} fields",
                tokens.len()
            )));
        }
        let mut v = [0u32; 9];
        for (slot, tok) in v.iter_mut().zip(tokens[..5].iter().chain(&tokens[6..])) {
            let digits = tok.strip_prefix("0x").unwrap_or(tok);
            *slot = u32::from_str_radix(digits, 16)
                .map_err(|_| err(format!("{tok:?} is not a 32-bit hex number")))?;
        }
        let [mask, in_eax, _in_ebx, in_ecx, _in_edx, eax, ebx, ecx, edx] = v;
        if mask & 0x1 == 0 {
            return Err(err(format!("input mask {mask:#x} lacks EAX (bit 0)")));
        }
        let e = if mask & MASK_ECX != 0 {
            CpuidEntry::subleaf(in_eax, in_ecx, eax, ebx, ecx, edx)
        } else {
            CpuidEntry::leaf(in_eax, eax, ebx, ecx, edx)
        };
        if !out
            .iter()
            .any(|o| o.function == e.function && o.index == e.index && o.flags == e.flags)
        {
            out.push(e);
        }
    }
    Ok(out)
}

/// Reads a host CPUID base from `path`: a file in hwloc's dump format, or an hwloc dump
/// directory (its `pu0` is read).
///
/// # Errors
///
/// [`TopologyError::HostCpuidIo`] when the file cannot be read, else as
/// [`parse_hwloc_dump`].
pub fn read_host_file(path: &Path) -> Result<Vec<CpuidEntry>, TopologyError> {
    let file = if path.is_dir() {
        path.join("pu0")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| TopologyError::HostCpuidIo {
        path: file.clone(),
        source,
    })?;
    parse_hwloc_dump(&text, &file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid_entry::find_entry;

    #[test]
    fn synthetic_vendors() {
        for v in [CpuVendor::Intel, CpuVendor::Amd, CpuVendor::Hygon] {
            assert_eq!(CpuVendor::from_entries(&synthetic(v)), Some(v));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_few_host_leaves_are_those_of_the_whole_host_cpuid() {
        let all = this_host().unwrap();
        let wanted = [
            0,
            1,
            leaf::EXT_MAX,
            0x8000_0002,
            0x8000_0004,
            0x7fff_fff0,
            0xffff_fff0,
        ];
        let some = this_host_leaves(wanted).unwrap();
        let absent = [0x7fff_fff0, 0xffff_fff0];
        assert!(
            some.iter().all(|e| !absent.contains(&e.function)),
            "{some:?}"
        );
        assert!(some.len() >= 3, "{some:?}");
        for e in &some {
            assert_eq!(
                find_entry(&all, e.function, 0),
                Some(e),
                "leaf {:#x}",
                e.function
            );
        }
    }

    #[test]
    fn brand_is_encoded_little_endian() {
        let b = brand_string("AMD EPYC");
        assert_eq!((b[0].eax, b[0].ebx), (0x2044_4d41, 0x4359_5045));
    }

    #[test]
    fn parse_dump_lines() {
        let text = "# mask e[abcd]x => e[abcd]x\n1 0 0 0 0 => 1f 756e6547 6c65746e 49656e69\n\n5 b 0 1 0 => 3 c 201 8\n";
        let e = parse_hwloc_dump(text, Path::new("x")).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(find_entry(&e, 0xb, 1).map(|e| e.ecx), Some(0x201));
        assert_eq!(find_entry(&e, 0xb, 0), None);
        assert_eq!(CpuVendor::from_entries(&e), Some(CpuVendor::Intel));
    }

    #[test]
    fn parse_dump_errors_name_line_and_token() {
        let err = parse_hwloc_dump("1 0 0 0 0 => 1f zz 0 0\n", Path::new("host.txt")).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, TopologyError::HostCpuidParse { line: 1, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("\"zz\"") && msg.contains("host.txt:1"),
            "{msg}"
        );
        let err = parse_hwloc_dump("# c\n1 0 0 0\n", Path::new("h")).unwrap_err();
        assert!(
            matches!(err, TopologyError::HostCpuidParse { line: 2, .. }),
            "{err}"
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn this_host_has_vendor_and_features() {
        let e = this_host().unwrap();
        assert!(find_entry(&e, 0, 0).is_some_and(|e| e.eax >= 1));
        assert!(find_entry(&e, 1, 0).is_some());
    }
}
