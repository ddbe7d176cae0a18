//! `vcpuctl fingerprint dump|compare`: what a host offers guests, as JSON, and what differs
//! between two hosts, and whether a CPU template hides it (can a VM move between them?).
//!
//! A fingerprint holds the host CPU's model (brand string, vendor, family/model/stepping),
//! KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`: what a VMM can give a guest, the input
//! of a template) with the fields that differ between CPUs of one machine zeroed (APIC IDs),
//! and every KVM capability `KVM_CHECK_EXTENSION` answers non-zero for (numbers 0 to 299).
//! The microcode revision and the kernel release are recorded too, but are informational:
//! CPUID as KVM reports it does not carry the microcode revision, and a comparison does not
//! count them as differences.
//!
//! `compare A B [--template FILE]` lists every difference: the model, each CPUID register
//! (with the differing bits), each capability. With a template, a CPUID difference is hidden
//! when the template's bitmaps give both hosts the same register; a model or capability
//! difference is never hidden. The exit code is 0 when nothing is left unhidden, 1 otherwise.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use topology::hwloc::CpuidResult;
use topology::CpuidEntry;
use vmm_core::template::apply_cpuid_modifiers;
use vmm_core::CpuTemplate;

use super::{open_kvm, print_json, CliError, ExitCode};

/// The fingerprint format's version.
pub const FORMAT: u32 = 1;
/// Capability numbers asked (`KVM_CHECK_EXTENSION` 0 to 299).
const CAPABILITIES: u32 = 300;

/// One host's fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// [`FORMAT`].
    pub format: u32,
    /// The host CPU's brand string.
    pub cpu_model: Option<String>,
    /// The vendor string of leaf 0 (`GenuineIntel`, `AuthenticAMD` ...).
    pub vendor: String,
    /// Family, model, stepping (leaf 1 EAX, decoded with the extended fields).
    pub family_model_stepping: [u32; 3],
    /// The microcode revision (`/proc/cpuinfo`); informational, not compared.
    pub microcode: Option<String>,
    /// The kernel release (`/proc/sys/kernel/osrelease`); informational, not compared.
    pub kernel: Option<String>,
    /// KVM's supported CPUID, APIC ID fields zeroed.
    pub kvm_cpuid: Vec<CpuidResult>,
    /// `KVM_CHECK_EXTENSION` answers that are not 0, by capability number.
    pub kvm_capabilities: BTreeMap<u32, i32>,
}

/// One difference between two fingerprints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// What differs: `cpu_model`, `vendor`, `family_model_stepping`, `cpuid` or
    /// `kvm_capability`.
    pub kind: String,
    /// For `cpuid`: `leaf 0x7 subleaf 0x0 ebx`; for `kvm_capability`: its number.
    pub item: String,
    /// The first fingerprint's value.
    pub a: String,
    /// The second's.
    pub b: String,
    /// For `cpuid`: the differing bits.
    pub bits: Option<String>,
    /// Whether the template makes the two the same (`false` without a template).
    pub hidden_by_template: bool,
}

/// The result of comparing two fingerprints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    /// Every difference.
    pub differences: Vec<Difference>,
    /// How many are not hidden by the template.
    pub unhidden: usize,
    /// Whether a template was given.
    pub template: bool,
}

fn failure(message: String) -> CliError {
    CliError {
        code: ExitCode::Failure,
        message,
    }
}

/// Zeroes what differs between CPUs of one machine: leaf 1 EBX\[31:24\] (initial APIC ID),
/// leaves 0xB and 0x1F EDX (x2APIC ID), 0x8000_001E EAX (extended APIC ID).
fn without_cpu_ids(entries: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut v = entries.to_vec();
    for e in &mut v {
        match e.function {
            0x1 => e.ebx &= 0x00ff_ffff,
            0xb | 0x1f => e.edx = 0,
            0x8000_001e => e.eax = 0,
            _ => {}
        }
    }
    v
}

fn results(entries: &[CpuidEntry]) -> Vec<CpuidResult> {
    super::cpuid::kvm_results(entries)
}

fn entries(results: &[CpuidResult]) -> Vec<CpuidEntry> {
    results
        .iter()
        .map(|r| CpuidEntry::subleaf(r.leaf, r.subleaf, r.eax, r.ebx, r.ecx, r.edx))
        .collect()
}

fn cpuinfo_field(name: &str) -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_string())
}

