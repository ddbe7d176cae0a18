//! Errors of the VM itself: creating it, its bus, its vPMU actions, and the OS calls of the
//! exit monitor.

use crate::bus::BusSpace;

use super::{KvmOp, OsOp};

/// Why a [`Vm`](crate::Vm) could not be created, or KVM could not be asked what it allows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}; check that the kvm module is loaded and that this user may \
         read and write /dev/kvm"
    )]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl on `/dev/kvm` or on the VM failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The ioctl that failed.
        op: KvmOp,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// x2APIC mode (APIC IDs above 254) needs `KVM_CAP_X2APIC_API`, which this host's KVM
    /// lacks.
    #[error(
        "this host's KVM lacks KVM_CAP_X2APIC_API, which x2APIC mode (APIC IDs above 254) \
         needs: use a topology whose APIC IDs are all below 255, or a newer kernel"
    )]
    X2apicApiMissing,
    /// The memory size cannot be used.
    #[error(
        "guest memory size {size:#x} is invalid: it must be a non-zero multiple of 4 KiB and at \
         least {min:#x}"
    )]
    InvalidMemorySize {
        /// The requested size in bytes.
        size: u64,
        /// The smallest size accepted.
        min: u64,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory: {0}")]
    MemoryAllocation(#[source] vm_memory::mmap::FromRangesError),
    /// A built-in device could not be registered on the bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// An EventFd for a built-in device could not be created.
    #[error(transparent)]
    Os(#[from] OsError),
}

/// Why a device could not be registered on the [`IoBus`](crate::IoBus).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// A device range overlaps one already registered.
    #[error(
        "{space} range {base:#x}+{len:#x} overlaps the registered range \
         {existing_base:#x}+{existing_len:#x}: choose a free range"
    )]
    RangeOverlap {
        /// Port I/O or MMIO.
        space: BusSpace,
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// The base of the range it overlaps.
        existing_base: u64,
        /// The length of the range it overlaps.
        existing_len: u64,
    },
    /// A device range is empty or wraps around the address space.
    #[error("{space} range {base:#x}+{len:#x} is empty or wraps around: use a non-zero length")]
    RangeInvalid {
        /// Port I/O or MMIO.
        space: BusSpace,
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
}

/// Why a vPMU KVM action ([`apply_pmu_actions`](crate::pmu::apply_pmu_actions)) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PmuError {
    /// A KVM ioctl on the VM failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The ioctl that failed.
        op: KvmOp,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// This host's KVM lacks a capability the action needs.
    #[error(
        "this host's KVM lacks {} (capability {}), needed for {needed_for}: use a newer kernel \
         or a configuration that does not need it",
        capability.name,
        capability.number
    )]
    MissingKvmCapability {
        /// The capability, e.g. `KVM_CAP_PMU_EVENT_FILTER`.
        capability: vpmu::KvmCapability,
        /// What needed it.
        needed_for: &'static str,
    },
    /// The event filter is one KVM would reject or silently misread.
    #[error("the vPMU event filter cannot be installed: {0}")]
    InvalidFilter(#[source] vpmu::VpmuError),
}

/// An EventFd or epoll call failed (the [`ExitMonitor`](crate::ExitMonitor), the serial
/// console's interrupt).
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct OsError {
    /// What was being done.
    pub op: OsOp,
    /// The OS error.
    pub source: std::io::Error,
}

impl OsError {
    /// A function that maps an `io::Error` of `op` to an [`OsError`].
    pub(crate) fn of(op: OsOp) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self { op, source }
    }
}
