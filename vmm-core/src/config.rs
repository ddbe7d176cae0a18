//! The vCPU configuration and its validation against this host's KVM.
//!
//! Validation is pure: [`VcpuConfig::validate`] takes a [`KvmLimits`] that is either queried
//! from `/dev/kvm` once ([`KvmLimits::query`]) or filled by hand, so every rule can be checked
//! before any VM or vCPU exists (and in unit tests without KVM). The SMP rules (counts and
//! topology) are the `topology` crate's ([`SmpConfig::validate`]); this module adds what
//! KVM, the interrupt mode and the vPMU level allow.

use std::collections::BTreeMap;
use std::fmt;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use topology::{CpuTopology, CpuVendor, CpuidEntry, SmpConfig, XAPIC_ID_LIMIT};
use vpmu::VpmuFeatureLevel;

use crate::cpuid::entries_from_kvm;
use crate::error::{ConfigError, KvmOp, VmError};
use crate::template::CpuTemplate;

/// Host CPUs a vCPU thread may run on, by vCPU index (see [`VcpuConfig::vcpu_affinity`]).
pub type VcpuAffinity = BTreeMap<u32, Vec<usize>>;

/// The most host CPUs a CPU set names (`CPU_SETSIZE`).
pub const MAX_HOST_CPUS: usize = 1024;

/// Parses a vCPU affinity as `vcpuctl --vcpu-affinity` writes it: `INDEX=CPUS` items
/// separated by `,` or `;`, e.g. `0=0-1,1=1`. `CPUS` is CPU numbers and ranges joined by `:`
/// (`0=0-1:3`); an item without `INDEX=` continues the previous item's list, so
/// `0=0-1,3,1=2` gives vCPU 0 the CPUs 0, 1 and 3 and vCPU 1 the CPU 2.
///
/// # Errors
///
/// A message saying which item is malformed.
pub fn parse_vcpu_affinity(text: &str) -> Result<VcpuAffinity, String> {
    let mut map = VcpuAffinity::new();
    let mut current: Option<u32> = None;
    for item in text
        .split([',', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let cpus = match item.split_once('=') {
            Some((index, cpus)) => {
                let index: u32 = index.trim().parse().map_err(|_| {
                    format!(
                        "{item:?}: {index:?} is not a vCPU index (write INDEX=CPUS, e.g. 0=0-1)"
                    )
                })?;
                current = Some(index);
                cpus
            }
            None => item,
        };
        let index = current.ok_or_else(|| {
            format!("{item:?}: start with a vCPU index (INDEX=CPUS, e.g. 0=0-1,1=1)")
        })?;
        let set = map.entry(index).or_default();
        for part in cpus.split(':').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = || format!("{item:?}: {part:?} is not a CPU number or range (e.g. 2 or 0-3)");
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse::<usize>().map_err(|_| bad())?,
                    b.trim().parse::<usize>().map_err(|_| bad())?,
                ),
                None => {
                    let n = part.parse::<usize>().map_err(|_| bad())?;
                    (n, n)
                }
            };
            if lo > hi || hi >= MAX_HOST_CPUS {
                return Err(format!(
                    "{item:?}: range {lo}-{hi} is empty or beyond CPU {}",
                    MAX_HOST_CPUS - 1
                ));
            }
            set.extend(lo..=hi);
        }
        set.sort_unstable();
        set.dedup();
    }
    Ok(map)
}

/// How interrupts reach the vCPUs, which bounds the APIC IDs a VM may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InterruptMode {
    /// xAPIC while every APIC ID fits it (below 255), x2APIC otherwise
    /// ([`InterruptMode::resolve`]): guests without x2APIC support keep working whenever they
    /// can.
    #[default]
    Auto,
    /// xAPIC with an MP table: 8-bit APIC IDs, 0xFF is the broadcast ID, so every APIC ID must
    /// be below 255.
    XApic,
    /// x2APIC: 32-bit APIC IDs (only `KVM_CAP_MAX_VCPU_ID` bounds them). KVM gets
    /// `KVM_CAP_X2APIC_API` (32-bit IDs, broadcast quirk off), every vCPU starts with its
    /// local APIC in x2APIC mode, the guest is told about KVM's MSI extended destination ID,
    /// and Linux boot writes no MP table (its ACPI MADT lists the large IDs as Local x2APIC
    /// entries). See [`crate::arch::x86_64::x2apic`].
    X2Apic,
}

