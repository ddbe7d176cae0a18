//! What the KVM tests of this crate share.

use kvm_ioctls::Kvm;

/// Opens `/dev/kvm` for a test that needs it. Without KVM: `None` after a loud
/// `SKIPPED (no /dev/kvm): <test>` on stderr, or a panic when `VCPU_REQUIRE_KVM=1`.
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            if std::env::var("VCPU_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("{test}: VCPU_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("SKIPPED (no /dev/kvm): {test}: {e}");
            None
        }
    }
}
