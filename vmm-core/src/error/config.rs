//! Errors of checking a vCPU configuration against this host's KVM.

use crate::config::InterruptMode;

/// Why a [`VcpuConfig`](crate::VcpuConfig) cannot run on this host. Checked before any KVM
/// object exists ([`VcpuConfig::validate`](crate::VcpuConfig::validate)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The counts and topology do not form a valid SMP configuration (the `topology` crate's
    /// rules: at least one boot vCPU, no more boot vCPUs than the maximum, every level at
    /// least 1, sockets x dies x cores x threads equal to the maximum).
    #[error(
        "invalid vCPU configuration (boot_vcpu_count {boot}, max_vcpu_count {max}, topology \
         {topology}; cpus and maxcpus below are these counts): {source}"
    )]
    Smp {
        /// The configured boot vCPU count.
        boot: u32,
        /// The configured maximum vCPU count.
        max: u32,
        /// The configured topology.
        topology: topology::CpuTopology,
        /// The rule it breaks, as the topology crate says it.
        source: topology::TopologyError,
    },
    /// [`VcpuConfig::with_counts`](crate::VcpuConfig::with_counts) found no default topology
    /// (1 socket of `max` cores) for the maximum vCPU count.
    #[error("max_vcpu_count {max} has no default topology (1 socket of {max} cores): {source}")]
    DefaultTopology {
        /// The maximum vCPU count asked for.
        max: u32,
        /// Why, as the topology crate says it.
        source: topology::TopologyError,
    },
    /// `max_vcpu_count` is over what this host's KVM allows (`KVM_CAP_MAX_VCPUS`).
    #[error(
        "max_vcpu_count {max} is over this host's KVM limit of {kvm_limit} vCPUs per VM \
         (KVM_CAP_MAX_VCPUS): use at most {kvm_limit}"
    )]
    MaxVcpusOverKvmLimit {
        /// The configured maximum vCPU count.
        max: u32,
        /// `KVM_CAP_MAX_VCPUS`.
        kvm_limit: u32,
    },
    /// A vCPU's APIC ID (= its KVM vCPU id) is not below `KVM_CAP_MAX_VCPU_ID`.
    #[error(
        "vCPU index {index} would get APIC ID {apic_id}, but this host's KVM only accepts vCPU \
         ids below {kvm_limit} (KVM_CAP_MAX_VCPU_ID): use a smaller topology or powers of two \
         per level (sparse APIC IDs need room)"
    )]
    ApicIdOverKvmLimit {
        /// The vCPU index with the largest APIC ID.
        index: u32,
        /// Its APIC ID.
        apic_id: u32,
        /// `KVM_CAP_MAX_VCPU_ID`.
        kvm_limit: u32,
    },
    /// A vCPU's APIC ID does not fit the interrupt mode (xAPIC and the MP table carry 8-bit IDs,
    /// 0xFF is the broadcast ID).
    #[error(
        "vCPU index {index} would get APIC ID {apic_id}, too large for {mode} mode (APIC IDs \
         must be below {limit}): use fewer vCPUs or a denser topology"
    )]
    ApicIdTooLargeForInterruptMode {
        /// The vCPU index with the largest APIC ID.
        index: u32,
        /// Its APIC ID.
        apic_id: u32,
        /// The interrupt mode.
        mode: InterruptMode,
        /// The first APIC ID the mode cannot address.
        limit: u32,
    },
    /// The requested vPMU level needs something this host cannot give: a PMU in KVM's
    /// supported CPUID, or a KVM capability (`vpmu::check_host_support`,
    /// `vpmu::check_kvm_caps`).
    #[error("vPMU level {level} is not available on this host: {source}")]
    VpmuUnsupported {
        /// The requested level.
        level: vpmu::VpmuFeatureLevel,
        /// Why, as the vpmu crate says it.
        source: vpmu::VpmuError,
    },
    /// KVM's supported CPUID names a vendor we cannot build topology/PMU leaves for.
    #[error(
        "KVM's supported CPUID leaf 0 names an unknown CPU vendor: only Intel, AMD and Hygon \
         are supported"
    )]
    UnknownCpuVendor,
    /// The CPU template is malformed or needs a KVM capability this host lacks.
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    /// A vCPU affinity names a vCPU index or host CPU that cannot be.
    #[error("vCPU affinity of vCPU index {index}: {reason}")]
    VcpuAffinity {
        /// The vCPU index.
        index: u32,
        /// What is wrong and what to do.
        reason: String,
    },
}