impl InterruptMode {
    /// The first APIC ID this mode cannot address (`None`: no limit of its own; `Auto` has
    /// none, it picks x2APIC when needed).
    pub fn apic_id_limit(self) -> Option<u32> {
        match self {
            InterruptMode::XApic => Some(XAPIC_ID_LIMIT),
            InterruptMode::Auto | InterruptMode::X2Apic => None,
        }
    }

    /// The mode a VM whose largest APIC ID is `largest_apic_id` runs in: `Auto` becomes xAPIC
    /// when that ID is below 255 and x2APIC otherwise; the other modes stay as they are.
    pub fn resolve(self, largest_apic_id: u32) -> InterruptMode {
        match self {
            InterruptMode::Auto if largest_apic_id < XAPIC_ID_LIMIT => InterruptMode::XApic,
            InterruptMode::Auto => InterruptMode::X2Apic,
            other => other,
        }
    }
}

impl fmt::Display for InterruptMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InterruptMode::Auto => "automatic (xAPIC, or x2APIC for APIC IDs above 254)",
            InterruptMode::XApic => "xAPIC",
            InterruptMode::X2Apic => "x2APIC",
        })
    }
}

/// What this host's KVM allows, as far as the vCPU configuration is concerned. Query it once
/// ([`KvmLimits::query`]) and hand it to [`VcpuConfig::validate`] and
/// [`VcpuManager::new`](crate::VcpuManager::new).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmLimits {
    /// `KVM_CAP_MAX_VCPUS`: the most vCPUs one VM may have.
    pub max_vcpus: u32,
    /// `KVM_CAP_MAX_VCPU_ID`: every KVM vCPU id (= APIC ID) must be below it.
    pub max_vcpu_id: u32,
    /// `KVM_GET_SUPPORTED_CPUID`, converted.
    pub supported_cpuid: Vec<CpuidEntry>,
    /// What `KVM_CHECK_EXTENSION` answered for each capability a vPMU level needs or uses
    /// (`vpmu::required_kvm_caps`, `vpmu::optional_kvm_caps`), by capability number. A
    /// capability not in the map counts as absent (0).
    pub capabilities: BTreeMap<u32, i32>,
}

impl KvmLimits {
    /// Asks KVM (only the `/dev/kvm` fd: no VM is created).
    ///
    /// # Errors
    ///
    /// [`VmError::Kvm`] with [`KvmOp::GetSupportedCpuid`] if KVM does not report its supported
    /// CPUID.
    pub fn query(kvm: &Kvm) -> Result<Self, VmError> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                op: KvmOp::GetSupportedCpuid,
                source,
            })?;
        // KVM_CHECK_EXTENSION answers with an int; a negative answer would be a kernel bug.
        let cap = |c: Cap, fallback: usize| -> u32 {
            let v = usize::try_from(kvm.check_extension_int(c))
                .ok()
                .filter(|v| *v > 0)
                .unwrap_or(fallback);
            u32::try_from(v).unwrap_or(u32::MAX)
        };
        // The kernel's documented fallbacks: MAX_VCPUS defaults to NR_VCPUS, MAX_VCPU_ID to
        // MAX_VCPUS.
        let max_vcpus = cap(Cap::MaxVcpus, kvm.get_nr_vcpus());
        let max_vcpu_id = cap(Cap::MaxVcpuId, max_vcpus as usize);
        let capabilities = VpmuFeatureLevel::ALL
            .iter()
            .flat_map(|level| {
                vpmu::required_kvm_caps(*level)
                    .into_iter()
                    .chain(vpmu::optional_kvm_caps(*level))
            })
            .map(|c| (c.number, kvm.check_extension_raw(u64::from(c.number))))
            .collect();
        Ok(Self {
            max_vcpus,
            max_vcpu_id,
            supported_cpuid: entries_from_kvm(cpuid.as_slice()),
            capabilities,
        })
    }

    /// What `KVM_CHECK_EXTENSION` answered for capability `number` (0 if it was not asked).
    pub fn capability(&self, number: u32) -> i32 {
        self.capabilities.get(&number).copied().unwrap_or(0)
    }

    /// The CPU vendor KVM reports in leaf 0.
    ///
    /// # Errors
    ///
    /// [`ConfigError::UnknownCpuVendor`] if leaf 0 names no vendor we support.
    pub fn vendor(&self) -> Result<CpuVendor, ConfigError> {
        CpuVendor::from_entries(&self.supported_cpuid).ok_or(ConfigError::UnknownCpuVendor)
    }
}

