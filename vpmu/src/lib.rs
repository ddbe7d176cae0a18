//! vPMU levels for a KVM-based VMM: what the guest sees in CPUID, and what KVM must enforce.
//!
//! This crate owns the vPMU level ([`VpmuFeatureLevel`]: off, limited, full) and turns it
//! into plain data; it issues no KVM ioctl and depends on no KVM crate. For a level and the
//! host's CPU vendor it gives:
//! - [`check_host_support`]: whether the host's KVM-supported CPUID can provide the level, or a
//!   [`VpmuError::HostLacksPmu`] that names the level and what is missing (never a silent
//!   downgrade);
//! - [`apply_cpuid`]: the edits of one vCPU's CPUID set (Intel leaf 0xA and PDCM; AMD/Hygon
//!   PerfCtrExtCore and leaf 0x8000_0022);
//! - the KVM capability API: [`check_kvm_support`] (are the capabilities the level needs
//!   there: [`required_kvm_caps`], and `KVM_CAP_PMU_CAPABILITY` to turn a present vPMU off)
//!   and [`kvm_actions`], what the VMM must do in KVM before creating vCPUs: disable the vPMU
//!   ([`KvmPmuActions::should_enable_pmu_disable`]) or install an allow-list
//!   ([`PmuEventFilter`], whose [`PmuEventFilter::to_kvm_abi_words`] are the exact
//!   `KVM_SET_PMU_EVENT_FILTER` argument, checked against the kernel's struct layout in the
//!   tests).
//!
//! CPUID entries are `topology`'s plain [`topology::CpuidEntry`].
//!
//! # CPUID
//!
//! ```
//! use topology::{CpuVendor, CpuidEntry};
//! use vpmu::{apply_cpuid, check_host_support, kvm_actions, FilterAction, VpmuFeatureLevel};
//!
//! // Part of an Intel host's supported CPUID: leaf 0xA with a version 4 PMU.
//! let host = vec![
//!     CpuidEntry::leaf(0x1, 0x000906E9, 0x00100800, 0x4FFAEBBF, 0xBFEBFBFF),
//!     CpuidEntry::leaf(0xA, 0x07300404, 0, 0, 0x00000603),
//! ];
//! let level: VpmuFeatureLevel = "limited".parse()?;
//! check_host_support(level, CpuVendor::Intel, &host)?;
//!
//! let mut vcpu = host.clone();
//! apply_cpuid(level, CpuVendor::Intel, &mut vcpu)?;
//! assert_eq!(vcpu[1].eax & 0xff, 2); // PMU version 2
//!
//! let actions = kvm_actions(level, CpuVendor::Intel);
//! assert!(!actions.disable_pmu);
//! let filter = actions.event_filter.expect("limited installs a filter");
//! assert_eq!(filter.action, FilterAction::Allow);
//! assert_eq!(filter.events, vec![0x3C, 0xC0]); // core cycles, instructions retired
//! assert_eq!(filter.to_kvm_abi_bytes().len(), 32 + 2 * 8);
//!
//! // A host whose KVM has no PMU (leaf 0xA all zero) cannot run a limited guest.
//! let no_pmu = vec![CpuidEntry::leaf(0xA, 0, 0, 0, 0)];
//! let err = check_host_support(level, CpuVendor::Intel, &no_pmu).unwrap_err();
//! assert!(err.to_string().contains("`limited`"));
//! # Ok::<(), vpmu::VpmuError>(())
//! ```
//!
//! # KVM, in order
//!
//! A VMM does this on the VM fd before the first `KVM_CREATE_VCPU`; `check_extension` stands
//! for `KVM_CHECK_EXTENSION` (with kvm-ioctls: `|n| vm.check_extension_raw(u64::from(n))`).
//!
//! ```
//! use topology::{CpuVendor, CpuidEntry};
//! use vpmu::{check_kvm_support, kvm_actions, KvmCapability, VpmuFeatureLevel};
//!
//! let supported = vec![CpuidEntry::leaf(0xA, 0x07300404, 0, 0, 0x00000603)];
//! // This KVM reports both PMU capabilities; `KVM_CAP_PMU_CAPABILITY` has the disable bit.
//! let check_extension = |cap: u32| match cap {
//!     n if n == KvmCapability::PMU_CAPABILITY.number => 1,
//!     n if n == KvmCapability::PMU_EVENT_FILTER.number => 1,
//!     _ => 0,
//! };
//!
//! for level in VpmuFeatureLevel::ALL {
//!     // 1. Refuse early what KVM cannot enforce.
//!     check_kvm_support(level, CpuVendor::Intel, &supported, check_extension)?;
//!     let actions = kvm_actions(level, CpuVendor::Intel);
//!     // 2. KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY, args[0] = KVM_PMU_CAP_DISABLE).
//!     let pmu_capability = check_extension(KvmCapability::PMU_CAPABILITY.number);
//!     let disable = actions.should_enable_pmu_disable(pmu_capability);
//!     assert_eq!(disable, level == VpmuFeatureLevel::Disabled);
//!     // 3. KVM_SET_PMU_EVENT_FILTER with these 8-byte aligned words.
//!     if let Some(filter) = &actions.event_filter {
//!         filter.validate(CpuVendor::Intel)?;
//!         let words: Vec<u64> = filter.to_kvm_abi_words();
//!         assert_eq!(words.len(), 4 + filter.events.len());
//!     }
//! }
//! # Ok::<(), vpmu::VpmuError>(())
//! ```

pub mod amd;
mod cpuid;
mod error;
pub mod intel;
mod kvm;
mod level;

pub use cpuid::{
    apply_cpuid, check_host_support, host_has_pmu, LIMITED_INTEL_EVENTS,
    LIMITED_INTEL_FIXED_COUNTERS, LIMITED_INTEL_GP_COUNTERS, LIMITED_INTEL_VERSION,
};
pub use error::{HostPmuGap, VpmuError};
pub use kvm::{
    check_kvm_caps, check_kvm_support, kvm_actions, optional_kvm_caps, required_kvm_caps,
    FilterAction, KvmCapability, KvmPmuActions, PmuEvent, PmuEventFilter, KVM_PMU_CAP_DISABLE,
    KVM_PMU_EVENT_ALLOW, KVM_PMU_EVENT_DENY,
};
pub use level::VpmuFeatureLevel;
