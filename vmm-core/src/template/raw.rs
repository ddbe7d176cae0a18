//! The template's JSON shape as written (strings for numbers and bitmaps), and its checked
//! conversion into [`CpuTemplate`].

use serde::{Deserialize, Serialize};

use super::{
    BitFilter, CpuTemplate, CpuidLeafModifier, CpuidRegister, CpuidRegisterModifier,
    KvmCapabilityModifier, MsrModifier, TemplateError,
};

/// A number as a template writes it: `"0x1f"`, `"0b101"`, or a JSON number.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum RawNumber {
    /// A JSON number.
    Number(u64),
    /// A prefixed string.
    Text(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTemplate {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    kvm_capabilities: Vec<String>,
    #[serde(default)]
    cpuid_modifiers: Vec<RawCpuidLeaf>,
    #[serde(default)]
    msr_modifiers: Vec<RawMsr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCpuidLeaf {
    leaf: RawNumber,
    #[serde(default = "zero")]
    subleaf: RawNumber,
    #[serde(default)]
    flags: u32,
    modifiers: Vec<RawRegister>,
}

fn zero() -> RawNumber {
    RawNumber::Number(0)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegister {
    register: String,
    bitmap: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMsr {
    addr: RawNumber,
    bitmap: String,
}

/// `value` as a number of at most `max` (u32::MAX for leaves and addresses).
fn number(
    entry: &str,
    field: &'static str,
    value: &RawNumber,
    max: u64,
) -> Result<u64, TemplateError> {
    let bad = || TemplateError::NotANumber {
        entry: entry.to_string(),
        field,
        value: match value {
            RawNumber::Number(n) => n.to_string(),
            RawNumber::Text(s) => s.clone(),
        },
    };
    let n = match value {
        RawNumber::Number(n) => *n,
        RawNumber::Text(s) => {
            let s = s.trim();
            let parsed = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                u64::from_str_radix(hex, 16)
            } else if let Some(bin) = s.strip_prefix("0b") {
                u64::from_str_radix(bin, 2)
            } else {
                s.parse::<u64>()
            };
            parsed.map_err(|_| bad())?
        }
    };
    if n > max {
        return Err(bad());
    }
    Ok(n)
}

/// Parses a `0b` bitmap of exactly `bits` bits into (filter, value).
fn bitmap(
    entry: &str,
    text: &str,
    bits: usize,
    what: &'static str,
) -> Result<BitFilter<u64>, TemplateError> {
    let body = text
        .strip_prefix("0b")
        .ok_or_else(|| TemplateError::BitmapPrefix {
            entry: entry.to_string(),
            bitmap: text.to_string(),
        })?;
    let mut filter = 0u64;
    let mut value = 0u64;
    let mut count = 0usize;
    for (position, c) in body.chars().enumerate() {
        let (f, v) = match c {
            '_' => continue,
            'x' | 'X' => (0, 0),
            '0' => (1, 0),
            '1' => (1, 1),
            character => {
                return Err(TemplateError::BitmapCharacter {
                    entry: entry.to_string(),
                    character,
                    position,
                })
            }
        };
        count += 1;
        // Shifting out of a u64 is checked below by the length; wrapping keeps this total.
        filter = filter.wrapping_shl(1) | f;
        value = value.wrapping_shl(1) | v;
    }
    if count != bits {
        return Err(TemplateError::BitmapLength {
            entry: entry.to_string(),
            what,
            bits: count,
            expected: bits,
        });
    }
    Ok(BitFilter { filter, value })
}

/// The low 32 bits (a 32-bit bitmap has nothing above).
fn low32(v: u64) -> u32 {
    u32::try_from(v & u64::from(u32::MAX)).unwrap_or(u32::MAX)
}

impl TryFrom<RawTemplate> for CpuTemplate {
    type Error = TemplateError;

    fn try_from(raw: RawTemplate) -> Result<Self, TemplateError> {
        let mut kvm_capabilities = Vec::with_capacity(raw.kvm_capabilities.len());
        for (i, cap) in raw.kvm_capabilities.iter().enumerate() {
            let entry = format!("kvm_capabilities[{i}]");
            let bad = || TemplateError::KvmCapability {
                entry: entry.clone(),
                value: cap.clone(),
            };
            let c = match cap.trim().strip_prefix('!') {
                Some(n) => KvmCapabilityModifier::Remove(n.parse().map_err(|_| bad())?),
                None => KvmCapabilityModifier::Require(cap.trim().parse().map_err(|_| bad())?),
            };
            kvm_capabilities.push(c);
        }

        let mut cpuid_modifiers: Vec<CpuidLeafModifier> =
            Vec::with_capacity(raw.cpuid_modifiers.len());
        for (i, l) in raw.cpuid_modifiers.iter().enumerate() {
            let entry = format!("cpuid_modifiers[{i}]");
            let max = u64::from(u32::MAX);
            let leaf = low32(number(&entry, "leaf", &l.leaf, max)?);
            let subleaf = low32(number(&entry, "subleaf", &l.subleaf, max)?);
            let entry = format!("cpuid_modifiers[{i}] (leaf {leaf:#x} subleaf {subleaf:#x})");
            if cpuid_modifiers
                .iter()
                .any(|m| m.leaf == leaf && m.subleaf == subleaf)
            {
                return Err(TemplateError::DuplicateEntry {
                    entry,
                    what: format!("leaf {leaf:#x} subleaf {subleaf:#x}"),
                });
            }
            let mut modifiers: Vec<CpuidRegisterModifier> = Vec::with_capacity(l.modifiers.len());
            for (j, r) in l.modifiers.iter().enumerate() {
                let entry = format!("{entry}.modifiers[{j}]");
                let register = CpuidRegister::from_name(r.register.trim()).ok_or_else(|| {
                    TemplateError::UnknownRegister {
                        entry: entry.clone(),
                        register: r.register.clone(),
                    }
                })?;
                if modifiers.iter().any(|m| m.register == register) {
                    return Err(TemplateError::DuplicateRegister {
                        entry,
                        register: register.name(),
                    });
                }
                let b = bitmap(&entry, r.bitmap.trim(), 32, "CPUID register")?;
                modifiers.push(CpuidRegisterModifier {
                    register,
                    bits: BitFilter {
                        filter: low32(b.filter),
                        value: low32(b.value),
                    },
                });
            }
            cpuid_modifiers.push(CpuidLeafModifier {
                leaf,
                subleaf,
                flags: l.flags,
                modifiers,
            });
        }

        let mut msr_modifiers: Vec<MsrModifier> = Vec::with_capacity(raw.msr_modifiers.len());
        for (i, m) in raw.msr_modifiers.iter().enumerate() {
            let entry = format!("msr_modifiers[{i}]");
            let addr = low32(number(&entry, "addr", &m.addr, u64::from(u32::MAX))?);
            let entry = format!("msr_modifiers[{i}] (MSR {addr:#x})");
            if msr_modifiers.iter().any(|x| x.addr == addr) {
                return Err(TemplateError::DuplicateEntry {
                    entry,
                    what: format!("MSR {addr:#x}"),
                });
            }
            let bits = bitmap(&entry, m.bitmap.trim(), 64, "MSR")?;
            msr_modifiers.push(MsrModifier { addr, bits });
        }

        Ok(CpuTemplate {
            kvm_capabilities,
            cpuid_modifiers,
            msr_modifiers,
        })
    }
}

/// A bitmap string of `bits` bits for (filter, value).
fn bitmap_text(filter: u64, value: u64, bits: u32) -> String {
    let mut s = String::with_capacity(bits as usize + 2);
    s.push_str("0b");
    for i in (0..bits).rev() {
        let b = 1u64 << i;
        s.push(match (filter & b != 0, value & b != 0) {
            (false, _) => 'x',
            (true, false) => '0',
            (true, true) => '1',
        });
    }
    s
}

impl From<CpuTemplate> for RawTemplate {
    fn from(t: CpuTemplate) -> Self {
        RawTemplate {
            kvm_capabilities: t
                .kvm_capabilities
                .iter()
                .map(|c| match c {
                    KvmCapabilityModifier::Require(n) => n.to_string(),
                    KvmCapabilityModifier::Remove(n) => format!("!{n}"),
                })
                .collect(),
            cpuid_modifiers: t.cpuid_modifiers.iter().map(RawCpuidLeaf::from).collect(),
            msr_modifiers: t.msr_modifiers.iter().map(RawMsr::from).collect(),
        }
    }
}

/// A number as templates write it back: hexadecimal text.
fn hex_text(n: u32) -> RawNumber {
    RawNumber::Text(format!("{n:#x}"))
}

impl From<&CpuidLeafModifier> for RawCpuidLeaf {
    fn from(l: &CpuidLeafModifier) -> Self {
        let register = |m: &CpuidRegisterModifier| RawRegister {
            register: m.register.name().to_string(),
            bitmap: bitmap_text(u64::from(m.bits.filter), u64::from(m.bits.value), 32),
        };
        RawCpuidLeaf {
            leaf: hex_text(l.leaf),
            subleaf: hex_text(l.subleaf),
            flags: l.flags,
            modifiers: l.modifiers.iter().map(register).collect(),
        }
    }
}

impl From<&MsrModifier> for RawMsr {
    fn from(m: &MsrModifier) -> Self {
        RawMsr {
            addr: hex_text(m.addr),
            bitmap: bitmap_text(m.bits.filter, m.bits.value, 64),
        }
    }
}
