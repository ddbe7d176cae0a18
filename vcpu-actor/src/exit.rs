//! How the actor hands KVM exits to the VMM, and why a vCPU stopped.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a device handler asks the actor to do after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoOutcome {
    /// The access was handled; keep running the guest.
    Handled,
    /// A device asked the VM to stop (e.g. a shutdown port): the vCPU goes to `waiting_exit`
    /// with [`VcpuExitReason::DeviceRequestedStop`].
    StopVm,
}

/// An error from a device handler. It is logged and counted; the guest keeps running.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device error: {0}")]
pub struct DeviceError(pub String);

/// The VMM's view of the devices, called by the vCPU thread on every I/O exit.
///
/// Called concurrently from all vCPU threads. A handler must not block for long: while it
/// runs, the vCPU cannot answer messages (a `Pause` waits for it).
///
/// A handler that panics does not take the vCPU thread with it: the panic is caught, and the
/// vCPU stops with [`VcpuExitReason::DevicePanicked`] (its exit event fires, `join` still
/// gives the vCPU fd back).
pub trait ExitHandler: Send + Sync + 'static {
    /// The guest read `data.len()` bytes from I/O port `port`; fill `data`.
    fn pio_read(&self, vcpu_id: u32, port: u16, data: &mut [u8]) -> Result<IoOutcome, DeviceError>;
    /// The guest wrote `data` to I/O port `port`.
    fn pio_write(&self, vcpu_id: u32, port: u16, data: &[u8]) -> Result<IoOutcome, DeviceError>;
    /// The guest read `data.len()` bytes at guest-physical `addr`; fill `data`.
    fn mmio_read(&self, vcpu_id: u32, addr: u64, data: &mut [u8])
        -> Result<IoOutcome, DeviceError>;
    /// The guest wrote `data` at guest-physical `addr`.
    fn mmio_write(&self, vcpu_id: u32, addr: u64, data: &[u8]) -> Result<IoOutcome, DeviceError>;
}

/// Which kind of guest access an [`ExitHandler`] method was serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoAccess {
    /// [`ExitHandler::pio_read`].
    PioRead,
    /// [`ExitHandler::pio_write`].
    PioWrite,
    /// [`ExitHandler::mmio_read`].
    MmioRead,
    /// [`ExitHandler::mmio_write`].
    MmioWrite,
}

impl fmt::Display for IoAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoAccess::PioRead => "port read",
            IoAccess::PioWrite => "port write",
            IoAccess::MmioRead => "MMIO read",
            IoAccess::MmioWrite => "MMIO write",
        })
    }
}

