//! What KVM must be told for a vPMU level, as plain data (this crate issues no ioctl).
//!
//! # The event filter ABI (`KVM_SET_PMU_EVENT_FILTER`, a VM ioctl)
//!
//! From the kernel's `Documentation/virt/kvm/api.rst` and `arch/x86/include/uapi/asm/kvm.h`:
//!
//! ```text
//! struct kvm_pmu_event_filter {
//!     __u32 action;               /* KVM_PMU_EVENT_ALLOW 0, KVM_PMU_EVENT_DENY 1 */
//!     __u32 nevents;
//!     __u32 fixed_counter_bitmap;
//!     __u32 flags;                /* 0, or KVM_PMU_EVENT_FLAG_MASKED_EVENTS */
//!     __u32 pad[4];
//!     __u64 events[0];
//! };
//! ```
//!
//! What the documentation and KVM's `arch/x86/kvm/pmu.c` say, and what this crate relies on:
//! - With `flags = 0` (the legacy format used here) each event holds "an event select + unit
//!   mask"; when the guest programs a general purpose counter, the event select and unit mask
//!   of the event select MSR it writes are compared against the list. The events are therefore
//!   written in that MSR's layout: event select bits 7:0 at bits 7:0, unit mask at bits 15:8
//!   and, on AMD only, event select bits 11:8 at bits 35:32. KVM masks the comparison with
//!   `EVENTSEL_EVENT | ARCH_PERFMON_EVENTSEL_UMASK` (`EVENTSEL_EVENT` is `0xFF` on Intel and
//!   `0xFF | 0xF << 32` on AMD) and *silently drops* list entries with any other bit set, so
//!   an Intel event must not use bits 35:32.
//! - `events` only governs general purpose counters. Fixed counter `i` is allowed iff
//!   `(action == ALLOW && bitmap & BIT(i)) || (action == DENY && !(bitmap & BIT(i)))`: KVM
//!   always consumes `fixed_counter_bitmap`, so an allow list with bitmap 0 denies every fixed
//!   counter. Intel's fixed counter 0 counts instructions retired, 1 unhalted core cycles,
//!   2 reference cycles. KVM's AMD vPMU has no fixed counters.
//! - KVM rejects more than 300 events (`KVM_PMU_EVENT_FILTER_MAX_EVENTS`) with `E2BIG`.

use serde::{Deserialize, Serialize};
use topology::{CpuVendor, CpuidEntry};

use crate::cpuid::host_has_pmu;
use crate::error::VpmuError;
use crate::level::VpmuFeatureLevel;

/// `KVM_PMU_CAP_DISABLE`: the bit of `KVM_CAP_PMU_CAPABILITY` (and the `args[0]` of its
/// `KVM_ENABLE_CAP`) that turns the VM's vPMU off.
pub const KVM_PMU_CAP_DISABLE: u32 = 1;
/// `KVM_PMU_EVENT_ALLOW`.
pub const KVM_PMU_EVENT_ALLOW: u32 = 0;
/// `KVM_PMU_EVENT_DENY`.
pub const KVM_PMU_EVENT_DENY: u32 = 1;

/// A KVM capability (`KVM_CHECK_EXTENSION` / `KVM_ENABLE_CAP` number) with its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct KvmCapability {
    /// The `KVM_CAP_*` number.
    pub number: u32,
    /// The `KVM_CAP_*` name, for messages.
    pub name: &'static str,
}

impl KvmCapability {
    /// `KVM_CAP_PMU_EVENT_FILTER` (173): `KVM_SET_PMU_EVENT_FILTER` exists.
    pub const PMU_EVENT_FILTER: KvmCapability = KvmCapability {
        number: 173,
        name: "KVM_CAP_PMU_EVENT_FILTER",
    };
    /// `KVM_CAP_PMU_CAPABILITY` (212): the VM's vPMU can be disabled with `KVM_ENABLE_CAP`
    /// (Linux 5.18 and later; reports 0 when KVM has no vPMU, e.g. `enable_pmu=N`).
    pub const PMU_CAPABILITY: KvmCapability = KvmCapability {
        number: 212,
        name: "KVM_CAP_PMU_CAPABILITY",
    };
}