/// This host's fingerprint (opens `/dev/kvm`; creates no VM).
pub fn dump() -> Result<Fingerprint, CliError> {
    let kvm = open_kvm()?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| failure(format!("KVM_GET_SUPPORTED_CPUID: {e}")))?;
    let supported: Vec<CpuidEntry> = supported
        .as_slice()
        .iter()
        .map(|e| {
            let mut c = CpuidEntry::subleaf(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx);
            c.flags = e.flags;
            c
        })
        .collect();
    let host = topology::host::this_host().unwrap_or_default();
    let leaf0 = topology::find_entry(&host, 0, 0)
        .copied()
        .unwrap_or_default();
    let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    let eax = topology::find_entry(&host, 1, 0).map_or(0, |e| e.eax);
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4);
    let kvm_capabilities = (0..CAPABILITIES)
        .filter_map(|n| {
            let v = kvm.check_extension_raw(u64::from(n));
            (v != 0).then_some((n, v))
        })
        .collect();
    Ok(Fingerprint {
        format: FORMAT,
        cpu_model: vmm_core::arch::x86_64::cpuid::host_brand_string(),
        vendor: String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_string(),
        family_model_stepping: [family, model, eax & 0xf],
        microcode: cpuinfo_field("microcode"),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        kvm_cpuid: results(&without_cpu_ids(&supported)),
        kvm_capabilities,
    })
}

/// The registers of (leaf, subleaf) in `e`, zeros when absent.
fn regs(e: &[CpuidEntry], leaf: u32, subleaf: u32) -> [u32; 4] {
    e.iter()
        .find(|x| x.function == leaf && x.index == subleaf)
        .map_or([0; 4], |x| [x.eax, x.ebx, x.ecx, x.edx])
}

/// Every difference between `a` and `b`, and whether `template` hides it.
pub fn compare(a: &Fingerprint, b: &Fingerprint, template: Option<&CpuTemplate>) -> Comparison {
    let mut differences = Vec::new();
    let mut plain = |kind: &str, item: &str, x: String, y: String| {
        if x != y {
            differences.push(Difference {
                kind: kind.into(),
                item: item.into(),
                a: x,
                b: y,
                bits: None,
                hidden_by_template: false,
            });
        }
    };
    plain(
        "cpu_model",
        "brand string",
        format!("{:?}", a.cpu_model),
        format!("{:?}", b.cpu_model),
    );
    plain("vendor", "leaf 0", a.vendor.clone(), b.vendor.clone());
    plain(
        "family_model_stepping",
        "leaf 1 EAX",
        format!("{:?}", a.family_model_stepping),
        format!("{:?}", b.family_model_stepping),
    );
    let caps: std::collections::BTreeSet<u32> = a
        .kvm_capabilities
        .keys()
        .chain(b.kvm_capabilities.keys())
        .copied()
        .collect();
    for cap in caps {
        let x = a.kvm_capabilities.get(&cap).copied().unwrap_or(0);
        let y = b.kvm_capabilities.get(&cap).copied().unwrap_or(0);
        plain(
            "kvm_capability",
            &cap.to_string(),
            x.to_string(),
            y.to_string(),
        );
    }
    let (ea, eb) = (entries(&a.kvm_cpuid), entries(&b.kvm_cpuid));
    let (mut ta, mut tb) = (ea.clone(), eb.clone());
    if let Some(t) = template {
        apply_cpuid_modifiers(t, &mut ta);
        apply_cpuid_modifiers(t, &mut tb);
    }
    let keys: std::collections::BTreeSet<(u32, u32)> = ea
        .iter()
        .chain(eb.iter())
        .map(|e| (e.function, e.index))
        .collect();
    for (leaf, subleaf) in keys {
        let (ra, rb) = (regs(&ea, leaf, subleaf), regs(&eb, leaf, subleaf));
        let (sa, sb) = (regs(&ta, leaf, subleaf), regs(&tb, leaf, subleaf));
        for (i, name) in ["eax", "ebx", "ecx", "edx"].iter().enumerate() {
            if ra[i] != rb[i] {
                differences.push(Difference {
                    kind: "cpuid".into(),
                    item: format!("leaf {leaf:#x} subleaf {subleaf:#x} {name}"),
                    a: format!("{:#010x}", ra[i]),
                    b: format!("{:#010x}", rb[i]),
                    bits: Some(format!("{:#010x}", ra[i] ^ rb[i])),
                    hidden_by_template: template.is_some() && sa[i] == sb[i],
                });
            }
        }
    }
    let unhidden = differences.iter().filter(|d| !d.hidden_by_template).count();
    Comparison {
        differences,
        unhidden,
        template: template.is_some(),
    }
}

