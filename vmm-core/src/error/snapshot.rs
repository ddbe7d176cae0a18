//! Errors of saving and restoring vCPU and VM state ([`StateError`]) and of snapshot files
//! ([`SnapshotError`]).

use std::fmt;
use std::path::PathBuf;

/// A KVM call of state save or restore. `Display` gives its usual name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StateOp {
    /// `KVM_GET_MSR_INDEX_LIST` (on `/dev/kvm`).
    GetMsrIndexList,
    /// `KVM_GET_SUPPORTED_CPUID` (on `/dev/kvm`).
    GetSupportedCpuid,
    /// `KVM_CREATE_VM` (of a scratch VM that asks KVM what it provides).
    CreateVm,
    /// `KVM_CREATE_VCPU` (of a scratch VM that asks KVM what it provides).
    CreateVcpu,
    /// `KVM_GET_MP_STATE`.
    GetMpState,
    /// `KVM_SET_MP_STATE`.
    SetMpState,
    /// `KVM_GET_REGS`.
    GetRegs,
    /// `KVM_SET_REGS`.
    SetRegs,
    /// `KVM_GET_SREGS`.
    GetSregs,
    /// `KVM_SET_SREGS`.
    SetSregs,
    /// `KVM_GET_XSAVE`.
    GetXsave,
    /// `KVM_GET_XSAVE2`.
    GetXsave2,
    /// `KVM_SET_XSAVE`.
    SetXsave,
    /// `KVM_GET_XCRS`.
    GetXcrs,
    /// `KVM_SET_XCRS`.
    SetXcrs,
    /// `KVM_GET_DEBUGREGS`.
    GetDebugRegs,
    /// `KVM_SET_DEBUGREGS`.
    SetDebugRegs,
    /// `KVM_GET_LAPIC`.
    GetLapic,
    /// `KVM_SET_LAPIC`.
    SetLapic,
    /// `KVM_GET_TSC_KHZ`.
    GetTscKhz,
    /// `KVM_SET_TSC_KHZ`.
    SetTscKhz,
    /// `KVM_GET_CPUID2`.
    GetCpuid2,
    /// `KVM_SET_CPUID2`.
    SetCpuid2,
    /// `KVM_GET_MSRS`.
    GetMsrs,
    /// `KVM_SET_MSRS`.
    SetMsrs,
    /// `KVM_GET_VCPU_EVENTS`.
    GetVcpuEvents,
    /// `KVM_SET_VCPU_EVENTS`.
    SetVcpuEvents,
    /// `KVM_KVMCLOCK_CTRL`.
    KvmclockCtrl,
    /// `KVM_GET_CLOCK`.
    GetClock,
    /// `KVM_SET_CLOCK`.
    SetClock,
    /// `KVM_GET_PIT2`.
    GetPit2,
    /// `KVM_SET_PIT2`.
    SetPit2,
    /// `KVM_GET_IRQCHIP` of one chip (0: master PIC, 1: slave PIC, 2: IOAPIC).
    GetIrqchip(u32),
    /// `KVM_SET_IRQCHIP` of one chip (0: master PIC, 1: slave PIC, 2: IOAPIC).
    SetIrqchip(u32),
}

