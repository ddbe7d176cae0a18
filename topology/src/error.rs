//! The crate's one error type.

use std::path::PathBuf;

use crate::vendor::CpuVendor;

/// Everything that can go wrong in this crate. Every message names the offending value and
/// says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// A topology level (`sockets`, `dies`, `cores` or `threads`) is zero.
    #[error("{level}=0 is invalid: every topology level needs at least 1 member (use {level}=1)")]
    ZeroLevel {
        /// The level's `-smp` key: `sockets`, `dies`, `cores` or `threads`.
        level: &'static str,
    },

    /// `cpus` or `maxcpus` is zero.
    #[error("{key}=0 is invalid: a VM needs at least one vCPU (use {key}=1 or more)")]
    ZeroCpus {
        /// `cpus` or `maxcpus`.
        key: &'static str,
    },

    /// The product of the levels is not the maximum vCPU count.
    #[error(
        "sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads}) = {product}, \
         but the maximum vCPU count (maxcpus) is {max_cpus}: change a level or maxcpus so that \
         the product equals maxcpus"
    )]
    ProductMismatch {
        /// Sockets (may be a derived value).
        sockets: u32,
        /// Dies per socket.
        dies: u32,
        /// Cores per die (may be a derived value).
        cores: u32,
        /// Threads per core (may be a derived value).
        threads: u32,
        /// `sockets * dies * cores * threads`.
        product: u128,
        /// The maximum vCPU count it should equal.
        max_cpus: u32,
    },

    /// More boot vCPUs than the maximum.
    #[error(
        "{boot} boot vCPUs exceed the maximum of {max} (maxcpus): lower cpus or raise maxcpus"
    )]
    BootExceedsMax {
        /// The boot vCPU count (`cpus`).
        boot: u32,
        /// The maximum vCPU count (`maxcpus`).
        max: u32,
    },

    /// The topology is so large that its APIC IDs do not fit the supported width.
    #[error(
        "topology {topology} needs {bits} APIC ID bits (or more than 2^32 vCPUs); at most \
         {max_bits} bits are supported: use fewer sockets, dies, cores or threads"
    )]
    TopologyTooLarge {
        /// The topology, as `sockets=..,dies=..,cores=..,threads=..`.
        topology: String,
        /// The APIC ID bits it needs.
        bits: u32,
        /// The most we support.
        max_bits: u32,
    },

    /// Some APIC ID does not fit the 8-bit xAPIC / MP table / upcall encoding.
    #[error(
        "topology {topology} needs APIC ID {max_apic_id}, but xAPIC, the MP table and the upcall \
         protocol carry 8-bit IDs below {limit} (0xFF is the broadcast ID): use fewer or \
         power-of-two-sized levels"
    )]
    ApicIdTooLarge {
        /// The topology, as `sockets=..,dies=..,cores=..,threads=..`.
        topology: String,
        /// The largest APIC ID the topology uses.
        max_apic_id: u32,
        /// The first APIC ID that does not fit (255).
        limit: u32,
    },

    /// A vCPU index at or beyond the maximum vCPU count.
    #[error(
        "vCPU index {index} is out of range: the topology has {max_vcpus} vCPUs (0..{max_vcpus})"
    )]
    IndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// The topology's vCPU count.
        max_vcpus: u32,
    },

    /// An APIC ID that no vCPU of the topology has (a hole in the sparse ID space, or too large).
    #[error(
        "APIC ID {apic_id} ({apic_id:#x}) belongs to no vCPU of topology {topology}: its \
         {level} field is {value}, but only {count} exist"
    )]
    UnknownApicId {
        /// The APIC ID asked for.
        apic_id: u32,
        /// The topology, as `sockets=..,dies=..,cores=..,threads=..`.
        topology: String,
        /// The level whose field is out of range.
        level: &'static str,
        /// The field's value.
        value: u32,
        /// How many members that level has.
        count: u32,
    },

    /// A `-smp` string that does not parse.
    #[error("invalid -smp {input:?}: bad token {token:?}: {reason}")]
    MalformedSmp {
        /// The whole string.
        input: String,
        /// The token at fault (may be empty for an empty element).
        token: String,
        /// What is wrong and what is expected.
        reason: String,
    },

    /// The vendor asked for differs from the one in the host's leaf 0.
    #[error(
        "vendor {requested:?} was requested, but the host CPUID's leaf 0 says {host:?}: pass the \
         vendor of the host CPUID (CpuVendor::from_entries) or a base CPUID of that vendor"
    )]
    VendorMismatch {
        /// The vendor passed in.
        requested: CpuVendor,
        /// The vendor in the host's leaf 0.
        host: CpuVendor,
    },

    /// A line of a host CPUID file that does not parse.
    #[error(
        "{path}:{line}: {reason}; expected `MASK EAX EBX ECX EDX => EAX EBX ECX EDX` in hex \
         (hwloc's cpuid dump format), got {text:?}"
    )]
    HostCpuidParse {
        /// The file.
        path: PathBuf,
        /// The line number (1-based).
        line: usize,
        /// The line's text.
        text: String,
        /// What is wrong.
        reason: String,
    },

    /// Reading a host CPUID file failed.
    #[error("cannot read host CPUID file {path}: {source}")]
    HostCpuidIo {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// Reading this machine's CPUID is not possible on this architecture.
    #[error("reading this machine's CPUID needs an x86_64 host; pass a host CPUID file instead")]
    HostCpuidUnsupported,
}
