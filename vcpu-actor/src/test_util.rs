//! Helpers for tests that need `/dev/kvm` (cargo feature `test-util`, off by default).
//!
//! Every test suite of the workspace that drives real KVM opens it through
//! [`kvm_or_skip`], so a machine without KVM skips those tests in the same loud way, and a
//! CI machine that must have KVM makes them fail instead (`VCPU_REQUIRE_KVM=1`).

use kvm_ioctls::Kvm;

/// The environment variable that turns a missing `/dev/kvm` from a skip into a failure.
pub const REQUIRE_KVM_ENV: &str = "VCPU_REQUIRE_KVM";

/// Opens `/dev/kvm` for test `test`.
///
/// Without it, prints `SKIPPED (no /dev/kvm): <test>: <error>` on stderr and returns `None`
/// (the caller returns early), unless the environment variable `VCPU_REQUIRE_KVM` is `1`:
/// then it panics, so that a machine that must run the KVM tests cannot pass by skipping.
///
/// # Panics
///
/// When `/dev/kvm` cannot be opened and `VCPU_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            assert!(
                std::env::var(REQUIRE_KVM_ENV).as_deref() != Ok("1"),
                "{test}: {REQUIRE_KVM_ENV}=1 but /dev/kvm cannot be opened: {e}"
            );
            eprintln!("SKIPPED (no /dev/kvm): {test}: {e}");
            None
        }
    }
}