/// The vCPUs of a VM: how many boot, how many at most, their topology and vPMU level.
///
/// The counts and topology are those of an [`SmpConfig`] ([`VcpuConfig::from_smp`],
/// [`VcpuConfig::smp`]), and are checked by its rules.
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
    /// A CPU template (Firecracker's custom CPU template format, see [`crate::template`])
    /// applied to every vCPU's CPUID and MSRs; `None`: KVM's supported CPUID as it is
    /// (normalised). Set it with [`with_template`](Self::with_template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<CpuTemplate>,
    /// Host CPUs each vCPU thread may run on, by vCPU index (vCPUs not listed may run
    /// anywhere). Each thread applies its set to itself before its seccomp filter
    /// ([`vcpu_actor::VcpuOptions::affinity`]). Set it with
    /// [`with_vcpu_affinity`](Self::with_vcpu_affinity).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vcpu_affinity: VcpuAffinity,
}

impl VcpuConfig {
    /// The vCPUs of `smp` (e.g. parsed from QEMU's `-smp` syntax) with the vPMU level `vpmu`.
    pub fn from_smp(smp: SmpConfig, vpmu: VpmuFeatureLevel) -> Self {
        Self {
            boot_vcpu_count: smp.boot_cpus,
            max_vcpu_count: smp.max_cpus,
            topology: smp.topology,
            vpmu,
            template: None,
            vcpu_affinity: VcpuAffinity::new(),
        }
    }

    /// This configuration with the CPU template `template`.
    pub fn with_template(mut self, template: Option<CpuTemplate>) -> Self {
        self.template = template;
        self
    }

    /// This configuration with the vCPU affinity `affinity` (e.g. from
    /// [`parse_vcpu_affinity`]).
    pub fn with_vcpu_affinity(mut self, affinity: VcpuAffinity) -> Self {
        self.vcpu_affinity = affinity;
        self
    }

    /// A configuration with the default topology (1 socket, 1 die, `max` cores, 1 thread) and
    /// no vPMU.
    ///
    /// # Errors
    ///
    /// [`ConfigError::DefaultTopology`] if `max` is 0 or too large for one die of cores,
    /// [`ConfigError::Smp`] if `boot` is 0 or larger than `max`.
    pub fn with_counts(boot: u32, max: u32) -> Result<Self, ConfigError> {
        let topology = CpuTopology::from_vcpu_count(max)
            .map_err(|source| ConfigError::DefaultTopology { max, source })?;
        let smp = SmpConfig::new(boot, max, topology).map_err(|source| ConfigError::Smp {
            boot,
            max,
            topology,
            source,
        })?;
        Ok(Self::from_smp(smp, VpmuFeatureLevel::default()))
    }

    /// The counts and topology, as the `topology` crate's SMP configuration (not checked: see
    /// [`SmpConfig::validate`]).
    pub fn smp(&self) -> SmpConfig {
        SmpConfig {
            boot_cpus: self.boot_vcpu_count,
            max_cpus: self.max_vcpu_count,
            topology: self.topology,
        }
    }

    /// The [`ConfigError::Smp`] of this configuration for `source`.
    fn smp_error(&self, source: topology::TopologyError) -> ConfigError {
        ConfigError::Smp {
            boot: self.boot_vcpu_count,
            max: self.max_vcpu_count,
            topology: self.topology,
            source,
        }
    }

    /// The largest APIC ID of the configuration (the last index's: APIC IDs grow with the
    /// index, each level's field being above the one before).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Smp`] if the SMP rules do not hold.
    pub fn largest_apic_id(&self) -> Result<u32, ConfigError> {
        let smp_error = |source| self.smp_error(source);
        self.smp().validate().map_err(smp_error)?;
        self.topology
            .apic_id(self.max_vcpu_count.saturating_sub(1))
            .map_err(smp_error)
    }

    /// The interrupt mode this configuration runs in when `requested` is asked for
    /// ([`InterruptMode::resolve`] with [`largest_apic_id`](Self::largest_apic_id)).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Smp`] if the SMP rules do not hold.
    pub fn interrupt_mode(&self, requested: InterruptMode) -> Result<InterruptMode, ConfigError> {
        Ok(requested.resolve(self.largest_apic_id()?))
    }

