//! Typed names of the calls and requests an error can be about.

use std::fmt;

use vcpu_actor::VcpuRequest;

/// A KVM ioctl (or one use of it) that failed. `Display` gives its usual name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvmOp {
    /// `KVM_GET_SUPPORTED_CPUID` (on `/dev/kvm`).
    GetSupportedCpuid,
    /// `KVM_GET_VCPU_MMAP_SIZE` (on `/dev/kvm`).
    GetVcpuMmapSize,
    /// `KVM_CREATE_VM`.
    CreateVm,
    /// `KVM_SET_TSS_ADDR`.
    SetTssAddr,
    /// `KVM_CREATE_IRQCHIP`.
    CreateIrqchip,
    /// `KVM_CREATE_PIT2`.
    CreatePit2,
    /// `KVM_SET_USER_MEMORY_REGION`.
    SetUserMemoryRegion,
    /// `KVM_IRQFD` for the COM1 console's interrupt.
    IrqfdCom1,
    /// `KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY, KVM_PMU_CAP_DISABLE)`.
    EnableCapPmuDisable,
    /// `KVM_SET_PMU_EVENT_FILTER`.
    SetPmuEventFilter,
    /// `KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)` (32-bit APIC IDs, no broadcast quirk).
    EnableCapX2apicApi,
    /// `KVM_CREATE_VCPU`.
    CreateVcpu,
    /// `KVM_SET_CPUID2`.
    SetCpuid2,
    /// `KVM_SET_MSRS`.
    SetMsrs,
    /// `KVM_GET_CPUID2` (what KVM holds for a vCPU).
    GetCpuid2,
    /// `KVM_GET_MSRS` (reading the MSRs a CPU template changes only in part).
    GetMsrs,
    /// `KVM_GET_LAPIC`.
    GetLapic,
    /// `KVM_SET_LAPIC`.
    SetLapic,
    /// `KVM_SET_FPU`.
    SetFpu,
    /// `KVM_SET_MP_STATE`.
    SetMpState,
    /// `KVM_GET_SREGS`.
    GetSregs,
    /// `KVM_SET_SREGS`.
    SetSregs,
    /// `KVM_SET_REGS`.
    SetRegs,
}

impl KvmOp {
    /// The ioctl's name, e.g. `KVM_SET_CPUID2`.
    pub fn name(self) -> &'static str {
        match self {
            KvmOp::GetSupportedCpuid => "KVM_GET_SUPPORTED_CPUID",
            KvmOp::GetVcpuMmapSize => "KVM_GET_VCPU_MMAP_SIZE",
            KvmOp::CreateVm => "KVM_CREATE_VM",
            KvmOp::SetTssAddr => "KVM_SET_TSS_ADDR",
            KvmOp::CreateIrqchip => "KVM_CREATE_IRQCHIP",
            KvmOp::CreatePit2 => "KVM_CREATE_PIT2",
            KvmOp::SetUserMemoryRegion => "KVM_SET_USER_MEMORY_REGION",
            KvmOp::IrqfdCom1 => "KVM_IRQFD (COM1)",
            KvmOp::EnableCapPmuDisable => {
                "KVM_ENABLE_CAP(KVM_CAP_PMU_CAPABILITY, KVM_PMU_CAP_DISABLE)"
            }
            KvmOp::SetPmuEventFilter => "KVM_SET_PMU_EVENT_FILTER",
            KvmOp::EnableCapX2apicApi => "KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)",
            KvmOp::CreateVcpu => "KVM_CREATE_VCPU",
            KvmOp::SetCpuid2 => "KVM_SET_CPUID2",
            KvmOp::SetMsrs => "KVM_SET_MSRS",
            KvmOp::GetMsrs => "KVM_GET_MSRS",
            KvmOp::GetCpuid2 => "KVM_GET_CPUID2",
            KvmOp::GetLapic => "KVM_GET_LAPIC",
            KvmOp::SetLapic => "KVM_SET_LAPIC",
            KvmOp::SetFpu => "KVM_SET_FPU",
            KvmOp::SetMpState => "KVM_SET_MP_STATE",
            KvmOp::GetSregs => "KVM_GET_SREGS",
            KvmOp::SetSregs => "KVM_SET_SREGS",
            KvmOp::SetRegs => "KVM_SET_REGS",
        }
    }
}