/// What the event list of a [`PmuEventFilter`] means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FilterAction {
    /// Only the listed events may be counted (`KVM_PMU_EVENT_ALLOW`).
    Allow,
    /// The listed events may not be counted (`KVM_PMU_EVENT_DENY`).
    Deny,
}

impl FilterAction {
    /// The value of the `action` field.
    pub const fn kvm_value(self) -> u32 {
        match self {
            FilterAction::Allow => KVM_PMU_EVENT_ALLOW,
            FilterAction::Deny => KVM_PMU_EVENT_DENY,
        }
    }
}

/// A performance event as the guest programs it: an event select and a unit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PmuEvent {
    /// Event select: 8 bits on Intel, 12 bits on AMD (bits 11:8 go to MSR bits 35:32).
    pub event_select: u16,
    /// Unit mask.
    pub unit_mask: u8,
}

impl PmuEvent {
    /// Intel architectural event "UnHalted Core Cycles": event 0x3C, umask 0x00.
    pub const INTEL_CORE_CYCLES: PmuEvent = PmuEvent::new(0x3C, 0x00);
    /// Intel architectural event "Instructions Retired": event 0xC0, umask 0x00.
    pub const INTEL_INSTRUCTIONS_RETIRED: PmuEvent = PmuEvent::new(0xC0, 0x00);
    /// AMD core event PMCx076 "Cycles not in Halt".
    pub const AMD_CORE_CYCLES: PmuEvent = PmuEvent::new(0x76, 0x00);
    /// AMD core event PMCx0C0 "Retired Instructions".
    pub const AMD_INSTRUCTIONS_RETIRED: PmuEvent = PmuEvent::new(0xC0, 0x00);

    /// An event from its select and unit mask.
    pub const fn new(event_select: u16, unit_mask: u8) -> Self {
        Self {
            event_select,
            unit_mask,
        }
    }

    /// Core cycles and instructions retired in `vendor`'s encoding.
    pub const fn cycles_and_instructions(vendor: CpuVendor) -> [PmuEvent; 2] {
        match vendor {
            CpuVendor::Intel => [Self::INTEL_CORE_CYCLES, Self::INTEL_INSTRUCTIONS_RETIRED],
            CpuVendor::Amd | CpuVendor::Hygon => {
                [Self::AMD_CORE_CYCLES, Self::AMD_INSTRUCTIONS_RETIRED]
            }
        }
    }

    /// The event in the legacy (`flags = 0`) filter format: the event select MSR layout,
    /// select bits 7:0 at 7:0, unit mask at 15:8, select bits 11:8 at 35:32 (see the module
    /// documentation). Select bits above 11 do not exist and are dropped.
    pub const fn kvm_filter_encoding(self) -> u64 {
        let select = self.event_select as u64;
        (select & 0xFF) | (self.unit_mask as u64) << 8 | ((select >> 8) & 0xF) << 32
    }

    /// Whether `vendor`'s KVM can match this event (Intel has only 8 event select bits).
    pub const fn fits(self, vendor: CpuVendor) -> bool {
        match vendor {
            CpuVendor::Intel => self.event_select <= 0xFF,
            CpuVendor::Amd | CpuVendor::Hygon => self.event_select <= 0xFFF,
        }
    }
}

/// The argument of `KVM_SET_PMU_EVENT_FILTER`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmuEventFilter {
    /// Allow or deny list.
    pub action: FilterAction,
    /// The events, each in [`PmuEvent::kvm_filter_encoding`] form when `flags` is 0.
    pub events: Vec<u64>,
    /// Fixed counters: bit `i` is fixed counter `i` (see the module documentation).
    pub fixed_counter_bitmap: u32,
    /// 0 (legacy format) or `KVM_PMU_EVENT_FLAG_MASKED_EVENTS` (1).
    pub flags: u32,
}

impl PmuEventFilter {
    /// Size of the fixed part of `struct kvm_pmu_event_filter`; the events follow it.
    pub const HEADER_SIZE: usize = 32;
    /// KVM's `KVM_PMU_EVENT_FILTER_MAX_EVENTS`.
    pub const MAX_EVENTS: usize = 300;

