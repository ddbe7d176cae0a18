//! ACPI tables: how a stock guest finds its processors and interrupt controllers.
//!
//! [`build_tables`] builds, with rust-vmm's `acpi_tables` crate, the tables a guest needs to
//! find every possible vCPU and the I/O APIC, laid out one after the other from a base
//! address; [`setup_acpi`] writes them at [`ACPI_START`] (the BIOS area `0xE0000..0x100000`,
//! where a guest scans for the RSDP, and which the e820 map reserves), and Linux boot also
//! announces the RSDP through the zero page (`acpi_rsdp_addr`).
//!
//! | table | what |
//! | --- | --- |
//! | RSDP (`RSD PTR `) | revision 2, points at the XSDT; 16-byte aligned at [`ACPI_START`] |
//! | XSDT | the FADT and the MADT |
//! | FADT (`FACP`) | revision 6.5, hardware-reduced ACPI (no SCI, no PM blocks, no FACS), points at the DSDT |
//! | DSDT | a definition block with the AML the caller hands in ([`build_tables`]'s `dsdt_aml`): the ACPI CPU hotplug objects, or nothing |
//! | MADT (`APIC`) | revision 5: every possible vCPU, the I/O APIC, the LINT1 NMI |
//!
//! The MADT lists the vCPUs in index order, the ACPI processor UID being the index:
//! - a Local APIC entry (type 0) for each APIC ID that fits 8 bits (below 255; 0xFF is the
//!   broadcast ID), a Local x2APIC entry (type 9) for the others, as the ACPI specification
//!   asks. Guests without x2APIC support keep working as long as every ID fits (a MADT of
//!   type-9 entries only is what made such guests boot with one CPU elsewhere);
//! - boot vCPUs `Enabled`, the others `Online Capable` (MADT revision 5: present later,
//!   through hotplug; Linux counts them as hotplug CPUs);
//! - the I/O APIC ([`IOAPIC_ADDR`], GSI base 0; its ID as the MP table gives it, or 0 when
//!   the APIC IDs leave no 8-bit ID above them);
//! - a Local APIC NMI entry (type 4) for LINT1 on all processors (UID 0xFF), and a Local
//!   x2APIC NMI entry (type 0xA, UID 0xFFFF_FFFF) too when there are type-9 entries: the
//!   vCPU manager programs the BSP's LINT1 as NMI ([`super::lapic::setup_lint`]) and the
//!   guest its APs' (their INIT resets every LVT entry).
//!
//! The flags say `PCAT_COMPAT` (KVM's in-kernel irqchip has the 8259 pair, which the guest
//! should mask). ISA IRQs are identity-mapped to I/O APIC pins 0-15 (ACPI's default without
//! Interrupt Source Override entries, as KVM routes GSIs 0-15 and as the MP table says).
//!
//! # The DSDT hook
//!
//! The DSDT is where ACPI CPU hotplug puts its processor devices (`\_SB_.CPUS`, `_MAT`,
//! `_STA`, `_EJ0` and the GED that notifies them, [`crate::acpi_hotplug::HotplugAml`]):
//! [`build_tables`] and [`setup_acpi_with`] take the AML objects to put in it; Linux boot
//! passes them when [`LinuxBootConfig::acpi_cpu_hotplug`](crate::boot::LinuxBootConfig) is
//! set. Everything else in this module stays as it is.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::GuestMemoryMmap;

use super::layout::{const_u32, ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};
use super::write_guest;
use crate::error::BootError;

/// The OEM ID of every table.
pub const OEM_ID: [u8; 6] = *b"VMMCOR";
/// The OEM table ID of every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"VCPUMGR ";
/// The OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// The MADT revision: 5 is the first with the `Online Capable` processor flag.
pub const MADT_REVISION: u8 = 5;
/// The DSDT revision (2: 64-bit AML integers).
pub const DSDT_REVISION: u8 = 2;
/// Where each table starts: a multiple of this after the one before.
pub const TABLE_ALIGN: u64 = 64;
/// The largest APIC ID a Local APIC (type 0) entry carries; larger IDs get a Local x2APIC
/// (type 9) entry. 0xFF is the xAPIC broadcast ID.
pub const MAX_XAPIC_ID: u32 = 254;