impl StateOp {
    /// The ioctl's name, e.g. `KVM_GET_MSRS`.
    pub fn name(self) -> &'static str {
        match self {
            StateOp::GetMsrIndexList => "KVM_GET_MSR_INDEX_LIST",
            StateOp::GetSupportedCpuid => "KVM_GET_SUPPORTED_CPUID",
            StateOp::CreateVm => "KVM_CREATE_VM",
            StateOp::CreateVcpu => "KVM_CREATE_VCPU",
            StateOp::GetMpState => "KVM_GET_MP_STATE",
            StateOp::SetMpState => "KVM_SET_MP_STATE",
            StateOp::GetRegs => "KVM_GET_REGS",
            StateOp::SetRegs => "KVM_SET_REGS",
            StateOp::GetSregs => "KVM_GET_SREGS",
            StateOp::SetSregs => "KVM_SET_SREGS",
            StateOp::GetXsave => "KVM_GET_XSAVE",
            StateOp::GetXsave2 => "KVM_GET_XSAVE2",
            StateOp::SetXsave => "KVM_SET_XSAVE",
            StateOp::GetXcrs => "KVM_GET_XCRS",
            StateOp::SetXcrs => "KVM_SET_XCRS",
            StateOp::GetDebugRegs => "KVM_GET_DEBUGREGS",
            StateOp::SetDebugRegs => "KVM_SET_DEBUGREGS",
            StateOp::GetLapic => "KVM_GET_LAPIC",
            StateOp::SetLapic => "KVM_SET_LAPIC",
            StateOp::GetTscKhz => "KVM_GET_TSC_KHZ",
            StateOp::SetTscKhz => "KVM_SET_TSC_KHZ",
            StateOp::GetCpuid2 => "KVM_GET_CPUID2",
            StateOp::SetCpuid2 => "KVM_SET_CPUID2",
            StateOp::GetMsrs => "KVM_GET_MSRS",
            StateOp::SetMsrs => "KVM_SET_MSRS",
            StateOp::GetVcpuEvents => "KVM_GET_VCPU_EVENTS",
            StateOp::SetVcpuEvents => "KVM_SET_VCPU_EVENTS",
            StateOp::KvmclockCtrl => "KVM_KVMCLOCK_CTRL",
            StateOp::GetClock => "KVM_GET_CLOCK",
            StateOp::SetClock => "KVM_SET_CLOCK",
            StateOp::GetPit2 => "KVM_GET_PIT2",
            StateOp::SetPit2 => "KVM_SET_PIT2",
            StateOp::GetIrqchip(_) => "KVM_GET_IRQCHIP",
            StateOp::SetIrqchip(_) => "KVM_SET_IRQCHIP",
        }
    }
}

/// The name of irqchip `chip` in `KVM_GET/SET_IRQCHIP`.
fn chip_name(chip: u32) -> &'static str {
    match chip {
        0 => "master PIC",
        1 => "slave PIC",
        2 => "IOAPIC",
        _ => "unknown chip",
    }
}