    /// Checks every rule, in this order: the SMP rules ([`SmpConfig::validate`]: boot count
    /// not 0, every level at least 1, topology product == max, boot <= max), max within
    /// `KVM_CAP_MAX_VCPUS`, every APIC ID below `KVM_CAP_MAX_VCPU_ID` and within the interrupt
    /// mode's range (`Auto` resolved first: it fits any APIC ID), vPMU level available on the
    /// host (its CPUID, then its KVM capabilities).
    ///
    /// # Errors
    ///
    /// The first rule broken: [`ConfigError::Smp`], [`ConfigError::MaxVcpusOverKvmLimit`],
    /// [`ConfigError::ApicIdOverKvmLimit`], [`ConfigError::ApicIdTooLargeForInterruptMode`],
    /// [`ConfigError::UnknownCpuVendor`] or [`ConfigError::VpmuUnsupported`].
    pub fn validate(&self, limits: &KvmLimits, mode: InterruptMode) -> Result<(), ConfigError> {
        let smp_error = |source| self.smp_error(source);
        self.smp().validate().map_err(smp_error)?;
        let max = self.max_vcpu_count;
        if max > limits.max_vcpus {
            return Err(ConfigError::MaxVcpusOverKvmLimit {
                max,
                kvm_limit: limits.max_vcpus,
            });
        }
        // APIC IDs grow with the index (each level's field is above the one before), so the
        // last index has the largest. max >= 1: the SMP rules hold.
        let index = max.saturating_sub(1);
        let apic_id = self.topology.apic_id(index).map_err(smp_error)?;
        if apic_id >= limits.max_vcpu_id {
            return Err(ConfigError::ApicIdOverKvmLimit {
                index,
                apic_id,
                kvm_limit: limits.max_vcpu_id,
            });
        }
        if let Some(limit) = mode.resolve(apic_id).apic_id_limit() {
            if apic_id >= limit {
                return Err(ConfigError::ApicIdTooLargeForInterruptMode {
                    index,
                    apic_id,
                    mode,
                    limit,
                });
            }
        }
        let vendor = limits.vendor()?;
        let unsupported = |source| ConfigError::VpmuUnsupported {
            level: self.vpmu,
            source,
        };
        vpmu::check_host_support(self.vpmu, vendor, &limits.supported_cpuid)
            .map_err(unsupported)?;
        vpmu::check_kvm_caps(self.vpmu, |n| limits.capability(n)).map_err(unsupported)?;
        for (index, cpus) in &self.vcpu_affinity {
            let reason = if *index >= max {
                format!("there are only {max} vCPUs (indices 0 to {})", max - 1)
            } else if cpus.is_empty() {
                "the CPU set is empty: list at least one host CPU".to_string()
            } else if let Some(cpu) = cpus.iter().find(|c| **c >= MAX_HOST_CPUS) {
                format!("host CPU {cpu} is beyond the last one a CPU set holds ({MAX_HOST_CPUS})")
            } else {
                continue;
            };
            return Err(ConfigError::VcpuAffinity {
                index: *index,
                reason,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topology::TopologyError;

    /// Unwraps the error of `$result`, asserting that it matches `$pat` (its message shows
    /// otherwise).
    macro_rules! assert_err {
        ($result:expr, $pat:pat) => {{
            let e = $result.unwrap_err();
            assert!(matches!(e, $pat), "{e}");
            e
        }};
    }

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
            capabilities: BTreeMap::new(),
        }
    }

    fn config(boot: u32, max: u32, s: u32, c: u32, t: u32) -> VcpuConfig {
        VcpuConfig {
            boot_vcpu_count: boot,
            max_vcpu_count: max,
            topology: CpuTopology::new(s, 1, c, t).unwrap(),
            vpmu: VpmuFeatureLevel::Disabled,
            template: None,
            vcpu_affinity: VcpuAffinity::new(),
        }
    }

    fn check(c: &VcpuConfig) -> Result<(), ConfigError> {
        c.validate(&limits(), InterruptMode::XApic)
    }

    #[test]
    fn auto_mode_is_xapic_while_every_id_fits_and_x2apic_beyond() {
        assert_eq!(InterruptMode::default(), InterruptMode::Auto);
        // 255 cores: the last APIC ID is 254.
        let fits = config(1, 255, 1, 255, 1);
        assert_eq!(fits.largest_apic_id().unwrap(), 254);
        assert_eq!(
            fits.interrupt_mode(InterruptMode::Auto).unwrap(),
            InterruptMode::XApic
        );
        // 2 sockets x 75 cores x 2 threads: 300 vCPUs with APIC IDs up to 405.
        let sparse = config(2, 300, 2, 75, 2);
        assert_eq!(sparse.largest_apic_id().unwrap(), 405);
        assert_eq!(
            sparse.interrupt_mode(InterruptMode::Auto).unwrap(),
            InterruptMode::X2Apic
        );
        sparse.validate(&limits(), InterruptMode::Auto).unwrap();
        // An explicit mode stays.
        assert_eq!(
            fits.interrupt_mode(InterruptMode::X2Apic).unwrap(),
            InterruptMode::X2Apic
        );
        assert_eq!(
            sparse.interrupt_mode(InterruptMode::XApic).unwrap(),
            InterruptMode::XApic
        );
        // KVM's limits still hold in Auto mode: 1024 vCPUs pass, their IDs below 4096.
        config(1, 1024, 4, 128, 2)
            .validate(&limits(), InterruptMode::Auto)
            .unwrap();
        assert!(matches!(
            config(1, 2048, 8, 128, 2).validate(&limits(), InterruptMode::Auto),
            Err(ConfigError::MaxVcpusOverKvmLimit { .. })
        ));
        let mut l = limits();
        l.max_vcpu_id = 400;
        assert!(matches!(
            sparse.validate(&l, InterruptMode::Auto),
            Err(ConfigError::ApicIdOverKvmLimit { apic_id: 405, .. })
        ));
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
            Err(ConfigError::Smp {
                source: TopologyError::ZeroCpus { key: "cpus" },
                ..
            })
        ));
    }