/// The RSDP's signature (8 bytes, with a trailing space).
pub const RSDP_SIGNATURE: &str = "RSD PTR ";

/// MADT structure types.
pub mod madt_type {
    consts! {
        LOCAL_APIC: u8 = 0, "Processor Local APIC (8 bytes).";
        IO_APIC: u8 = 1, "I/O APIC (12 bytes).";
        LOCAL_APIC_NMI: u8 = 4, "Local APIC NMI (6 bytes).";
        LOCAL_X2APIC: u8 = 9, "Processor Local x2APIC (16 bytes).";
        LOCAL_X2APIC_NMI: u8 = 0xa, "Local x2APIC NMI (12 bytes).";
    }
}

/// MADT processor flags.
pub mod processor_flags {
    consts! {
        ENABLED: u32 = 1 << 0, "The processor is present and usable at boot.";
        ONLINE_CAPABLE: u32 = 1 << 1, "The processor can be brought online later (hotplug); only when not `ENABLED`.";
    }
}

consts! {
    MADT_PCAT_COMPAT: u32 = 1 << 0, "The MADT flag saying the system also has dual 8259 PICs (to be masked by the OS).";
    ALL_PROCESSORS_UID: u8 = 0xff, "The ACPI processor UID meaning \"all processors\" in a Local APIC NMI entry.";
    ALL_PROCESSORS_X2APIC_UID: u32 = 0xffff_ffff, "The ACPI processor UID meaning \"all processors\" in a Local x2APIC NMI entry.";
    NMI_LINT: u8 = 1, "The LAPIC input wired to NMI.";
}

/// One possible vCPU as the MADT lists it (its ACPI processor UID is its position in the list,
/// the vCPU index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AcpiCpu {
    /// Its APIC ID (the topology's; any 32-bit value).
    pub apic_id: u32,
    /// Present at boot (`Enabled`); otherwise `Online Capable`.
    pub enabled: bool,
}

/// One table: its signature (for RSDP, `RSD PTR `), its guest address, its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// The signature: 4 bytes for a table with the common header, `RSD PTR ` for the RSDP.
    pub signature: String,
    /// Where it goes in guest memory.
    pub addr: u64,
    /// Its bytes, checksums included.
    pub bytes: Vec<u8>,
}

impl AcpiTable {
    /// The file name ACPICA's `acpixtract` gives it: the signature in lower case (without
    /// the RSDP's trailing `PTR `), then `.dat` (`apic.dat`, `rsdp.dat`, ...).
    pub fn file_name(&self) -> String {
        let sig = if self.signature == RSDP_SIGNATURE {
            "rsdp"
        } else {
            self.signature.as_str()
        };
        format!("{}.dat", sig.to_ascii_lowercase())
    }
}

/// Every table, in the order they lie in memory (RSDP first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// RSDP, DSDT, FACP, APIC, XSDT.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    /// The RSDP's address.
    pub fn rsdp_addr(&self) -> u64 {
        self.tables.first().map_or(0, |t| t.addr)
    }

    /// The table with `signature` (`APIC`, `RSD PTR `, ...).
    pub fn get(&self, signature: &str) -> Option<&AcpiTable> {
        self.tables.iter().find(|t| t.signature == signature)
    }

    /// The end (exclusive) of the last table.
    pub fn end(&self) -> u64 {
        self.tables
            .iter()
            .map(|t| t.addr + t.bytes.len() as u64)
            .max()
            .unwrap_or(0)
    }
}

