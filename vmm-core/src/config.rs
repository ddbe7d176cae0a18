//! The vCPU configuration and its validation against this host's KVM.
//!
//! Validation is pure: [`VcpuConfig::validate`] takes a [`KvmLimits`] that is either queried
//! from `/dev/kvm` ([`KvmLimits::query`]) or filled by hand, so every rule can be checked
//! before any VM or vCPU exists (and in unit tests without KVM).

use std::fmt;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use topology::{CpuTopology, CpuVendor, CpuidEntry};
use vpmu::VpmuFeatureLevel;

use crate::cpuid::entries_from_kvm;
use crate::VmmError;

/// How interrupts reach the vCPUs, which bounds the APIC IDs a VM may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterruptMode {
    /// xAPIC with an MP table: 8-bit APIC IDs, 0xFF is the broadcast ID, so every APIC ID must
    /// be below 255.
    #[default]
    XApic,
    /// x2APIC: 32-bit APIC IDs (only `KVM_CAP_MAX_VCPU_ID` bounds them). Reserved for a future
    /// mode; the guest-program loader and the MP table still assume xAPIC.
    X2Apic,
}

impl InterruptMode {
    /// The first APIC ID this mode cannot address (`None`: no limit of its own).
    pub fn apic_id_limit(self) -> Option<u32> {
        match self {
            InterruptMode::XApic => Some(255),
            InterruptMode::X2Apic => None,
        }
    }
}

impl fmt::Display for InterruptMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InterruptMode::XApic => "xAPIC",
            InterruptMode::X2Apic => "x2APIC",
        })
    }
}

/// What this host's KVM allows, as far as the vCPU configuration is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmLimits {
    /// `KVM_CAP_MAX_VCPUS`: the most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// `KVM_CAP_MAX_VCPU_ID`: every KVM vCPU id (= APIC ID) must be below it.
    pub max_vcpu_id: u32,
    /// `KVM_GET_SUPPORTED_CPUID`, converted.
    pub supported_cpuid: Vec<CpuidEntry>,
}

impl KvmLimits {
    /// Asks KVM (only the `/dev/kvm` fd: no VM is created).
    pub fn query(kvm: &Kvm) -> Result<Self, VmmError> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        // KVM_CHECK_EXTENSION answers with an int; a negative answer would be a kernel bug.
        let cap = |c: Cap, fallback: usize| -> u32 {
            let v = kvm.check_extension_int(c);
            let v = if v > 0 { v as usize } else { fallback };
            u32::try_from(v).unwrap_or(u32::MAX)
        };
        // The kernel's documented fallbacks: MAX_VCPUS defaults to NR_VCPUS, MAX_VCPU_ID to
        // MAX_VCPUS.
        let max_vcpus = cap(Cap::MaxVcpus, kvm.get_nr_vcpus());
        let max_vcpu_id = cap(Cap::MaxVcpuId, max_vcpus as usize);
        Ok(Self {
            max_vcpus,
            max_vcpu_id,
            supported_cpuid: entries_from_kvm(cpuid.as_slice()),
        })
    }

    /// The CPU vendor KVM reports in leaf 0.
    pub fn vendor(&self) -> Result<CpuVendor, VmmError> {
        CpuVendor::from_entries(&self.supported_cpuid).ok_or(VmmError::UnknownCpuVendor)
    }
}

/// The vCPUs of a VM: how many boot, how many at most, their topology and vPMU level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuConfig {
    /// vCPUs created and started at boot (indices `0..boot_vcpu_count`).
    pub boot_vcpu_count: u32,
    /// The most vCPUs this VM can ever have (boot + hot-added).
    pub max_vcpu_count: u32,
    /// The topology of all `max_vcpu_count` vCPUs; its product must equal `max_vcpu_count`.
    pub topology: CpuTopology,
    /// The vPMU level every vCPU gets.
    pub vpmu: VpmuFeatureLevel,
}

