//! hwloc's view of a CPUID dump directory: runs
//! `HWLOC_CPUID_PATH=DIR HWLOC_COMPONENTS=x86,stop lstopo-no-graphics --of xml -` and reads
//! the object tree from its XML ([`HwlocTopology`], from [`topology::lstopo`]), so that tests
//! can compare it with the configured topology.

use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

pub use topology::lstopo::{HwlocObject, HwlocTopology};

use crate::IntegrationError;

/// The hwloc tool run (Debian package `hwloc`).
pub const LSTOPO: &str = "lstopo-no-graphics";

/// Whether a missing lstopo fails the run instead of skipping: under `VCPU_REQUIRE_KVM=1`
/// ([`crate::kvm_required`]) or `CI=true` (CI installs hwloc).
pub fn lstopo_required() -> bool {
    crate::kvm_required() || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// What a test does when [`lstopo_dump`] found no lstopo: panics when [`lstopo_required`],
/// else prints a loud `SKIPPED` line naming `what` was not checked.
pub fn skip_without_lstopo(what: &str) {
    assert!(
        !lstopo_required(),
        "{LSTOPO} not found but CI=true or VCPU_REQUIRE_KVM=1: apt-get install hwloc"
    );
    eprintln!("SKIPPED (no {LSTOPO}; apt-get install hwloc): {what}");
}

/// Runs lstopo on the CPUID dump in `dir`. `Ok(None)` when lstopo is not installed. Fails when
/// lstopo fails or says on stderr that the dump is incomplete or rejected.
pub fn lstopo_dump(dir: &Path) -> Result<Option<HwlocTopology>, IntegrationError> {
    let out = Command::new(LSTOPO)
        .args(["--of", "xml", "-"])
        .env("HWLOC_CPUID_PATH", dir)
        .env("HWLOC_COMPONENTS", "x86,stop")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IntegrationError::Guest(format!("cannot run {LSTOPO}: {e}"))),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || stderr.contains("Couldn't find")
        || stderr.contains("Ignoring dumped cpuid")
    {
        return Err(IntegrationError::Guest(format!(
            "{LSTOPO} did not accept the CPUID dump in {}: {}",
            dir.display(),
            stderr.trim()
        )));
    }
    Ok(Some(HwlocTopology::parse(&String::from_utf8_lossy(
        &out.stdout,
    ))))
}
