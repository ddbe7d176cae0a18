//! The MP table (Intel MultiProcessor Specification 1.4): how a guest without ACPI learns its
//! processors, buses, I/O APIC and interrupt wiring.
//!
//! [`setup_mptable`] writes, at [`MPTABLE_START`] (the start of the EBDA, which the e820 map
//! reserves and the BIOS data area points to):
//! - the floating pointer structure ([`MpFloatingPointer`], 16 bytes, signature `_MP_`);
//! - the configuration table: a header ([`MpConfigHeader`], `PCMP`), then
//!   - one [`MpProcessorEntry`] per possible vCPU (`max_vcpu_count` of them): its topology APIC
//!     ID, APIC version [`LAPIC_VERSION`], enabled for boot vCPUs and disabled for the others
//!     (Linux counts those as hotplug CPUs), the BSP flagged;
//!   - one ISA bus ([`MpBusEntry`], bus 0);
//!   - the I/O APIC ([`MpIoApicEntry`]): ID one above the largest APIC ID, version
//!     [`IOAPIC_VERSION`], at `0xFEC0_0000`;
//!   - ISA IRQs 0-15 wired to I/O APIC pins 0-15 ([`MpIoInterruptEntry`]), as KVM's in-kernel
//!     irqchip routes GSIs 0-15 (so COM1's IRQ 4 is pin 4);
//!   - LINT0 as ExtINT and LINT1 as NMI on every local APIC ([`MpLocalInterruptEntry`]), as the
//!     vCPU manager programs the LAPICs.
//!
//! Both checksums make their structure's bytes sum to 0 (mod 256).

use std::collections::BTreeSet;
use std::mem::size_of;

use vm_memory::{ByteValued, GuestMemoryMmap};

use super::layout::{const_u32, EBDA, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};
use super::write_guest;
use crate::error::BootError;

/// One possible vCPU as the MP table lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MpCpu {
    /// Its local APIC ID (the topology's; below 255).
    pub apic_id: u8,
    /// Present at boot; disabled entries are the hotplug slots.
    pub enabled: bool,
    /// The bootstrap processor (exactly one, and enabled).
    pub bsp: bool,
}

/// The local APIC version of KVM's LAPIC (an integrated xAPIC).
pub const LAPIC_VERSION: u8 = 0x14;
/// The I/O APIC version of KVM's in-kernel I/O APIC.
pub const IOAPIC_VERSION: u8 = 0x11;
/// The number of pins of KVM's in-kernel I/O APIC.
pub const IOAPIC_PINS: u8 = 24;
/// The number of ISA IRQs wired to the I/O APIC.
pub const ISA_IRQS: u8 = 16;
/// The ID of the one (ISA) bus.
pub const ISA_BUS_ID: u8 = 0;
/// The MP specification revision we write (1.4).
pub const SPEC_REVISION: u8 = 4;
/// The OEM ID in the configuration table header.
pub const OEM_ID: [u8; 8] = *b"VMMCORE ";
/// The product ID in the configuration table header.
pub const PRODUCT_ID: [u8; 12] = *b"KVM VCPU MGR";
/// The CPU signature of processor entries (family 6): informational, Linux ignores it.
pub const CPU_SIGNATURE: u32 = 0x600;
/// The feature flags of processor entries (CPUID.1:EDX FPU | APIC): informational.
pub const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Destination "all local APICs" in a local interrupt entry.
pub const ALL_LOCAL_APICS: u8 = 0xff;

/// Declares a one-byte code of the MP table: a `#[repr(u8)]` enum, each variant with its
/// value, and [`code`](EntryType::code) giving the byte the table holds.
macro_rules! mp_code {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $value,)*
        }

        impl $name {
            /// The code as the table holds it.
            pub const fn code(self) -> u8 {
                self as u8
            }
        }
    };
}

mp_code! {
    /// Entry type codes of the configuration table.
    EntryType {
        /// Processor (20 bytes).
        Processor = 0,
        /// Bus (8 bytes).
        Bus = 1,
        /// I/O APIC (8 bytes).
        IoApic = 2,
        /// I/O interrupt assignment (8 bytes).
        IoInterrupt = 3,
        /// Local interrupt assignment (8 bytes).
        LocalInterrupt = 4,
    }
}