impl VcpuConfig {
    /// A configuration with the default topology (1 socket, 1 die, `max` cores, 1 thread) and
    /// no vPMU.
    pub fn with_counts(boot: u32, max: u32) -> Result<Self, VmmError> {
        Ok(Self {
            boot_vcpu_count: boot,
            max_vcpu_count: max,
            topology: CpuTopology::from_vcpu_count(max)?,
            vpmu: VpmuFeatureLevel::default(),
        })
    }

    /// Checks every rule, in this order: boot count not 0, boot <= max, max within
    /// `KVM_CAP_MAX_VCPUS`, topology product == max, every APIC ID below
    /// `KVM_CAP_MAX_VCPU_ID` and within the interrupt mode's range, vPMU level available on the
    /// host. The first violation is returned.
    pub fn validate(&self, limits: &KvmLimits, mode: InterruptMode) -> Result<(), VmmError> {
        let boot = self.boot_vcpu_count;
        let max = self.max_vcpu_count;
        if boot == 0 {
            return Err(VmmError::ZeroBootVcpus);
        }
        if boot > max {
            return Err(VmmError::BootExceedsMax { boot, max });
        }
        if max > limits.max_vcpus {
            return Err(VmmError::MaxVcpusOverKvmLimit {
                max,
                kvm_limit: limits.max_vcpus,
            });
        }
        let t = &self.topology;
        let product = u64::from(t.sockets)
            * u64::from(t.dies_per_socket)
            * u64::from(t.cores_per_die)
            * u64::from(t.threads_per_core);
        if product != u64::from(max) {
            return Err(VmmError::TopologyMismatch {
                topology: topology_string(t),
                product,
                max,
            });
        }
        // APIC IDs grow with the index (each level's field is above the one before), so the
        // last index has the largest.
        let index = max - 1;
        let apic_id = t.apic_id(index)?;
        if apic_id >= limits.max_vcpu_id {
            return Err(VmmError::ApicIdOverKvmLimit {
                index,
                apic_id,
                kvm_limit: limits.max_vcpu_id,
            });
        }
        if let Some(limit) = mode.apic_id_limit() {
            if apic_id >= limit {
                return Err(VmmError::ApicIdTooLargeForInterruptMode {
                    index,
                    apic_id,
                    mode,
                    limit,
                });
            }
        }
        let vendor = limits.vendor()?;
        vpmu::check_host_support(self.vpmu, vendor, &limits.supported_cpuid).map_err(|source| {
            VmmError::VpmuUnsupported {
                level: self.vpmu,
                source,
            }
        })?;
        Ok(())
    }
}