impl fmt::Display for StateOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateOp::GetIrqchip(c) | StateOp::SetIrqchip(c) => {
                write!(f, "{} ({})", self.name(), chip_name(*c))
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// Saving or restoring the state of one vCPU or of the VM failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// A KVM call failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The call.
        op: StateOp,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_MSRS` or `KVM_SET_MSRS` handled fewer MSRs than asked: KVM stopped at `msr`.
    #[error(
        "{op} handled {done} of {total} MSRs: KVM refused MSR {msr:#x} (an MSR this host's KVM \
         cannot save or restore for this vCPU; a snapshot from another host or CPUID may hold it)"
    )]
    MsrRefused {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        op: StateOp,
        /// The first MSR KVM did not handle.
        msr: u32,
        /// How many it handled before.
        done: usize,
        /// How many were asked.
        total: usize,
    },
    /// A list is longer than the KVM structure holding it can be.
    #[error("{count} {what} do not fit the KVM call (at most {max})")]
    TooManyEntries {
        /// What the entries are (e.g. "CPUID entries").
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The most KVM's structure takes.
        max: usize,
    },
    /// The saved XSAVE area is larger than this host's KVM uses (`KVM_CAP_XSAVE2`): the
    /// state comes from a host with more XSAVE features.
    #[error(
        "the saved XSAVE area has {saved} bytes but this host's KVM uses {host}: restore on a \
         host with the same XSAVE features"
    )]
    XsaveTooLarge {
        /// Bytes saved.
        saved: usize,
        /// Bytes this host's KVM uses.
        host: usize,
    },
}

impl StateError {
    /// A mapper from a failed KVM call `op` to its error.
    pub(crate) fn kvm(op: StateOp) -> impl Fn(kvm_ioctls::Error) -> StateError {
        move |source| StateError::Kvm { op, source }
    }
}

/// Which file of a snapshot directory an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SnapshotFile {
    /// The state file (vCPU and VM state, configuration).
    State,
    /// The guest memory file.
    Memory,
}

impl fmt::Display for SnapshotFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapshotFile::State => "state file",
            SnapshotFile::Memory => "memory file",
        })
    }
}

/// Writing, reading, checking or restoring a snapshot failed. Nothing was restored when one
/// of these comes back from reading or checking a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (e.g. "writing").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file does not start with the snapshot magic: not a snapshot file of this project.
    #[error("{path} is not a snapshot {file} (no snapshot header): pass a snapshot directory")]
    NotASnapshot {
        /// Which file.
        file: SnapshotFile,
        /// Its path.
        path: PathBuf,
    },
    /// The file's header fails its own checksum.
    #[error("the header of {path} is corrupted (its checksum does not match): the {file} is damaged, take a new snapshot")]
    HeaderCorrupted {
        /// Which file.
        file: SnapshotFile,
        /// Its path.
        path: PathBuf,
    },
    /// The snapshot was written by another format version.
    #[error(
        "{path} has snapshot format version {found}, this build reads version {supported}: \
         restore it with the build that took it"
    )]
    FormatVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The file holds the other kind of content (e.g. a memory file named as the state file).
    #[error("{path} holds a {found}, expected the {expected}")]
    WrongFile {
        /// The path.
        path: PathBuf,
        /// What was expected.
        expected: SnapshotFile,
        /// What the header says it is.
        found: SnapshotFile,
    },
    /// The file is shorter (or longer) than its header says.
    #[error("{path} has {actual} bytes of content, its header says {expected}: the {file} is truncated or damaged")]
    Truncated {
        /// Which file.
        file: SnapshotFile,
        /// Its path.
        path: PathBuf,
        /// Content bytes the header announces.
        expected: u64,
        /// Content bytes found.
        actual: u64,
    },
    /// The content's checksum does not match the header's.
    #[error("{path}: CRC32 of the content is {actual:#010x}, expected {expected:#010x}: the {file} is corrupted")]
    Checksum {
        /// Which file.
        file: SnapshotFile,
        /// Its path.
        path: PathBuf,
        /// The CRC32 recorded.
        expected: u32,
        /// The CRC32 computed.
        actual: u32,
    },
    /// The memory file is intact but is not the one the state file was saved with.
    #[error(
        "{path} is not the memory file of this snapshot (the state file expects {expected_len} \
         bytes with CRC32 {expected_crc:#010x}, found {actual_len} bytes with CRC32 \
         {actual_crc:#010x}): keep a snapshot's files together"
    )]
    MemoryFileMismatch {
        /// The memory file.
        path: PathBuf,
        /// Length the state file records.
        expected_len: u64,
        /// CRC32 the state file records.
        expected_crc: u32,
        /// Length found.
        actual_len: u64,
        /// CRC32 found.
        actual_crc: u32,
    },
    /// The state file's content is not valid snapshot JSON.
    #[error("{path}: the state does not parse ({source}): the state file is damaged")]
    Parse {
        /// The state file.
        path: PathBuf,
        /// serde's error.
        source: serde_json::Error,
    },
    /// Encoding the state failed.
    #[error("encoding the snapshot state: {0}")]
    Encode(#[source] serde_json::Error),
    /// The snapshot was taken on another CPU vendor.
    #[error("the snapshot was taken on a {saved} CPU, this host is {host}: restore it on a {saved} host")]
    CpuVendor {
        /// Vendor string of the snapshot's host.
        saved: String,
        /// Vendor string of this host.
        host: String,
    },
    /// A vCPU's saved CPUID has feature bits this host's KVM cannot provide.
    #[error(
        "vCPU {vcpu_index}: CPUID leaf {leaf:#x} subleaf {subleaf} {register} has bits \
         {missing:#010x} that this host's KVM does not support: restore on a host with these \
         CPU features"
    )]
    CpuidUnsupported {
        /// The vCPU's index.
        vcpu_index: u32,
        /// The leaf.
        leaf: u32,
        /// The subleaf.
        subleaf: u32,
        /// `eax`, `ebx`, `ecx` or `edx`.
        register: &'static str,
        /// The saved bits that KVM's supported CPUID lacks.
        missing: u32,
    },
    /// A vCPU's saved MSR is not in this host's `KVM_GET_MSR_INDEX_LIST`.
    #[error(
        "vCPU {vcpu_index}: the snapshot holds MSR {msr:#x}, which this host's KVM does not \
         save or restore: restore on a host whose KVM has it"
    )]
    MsrUnsupported {
        /// The vCPU's index.
        vcpu_index: u32,
        /// The MSR.
        msr: u32,
    },
    /// Guest memory does not have the layout the snapshot was saved with.
    #[error("guest memory has regions {target:?} (address, bytes), the snapshot has {saved:?}: create the VM with the snapshot's memory size")]
    MemoryLayout {
        /// The snapshot's regions.
        saved: Vec<(u64, u64)>,
        /// The target memory's regions.
        target: Vec<(u64, u64)>,
    },
    /// Copying guest memory failed.
    #[error("copying guest memory at {addr:#x}: {reason}")]
    GuestMemory {
        /// Guest address of the region.
        addr: u64,
        /// What failed.
        reason: String,
    },
    /// Saving or restoring vCPU `index`'s state failed.
    #[error("vCPU {index}: {source}")]
    VcpuState {
        /// The vCPU's index.
        index: u32,
        /// What failed.
        source: StateError,
    },
    /// Saving or restoring the VM-scope state (clock, PIT, PICs, IOAPIC), or reading this
    /// host's KVM capabilities, failed.
    #[error(transparent)]
    VmState(#[from] StateError),
    /// [`VcpuManager::save`](crate::VcpuManager::save) needs a paused VM.
    #[error("cannot save the VM: it is {state}; pause it first (pause_all)")]
    NotPaused {
        /// What the VM is doing.
        state: crate::state::VmRunState,
    },
    /// [`VcpuManager::save`](crate::VcpuManager::save) is refused while a resize waits for
    /// the guest: the guest's CPU set is changing.
    #[error(
        "cannot save the VM while a resize to {target} vCPUs is in flight: wait for the resize \
         to end (resume the VM if it is paused, so the guest can answer), pause, then save"
    )]
    ResizeInFlight {
        /// The resize's target vCPU count.
        target: u32,
    },
    /// The VM has no present vCPU to save.
    #[error("cannot save the VM: no vCPU is present")]
    NoVcpus,
    /// The list of MSRs to save could not be probed when the vCPUs were created.
    #[error(
        "the MSRs to save are unknown: probing them on the first vCPU failed ({reason}); this \
         VM cannot be saved"
    )]
    MsrListUnavailable {
        /// Why the probe failed.
        reason: String,
    },
    /// A vCPU did not save its state (it refused, failed, or did not answer in time).
    #[error("vCPU {index} (APIC ID {apic_id}) did not save its state: {reason}")]
    VcpuSave {
        /// The vCPU's index.
        index: u32,
        /// Its APIC ID.
        apic_id: u32,
        /// What it answered, or that it did not.
        reason: String,
    },
    /// The snapshot's vCPU list does not fit its own configuration (an index out of range,
    /// listed twice, or an APIC ID that is not its index's in the topology).
    #[error("the snapshot's vCPUs do not fit its configuration: {reason}; the state file is damaged or was edited")]
    InvalidVcpus {
        /// What does not fit.
        reason: String,
    },
}

impl SnapshotError {
    /// A mapper from an I/O error on `path` while doing `action`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.into();
        move |source| SnapshotError::Io {
            action,
            path,
            source,
        }
    }
}