impl fmt::Display for KvmOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An EventFd or epoll call that failed. `Display` says what was being done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OsOp {
    /// Creating the EventFd the vCPUs signal their exit on.
    CreateExitEventFd,
    /// Creating the EventFd a stop is requested on.
    CreateStopRequestEventFd,
    /// `epoll_create`.
    EpollCreate,
    /// `epoll_ctl`.
    EpollCtl,
    /// Writing the stop-request EventFd.
    WriteStopRequest,
    /// `epoll_wait`.
    EpollWait,
    /// Reading an exit or stop-request EventFd.
    ReadExitEventFd,
    /// Creating the EventFd of the serial console's interrupt.
    CreateSerialIrqEventFd,
}

impl fmt::Display for OsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OsOp::CreateExitEventFd => "creating the exit EventFd",
            OsOp::CreateStopRequestEventFd => "creating the stop-request EventFd",
            OsOp::EpollCreate => "epoll_create",
            OsOp::EpollCtl => "epoll_ctl",
            OsOp::WriteStopRequest => "writing the stop-request EventFd",
            OsOp::EpollWait => "epoll_wait",
            OsOp::ReadExitEventFd => "reading an exit EventFd",
            OsOp::CreateSerialIrqEventFd => "creating the serial interrupt EventFd",
        })
    }
}

/// What the vCPU manager was asked to do when the manager's state did not allow it.
/// `Display` reads as the object of "cannot ...".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ManagerOp {
    /// [`VcpuManager::create_boot_vcpus`](crate::VcpuManager::create_boot_vcpus).
    CreateBootVcpus,
    /// [`VcpuManager::create_vcpu`](crate::VcpuManager::create_vcpu).
    CreateVcpu,
    /// Setting up the boot vCPU (index 0) through its boot entry.
    ConfigureBootVcpu,
    /// [`VcpuManager::start_boot_vcpus`](crate::VcpuManager::start_boot_vcpus).
    StartBootVcpus,
    /// [`VcpuManager::start_vcpus`](crate::VcpuManager::start_vcpus).
    StartVcpus,
    /// [`VcpuManager::resume_all`](crate::VcpuManager::resume_all).
    ResumeAll,
    /// Sending a request to a vCPU.
    Send(VcpuRequest),
    /// [`VcpuManager::exit_vcpus`](crate::VcpuManager::exit_vcpus).
    ExitVcpus,
}

impl fmt::Display for ManagerOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManagerOp::CreateBootVcpus => f.write_str("create the boot vCPUs"),
            ManagerOp::CreateVcpu => f.write_str("create a vCPU"),
            ManagerOp::ConfigureBootVcpu => f.write_str("configure the boot vCPU"),
            ManagerOp::StartBootVcpus => f.write_str("start the vCPUs"),
            ManagerOp::StartVcpus => f.write_str("start vCPUs"),
            ManagerOp::ResumeAll => f.write_str("resume the vCPUs"),
            ManagerOp::Send(req) => write!(f, "{req}"),
            ManagerOp::ExitVcpus => f.write_str("exit vCPUs"),
        }
    }
}

/// The direction of a vCPU hotplug request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HotplugOp {
    /// Onlining new vCPUs (`ADD_CPU`).
    Add,
    /// Offlining vCPUs (`DEL_CPU`).
    Remove,
}

impl fmt::Display for HotplugOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HotplugOp::Add => "hot-add",
            HotplugOp::Remove => "hot-remove",
        })
    }
}