/// Why a vCPU went to `waiting_exit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuExitReason {
    /// `KVM_EXIT_SYSTEM_EVENT` of type shutdown (or crash): the guest powered off.
    GuestShutdown {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
    },
    /// `KVM_EXIT_SYSTEM_EVENT` of type reset: the guest asked for a reboot.
    GuestReset {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
    },
    /// `KVM_EXIT_SHUTDOWN`: the guest triple-faulted (e.g. a fault with no IDT).
    TripleFault {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` (e.g. an emulation failure).
    InternalError {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    FailEntry {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// An exit the actor does not handle (`exit` is `kvm_run.exit_reason`).
    Unknown {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
        /// The `KVM_EXIT_*` number.
        exit: u32,
    },
    /// A device handler returned [`IoOutcome::StopVm`].
    DeviceRequestedStop {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited (after the I/O instruction).
        rip: u64,
    },
    /// An [`ExitHandler`] method panicked (a bug in the device). The panic was caught on
    /// the vCPU thread, which stays alive (its `join` gives the vCPU fd back); the I/O
    /// instruction was not completed.
    DevicePanicked {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it exited.
        rip: u64,
        /// The kind of access the handler was serving.
        access: IoAccess,
        /// The I/O port or guest-physical address of the access.
        addr: u64,
        /// The panic message (when the payload was a string).
        message: String,
    },
    /// The vCPU thread made a system call its seccomp filter forbids (with
    /// [`ViolationAction::StopVm`](crate::ViolationAction::StopVm), the default). The call
    /// failed with `EPERM`; the vCPU stopped after the exit it was handling.
    SeccompViolation {
        /// The vCPU.
        vcpu_id: u32,
        /// Guest RIP when it stopped.
        rip: u64,
        /// The system call number (x86_64, `libc::SYS_*`).
        syscall: i64,
        /// Its name, where known (`"openat"`).
        name: Option<String>,
    },
    /// `KVM_RUN` itself failed with an errno other than `EINTR`/`EAGAIN`.
    KvmRunError {
        /// The vCPU.
        vcpu_id: u32,
        /// The errno.
        errno: i32,
    },
}

impl VcpuExitReason {
    /// The vCPU this reason is about.
    pub fn vcpu_id(&self) -> u32 {
        self.vcpu_and_rip().0
    }

    /// The guest RIP at the exit, where known.
    pub fn rip(&self) -> Option<u64> {
        self.vcpu_and_rip().1
    }

    fn vcpu_and_rip(&self) -> (u32, Option<u64>) {
        match *self {
            VcpuExitReason::GuestShutdown { vcpu_id, rip }
            | VcpuExitReason::GuestReset { vcpu_id, rip }
            | VcpuExitReason::TripleFault { vcpu_id, rip }
            | VcpuExitReason::InternalError { vcpu_id, rip, .. }
            | VcpuExitReason::FailEntry { vcpu_id, rip, .. }
            | VcpuExitReason::Unknown { vcpu_id, rip, .. }
            | VcpuExitReason::DeviceRequestedStop { vcpu_id, rip }
            | VcpuExitReason::DevicePanicked { vcpu_id, rip, .. }
            | VcpuExitReason::SeccompViolation { vcpu_id, rip, .. } => (vcpu_id, Some(rip)),
            VcpuExitReason::KvmRunError { vcpu_id, .. } => (vcpu_id, None),
        }
    }
}

impl fmt::Display for VcpuExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VcpuExitReason::GuestShutdown { vcpu_id, rip } => {
                write!(f, "vCPU {vcpu_id}: guest shut down at RIP {rip:#x}")
            }
            VcpuExitReason::GuestReset { vcpu_id, rip } => {
                write!(f, "vCPU {vcpu_id}: guest asked for a reset at RIP {rip:#x}")
            }
            VcpuExitReason::TripleFault { vcpu_id, rip } => write!(
                f,
                "vCPU {vcpu_id}: guest triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"
            ),
            VcpuExitReason::InternalError {
                vcpu_id,
                rip,
                suberror,
            } => write!(
                f,
                "vCPU {vcpu_id}: KVM internal error (suberror {suberror}) at RIP {rip:#x}"
            ),
            VcpuExitReason::FailEntry {
                vcpu_id,
                rip,
                reason,
            } => write!(
                f,
                "vCPU {vcpu_id}: KVM could not enter the guest (hardware reason {reason:#x}) at RIP {rip:#x}"
            ),
            VcpuExitReason::Unknown { vcpu_id, rip, exit } => {
                write!(f, "vCPU {vcpu_id}: unhandled KVM exit {exit} at RIP {rip:#x}")
            }
            VcpuExitReason::DeviceRequestedStop { vcpu_id, rip } => {
                write!(f, "vCPU {vcpu_id}: a device asked the VM to stop at RIP {rip:#x}")
            }
            VcpuExitReason::DevicePanicked {
                vcpu_id,
                rip,
                access,
                addr,
                message,
            } => write!(
                f,
                "vCPU {vcpu_id}: the device handling the {access} at {addr:#x} panicked at RIP \
                 {rip:#x}: {message}; the VM was stopped (a bug in that device)"
            ),
            VcpuExitReason::SeccompViolation {
                vcpu_id,
                rip,
                syscall,
                ref name,
            } => write!(
                f,
                "vCPU {vcpu_id}: the vCPU thread made the forbidden system call {} ({syscall}) \
                 (seccomp; RIP {rip:#x}); a device handler or logger on the vCPU thread needs \
                 it: fix the handler, or allow it in VcpuOptions::seccomp",
                name.as_deref().unwrap_or("unknown")
            ),
            VcpuExitReason::KvmRunError { vcpu_id, errno } => write!(
                f,
                "vCPU {vcpu_id}: KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_id_and_rip_of_every_reason() {
        let with_rip = [
            VcpuExitReason::GuestShutdown { vcpu_id: 1, rip: 2 },
            VcpuExitReason::GuestReset { vcpu_id: 1, rip: 2 },
            VcpuExitReason::TripleFault { vcpu_id: 1, rip: 2 },
            VcpuExitReason::InternalError {
                vcpu_id: 1,
                rip: 2,
                suberror: 3,
            },
            VcpuExitReason::FailEntry {
                vcpu_id: 1,
                rip: 2,
                reason: 3,
            },
            VcpuExitReason::Unknown {
                vcpu_id: 1,
                rip: 2,
                exit: 3,
            },
            VcpuExitReason::DeviceRequestedStop { vcpu_id: 1, rip: 2 },
            VcpuExitReason::DevicePanicked {
                vcpu_id: 1,
                rip: 2,
                access: IoAccess::MmioWrite,
                addr: 0xd000_0000,
                message: "boom".into(),
            },
            VcpuExitReason::SeccompViolation {
                vcpu_id: 1,
                rip: 2,
                syscall: libc::SYS_openat,
                name: Some("openat".into()),
            },
        ];
        for r in with_rip {
            assert_eq!((r.vcpu_id(), r.rip()), (1, Some(2)), "{r}");
        }
        let r = VcpuExitReason::KvmRunError {
            vcpu_id: 4,
            errno: libc::EFAULT,
        };
        assert_eq!((r.vcpu_id(), r.rip()), (4, None));
    }

    #[test]
    fn a_seccomp_violation_names_the_call() {
        let r = VcpuExitReason::SeccompViolation {
            vcpu_id: 3,
            rip: 0x1000,
            syscall: libc::SYS_openat,
            name: Some("openat".into()),
        };
        let text = r.to_string();
        assert!(
            text.contains("vCPU 3") && text.contains("openat (257)") && text.contains("seccomp"),
            "{text}"
        );
    }
}