    #[test]
    fn boot_over_max() {
        let e = assert_err!(
            check(&config(9, 8, 2, 2, 2)),
            ConfigError::Smp {
                source: TopologyError::BootExceedsMax { boot: 9, max: 8 },
                ..
            }
        );
        assert!(e.to_string().contains("boot_vcpu_count 9"), "{e}");
    }

    #[test]
    fn max_over_kvm_limit() {
        assert_err!(
            check(&config(1, 2048, 8, 128, 2)),
            ConfigError::MaxVcpusOverKvmLimit {
                max: 2048,
                kvm_limit: 1024
            }
        );
    }

    #[test]
    fn topology_product_differs_from_max() {
        let e = assert_err!(
            check(&config(2, 8, 1, 3, 2)),
            ConfigError::Smp {
                source: TopologyError::ProductMismatch {
                    product: 6,
                    max_cpus: 8,
                    ..
                },
                ..
            }
        );
        assert!(
            e.to_string().contains("sockets=1,dies=1,cores=3,threads=2"),
            "{e}"
        );
        // A zero level cannot even be built: topology refuses it, typed, not a panic.
        assert!(matches!(
            CpuTopology::new(0, 1, 4, 1),
            Err(TopologyError::ZeroLevel { level: "sockets" })
        ));
    }

    #[test]
    fn apic_id_over_kvm_vcpu_id_limit() {
        let mut l = limits();
        l.max_vcpu_id = 8;
        // 3 sockets x 3 cores: the core field is 2 bits, so the last vCPU (index 8, socket 2,
        // core 2) has APIC ID 2 << 2 | 2 = 10, not below KVM's 8.
        assert_err!(
            config(1, 9, 3, 3, 1).validate(&l, InterruptMode::XApic),
            ConfigError::ApicIdOverKvmLimit {
                index: 8,
                apic_id: 10,
                kvm_limit: 8
            }
        );
    }

    #[test]
    fn apic_id_too_large_for_xapic() {
        // 255 cores: the last APIC ID is 254, fine; 2 x 160 cores: core field 8 bits, the
        // last vCPU (socket 1, core 159) has APIC ID 256 + 159.
        check(&config(1, 255, 1, 255, 1)).unwrap();
        let e = assert_err!(
            check(&config(1, 320, 2, 160, 1)),
            ConfigError::ApicIdTooLargeForInterruptMode {
                index: 319,
                apic_id: 415,
                mode: InterruptMode::XApic,
                limit: 255
            }
        );
        assert!(e.to_string().contains("APIC ID 415"), "{e}");
        // 256 cores: the last APIC ID is 255, the broadcast ID.
        assert!(matches!(
            check(&config(1, 256, 1, 256, 1)),
            Err(ConfigError::ApicIdTooLargeForInterruptMode { apic_id: 255, .. })
        ));
    }

