//! End-to-end pieces: guest programs ([`guest`]), benchmark routines ([`mod@bench`]) and helpers
//! the tests share ([`kvm_or_skip`]).
//!
//! ```
//! let smp = integration::guest::smp_counter();
//! assert!(smp.ap_entry.is_some());
//! assert_eq!(integration::guest::counter_addr(1), 0x30_0040);
//! ```

pub mod actor_bench;
pub mod agent;
pub mod bench;
pub mod cli;
pub mod cmd_bench;
pub mod cpuid_view;
pub mod guest;
pub mod loader;
pub mod lstopo;

/// The one error type of this crate.
#[derive(Debug, thiserror::Error)]
pub enum IntegrationError {
    /// The VMM failed.
    #[error(transparent)]
    Vmm(#[from] vmm_core::VmmError),
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

/// Opens `/dev/kvm` for a test that needs it. Without KVM: `None` after a loud
/// `SKIPPED (no /dev/kvm): <test>` on stderr, or a panic when `VCPU_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> Option<kvm_ioctls::Kvm> {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            if std::env::var("VCPU_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: VCPU_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("SKIPPED (no /dev/kvm): {test}: {e}");
            None
        }
    }
}