mp_code! {
    /// Interrupt types of interrupt assignment entries.
    InterruptType {
        /// A vectored interrupt (the I/O APIC redirection entry supplies the vector).
        Int = 0,
        /// Non-maskable interrupt.
        Nmi = 1,
        /// System management interrupt.
        Smi = 2,
        /// External interrupt from an 8259A-compatible PIC.
        ExtInt = 3,
    }
}

/// Processor entry flags.
pub mod cpu_flags {
    /// The processor is usable (present at boot).
    pub const ENABLED: u8 = 1 << 0;
    /// The bootstrap processor.
    pub const BOOT_PROCESSOR: u8 = 1 << 1;
}

/// Interrupt entry flags: polarity and trigger mode "conform to the bus" (ISA: active high,
/// edge-triggered).
pub const INT_FLAGS_CONFORM: u16 = 0;
/// I/O APIC entry flags: usable.
pub const IOAPIC_ENABLED: u8 = 1 << 0;

/// The MP floating pointer structure.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpFloatingPointer {
    /// `_MP_`.
    pub signature: [u8; 4],
    /// Physical address of the configuration table.
    pub config_table: u32,
    /// Length in 16-byte paragraphs (1).
    pub length: u8,
    /// Specification revision (4).
    pub spec_revision: u8,
    /// Makes the 16 bytes sum to 0.
    pub checksum: u8,
    /// 0: a configuration table is present (no default configuration).
    pub feature1: u8,
    /// Bit 7 (IMCRP) clear: virtual wire mode.
    pub feature2: u8,
    /// Reserved.
    pub feature3_5: [u8; 3],
}

/// The configuration table header.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpConfigHeader {
    /// `PCMP`.
    pub signature: [u8; 4],
    /// Length of the base table, header included.
    pub base_length: u16,
    /// Specification revision (4).
    pub spec_revision: u8,
    /// Makes the base table sum to 0.
    pub checksum: u8,
    /// OEM ID.
    pub oem_id: [u8; 8],
    /// Product ID.
    pub product_id: [u8; 12],
    /// OEM table pointer (none).
    pub oem_table: u32,
    /// OEM table size (none).
    pub oem_table_size: u16,
    /// Number of entries after the header.
    pub entry_count: u16,
    /// The local APIC's address.
    pub lapic_addr: u32,
    /// Extended table length (none).
    pub ext_length: u16,
    /// Extended table checksum (none).
    pub ext_checksum: u8,
    /// Reserved.
    pub reserved: u8,
}

/// A processor entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpProcessorEntry {
    /// [`EntryType::Processor`].
    pub entry_type: u8,
    /// Local APIC ID.
    pub apic_id: u8,
    /// Local APIC version.
    pub apic_version: u8,
    /// [`cpu_flags`].
    pub flags: u8,
    /// CPU signature (stepping, model, family).
    pub signature: u32,
    /// CPUID.1:EDX feature flags.
    pub features: u32,
    /// Reserved.
    pub reserved: [u32; 2],
}

/// A bus entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpBusEntry {
    /// [`EntryType::Bus`].
    pub entry_type: u8,
    /// Bus ID.
    pub bus_id: u8,
    /// Bus type string, space padded (`ISA   `).
    pub bus_type: [u8; 6],
}

/// An I/O APIC entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpIoApicEntry {
    /// [`EntryType::IoApic`].
    pub entry_type: u8,
    /// I/O APIC ID.
    pub id: u8,
    /// I/O APIC version.
    pub version: u8,
    /// [`IOAPIC_ENABLED`].
    pub flags: u8,
    /// MMIO address.
    pub addr: u32,
}

/// An I/O interrupt assignment entry: a bus IRQ to an I/O APIC pin.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpIoInterruptEntry {
    /// [`EntryType::IoInterrupt`].
    pub entry_type: u8,
    /// [`InterruptType`].
    pub interrupt_type: u8,
    /// Polarity and trigger mode.
    pub flags: u16,
    /// Source bus ID.
    pub source_bus: u8,
    /// Source bus IRQ.
    pub source_irq: u8,
    /// Destination I/O APIC ID.
    pub dest_ioapic: u8,
    /// Destination I/O APIC pin (INTIN#).
    pub dest_pin: u8,
}

/// A local interrupt assignment entry: a source to a local APIC's LINT pin.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MpLocalInterruptEntry {
    /// [`EntryType::LocalInterrupt`].
    pub entry_type: u8,
    /// [`InterruptType`].
    pub interrupt_type: u8,
    /// Polarity and trigger mode.
    pub flags: u16,
    /// Source bus ID.
    pub source_bus: u8,
    /// Source bus IRQ.
    pub source_irq: u8,
    /// Destination local APIC ID ([`ALL_LOCAL_APICS`] for all).
    pub dest_lapic: u8,
    /// Destination pin (LINTIN#: 0 or 1).
    pub dest_lint: u8,
}

