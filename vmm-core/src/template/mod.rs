//! CPU templates in Firecracker's custom CPU template format: what a runtime sets so that a
//! guest sees the same CPU on every host of a fleet.
//!
//! A template is JSON with three optional lists (unknown keys are refused, so that a typo does
//! not silently leave a feature visible):
//!
//! ```json
//! {
//!   "kvm_capabilities": ["171", "!172"],
//!   "cpuid_modifiers": [
//!     {
//!       "leaf": "0x80000001",
//!       "subleaf": "0x0",
//!       "flags": 0,
//!       "modifiers": [
//!         { "register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxx1xxxx1" }
//!       ]
//!     }
//!   ],
//!   "msr_modifiers": [
//!     { "addr": "0x10a", "bitmap": "0b0000000000000000000000000000000000000000000000000000000000001000" }
//!   ]
//! }
//! ```
//!
//! - `leaf`, `subleaf` and `addr` are strings with a `0x` (hexadecimal) or `0b` (binary)
//!   prefix, or plain JSON numbers; `flags` is KVM's `KVM_CPUID_FLAG_*` of the entry (1: the
//!   subleaf matters).
//! - A `bitmap` is `0b` followed by exactly one character per bit, most significant first:
//!   32 for a CPUID register, 64 for an MSR. `0` clears the bit, `1` sets it, `x` keeps what
//!   KVM (or the host) gives. `_` may separate groups and is not counted.
//! - `kvm_capabilities` lists KVM capability numbers (`KVM_CAP_*`) the VM needs, checked
//!   with `KVM_CHECK_EXTENSION` before any vCPU exists; `!N` removes `N` from the capabilities
//!   the VMM itself requires (this VMM requires none beyond what it checks on its own, so a
//!   removal is accepted and has no effect).
//!
//! Where a template sits in the CPUID each vCPU gets (see
//! [`VcpuManager::vcpu_cpuid`](crate::VcpuManager::vcpu_cpuid)): KVM's supported CPUID, then
//! the template, then the VMM's normalisation ([`crate::arch::x86_64::cpuid::normalize`]),
//! then the topology leaves (`topology`), then the vPMU level (`vpmu`). The VMM keeps the
//! topology and PMU leaves: a template cannot change what the topology and the vPMU level
//! say. MSR modifiers are applied at vCPU setup, after the VMM's own boot MSRs
//! ([`CpuTemplate::apply_msrs`]); [`CpuTemplate::msr_indices`] lists them for a snapshot.
//!
//! Parsing refuses what is malformed with an error that names the entry
//! ([`TemplateError`]); [`CpuTemplate::from_json`] and [`CpuTemplate::from_file`] are the
//! entry points.

mod apply;
mod raw;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use apply::{
    apply_cpuid_modifiers, apply_msr_value, guest_base_cpuid, keep_vmm_owned, VMM_OWNED_LEAVES,
};

/// A register of a CPUID entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl CpuidRegister {
    /// The four registers, in order.
    pub const ALL: [CpuidRegister; 4] = [
        CpuidRegister::Eax,
        CpuidRegister::Ebx,
        CpuidRegister::Ecx,
        CpuidRegister::Edx,
    ];

    /// The lower-case name the template format uses (`eax` ...).
    pub fn name(self) -> &'static str {
        match self {
            CpuidRegister::Eax => "eax",
            CpuidRegister::Ebx => "ebx",
            CpuidRegister::Ecx => "ecx",
            CpuidRegister::Edx => "edx",
        }
    }

    /// The register of that name (`eax`, `ebx`, `ecx`, `edx`; case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(name))
    }
}

/// Which bits of a register a template sets, and to what: `filter` has a 1 for every bit the
/// template gives (`0` or `1` in the bitmap), `value` the bits themselves (0 outside
/// `filter`). The result is `(current & !filter) | value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BitFilter<T> {
    /// 1: the template sets this bit; 0: the bit is kept (`x`).
    pub filter: T,
    /// The bits set to 1 (a subset of `filter`).
    pub value: T,
}

impl BitFilter<u32> {
    /// `current` with the template's bits.
    pub fn apply(&self, current: u32) -> u32 {
        (current & !self.filter) | (self.value & self.filter)
    }
}

impl BitFilter<u64> {
    /// `current` with the template's bits.
    pub fn apply(&self, current: u64) -> u64 {
        (current & !self.filter) | (self.value & self.filter)
    }
}

/// One register's modifier in a CPUID entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuidRegisterModifier {
    /// The register.
    pub register: CpuidRegister,
    /// Its bits.
    pub bits: BitFilter<u32>,
}

/// The modifiers of one CPUID entry (leaf, subleaf).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CpuidLeafModifier {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The subleaf (ECX input).
    pub subleaf: u32,
    /// KVM's `KVM_CPUID_FLAG_*` for the entry (used when the template adds an entry KVM did
    /// not list).
    pub flags: u32,
    /// One per register (at most one per register).
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// One MSR's modifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsrModifier {
    /// The MSR index.
    pub addr: u32,
    /// Its bits.
    pub bits: BitFilter<u64>,
}

/// A change to the KVM capabilities the VM requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvmCapabilityModifier {
    /// `"N"`: `KVM_CHECK_EXTENSION(N)` must be positive.
    Require(u32),
    /// `"!N"`: `N` is no longer required.
    Remove(u32),
}

/// A CPU template (see the [module documentation](self) for the format and where it
/// applies). Serializes back to the same JSON format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "raw::RawTemplate", into = "raw::RawTemplate")]
pub struct CpuTemplate {
    /// KVM capabilities required (or no longer required).
    pub kvm_capabilities: Vec<KvmCapabilityModifier>,
    /// CPUID modifiers.
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers.
    pub msr_modifiers: Vec<MsrModifier>,
}

