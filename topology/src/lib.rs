//! CPU topology, APIC ID assignment and the CPUID topology leaves, for a KVM-based VMM.
//! No KVM dependency: everything here is plain data.
//!
//! This crate owns:
//!
//! - [`CpuTopology`]: sockets x dies x cores x threads, and the mapping vCPU index <-> APIC
//!   ID <-> [`CpuLocation`]. Its fields are private: [`CpuTopology::new`] and deserialization
//!   validate once, so every `CpuTopology` is a usable shape (no zero level, APIC IDs within
//!   [`MAX_APIC_ID_BITS`], no overflow anywhere) and only real input (an index, an APIC ID)
//!   can still be out of range. Each level is a bit field of the APIC ID of
//!   width `ceil(log2(n))` (thread lowest, then core, die, socket), so shapes whose levels
//!   are not powers of two get sparse APIC IDs; vCPU indexes run thread fastest, then core,
//!   die, socket. [`CpuTopology::check_xapic`] rejects shapes that need an APIC ID >= 255.
//! - [`SmpConfig`]: QEMU's `-smp` syntax (`8,maxcpus=16,sockets=2,dies=1,cores=4,threads=2`),
//!   omitted values derived as modern QEMU does (cores preferred over sockets).
//! - [`build_vcpu_cpuid`]: one vCPU's CPUID entries from the host's, with leaves 0x0, 0x1,
//!   0x4, 0xB, 0x1F (and for AMD/Hygon 0x8000_0000/1/8/1D/1E) set for the topology, sized
//!   for the maximum vCPU count; see [`cpuid`] for exactly what it owns.
//! - [`CpuidEntry`] (KVM-independent `kvm_cpuid_entry2`) and [`CpuVendor`].
//! - [`host`]: host CPUID bases (synthetic Intel/AMD/Hygon, this machine's, hwloc dump
//!   files) and [`hwloc`]: writing hwloc CPUID dumps so that `lstopo` can check the result;
//!   [`lstopo`]: reading the object tree `lstopo` prints.
//!
//! # Example
//!
//! ```
//! use topology::{build_vcpu_cpuid, find_entry, host, CpuVendor, SmpConfig};
//!
//! // 4 vCPUs at boot, up to 12: 2 sockets x 3 cores x 2 threads.
//! let smp: SmpConfig = "4,maxcpus=12,sockets=2,threads=2".parse()?;
//! assert_eq!(smp.to_string(), "4,maxcpus=12,sockets=2,dies=1,cores=3,threads=2");
//!
//! // 3 cores need a 2-bit core field: APIC IDs are sparse.
//! let t = smp.topology;
//! assert_eq!(t.apic_ids(), [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
//! assert_eq!(t.apic_id(6)?, 8);
//! assert_eq!(t.location(6)?.socket, 1);
//! assert_eq!(t.index_of_apic_id(8)?, 6);
//! t.check_xapic()?; // every APIC ID fits 8 bits
//!
//! // vCPU 6's CPUID, from a host base (in a VMM: KVM_GET_SUPPORTED_CPUID).
//! let base = host::synthetic_intel();
//! let cpuid = build_vcpu_cpuid(&base, CpuVendor::Intel, &t, 6)?;
//! let leaf_b = find_entry(&cpuid, 0xb, 1).expect("leaf 0xB subleaf 1");
//! assert_eq!(leaf_b.edx, 8); // x2APIC ID
//! assert_eq!(leaf_b.eax, 3); // shift to the package ID: 1 thread bit + 2 core bits
//! # Ok::<(), topology::TopologyError>(())
//! ```

pub mod cpuid;
mod cpuid_entry;
mod error;
pub mod host;
pub mod hwloc;
pub mod lstopo;
mod smp;
mod topology;
mod vendor;

pub use cpuid::build_vcpu_cpuid;
pub use cpuid_entry::{find_entry, find_entry_mut, CpuidEntry};
pub use error::TopologyError;
pub use smp::SmpConfig;
pub use topology::{
    field_width, ApicIdLayout, CpuLocation, CpuTopology, MAX_APIC_ID_BITS, XAPIC_ID_LIMIT,
};
pub use vendor::CpuVendor;