/// `sockets=S,dies=D,cores=C,threads=T`, for messages.
pub(crate) fn topology_string(t: &CpuTopology) -> String {
    format!(
        "sockets={},dies={},cores={},threads={}",
        t.sockets, t.dies_per_socket, t.cores_per_die, t.threads_per_core
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Limits filled by hand: this host's KVM numbers over a synthetic Intel CPUID with no
    /// PMU (leaf 0xA zero), like the PVM hosts.
    fn limits() -> KvmLimits {
        let mut cpuid = topology::host::synthetic_intel();
        if let Some(e) = topology::find_entry_mut(&mut cpuid, 0xa, 0) {
            *e = CpuidEntry::leaf(0xa, 0, 0, 0, 0);
        }
        KvmLimits {
            max_vcpus: 1024,
            max_vcpu_id: 4096,
            supported_cpuid: cpuid,
        }
    }

    fn config(boot: u32, max: u32, s: u32, c: u32, t: u32) -> VcpuConfig {
        VcpuConfig {
            boot_vcpu_count: boot,
            max_vcpu_count: max,
            topology: CpuTopology {
                sockets: s,
                dies_per_socket: 1,
                cores_per_die: c,
                threads_per_core: t,
            },
            vpmu: VpmuFeatureLevel::Disabled,
        }
    }

    fn check(c: &VcpuConfig) -> Result<(), VmmError> {
        c.validate(&limits(), InterruptMode::XApic)
    }

    #[test]
    fn valid_configs_pass() {
        check(&config(4, 8, 2, 2, 2)).unwrap();
        check(&config(1, 254, 1, 254, 1)).unwrap();
        // 2 x 3 x 2: sparse APIC IDs, largest 13.
        check(&config(12, 12, 2, 3, 2)).unwrap();
        // More than 255 vCPUs is fine in x2APIC mode (counts are not u8).
        config(300, 512, 2, 128, 2)
            .validate(&limits(), InterruptMode::X2Apic)
            .unwrap();
    }

    #[test]
    fn zero_boot_vcpus() {
        assert!(matches!(
            check(&config(0, 8, 2, 2, 2)),
            Err(VmmError::ZeroBootVcpus)
        ));
    }

    #[test]
    fn boot_over_max() {
        let e = check(&config(9, 8, 2, 2, 2)).unwrap_err();
        assert!(
            matches!(e, VmmError::BootExceedsMax { boot: 9, max: 8 }),
            "{e}"
        );
        assert!(e.to_string().contains("boot_vcpu_count 9"), "{e}");
    }

    #[test]
    fn max_over_kvm_limit() {
        let e = check(&config(1, 2048, 8, 128, 2)).unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::MaxVcpusOverKvmLimit {
                    max: 2048,
                    kvm_limit: 1024
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn topology_product_differs_from_max() {
        let e = check(&config(2, 8, 1, 3, 2)).unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::TopologyMismatch {
                    product: 6,
                    max: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("sockets=1,dies=1,cores=3,threads=2"),
            "{e}"
        );
        // A zero level is a mismatch too, not a panic.
        assert!(matches!(
            check(&config(1, 4, 0, 4, 1)),
            Err(VmmError::TopologyMismatch { product: 0, .. })
        ));
    }

    #[test]
    fn apic_id_over_kvm_vcpu_id_limit() {
        let mut l = limits();
        l.max_vcpu_id = 8;
        // 3 sockets x 3 cores: the core field is 2 bits, so the last vCPU (index 8, socket 2,
        // core 2) has APIC ID 2 << 2 | 2 = 10, not below KVM's 8.
        let e = config(1, 9, 3, 3, 1)
            .validate(&l, InterruptMode::XApic)
            .unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::ApicIdOverKvmLimit {
                    index: 8,
                    apic_id: 10,
                    kvm_limit: 8
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn apic_id_too_large_for_xapic() {
        // 255 cores: the last APIC ID is 254, fine; 2 x 160 cores: core field 8 bits, the
        // last vCPU (socket 1, core 159) has APIC ID 256 + 159.
        check(&config(1, 255, 1, 255, 1)).unwrap();
        let e = check(&config(1, 320, 2, 160, 1)).unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::ApicIdTooLargeForInterruptMode {
                    index: 319,
                    apic_id: 415,
                    mode: InterruptMode::XApic,
                    limit: 255
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("APIC ID 415"), "{e}");
        // 256 cores: the last APIC ID is 255, the broadcast ID.
        assert!(matches!(
            check(&config(1, 256, 1, 256, 1)),
            Err(VmmError::ApicIdTooLargeForInterruptMode { apic_id: 255, .. })
        ));
    }

    #[test]
    fn vpmu_level_the_host_cannot_give() {
        let mut c = config(1, 1, 1, 1, 1);
        c.vpmu = VpmuFeatureLevel::LimitedlyEnabled;
        let e = check(&c).unwrap_err();
        assert!(
            matches!(
                e,
                VmmError::VpmuUnsupported {
                    level: VpmuFeatureLevel::LimitedlyEnabled,
                    ..
                }
            ),
            "{e}"
        );
        // With a PMU in the host's CPUID, the same level passes.
        let mut l = limits();
        l.supported_cpuid = topology::host::synthetic_intel();
        if topology::find_entry(&l.supported_cpuid, 0xa, 0).is_some_and(|e| e.eax & 0xff != 0) {
            c.validate(&l, InterruptMode::XApic).unwrap();
        }
    }

    #[test]
    fn unknown_vendor() {
        let mut l = limits();
        l.supported_cpuid.retain(|e| e.function != 0);
        assert!(matches!(
            config(1, 1, 1, 1, 1).validate(&l, InterruptMode::XApic),
            Err(VmmError::UnknownCpuVendor)
        ));
    }
}