    /// The allow list of a [`VpmuFeatureLevel::LimitedlyEnabled`] guest on `vendor`: core
    /// cycles and instructions retired, and on Intel the fixed counters 0 (instructions) and
    /// 1 (core cycles), `0b011`. AMD has no fixed counters in KVM, its bitmap is 0.
    pub fn limited(vendor: CpuVendor) -> Self {
        let fixed_counter_bitmap = match vendor {
            CpuVendor::Intel => 0b011,
            CpuVendor::Amd | CpuVendor::Hygon => 0,
        };
        Self {
            action: FilterAction::Allow,
            events: PmuEvent::cycles_and_instructions(vendor)
                .iter()
                .map(|e| e.kvm_filter_encoding())
                .collect(),
            fixed_counter_bitmap,
            flags: 0,
        }
    }

    /// Checks what KVM would reject (too many events, unknown flags) or silently ignore (a
    /// legacy-format event with bits outside `vendor`'s event select and unit mask).
    ///
    /// # Errors
    ///
    /// [`VpmuError::InvalidEventFilter`] saying which rule the filter breaks.
    pub fn validate(&self, vendor: CpuVendor) -> Result<(), VpmuError> {
        if self.events.len() > Self::MAX_EVENTS {
            return Err(VpmuError::InvalidEventFilter {
                reason: format!(
                    "{} events, KVM accepts at most {}",
                    self.events.len(),
                    Self::MAX_EVENTS
                ),
            });
        }
        if self.flags > 1 {
            return Err(VpmuError::InvalidEventFilter {
                reason: format!(
                    "flags {:#x}: only 0 and KVM_PMU_EVENT_FLAG_MASKED_EVENTS (1) exist",
                    self.flags
                ),
            });
        }
        if self.flags == 0 {
            let valid: u64 = match vendor {
                CpuVendor::Intel => 0xFFFF,
                CpuVendor::Amd | CpuVendor::Hygon => 0xF_0000_FFFF,
            };
            if let Some(bad) = self.events.iter().find(|e| *e & !valid != 0) {
                return Err(VpmuError::InvalidEventFilter {
                    reason: format!(
                        "event {bad:#x} has bits outside the {} event select and unit mask \
                         ({valid:#x}); KVM would silently drop it",
                        vendor.id_string()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The exact bytes of `struct kvm_pmu_event_filter` followed by the events, in the
    /// host's (x86: little endian) byte order. `nevents` saturates at `u32::MAX`; call
    /// [`PmuEventFilter::validate`] first.
    pub fn to_kvm_abi_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER_SIZE + 8 * self.events.len());
        let nevents = u32::try_from(self.events.len()).unwrap_or(u32::MAX);
        for field in [
            self.action.kvm_value(),
            nevents,
            self.fixed_counter_bitmap,
            self.flags,
            0,
            0,
            0,
            0,
        ] {
            out.extend_from_slice(&field.to_ne_bytes());
        }
        for event in &self.events {
            out.extend_from_slice(&event.to_ne_bytes());
        }
        out
    }

    /// The same bytes as [`PmuEventFilter::to_kvm_abi_bytes`] in 8-byte words, so the buffer
    /// handed to the ioctl is aligned like the kernel struct.
    pub fn to_kvm_abi_words(&self) -> Vec<u64> {
        self.to_kvm_abi_bytes()
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_ne_bytes(w)
            })
            .collect()
    }
}

/// What the VMM must do in KVM, before creating any vCPU, for a level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmPmuActions {
    /// Turn the VM's vPMU off: `KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY (212), args[0] =
    /// KVM_PMU_CAP_DISABLE (1))`, before any vCPU exists. Do it when
    /// `KVM_CHECK_EXTENSION(KVM_CAP_PMU_CAPABILITY)` has the `KVM_PMU_CAP_DISABLE` bit (see
    /// [`KvmPmuActions::should_enable_pmu_disable`]); when it reports 0, KVM has no vPMU
    /// (`enable_pmu=N`) or predates Linux 5.18, and the CPUID edits are all there is.
    pub disable_pmu: bool,
    /// Install this filter with `KVM_SET_PMU_EVENT_FILTER` (needs
    /// `KVM_CAP_PMU_EVENT_FILTER`, see [`required_kvm_caps`]).
    pub event_filter: Option<PmuEventFilter>,
}

impl KvmPmuActions {
    /// Whether to issue the `KVM_ENABLE_CAP` of [`KvmPmuActions::disable_pmu`], given what
    /// `KVM_CHECK_EXTENSION(KVM_CAP_PMU_CAPABILITY)` returned (negative counts as 0).
    pub fn should_enable_pmu_disable(&self, pmu_capability: i32) -> bool {
        let bits = u32::try_from(pmu_capability).unwrap_or(0);
        self.disable_pmu && bits & KVM_PMU_CAP_DISABLE != 0
    }
}

/// What KVM must do for `level` on a `vendor` host.
///
/// - Disabled: disable the vPMU with `KVM_CAP_PMU_CAPABILITY`, which is the only way to stop
///   an AMD guest from using the four legacy counters that CPUID cannot hide.
/// - Limited: an allow-list filter of core cycles and instructions retired
///   ([`PmuEventFilter::limited`]).
/// - Full: nothing.
pub fn kvm_actions(level: VpmuFeatureLevel, vendor: CpuVendor) -> KvmPmuActions {
    match level {
        VpmuFeatureLevel::Disabled => KvmPmuActions {
            disable_pmu: true,
            event_filter: None,
        },
        VpmuFeatureLevel::LimitedlyEnabled => KvmPmuActions {
            disable_pmu: false,
            event_filter: Some(PmuEventFilter::limited(vendor)),
        },
        VpmuFeatureLevel::FullyEnabled => KvmPmuActions {
            disable_pmu: false,
            event_filter: None,
        },
    }
}

/// The capabilities KVM must report (`KVM_CHECK_EXTENSION` > 0) for `level`: Limited needs
/// `KVM_CAP_PMU_EVENT_FILTER`; the others need none.
pub fn required_kvm_caps(level: VpmuFeatureLevel) -> Vec<KvmCapability> {
    match level {
        VpmuFeatureLevel::LimitedlyEnabled => vec![KvmCapability::PMU_EVENT_FILTER],
        VpmuFeatureLevel::Disabled | VpmuFeatureLevel::FullyEnabled => Vec::new(),
    }
}

/// The capabilities used for `level` when KVM reports them: Disabled uses
/// `KVM_CAP_PMU_CAPABILITY`, which is absent (0) where KVM has no vPMU at all.
pub fn optional_kvm_caps(level: VpmuFeatureLevel) -> Vec<KvmCapability> {
    match level {
        VpmuFeatureLevel::Disabled => vec![KvmCapability::PMU_CAPABILITY],
        VpmuFeatureLevel::LimitedlyEnabled | VpmuFeatureLevel::FullyEnabled => Vec::new(),
    }
}

/// Checks [`required_kvm_caps`] against `check_extension`, a function that returns what
/// `KVM_CHECK_EXTENSION` says for a capability number (with kvm-ioctls:
/// `|n| vm.check_extension_raw(u64::from(n))`).
///
/// This is the level-only part of [`check_kvm_support`], which also knows whether the
/// host's KVM has a vPMU to disable; a VMM calls that one.
///
/// # Errors
///
/// [`VpmuError::KvmLacksCapability`] naming the first required capability that KVM reports
/// as 0 (or negative).
///
/// ```
/// use vpmu::{check_kvm_caps, KvmCapability, VpmuError, VpmuFeatureLevel};
///
/// // A KVM that reports KVM_CAP_PMU_EVENT_FILTER (173) and nothing else.
/// let kvm = |cap: u32| i32::from(cap == KvmCapability::PMU_EVENT_FILTER.number);
/// check_kvm_caps(VpmuFeatureLevel::LimitedlyEnabled, kvm)?;
///
/// let old_kvm = |_: u32| 0;
/// let err = check_kvm_caps(VpmuFeatureLevel::LimitedlyEnabled, old_kvm).unwrap_err();
/// assert!(matches!(err, VpmuError::KvmLacksCapability { .. }));
/// # Ok::<(), VpmuError>(())
/// ```
pub fn check_kvm_caps(
    level: VpmuFeatureLevel,
    check_extension: impl Fn(u32) -> i32,
) -> Result<(), VpmuError> {
    match required_kvm_caps(level)
        .into_iter()
        .find(|cap| check_extension(cap.number) <= 0)
    {
        Some(capability) => Err(VpmuError::KvmLacksCapability { level, capability }),
        None => Ok(()),
    }
}

/// Checks that the host's KVM can enforce `level`, before the VM gets any vCPU:
///
/// - every capability of [`required_kvm_caps`] is reported (see [`check_kvm_caps`]);
/// - [`VpmuFeatureLevel::Disabled`] on a host whose KVM offers a vPMU ([`host_has_pmu`] on
///   `supported`, the `KVM_GET_SUPPORTED_CPUID` entries) needs `KVM_CAP_PMU_CAPABILITY`
///   with the [`KVM_PMU_CAP_DISABLE`] bit: CPUID cannot hide AMD's four legacy counters, so
///   only KVM can take them away. Where KVM has no vPMU at all (`enable_pmu=N`) there is
///   nothing to disable and the capability is not needed.
///
/// `check_extension` returns what `KVM_CHECK_EXTENSION` says for a capability number (with
/// kvm-ioctls: `|n| vm.check_extension_raw(u64::from(n))`). After this succeeds, carry out
/// [`kvm_actions`] with [`KvmPmuActions::should_enable_pmu_disable`] and
/// [`PmuEventFilter::to_kvm_abi_words`].
///
/// # Errors
///
/// [`VpmuError::KvmLacksCapability`] for a missing required capability,
/// [`VpmuError::KvmCannotDisablePmu`] when the vPMU is on and cannot be turned off.
///
/// ```
/// use topology::{CpuVendor, CpuidEntry};
/// use vpmu::{check_kvm_support, KvmCapability, VpmuError, VpmuFeatureLevel};
///
/// let off = VpmuFeatureLevel::Disabled;
/// let with_pmu = [CpuidEntry::leaf(0xA, 0x0730_0404, 0, 0, 0x603)];
/// let without_pmu = [CpuidEntry::leaf(0xA, 0, 0, 0, 0)];
/// // A KVM older than Linux 5.18: no KVM_CAP_PMU_CAPABILITY.
/// let old_kvm = |_: u32| 0;
///
/// // Its vPMU cannot be turned off ...
/// let err = check_kvm_support(off, CpuVendor::Intel, &with_pmu, old_kvm).unwrap_err();
/// assert!(matches!(err, VpmuError::KvmCannotDisablePmu { .. }));
/// // ... unless it has none.
/// check_kvm_support(off, CpuVendor::Intel, &without_pmu, old_kvm)?;
///
/// // A KVM that can disable it (the capability reports KVM_PMU_CAP_DISABLE = 1).
/// let kvm = |cap: u32| i32::from(cap == KvmCapability::PMU_CAPABILITY.number);
/// check_kvm_support(off, CpuVendor::Intel, &with_pmu, kvm)?;
/// # Ok::<(), VpmuError>(())
/// ```
pub fn check_kvm_support(
    level: VpmuFeatureLevel,
    vendor: CpuVendor,
    supported: &[CpuidEntry],
    check_extension: impl Fn(u32) -> i32,
) -> Result<(), VpmuError> {
    check_kvm_caps(level, &check_extension)?;
    if kvm_actions(level, vendor).disable_pmu && host_has_pmu(vendor, supported) {
        let capability = KvmCapability::PMU_CAPABILITY;
        let reported = check_extension(capability.number);
        let can_disable = u32::try_from(reported).is_ok_and(|b| b & KVM_PMU_CAP_DISABLE != 0);
        if !can_disable {
            return Err(VpmuError::KvmCannotDisablePmu {
                capability,
                reported,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd_extended_event_select_goes_to_bits_35_32() {
        assert_eq!(
            PmuEvent::new(0x1C0, 0x5A).kvm_filter_encoding(),
            0x1_0000_5AC0
        );
        assert!(!PmuEvent::new(0x1C0, 0).fits(CpuVendor::Intel));
        assert!(PmuEvent::new(0x1C0, 0).fits(CpuVendor::Amd));
    }

    #[test]
    fn validate_rejects_what_kvm_would() {
        let mut f = PmuEventFilter::limited(CpuVendor::Intel);
        assert!(f.validate(CpuVendor::Intel).is_ok());
        f.events.push(PmuEvent::new(0x1C0, 0).kvm_filter_encoding());
        assert!(f.validate(CpuVendor::Intel).is_err());
        assert!(f.validate(CpuVendor::Amd).is_ok());
        f.events = vec![0; PmuEventFilter::MAX_EVENTS + 1];
        assert!(f.validate(CpuVendor::Amd).is_err());
        f.events.clear();
        f.flags = 2;
        assert!(f.validate(CpuVendor::Amd).is_err());
    }

    #[test]
    fn pmu_disable_follows_the_capability() {
        let off = kvm_actions(VpmuFeatureLevel::Disabled, CpuVendor::Amd);
        assert!(off.should_enable_pmu_disable(1));
        assert!(!off.should_enable_pmu_disable(0));
        assert!(!off.should_enable_pmu_disable(-1));
        let full = kvm_actions(VpmuFeatureLevel::FullyEnabled, CpuVendor::Amd);
        assert!(!full.should_enable_pmu_disable(1));
    }

    #[test]
    fn caps_check() {
        let none = |_: u32| 0;
        assert!(check_kvm_caps(VpmuFeatureLevel::Disabled, none).is_ok());
        assert!(check_kvm_caps(VpmuFeatureLevel::FullyEnabled, none).is_ok());
        let err = check_kvm_caps(VpmuFeatureLevel::LimitedlyEnabled, none).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("KVM_CAP_PMU_EVENT_FILTER") && msg.contains("173"),
            "{msg}"
        );
        assert!(msg.contains("limited"), "{msg}");
        assert!(
            check_kvm_caps(VpmuFeatureLevel::LimitedlyEnabled, |n| i32::from(n == 173)).is_ok()
        );
    }

    #[test]
    fn kvm_support_for_disabling() {
        let with_pmu = [CpuidEntry::leaf(0xA, 0x0730_0404, 0, 0, 0x603)];
        let without_pmu = [CpuidEntry::leaf(0xA, 0, 0, 0, 0)];
        let off = VpmuFeatureLevel::Disabled;
        let caps = |pmu_capability: i32| {
            move |n: u32| {
                if n == KvmCapability::PMU_CAPABILITY.number {
                    pmu_capability
                } else {
                    0
                }
            }
        };
        for reported in [0, -1, 2] {
            let err =
                check_kvm_support(off, CpuVendor::Intel, &with_pmu, caps(reported)).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, VpmuError::KvmCannotDisablePmu { reported: r, .. } if r == reported),
                "{err:?}"
            );
            assert!(
                msg.contains("KVM_CAP_PMU_CAPABILITY") && msg.contains("212"),
                "{msg}"
            );
            assert!(check_kvm_support(off, CpuVendor::Intel, &without_pmu, caps(reported)).is_ok());
        }
        assert!(check_kvm_support(off, CpuVendor::Intel, &with_pmu, caps(1)).is_ok());
        // Full needs nothing; Limited needs the filter whatever the PMU capability says.
        let full = VpmuFeatureLevel::FullyEnabled;
        assert!(check_kvm_support(full, CpuVendor::Amd, &with_pmu, caps(0)).is_ok());
        let limited = VpmuFeatureLevel::LimitedlyEnabled;
        let err = check_kvm_support(limited, CpuVendor::Intel, &with_pmu, caps(1)).unwrap_err();
        assert!(
            matches!(err, VpmuError::KvmLacksCapability { .. }),
            "{err:?}"
        );
    }
}