    #[test]
    fn vpmu_level_the_host_cannot_give() {
        let mut c = config(1, 1, 1, 1, 1);
        c.vpmu = VpmuFeatureLevel::LimitedlyEnabled;
        assert_err!(
            check(&c),
            ConfigError::VpmuUnsupported {
                level: VpmuFeatureLevel::LimitedlyEnabled,
                ..
            }
        );
        // With a PMU in the host's CPUID, the same level passes.
        let mut l = limits();
        l.supported_cpuid = topology::host::synthetic_intel();
        if topology::find_entry(&l.supported_cpuid, 0xa, 0).is_some_and(|e| e.eax & 0xff != 0) {
            // ... once KVM also has the event filter the level needs.
            assert_err!(
                c.validate(&l, InterruptMode::XApic),
                ConfigError::VpmuUnsupported {
                    source: vpmu::VpmuError::KvmLacksCapability { .. },
                    ..
                }
            );
            l.capabilities
                .insert(vpmu::KvmCapability::PMU_EVENT_FILTER.number, 1);
            c.validate(&l, InterruptMode::XApic).unwrap();
        }
    }

    #[test]
    fn unknown_vendor() {
        let mut l = limits();
        l.supported_cpuid.retain(|e| e.function != 0);
        assert!(matches!(
            config(1, 1, 1, 1, 1).validate(&l, InterruptMode::XApic),
            Err(ConfigError::UnknownCpuVendor)
        ));
    }

    #[test]
    fn topology_product_overflow_is_an_error_not_a_panic() {
        assert!(CpuTopology::new(u32::MAX, u32::MAX, u32::MAX, u32::MAX).is_err());
        let mut c = config(1, 1, 1, 1, 1);
        c.max_vcpu_count = u32::MAX;
        assert!(matches!(check(&c), Err(ConfigError::Smp { .. })));
    }

    #[test]
    fn from_smp_keeps_the_counts_and_topology() {
        let smp: SmpConfig = "4,maxcpus=8,sockets=2,cores=2,threads=2".parse().unwrap();
        let c = VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled);
        assert_eq!(c, config(4, 8, 2, 2, 2));
        assert_eq!(c.smp(), smp);
        check(&c).unwrap();
    }

    #[test]
    fn vcpu_affinity_parses_and_is_checked() {
        let a = parse_vcpu_affinity("0=0-1,1=1").unwrap();
        assert_eq!(a[&0], vec![0, 1]);
        assert_eq!(a[&1], vec![1]);
        let a = parse_vcpu_affinity("0=0-1:3,2=5;1=1").unwrap();
        assert_eq!(a[&0], vec![0, 1, 3]);
        assert_eq!(a[&2], vec![5]);
        let a = parse_vcpu_affinity("0=0-1,3,1=2").unwrap();
        assert_eq!(a[&0], vec![0, 1, 3]);
        for bad in ["x=1", "0=a", "1", "0=3-1", "0=0-5000"] {
            assert!(parse_vcpu_affinity(bad).is_err(), "{bad}");
        }
        let c = config(2, 4, 1, 4, 1).with_vcpu_affinity(parse_vcpu_affinity("3=0").unwrap());
        check(&c).unwrap();
        let c = c.with_vcpu_affinity(parse_vcpu_affinity("4=0").unwrap());
        assert!(matches!(
            check(&c),
            Err(ConfigError::VcpuAffinity { index: 4, .. })
        ));
        let mut c = config(1, 1, 1, 1, 1);
        c.vcpu_affinity.insert(0, Vec::new());
        assert!(matches!(
            check(&c),
            Err(ConfigError::VcpuAffinity { index: 0, .. })
        ));
    }

    #[test]
    fn with_counts_checks_the_counts() {
        assert_eq!(VcpuConfig::with_counts(2, 4).unwrap().topology.cores(), 4);
        assert!(matches!(
            VcpuConfig::with_counts(3, 2),
            Err(ConfigError::Smp {
                source: TopologyError::BootExceedsMax { boot: 3, max: 2 },
                ..
            })
        ));
        assert!(matches!(
            VcpuConfig::with_counts(1, 0),
            Err(ConfigError::DefaultTopology { max: 0, .. })
        ));
    }
}
