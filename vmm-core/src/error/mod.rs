//! The errors of this crate, one small enum per operation.
//!
//! Each public function returns the error of what it does: [`ConfigError`] for checking a
//! [`VcpuConfig`](crate::VcpuConfig) against this host's KVM, [`VmError`] for creating a VM,
//! [`BusError`] for registering a device, [`PmuError`] for the vPMU's KVM actions,
//! [`VcpuSetupError`] for creating and configuring a vCPU, [`VcpuControlError`] for starting,
//! pausing, resuming and exiting vCPUs, [`BootError`] for writing a guest program or a Linux
//! kernel into guest memory, [`ResizeError`] for vCPU hotplug, [`StateError`] for saving and
//! restoring vCPU and VM state, [`SnapshotError`] for snapshot files, and [`OsError`] for the
//! EventFd/epoll calls of the exit monitor. A function that spans several operations (such as
//! [`build_vm`](crate::build_vm)) returns the umbrella [`VmmError`], which every one of them
//! converts into, so `?` works across operations.
//!
//! Where a failed call is worth matching on, the error names it with a typed value
//! ([`KvmOp`], [`OsOp`], [`ManagerOp`], [`HotplugOp`]) whose `Display` is the call's usual
//! name, e.g. `KVM_SET_CPUID2`.
//!
//! Every message names the offending value and, where there is one, what to change.

mod boot;
mod config;
mod ops;
mod resize;
mod snapshot;
mod vcpu;
mod vm;

pub use boot::BootError;
pub use config::ConfigError;
pub use ops::{HotplugOp, KvmOp, ManagerOp, OsOp};
pub use resize::ResizeError;
pub use snapshot::{SnapshotError, SnapshotFile, StateError, StateOp};
pub use vcpu::{VcpuControlError, VcpuSetupError};
pub use vm::{BusError, OsError, PmuError, VmError};

/// Declares the umbrella enum: every variant wraps one operation's error, converts from it
/// (so `?` works) and shows its message unchanged.
macro_rules! umbrella {
    ($(#[$attr:meta])* pub enum $name:ident { $($(#[$doc:meta])* $variant:ident($inner:ty),)* }) => {
        $(#[$attr])*
        #[derive(Debug, thiserror::Error)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$doc])* #[error(transparent)] $variant(#[from] $inner),)*
        }
    };
}

umbrella! {
    /// Any error of this crate: one variant per operation, each wrapping that operation's enum.
    ///
    /// Match on the inner enum for details, e.g.
    /// `VmmError::Config(ConfigError::MaxVcpusOverKvmLimit { .. })`. The message is the inner
    /// error's.
    pub enum VmmError {
        /// The vCPU configuration does not fit this host's KVM.
        Config(ConfigError),
        /// Creating the VM (KVM VM, memory, irqchip, devices) failed.
        Vm(VmError),
        /// Registering a device on the I/O bus failed.
        Bus(BusError),
        /// A vPMU KVM action failed.
        Pmu(PmuError),
        /// Creating or configuring a vCPU failed.
        VcpuSetup(VcpuSetupError),
        /// Starting, pausing, resuming or exiting vCPUs failed.
        VcpuControl(VcpuControlError),
        /// Loading a guest program or a Linux kernel failed.
        Boot(BootError),
        /// A vCPU resize (hotplug) failed.
        Resize(ResizeError),
        /// Saving or restoring vCPU or VM state failed.
        State(StateError),
        /// Writing, reading or checking a snapshot failed.
        Snapshot(SnapshotError),
        /// An EventFd or epoll call of the exit monitor failed.
        Os(OsError),
        /// Parsing or building an SMP configuration or topology failed (e.g. a `-smp` string
        /// given to [`SmpConfig`](crate::SmpConfig)'s `FromStr`).
        Topology(topology::TopologyError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_display_their_usual_names() {
        assert_eq!(KvmOp::SetCpuid2.to_string(), "KVM_SET_CPUID2");
        assert_eq!(KvmOp::IrqfdCom1.to_string(), "KVM_IRQFD (COM1)");
        assert_eq!(OsOp::EpollWait.to_string(), "epoll_wait");
        assert_eq!(HotplugOp::Remove.to_string(), "hot-remove");
        assert_eq!(
            ManagerOp::Send(vcpu_actor::VcpuRequest::Pause).to_string(),
            "pause"
        );
    }

    #[test]
    fn the_umbrella_keeps_the_inner_message() {
        let inner = VcpuControlError::InvalidState {
            op: ManagerOp::ResumeAll,
            reason: "the VM is stopping".into(),
        };
        let text = inner.to_string();
        let outer: VmmError = inner.into();
        assert_eq!(outer.to_string(), text);
        assert_eq!(text, "cannot resume the vCPUs: the VM is stopping");
        assert!(matches!(
            outer,
            VmmError::VcpuControl(VcpuControlError::InvalidState {
                op: ManagerOp::ResumeAll,
                ..
            })
        ));
    }
}