/// The I/O APIC's ID: one above the largest APIC ID while that fits 8 bits (as the MP table
/// gives it), otherwise 0 (with x2APIC IDs the I/O APIC's 8-bit ID names no processor).
pub fn ioapic_id(cpus: &[AcpiCpu]) -> u8 {
    let largest = cpus.iter().map(|c| c.apic_id).max().unwrap_or(0);
    u8::try_from(largest + 1)
        .ok()
        .filter(|id| u32::from(*id) <= MAX_XAPIC_ID)
        .unwrap_or(0)
}

/// The MADT structures after its header, in order: processors, I/O APIC, NMI entries.
///
/// # Errors
///
/// [`BootError::AcpiCpus`] for an empty list, a repeated APIC ID, or an index too large for
/// a processor UID.
pub fn madt_structures(cpus: &[AcpiCpu]) -> Result<Vec<u8>, BootError> {
    let bad = |reason: String| BootError::AcpiCpus { reason };
    if cpus.is_empty() {
        return Err(bad("no vCPU to list".into()));
    }
    if !cpus.first().is_some_and(|c| c.enabled) {
        return Err(bad(
            "the first vCPU (the BSP) must be present at boot".into()
        ));
    }
    let mut ids: Vec<u32> = cpus.iter().map(|c| c.apic_id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad(format!("APIC ID {} is listed twice", w[0])));
    }
    let mut out = Vec::with_capacity(cpus.len() * 16 + 32);
    let mut any_x2apic = false;
    for (index, cpu) in cpus.iter().enumerate() {
        let flags = if cpu.enabled {
            processor_flags::ENABLED
        } else {
            processor_flags::ONLINE_CAPABLE
        };
        let uid = u32::try_from(index)
            .ok()
            .filter(|u| *u != ALL_PROCESSORS_X2APIC_UID)
            .ok_or_else(|| bad(format!("vCPU index {index} has no ACPI processor UID")))?;
        match u8::try_from(cpu.apic_id)
            .ok()
            .filter(|id| u32::from(*id) <= MAX_XAPIC_ID)
        {
            Some(apic_id) => {
                // IDs grow at least as fast as indices, so the UID of an 8-bit ID fits too.
                let uid8 = u8::try_from(uid)
                    .ok()
                    .filter(|u| *u != ALL_PROCESSORS_UID)
                    .ok_or_else(|| {
                        bad(format!(
                            "vCPU index {index} (APIC ID {apic_id}) needs an 8-bit processor UID"
                        ))
                    })?;
                out.extend_from_slice(&[madt_type::LOCAL_APIC, 8, uid8, apic_id]);
                out.extend_from_slice(&flags.to_le_bytes());
            }
            None => {
                any_x2apic = true;
                out.extend_from_slice(&[madt_type::LOCAL_X2APIC, 16, 0, 0]);
                out.extend_from_slice(&cpu.apic_id.to_le_bytes());
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&uid.to_le_bytes());
            }
        }
    }
    out.extend_from_slice(&[madt_type::IO_APIC, 12, ioapic_id(cpus), 0]);
    out.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    // Flags 0: polarity and trigger conform to the bus.
    out.extend_from_slice(&[
        madt_type::LOCAL_APIC_NMI,
        6,
        ALL_PROCESSORS_UID,
        0,
        0,
        NMI_LINT,
    ]);
    if any_x2apic {
        out.extend_from_slice(&[madt_type::LOCAL_X2APIC_NMI, 12, 0, 0]);
        out.extend_from_slice(&ALL_PROCESSORS_X2APIC_UID.to_le_bytes());
        out.extend_from_slice(&[NMI_LINT, 0, 0, 0]);
    }
    Ok(out)
}

/// A table with the common 36-byte header and `body` after it, checksummed.
fn sdt(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    // The header alone is 36 bytes; `append_slice` grows the length and fixes the checksum.
    let mut t = Sdt::new(signature, 36, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(body);
    t.as_slice().to_vec()
}

/// The MADT of `cpus`.
///
/// # Errors
///
/// As [`madt_structures`].
pub fn madt(cpus: &[AcpiCpu]) -> Result<Vec<u8>, BootError> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    body.extend_from_slice(&madt_structures(cpus)?);
    Ok(sdt(*b"APIC", MADT_REVISION, &body))
}