fn read(path: &Path) -> Result<Fingerprint, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| failure(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| CliError {
        code: ExitCode::Usage,
        message: format!(
            "{} is not a fingerprint (vcpuctl fingerprint dump writes one): {e}",
            path.display()
        ),
    })
}

/// `vcpuctl fingerprint dump [--out FILE]`.
pub fn run_dump(out: Option<&Path>) -> Result<(), CliError> {
    let f = dump()?;
    match out {
        None => print_json(&f),
        Some(path) => {
            let text = serde_json::to_string_pretty(&f)
                .map_err(|e| failure(format!("cannot write JSON: {e}")))?;
            std::fs::write(path, text + "\n")
                .map_err(|e| failure(format!("cannot write {}: {e}", path.display())))
        }
    }
}

/// `vcpuctl fingerprint compare A B [--template FILE] [--json]`: exit code 1 when a
/// difference is left that the template does not hide.
pub fn run_compare(
    a: &Path,
    b: &Path,
    template: Option<&CpuTemplate>,
    json: bool,
) -> Result<(), CliError> {
    let c = compare(&read(a)?, &read(b)?, template);
    if json {
        print_json(&c)?;
    } else {
        for d in &c.differences {
            let hidden = if d.hidden_by_template {
                "  (hidden by the template)"
            } else {
                ""
            };
            let bits = d
                .bits
                .as_ref()
                .map_or(String::new(), |b| format!(" bits {b}"));
            println!(
                "{:<22} {:<32} {} vs {}{bits}{hidden}",
                d.kind, d.item, d.a, d.b
            );
        }
        println!(
            "{} differences, {} not hidden{}",
            c.differences.len(),
            c.unhidden,
            if c.template { " by the template" } else { "" }
        );
    }
    if c.unhidden > 0 {
        return Err(failure(format!(
            "{} differences between {} and {} are not hidden{}",
            c.unhidden,
            a.display(),
            b.display(),
            if template.is_some() {
                " by the template"
            } else {
                " (give a --template that sets them)"
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(ecx: u32) -> Fingerprint {
        Fingerprint {
            format: FORMAT,
            cpu_model: Some("X".into()),
            vendor: "AuthenticAMD".into(),
            family_model_stepping: [25, 1, 1],
            microcode: Some("0x1".into()),
            kernel: None,
            kvm_cpuid: vec![CpuidResult {
                leaf: 0x8000_0001,
                ecx,
                ..Default::default()
            }],
            kvm_capabilities: BTreeMap::from([(1, 1)]),
        }
    }

    #[test]
    fn differences_and_what_a_template_hides() {
        let (a, b) = (fp(0b101), fp(0b100));
        assert!(compare(&a, &a, None).differences.is_empty());
        let c = compare(&a, &b, None);
        assert_eq!(c.differences.len(), 1);
        assert_eq!(c.differences[0].bits.as_deref(), Some("0x00000001"));
        assert_eq!(c.unhidden, 1);
        // A template that clears bit 0 hides it; one that touches bit 2 does not.
        let hides = CpuTemplate::from_json(
            r#"{"cpuid_modifiers": [{"leaf": "0x80000001", "modifiers": [
                {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}"#,
        )
        .unwrap();
        let c = compare(&a, &b, Some(&hides));
        assert!(c.differences[0].hidden_by_template);
        assert_eq!(c.unhidden, 0);
        let other = CpuTemplate::from_json(
            r#"{"cpuid_modifiers": [{"leaf": "0x80000001", "modifiers": [
                {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0xx"}]}]}"#,
        )
        .unwrap();
        assert_eq!(compare(&a, &b, Some(&other)).unhidden, 1);
        // Microcode differences are not differences; capabilities are, and stay unhidden.
        let mut c2 = fp(0b101);
        c2.microcode = Some("0x2".into());
        c2.kvm_capabilities.insert(2, 1);
        let c = compare(&a, &c2, Some(&hides));
        assert_eq!(c.differences.len(), 1);
        assert_eq!(c.differences[0].kind, "kvm_capability");
        assert_eq!(c.unhidden, 1);
    }
}