/// Why a template cannot be used. Each names the entry (e.g. `cpuid_modifiers[2]` (leaf
/// 0x7) `.modifiers[1]`) and says what is expected there.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The file could not be read.
    #[error("cannot read the CPU template {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not JSON, or JSON that does not have the template's shape (a missing or unknown key,
    /// a string where a number belongs ...).
    #[error("the CPU template is not valid template JSON: {0}")]
    Json(String),
    /// A leaf, subleaf or MSR address that is not a number.
    #[error(
        "{entry}: {field} {value:?} is not a number: write it as \"0x...\" (hexadecimal), \
         \"0b...\" (binary) or a plain JSON number"
    )]
    NotANumber {
        /// The entry.
        entry: String,
        /// `leaf`, `subleaf` or `addr`.
        field: &'static str,
        /// What was written.
        value: String,
    },
    /// A register that is not eax, ebx, ecx or edx.
    #[error("{entry}: unknown register {register:?}: use eax, ebx, ecx or edx")]
    UnknownRegister {
        /// The entry.
        entry: String,
        /// What was written.
        register: String,
    },
    /// The same register twice in one CPUID entry.
    #[error("{entry}: register {register} is modified twice: merge the two bitmaps")]
    DuplicateRegister {
        /// The entry.
        entry: String,
        /// The register.
        register: &'static str,
    },
    /// The same (leaf, subleaf) or MSR twice.
    #[error("{entry}: {what} is already modified by an earlier entry: merge the two")]
    DuplicateEntry {
        /// The entry.
        entry: String,
        /// `leaf 0x7 subleaf 0x0` or `MSR 0x10a`.
        what: String,
    },
    /// A bitmap that does not start with `0b`.
    #[error("{entry}: bitmap {bitmap:?} must start with \"0b\"")]
    BitmapPrefix {
        /// The entry.
        entry: String,
        /// What was written.
        bitmap: String,
    },
    /// A bitmap with the wrong number of bits.
    #[error(
        "{entry}: bitmap has {bits} bits, a {what} needs exactly {expected} (one 0, 1 or x per \
         bit, most significant first)"
    )]
    BitmapLength {
        /// The entry.
        entry: String,
        /// `CPUID register` or `MSR`.
        what: &'static str,
        /// How many bits were written.
        bits: usize,
        /// 32 or 64.
        expected: usize,
    },
    /// A bitmap with a character other than 0, 1, x or _.
    #[error(
        "{entry}: bitmap has {character:?} at position {position}: use only 0, 1, x (keep) or _"
    )]
    BitmapCharacter {
        /// The entry.
        entry: String,
        /// The character.
        character: char,
        /// Its position after `0b` (0 = first).
        position: usize,
    },
    /// A KVM capability that is neither `N` nor `!N`.
    #[error(
        "{entry}: KVM capability {value:?} is not a number: write \"N\" to require KVM_CAP \
         number N, \"!N\" to drop it"
    )]
    KvmCapability {
        /// The entry.
        entry: String,
        /// What was written.
        value: String,
    },
    /// This host's KVM lacks a capability the template requires.
    #[error(
        "the CPU template requires KVM capability {cap}, which this host's KVM does not have \
         (KVM_CHECK_EXTENSION answered {answer}): use a template made for this host"
    )]
    KvmLacksCapability {
        /// The capability number.
        cap: u32,
        /// What KVM answered.
        answer: i32,
    },
}

impl CpuTemplate {
    /// Parses a template from its JSON text.
    ///
    /// # Errors
    ///
    /// [`TemplateError::Json`] for JSON that does not have the template's shape, the other
    /// variants for an entry that is malformed.
    pub fn from_json(text: &str) -> Result<Self, TemplateError> {
        let raw: raw::RawTemplate =
            serde_json::from_str(text).map_err(|e| TemplateError::Json(e.to_string()))?;
        Self::try_from(raw)
    }

    /// Reads and parses a template file.
    ///
    /// # Errors
    ///
    /// [`TemplateError::Read`], or as [`from_json`](Self::from_json).
    pub fn from_file(path: &Path) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The template as JSON, in the same format.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, numbers and lists cannot fail.
        serde_json::to_string_pretty(&raw::RawTemplate::from(self.clone())).unwrap_or_default()
    }

    /// The MSRs the template sets (what a snapshot must save beside the VMM's own MSRs).
    pub fn msr_indices(&self) -> Vec<u32> {
        self.msr_modifiers.iter().map(|m| m.addr).collect()
    }

    /// The capabilities the template requires (its `"N"` entries).
    pub fn required_kvm_capabilities(&self) -> Vec<u32> {
        self.kvm_capabilities
            .iter()
            .filter_map(|c| match c {
                KvmCapabilityModifier::Require(n) => Some(*n),
                KvmCapabilityModifier::Remove(_) => None,
            })
            .collect()
    }

    /// Checks every required capability with `check` (`KVM_CHECK_EXTENSION`).
    ///
    /// # Errors
    ///
    /// [`TemplateError::KvmLacksCapability`] for the first one KVM answers 0 (or less) for.
    pub fn check_kvm_capabilities(&self, check: impl Fn(u32) -> i32) -> Result<(), TemplateError> {
        for cap in self.required_kvm_capabilities() {
            let answer = check(cap);
            if answer <= 0 {
                return Err(TemplateError::KvmLacksCapability { cap, answer });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