/// The DSDT: a definition block holding `aml` (nothing else yet: see the module's "DSDT
/// hook").
pub fn dsdt(aml: &[&dyn Aml]) -> Vec<u8> {
    let mut body = Vec::new();
    for object in aml {
        object.to_aml_bytes(&mut body);
    }
    sdt(*b"DSDT", DSDT_REVISION, &body)
}

/// The FADT: hardware-reduced ACPI, no fixed power or sleep button, the DSDT at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .finalize()
        .to_aml_bytes(&mut bytes);
    bytes
}

/// The next table's address after `addr + len`.
fn next(addr: u64, len: usize) -> u64 {
    (addr + len as u64).next_multiple_of(TABLE_ALIGN)
}

/// Builds every table for `cpus` (in vCPU index order, the BSP first), laid out from `base`
/// (16-byte aligned, for the RSDP): RSDP, DSDT (holding `dsdt_aml`), FADT, MADT, XSDT.
///
/// # Errors
///
/// [`BootError::AcpiCpus`] for a bad CPU list (see [`madt_structures`]).
pub fn build_tables(
    cpus: &[AcpiCpu],
    dsdt_aml: &[&dyn Aml],
    base: u64,
) -> Result<AcpiTables, BootError> {
    let madt = madt(cpus)?;
    let rsdp_addr = base;
    let dsdt_addr = next(rsdp_addr, Rsdp::len());
    let dsdt = dsdt(dsdt_aml);
    let fadt_addr = next(dsdt_addr, dsdt.len());
    let fadt = fadt(dsdt_addr);
    let madt_addr = next(fadt_addr, fadt.len());
    let xsdt_addr = next(madt_addr, madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    let table = |signature: &str, addr, bytes| AcpiTable {
        signature: signature.into(),
        addr,
        bytes,
    };
    Ok(AcpiTables {
        tables: vec![
            table(RSDP_SIGNATURE, rsdp_addr, rsdp),
            table("DSDT", dsdt_addr, dsdt),
            table("FACP", fadt_addr, fadt),
            table("APIC", madt_addr, madt),
            table("XSDT", xsdt_addr, xsdt_bytes),
        ],
    })
}

/// Builds the tables for `cpus` with an empty DSDT and writes them at [`ACPI_START`]:
/// [`setup_acpi_with`] without DSDT objects.
///
/// # Errors
///
/// As [`setup_acpi_with`].
pub fn setup_acpi(mem: &GuestMemoryMmap, cpus: &[AcpiCpu]) -> Result<AcpiTables, BootError> {
    setup_acpi_with(mem, cpus, &[])
}

/// Builds the tables for `cpus` with `dsdt_aml` in the DSDT (e.g. the ACPI CPU hotplug
/// objects, [`crate::acpi_hotplug::HotplugAml`]) and writes them at [`ACPI_START`].
///
/// # Errors
///
/// [`BootError::AcpiCpus`] for a bad CPU list, [`BootError::AcpiTablesTooLarge`] if they do
/// not fit `ACPI_START..ACPI_END`, [`BootError::GuestMemory`] if that is not guest RAM.
pub fn setup_acpi_with(
    mem: &GuestMemoryMmap,
    cpus: &[AcpiCpu],
    dsdt_aml: &[&dyn Aml],
) -> Result<AcpiTables, BootError> {
    let tables = build_tables(cpus, dsdt_aml, ACPI_START)?;
    let room = const { const_u32(ACPI_END - ACPI_START) } as usize;
    let size = usize::try_from(tables.end() - ACPI_START).unwrap_or(usize::MAX);
    if size > room {
        return Err(BootError::AcpiTablesTooLarge {
            size,
            room,
            cpus: cpus.len(),
        });
    }
    for t in &tables.tables {
        write_guest(mem, t.addr, &t.bytes)?;
    }
    Ok(tables)
}

#[cfg(test)]
mod tests;
