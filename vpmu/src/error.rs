//! The crate's one error type and the typed reasons a host cannot provide a level.

use std::fmt;

use topology::CpuVendor;

use crate::intel::ArchEvent;
use crate::kvm::KvmCapability;
use crate::level::VpmuFeatureLevel;

/// Longest user string quoted back in an error message.
const MAX_QUOTED_CHARS: usize = 64;

/// What the host's (KVM-supported) CPUID lacks for a vPMU level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPmuGap {
    /// A CPUID leaf the level depends on is not in the host's entries.
    LeafMissing {
        /// The leaf.
        leaf: u32,
    },
    /// Intel leaf 0xA reports architectural performance monitoring version 0: no PMU.
    NoArchPerfmon,
    /// Intel leaf 0xA reports an older PMU version than the level needs.
    VersionTooOld {
        /// The host's version.
        found: u8,
        /// The version the level needs.
        needed: u8,
    },
    /// Intel leaf 0xA reports fewer general purpose counters than the level needs.
    TooFewGpCounters {
        /// The host's number.
        found: u8,
        /// The number the level needs.
        needed: u8,
    },
    /// Intel leaf 0xA reports fewer fixed counters than the level needs.
    TooFewFixedCounters {
        /// The host's number.
        found: u8,
        /// The number the level needs.
        needed: u8,
    },
    /// Intel leaf 0xA marks an architectural event the level needs as unavailable.
    EventUnavailable {
        /// The event.
        event: ArchEvent,
    },
    /// AMD/Hygon: leaf 0x8000_0001 ECX PerfCtrExtCore (bit 23) is clear and leaf 0x8000_0022
    /// reports no core counters, which is how KVM's supported CPUID looks without a vPMU.
    NoAmdCoreCounters,
}

impl fmt::Display for HostPmuGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPmuGap::LeafMissing { leaf } => {
                write!(f, "CPUID leaf {leaf:#x} is missing from the host's CPUID")
            }
            HostPmuGap::NoArchPerfmon => f.write_str(
                "CPUID leaf 0xA reports architectural performance monitoring version 0 (no PMU)",
            ),
            HostPmuGap::VersionTooOld { found, needed } => write!(
                f,
                "CPUID leaf 0xA reports PMU version {found}, version {needed} or later is needed"
            ),
            HostPmuGap::TooFewGpCounters { found, needed } => write!(
                f,
                "CPUID leaf 0xA reports {found} general purpose counters, {needed} are needed"
            ),
            HostPmuGap::TooFewFixedCounters { found, needed } => write!(
                f,
                "CPUID leaf 0xA reports {found} fixed counters, {needed} are needed"
            ),
            HostPmuGap::EventUnavailable { event } => write!(
                f,
                "CPUID leaf 0xA EBX marks the architectural event `{event}` unavailable"
            ),
            HostPmuGap::NoAmdCoreCounters => f.write_str(
                "CPUID leaf 0x8000_0001 ECX bit 23 (PerfCtrExtCore) is clear and leaf \
                 0x8000_0022 reports no core counters",
            ),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VpmuError {
    /// A vPMU level string that is none of the accepted spellings.
    #[error(
        "unknown vPMU level `{value}`: use one of {}",
        VpmuFeatureLevel::ACCEPTED_SPELLINGS
    )]
    UnknownLevel {
        /// The rejected text (at most 64 characters of it).
        value: String,
    },
    /// The host cannot provide the requested level: it is never silently downgraded.
    #[error(
        "vPMU level `{level}` cannot be provided on this {} host: {gap}. The host's KVM \
         exposes no usable PMU (is the kvm module loaded with enable_pmu=N?); configure vPMU \
         `off`, or run on a host whose KVM offers a PMU",
        vendor.id_string()
    )]
    HostLacksPmu {
        /// The level asked for.
        level: VpmuFeatureLevel,
        /// The host's CPU vendor.
        vendor: CpuVendor,
        /// What is missing.
        gap: HostPmuGap,
    },
    /// KVM lacks a capability the level needs (see [`crate::required_kvm_caps`]).
    #[error(
        "vPMU level `{level}` needs KVM capability {} ({}), which this host's KVM does not \
         report: use a newer host kernel or configure vPMU `off`",
        capability.name,
        capability.number
    )]
    KvmLacksCapability {
        /// The level asked for.
        level: VpmuFeatureLevel,
        /// The missing capability.
        capability: KvmCapability,
    },
    /// KVM offers a vPMU but cannot turn it off for the VM (see [`crate::check_kvm_support`]).
    #[error(
        "vPMU level `off` needs KVM to turn the VM's PMU off, but this host's KVM offers a vPMU \
         and its {} ({}) reports {reported}, without the KVM_PMU_CAP_DISABLE bit (1): use a \
         host kernel of Linux 5.18 or later, or load the kvm module with enable_pmu=N",
        capability.name,
        capability.number
    )]
    KvmCannotDisablePmu {
        /// `KVM_CAP_PMU_CAPABILITY`.
        capability: KvmCapability,
        /// What `KVM_CHECK_EXTENSION` returned for it.
        reported: i32,
    },
    /// An event filter KVM would reject or silently misread.
    #[error("invalid PMU event filter: {reason}")]
    InvalidEventFilter {
        /// What is wrong with it.
        reason: String,
    },
}

impl VpmuError {
    /// An [`VpmuError::UnknownLevel`] quoting (a bounded prefix of) `value`.
    pub(crate) fn unknown_level(value: &str) -> Self {
        let mut quoted: String = value.chars().take(MAX_QUOTED_CHARS).collect();
        if value.chars().nth(MAX_QUOTED_CHARS).is_some() {
            quoted.push_str("...");
        }
        VpmuError::UnknownLevel { value: quoted }
    }
}