// SAFETY: each is `repr(C, packed)` made only of integers and byte arrays: no padding, and
// every bit pattern is a valid value.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above.
unsafe impl ByteValued for MpProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MpBusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MpIoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MpIoInterruptEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MpLocalInterruptEntry {}

// The sizes the MP specification gives.
const _: () = assert!(size_of::<MpFloatingPointer>() == 16);
const _: () = assert!(size_of::<MpConfigHeader>() == 44);
const _: () = assert!(size_of::<MpProcessorEntry>() == 20);
const _: () = assert!(size_of::<MpBusEntry>() == 8);
const _: () = assert!(size_of::<MpIoApicEntry>() == 8);
const _: () = assert!(size_of::<MpIoInterruptEntry>() == 8);
const _: () = assert!(size_of::<MpLocalInterruptEntry>() == 8);

/// The byte that makes `bytes` sum to 0 (mod 256) when stored in place of a 0 checksum.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The number of bytes the floating pointer and configuration table take for `cpu_count`
/// processors.
pub fn mptable_size(cpu_count: usize) -> usize {
    size_of::<MpFloatingPointer>()
        + size_of::<MpConfigHeader>()
        + cpu_count * size_of::<MpProcessorEntry>()
        + size_of::<MpBusEntry>()
        + size_of::<MpIoApicEntry>()
        + usize::from(ISA_IRQS) * size_of::<MpIoInterruptEntry>()
        + 2 * size_of::<MpLocalInterruptEntry>()
}

