//! End-to-end pieces of the workspace:
//!
//! - [`guest`]: the guest-program framework (the guest agent, the small test programs, the
//!   devices and VMs that run them);
//! - [`bench`](mod@bench): every benchmark, each measurement once, next to bare KVM;
//! - [`cmd`]: the `vcpuctl` subcommands (`src/bin/vcpuctl.rs` only parses and dispatches);
//! - [`cpuid_view`] and [`lstopo`]: independent decoders of what guest code read (`raw-cpuid`,
//!   hwloc);
//! - helpers the tests share: [`kvm_or_skip`], [`poll_until`].
//!
//! ```
//! let smp = integration::guest::smp_counter();
//! assert!(smp.ap_entry.is_some());
//! assert_eq!(integration::guest::counter_addr(1), 0x30_0040);
//! ```

pub mod bench;
pub mod cmd;
pub mod cpuid_view;
pub mod guest;
pub mod loader;
pub mod lstopo;

use std::time::{Duration, Instant};

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] vmm_core::VmmError),
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}. Is KVM enabled on this host (modprobe kvm_intel or \
         kvm_amd) and is your user allowed to use it (the kvm group, or root)?"
    )]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM call made here (outside the VMM) failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was called.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A guest or harness thread did not do what it should.
    #[error("{0}")]
    Guest(String),
}

/// `from_each_vmm_error!(T)`: `?` on the error of one VMM operation (each has its own enum)
/// converts it to `T` as the umbrella [`vmm_core::VmmError`] converts, through `T`'s
/// `From<VmmError>`. The one list of those enums in this crate.
macro_rules! from_each_vmm_error {
    ($target:ty) => {
        $crate::from_each_vmm_error!(@impl $target: ConfigError, VmError, BusError, PmuError,
            VcpuSetupError, VcpuControlError, BootError, ResizeError, OsError, StateError,
            SnapshotError);
    };
    (@impl $target:ty: $($err:ident),*) => {$(
        impl From<vmm_core::$err> for $target {
            fn from(e: vmm_core::$err) -> Self {
                Self::from(vmm_core::VmmError::from(e))
            }
        }
    )*};
}
pub(crate) use from_each_vmm_error;

from_each_vmm_error!(IntegrationError);

impl IntegrationError {
    /// The error of a failed KVM call `op`, for `map_err`.
    pub fn kvm(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Self {
        move |source| Self::Kvm { op, source }
    }
}

/// Opens `/dev/kvm`, with an error a person can act on.
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, IntegrationError> {
    kvm_ioctls::Kvm::new().map_err(IntegrationError::KvmOpen)
}

/// Whether this run must not skip what needs the host (`VCPU_REQUIRE_KVM=1`): a missing
/// `/dev/kvm` (or, with [`lstopo::lstopo_required`], hwloc) is then a failure.
pub fn kvm_required() -> bool {
    std::env::var(vcpu_actor::test_util::REQUIRE_KVM_ENV).is_ok_and(|v| v == "1")
}

/// Opens `/dev/kvm` for a test that needs it (the workspace's one implementation, from
/// `vcpu-actor`'s `test-util`). Without KVM: `None` after a loud
/// `SKIPPED (no /dev/kvm): <test>` on stderr, or a panic when `VCPU_REQUIRE_KVM=1`.
pub use vcpu_actor::test_util::kvm_or_skip;

/// Checks `cond` every `step` until it holds (`true`) or `timeout` has passed (`false`). The
/// sleeps only turn a hang into a failure; nothing here waits for a fixed time.
pub fn poll_until(timeout: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_until_returns_when_the_condition_holds_or_time_is_up() {
        let mut n = 0;
        assert!(poll_until(Duration::from_secs(5), Duration::ZERO, || {
            n += 1;
            n == 3
        }));
        assert_eq!(n, 3);
        assert!(!poll_until(Duration::ZERO, Duration::ZERO, || false));
    }
}
