//! The one error type of this crate.

use std::time::Duration;

use crate::bus::BusSpace;
use crate::config::InterruptMode;

/// Everything that can go wrong while building, configuring and running a VM.
///
/// Each variant names the offending value and, where there is one, what to change.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    // ----- vCPU configuration (checked before any KVM object exists) -----
    /// `boot_vcpu_count` is 0.
    #[error("boot_vcpu_count is 0: a VM needs at least one boot vCPU")]
    ZeroBootVcpus,
    /// More boot vCPUs than `max_vcpu_count`.
    #[error(
        "boot_vcpu_count {boot} is larger than max_vcpu_count {max}: raise max_vcpu_count or \
         lower boot_vcpu_count"
    )]
    BootExceedsMax {
        /// The configured boot vCPU count.
        boot: u32,
        /// The configured maximum vCPU count.
        max: u32,
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
    /// The topology does not describe exactly `max_vcpu_count` vCPUs.
    #[error(
        "topology {topology} describes {product} vCPUs but max_vcpu_count is {max}: \
         sockets x dies x cores x threads must equal max_vcpu_count"
    )]
    TopologyMismatch {
        /// The topology, as `sockets=..,dies=..,cores=..,threads=..`.
        topology: String,
        /// sockets x dies x cores x threads.
        product: u64,
        /// The configured maximum vCPU count.
        max: u32,
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
    /// The requested vPMU level needs something this host cannot give.
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
    /// The topology crate refused a computation.
    #[error("topology: {0}")]
    Topology(#[from] topology::TopologyError),
    /// Editing a vCPU's CPUID for the vPMU level failed.
    #[error("vPMU CPUID for vCPU {vcpu_id}: {source}")]
    VpmuCpuid {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// Why.
        source: vpmu::VpmuError,
    },

    // ----- KVM -----
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}; check that the kvm module is loaded and that this user may \
         read and write /dev/kvm"
    )]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation (ioctl) that failed.
        op: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// A vCPU-level KVM ioctl failed.
    #[error("KVM {op} on vCPU {vcpu_id} failed: {source}")]
    VcpuKvm {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The operation (ioctl) that failed.
        op: &'static str,
        /// The errno KVM returned.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the MSRs we set.
    #[error(
        "KVM_SET_MSRS on vCPU {vcpu_id} stopped at MSR {msr:#x} ({set} of {total} set): this \
         host's KVM does not accept it"
    )]
    MsrRejected {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The first MSR KVM did not set.
        msr: u32,
        /// How many were set.
        set: usize,
        /// How many we asked for.
        total: usize,
    },
    /// A CPUID set is larger than KVM accepts.
    #[error("a CPUID set of {count} entries is larger than KVM's maximum of {max}")]
    TooManyCpuidEntries {
        /// Number of entries.
        count: usize,
        /// `KVM_MAX_CPUID_ENTRIES`.
        max: usize,
    },
    /// This host's KVM lacks a capability the configuration needs.
    #[error(
        "this host's KVM lacks {name} (capability {number}), needed for {needed_for}: use a \
         newer kernel or a configuration that does not need it"
    )]
    MissingKvmCapability {
        /// The capability's name, e.g. `KVM_CAP_PMU_EVENT_FILTER`.
        name: &'static str,
        /// The capability's number.
        number: u32,
        /// What needed it.
        needed_for: &'static str,
    },

    /// The vPMU event filter bytes are not a `struct kvm_pmu_event_filter` plus events.
    #[error(
        "the vPMU event filter is {len} bytes, not a 32-byte kvm_pmu_event_filter followed by \
         8-byte events: a bug in the vpmu crate"
    )]
    InvalidPmuFilter {
        /// The length of the bytes.
        len: usize,
    },

    // ----- Guest memory -----
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
    /// An access to guest memory failed (outside RAM, ...).
    #[error("guest memory access at {addr:#x} ({len} bytes) failed: {source}")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },

    // ----- Bus -----
    /// A device range overlaps one already registered.
    #[error(
        "{space} range {base:#x}+{len:#x} overlaps the registered range \
         {existing_base:#x}+{existing_len:#x}: choose a free range"
    )]
    BusRangeOverlap {
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
    BusRangeInvalid {
        /// Port I/O or MMIO.
        space: BusSpace,
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },

    // ----- Loader -----
    /// A piece of a guest program does not fit where it should go.
    #[error("guest program {what} at {addr:#x} ({len} bytes) does not fit: {reason}")]
    ProgramLayout {
        /// What was being placed.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why it does not fit.
        reason: &'static str,
    },

    // ----- vCPU manager -----
    /// A vCPU actor reported an error.
    #[error("vCPU {vcpu_id}: {source}")]
    Vcpu {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The actor's error.
        source: vcpu_actor::VcpuError,
    },
    /// Some vCPUs did not acknowledge a request in time.
    #[error(
        "vCPUs {vcpu_ids:?} did not acknowledge {request} within {timeout:?}: they may be stuck \
         in KVM_RUN or their thread died; see their metrics"
    )]
    VcpusDidNotAnswer {
        /// The request, e.g. `pause`.
        request: &'static str,
        /// The vCPUs (APIC IDs) that did not answer.
        vcpu_ids: Vec<u32>,
        /// How long we waited.
        timeout: Duration,
    },
    /// A vCPU answered a request with a refusal or an error.
    #[error("vCPU {vcpu_id} refused {request}: {reason}")]
    VcpuRefused {
        /// The vCPU (APIC ID).
        vcpu_id: u32,
        /// The request, e.g. `pause`.
        request: &'static str,
        /// What it answered.
        reason: String,
    },
    /// The operation does not fit the manager's current state.
    #[error("cannot {op}: {reason}")]
    InvalidManagerState {
        /// What was asked.
        op: &'static str,
        /// Why not now.
        reason: String,
    },
    /// A vCPU index outside `0..max_vcpu_count`.
    #[error("vCPU index {index} is out of range: max_vcpu_count is {max}")]
    VcpuIndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// `max_vcpu_count`.
        max: u32,
    },
    /// An EventFd, epoll or other OS call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    // ===== Linux boot (owned by the linux-boot engineer; add variants below this line) =====
    // --- Linux boot ---
    /// The kernel image cannot be opened or read.
    #[error(
        "cannot read the kernel image {}: {source}; check the path and its permissions",
        path.display()
    )]
    KernelRead {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor a 64-bit x86 ELF vmlinux.
    #[error(
        "{} is not a Linux x86-64 kernel image: {detail}; give a bzImage (e.g. \
         /boot/vmlinuz-*) or an uncompressed ELF vmlinux",
        path.display()
    )]
    KernelFormat {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// What was found instead.
        detail: &'static str,
    },
    /// The bzImage has no 64-bit entry point.
    #[error(
        "the bzImage {} has no 64-bit entry point (boot protocol {version:#06x}, xloadflags \
         {xloadflags:#x}): use a 64-bit kernel with boot protocol 2.12 or later",
        path.display()
    )]
    KernelNot64Bit {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// The boot protocol version in its setup header.
        version: u16,
        /// Its `xloadflags`.
        xloadflags: u16,
    },
    /// linux-loader refused the image.
    #[error("loading the {format} {} failed: {source}", path.display())]
    KernelLoad {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// The image format.
        format: crate::boot::KernelFormat,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened or read.
    #[error(
        "cannot read the initrd {}: {source}; check the path and its permissions",
        path.display()
    )]
    InitrdRead {
        /// The initrd's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the highest address it may use.
    #[error(
        "the initrd {} ({size} bytes) does not fit in guest memory: it must lie between the \
         kernel's end {lowest:#x} and {highest:#x} (end of low RAM or the kernel's \
         initrd_addr_max); give the VM more memory or use a smaller initrd",
        path.display()
    )]
    InitrdDoesNotFit {
        /// The initrd's path.
        path: std::path::PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The lowest address it may start at.
        lowest: u64,
        /// The address it must end at or below.
        highest: u64,
    },
    /// The command line is longer than the kernel or the VMM takes.
    #[error(
        "the kernel command line is {len} bytes, over the limit of {limit} bytes set by \
         {limited_by}: shorten it"
    )]
    CmdlineTooLong {
        /// Its length in bytes (without the NUL).
        len: usize,
        /// The limit (without the NUL).
        limit: usize,
        /// Who sets the limit.
        limited_by: &'static str,
    },
    /// The command line has characters a kernel command line cannot carry.
    #[error("the kernel command line is invalid: {reason}")]
    CmdlineInvalid {
        /// What is wrong.
        reason: String,
    },
    /// Guest memory is too small for what must go into it.
    #[error(
        "guest memory is too small for {what}: it needs RAM up to {needed:#x} ({} MiB) but \
         low RAM ends at {available:#x}; give the VM at least {} MiB",
        needed.div_ceil(1 << 20),
        needed.div_ceil(1 << 20)
    )]
    BootMemoryTooSmall {
        /// What did not fit.
        what: &'static str,
        /// The end (exclusive) of the RAM it needs.
        needed: u64,
        /// The end of the RAM there is.
        available: u64,
    },
    /// The e820 map has more entries than the zero page holds.
    #[error(
        "the e820 map has {count} entries but the zero page holds {max}: use fewer memory \
         regions"
    )]
    TooManyE820Entries {
        /// Entries needed.
        count: usize,
        /// The zero page's capacity.
        max: usize,
    },
    /// The CPU list cannot be an MP table.
    #[error("cannot build the MP table: {reason}")]
    MpTableCpus {
        /// What is wrong with the CPU list.
        reason: String,
    },
    /// The MP table does not fit its area (the EBDA).
    #[error("the MP table needs {size} bytes but its area (the EBDA) has {room}: use fewer vCPUs")]
    MpTableTooLarge {
        /// Bytes needed.
        size: usize,
        /// Bytes available.
        room: usize,
    },

    // --- vCPU resize ---
    /// A resize target outside `[1, max_vcpu_count]`.
    #[error("cannot resize to {target} vCPUs: the target must be in [1, {max}] (max_vcpu_count)")]
    ResizeOutOfRange {
        /// The target asked for.
        target: u32,
        /// `max_vcpu_count`.
        max: u32,
    },
    /// Resizing needs an upcall client.
    #[error(
        "cannot resize: no upcall client; connect one to the guest's upcall server and pass it \
         to VcpuManager::set_upcall_client"
    )]
    NoUpcallClient,
    /// The guest did not add or remove the vCPUs; the manager rolled back.
    #[error(
        "{op} of vCPUs {apic_ids:?} (APIC IDs) failed: {source}; rolled back, the present vCPUs \
         are as before{unknown}",
        unknown = if *.guest_state_unknown {
            " (the guest may have acted on part of the request: check it before retrying)"
        } else {
            ""
        }
    )]
    HotplugFailed {
        /// `hot-add` or `hot-remove`.
        op: &'static str,
        /// The APIC IDs of the request.
        apic_ids: Vec<u32>,
        /// Whether the guest may have acted (timeout, reset or mismatched reply).
        guest_state_unknown: bool,
        /// The upcall error (with the guest's errno where it sent one).
        #[source]
        source: hotplug::HotplugError,
    },
    /// A background resize was asked for while another one is still running.
    #[error(
        "cannot start a resize to {target} vCPUs: a resize to {in_flight} vCPUs is still running; \
         wait for its ResizeHandle and retry"
    )]
    ResizeBusy {
        /// The target asked for.
        target: u32,
        /// The target of the resize in flight.
        in_flight: u32,
    },
    /// A background resize did not finish within the wait; it goes on.
    #[error(
        "the resize to {target} vCPUs has not finished after {waited:?}; it goes on in the \
         background: wait on its ResizeHandle again"
    )]
    ResizeStillRunning {
        /// The target of the resize.
        target: u32,
        /// How long this wait lasted.
        waited: std::time::Duration,
    },
    /// The outcome of a background resize was already taken, or its thread ended without one.
    #[error(
        "the outcome of the resize to {target} vCPUs is gone (already taken by an earlier wait, \
         or its thread ended abnormally): check VcpuManager::present_vcpus"
    )]
    ResizeOutcomeGone {
        /// The target of the resize.
        target: u32,
    },
    /// The thread of a background resize could not be started.
    #[error("cannot start the background resize thread: {source}")]
    ResizeThread {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