/// Checks the CPU list: non-empty, unique APIC IDs below 255 that leave room for the I/O
/// APIC's ID, exactly one BSP, which is enabled. Returns the I/O APIC ID.
fn check_cpus(cpus: &[MpCpu]) -> Result<u8, BootError> {
    let invalid = |reason: String| BootError::MpTableCpus { reason };
    if cpus.is_empty() {
        return Err(invalid(
            "the CPU list is empty: give at least the BSP".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for c in cpus {
        if c.apic_id == 0xff {
            return Err(invalid(
                "APIC ID 255 is the xAPIC broadcast ID: use IDs below 255".into(),
            ));
        }
        if !seen.insert(c.apic_id) {
            return Err(invalid(format!("APIC ID {} is listed twice", c.apic_id)));
        }
    }
    let bsps: Vec<&MpCpu> = cpus.iter().filter(|c| c.bsp).collect();
    match bsps.as_slice() {
        [bsp] if bsp.enabled => {}
        [bsp] => {
            return Err(invalid(format!(
                "the BSP (APIC ID {}) is not enabled: the BSP must be a boot vCPU",
                bsp.apic_id
            )))
        }
        other => {
            return Err(invalid(format!(
                "{} CPUs are flagged as BSP: flag exactly one",
                other.len()
            )))
        }
    }
    // Not empty, checked above.
    let max = seen.last().copied().unwrap_or(0);
    max.checked_add(1).filter(|id| *id != 0xff).ok_or_else(|| {
        invalid(format!(
            "the largest APIC ID {max} leaves no ID below 255 for the I/O APIC: use a \
             smaller topology"
        ))
    })
}

/// The configuration table's bytes (header with its checksum, then the entries) for `cpus`.
///
/// # Errors
///
/// [`BootError::MpTableCpus`] for a CPU list an MP table cannot describe.
pub fn config_table_bytes(cpus: &[MpCpu]) -> Result<Vec<u8>, BootError> {
    let ioapic_id = check_cpus(cpus)?;
    let entries = cpus.len() + 1 + 1 + usize::from(ISA_IRQS) + 2;
    let mut body = Vec::with_capacity(mptable_size(cpus.len()));
    for c in cpus {
        let mut flags = 0;
        if c.enabled {
            flags |= cpu_flags::ENABLED;
        }
        if c.bsp {
            flags |= cpu_flags::BOOT_PROCESSOR;
        }
        let e = MpProcessorEntry {
            entry_type: EntryType::Processor.code(),
            apic_id: c.apic_id,
            apic_version: LAPIC_VERSION,
            flags,
            signature: CPU_SIGNATURE,
            features: CPU_FEATURES,
            reserved: [0; 2],
        };
        body.extend_from_slice(e.as_slice());
    }
    let bus = MpBusEntry {
        entry_type: EntryType::Bus.code(),
        bus_id: ISA_BUS_ID,
        bus_type: *b"ISA   ",
    };
    body.extend_from_slice(bus.as_slice());
    let ioapic = MpIoApicEntry {
        entry_type: EntryType::IoApic.code(),
        id: ioapic_id,
        version: IOAPIC_VERSION,
        flags: IOAPIC_ENABLED,
        addr: IOAPIC_ADDR,
    };
    body.extend_from_slice(ioapic.as_slice());
    for irq in 0..ISA_IRQS {
        let e = MpIoInterruptEntry {
            entry_type: EntryType::IoInterrupt.code(),
            interrupt_type: InterruptType::Int.code(),
            flags: INT_FLAGS_CONFORM,
            source_bus: ISA_BUS_ID,
            source_irq: irq,
            dest_ioapic: ioapic_id,
            dest_pin: irq,
        };
        body.extend_from_slice(e.as_slice());
    }
    for (lint, kind) in [(0u8, InterruptType::ExtInt), (1u8, InterruptType::Nmi)] {
        let e = MpLocalInterruptEntry {
            entry_type: EntryType::LocalInterrupt.code(),
            interrupt_type: kind.code(),
            flags: INT_FLAGS_CONFORM,
            source_bus: ISA_BUS_ID,
            source_irq: 0,
            dest_lapic: ALL_LOCAL_APICS,
            dest_lint: lint,
        };
        body.extend_from_slice(e.as_slice());
    }
    let too_large = |size: usize| BootError::MpTableTooLarge {
        size,
        room: EBDA_SIZE,
    };
    let base_length = size_of::<MpConfigHeader>() + body.len();
    let mut header = MpConfigHeader {
        signature: *b"PCMP",
        base_length: u16::try_from(base_length).map_err(|_| too_large(base_length))?,
        spec_revision: SPEC_REVISION,
        checksum: 0,
        oem_id: OEM_ID,
        product_id: PRODUCT_ID,
        oem_table: 0,
        oem_table_size: 0,
        entry_count: u16::try_from(entries).map_err(|_| too_large(base_length))?,
        lapic_addr: LAPIC_ADDR,
        ext_length: 0,
        ext_checksum: 0,
        reserved: 0,
    };
    let mut table = header.as_slice().to_vec();
    table.extend_from_slice(&body);
    header.checksum = checksum(&table);
    table[..size_of::<MpConfigHeader>()].copy_from_slice(header.as_slice());
    Ok(table)
}

/// The floating pointer for a configuration table at `config_table`.
pub fn floating_pointer(config_table: u32) -> MpFloatingPointer {
    let mut mpf = MpFloatingPointer {
        signature: *b"_MP_",
        config_table,
        length: 1,
        spec_revision: SPEC_REVISION,
        checksum: 0,
        feature1: 0,
        feature2: 0,
        feature3_5: [0; 3],
    };
    mpf.checksum = checksum(mpf.as_slice());
    mpf
}

/// The room for the MP table: the whole EBDA.
const EBDA_SIZE: usize = const_u32(EBDA.size) as usize;

/// The configuration table: right after the floating pointer.
const CONFIG_TABLE_ADDR: u64 = MPTABLE_START + size_of::<MpFloatingPointer>() as u64;

/// Writes the MP floating pointer at [`MPTABLE_START`] and the configuration table right
/// after it, for `cpus` (one entry per possible vCPU, in vCPU index order).
///
/// # Errors
///
/// [`BootError::MpTableCpus`] for a bad CPU list, [`BootError::MpTableTooLarge`] if the
/// table does not fit the EBDA, [`BootError::GuestMemory`] if the write fails.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: &[MpCpu]) -> Result<(), BootError> {
    let table = config_table_bytes(cpus)?;
    let size = size_of::<MpFloatingPointer>() + table.len();
    if size > EBDA_SIZE {
        return Err(BootError::MpTableTooLarge {
            size,
            room: EBDA_SIZE,
        });
    }
    let mpf = floating_pointer(const { const_u32(CONFIG_TABLE_ADDR) });
    write_guest(mem, MPTABLE_START, mpf.as_slice())?;
    write_guest(mem, CONFIG_TABLE_ADDR, &table)
}

#[cfg(test)]
mod tests;
