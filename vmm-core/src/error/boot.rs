//! Errors of writing what a guest boots into guest memory: a Linux kernel with its initrd,
//! command line, zero page and MP table, or a small guest program.

/// Why a Linux kernel ([`load_linux`](crate::boot::load_linux)) or a guest program
/// (the test-program loader of the `integration` crate) could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The kernel image cannot be opened or read.
    #[error(
        "cannot read the kernel image {}: {source}; check the path and its permissions",
        path.display()
    )]
    KernelRead {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is neither a bzImage nor a 64-bit x86 ELF vmlinux.
    #[error(
        "{} is not a Linux x86-64 kernel image: {detail}; give a bzImage (e.g. \
         /boot/vmlinuz-*) or an uncompressed ELF vmlinux",
        path.display()
    )]
    KernelFormat {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// What was found instead.
        detail: &'static str,
    },
    /// The bzImage has no 64-bit entry point.
    #[error(
        "the bzImage {} has no 64-bit entry point (boot protocol {version:#06x}, xloadflags \
         {xloadflags:#x}): use a 64-bit kernel with boot protocol 2.12 or later",
        path.display()
    )]
    KernelNot64Bit {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// The boot protocol version in its setup header.
        version: u16,
        /// Its `xloadflags`.
        xloadflags: u16,
    },
    /// linux-loader refused the image.
    #[error("loading the {format} {} failed: {source}", path.display())]
    KernelLoad {
        /// The kernel's path.
        path: std::path::PathBuf,
        /// The image format.
        format: crate::boot::KernelFormat,
        /// linux-loader's error.
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened or read.
    #[error(
        "cannot read the initrd {}: {source}; check the path and its permissions",
        path.display()
    )]
    InitrdRead {
        /// The initrd's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the highest address it may use.
    #[error(
        "the initrd {} ({size} bytes) does not fit in guest memory: it must lie between the \
         kernel's end {lowest:#x} and {highest:#x} (end of low RAM or the kernel's \
         initrd_addr_max); give the VM more memory or use a smaller initrd",
        path.display()
    )]
    InitrdDoesNotFit {
        /// The initrd's path.
        path: std::path::PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The lowest address it may start at.
        lowest: u64,
        /// The address it must end at or below.
        highest: u64,
    },
    /// The command line is longer than the kernel or the VMM takes.
    #[error(
        "the kernel command line is {len} bytes, over the limit of {limit} bytes set by \
         {limited_by}: shorten it"
    )]
    CmdlineTooLong {
        /// Its length in bytes (without the NUL).
        len: usize,
        /// The limit (without the NUL).
        limit: usize,
        /// Who sets the limit.
        limited_by: &'static str,
    },
    /// The command line has characters a kernel command line cannot carry.
    #[error("the kernel command line is invalid: {reason}")]
    CmdlineInvalid {
        /// What is wrong.
        reason: String,
    },
    /// Guest memory is too small for what must go into it.
    #[error(
        "guest memory is too small for {what}: it needs RAM up to {needed:#x} ({} MiB) but \
         low RAM ends at {available:#x}; give the VM at least {} MiB",
        needed.div_ceil(1 << 20),
        needed.div_ceil(1 << 20)
    )]
    MemoryTooSmall {
        /// What did not fit.
        what: &'static str,
        /// The end (exclusive) of the RAM it needs.
        needed: u64,
        /// The end of the RAM there is.
        available: u64,
    },
    /// The e820 map has more entries than the zero page holds.
    #[error(
        "the e820 map has {count} entries but the zero page holds {max}: use fewer memory \
         regions"
    )]
    TooManyE820Entries {
        /// Entries needed.
        count: usize,
        /// The zero page's capacity.
        max: usize,
    },
    /// A value does not fit its 32-bit field of the zero page.
    #[error(
        "the zero page field {field} is 32 bits wide but the value {value:#x} does not fit: \
         keep the command line and the initrd below 4 GiB"
    )]
    ZeroPageField {
        /// The field of `struct boot_params`.
        field: &'static str,
        /// The value that does not fit.
        value: u64,
    },
    /// The CPU list cannot be an MP table.
    #[error("cannot build the MP table: {reason}")]
    MpTableCpus {
        /// What is wrong with the CPU list.
        reason: String,
    },
    /// The MP table does not fit its area (the EBDA).
    #[error("the MP table needs {size} bytes but its area (the EBDA) has {room}: use fewer vCPUs")]
    MpTableTooLarge {
        /// Bytes needed.
        size: usize,
        /// Bytes available.
        room: usize,
    },
    /// The CPU list cannot be described in the MADT.
    #[error("cannot build the ACPI tables (MADT): {reason}")]
    AcpiCpus {
        /// What is wrong with the CPU list.
        reason: String,
    },
    /// The ACPI tables do not fit their area (the BIOS area below 1 MiB).
    #[error(
        "the ACPI tables for {cpus} vCPUs need {size} bytes but their area (0xE0000-0xFFFFF) \
         has {room}: use fewer vCPUs"
    )]
    AcpiTablesTooLarge {
        /// Bytes needed.
        size: usize,
        /// Bytes available.
        room: usize,
        /// The number of vCPUs listed.
        cpus: usize,
    },
    /// An access to guest memory failed (outside RAM, ...).
    #[error("guest memory access at {addr:#x} ({len} bytes) failed: {source}")]
    GuestMemory {
        /// Guest physical address.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// A piece of a guest program does not fit where it should go.
    #[error("guest program {what} at {addr:#x} ({len} bytes) does not fit: {reason}")]
    ProgramLayout {
        /// What was being placed.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Why it does not fit.
        reason: &'static str,
    },
}
