//! CPU topology, APIC ID assignment and the CPUID topology leaves. (work in progress)

mod cpuid_entry;
mod vendor;

pub use cpuid_entry::{find_entry, find_entry_mut, CpuidEntry};
pub use vendor::CpuVendor;
