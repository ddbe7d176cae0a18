//! ACPI CPU hotplug: the second [`HotplugBackend`](crate::HotplugBackend) beside upcall, for
//! guests with a stock kernel (Linux's ACPI processor driver, Windows).
//!
//! | part | what |
//! | --- | --- |
//! | [`CpuHotplugController`] | MMIO registers at [`CPU_HOTPLUG_MMIO_BASE`]: select a CPU, read its state, acknowledge events, eject |
//! | [`Ged`] | the Generic Event Device (`ACPI0013`): an event register at [`GED_MMIO_BASE`] and an interrupt on GSI [`GED_GSI`] (an irqfd) |
//! | [`HotplugAml`] | the DSDT objects: `\_SB_.CPUS` with one `ACPI0007` device per possible vCPU, the scan method, `\_SB_.GED0` |
//! | [`AcpiBackend`] | the manager's backend: marks CPUs, raises the GED, waits for the guest on the controller |
//! | [`attach`] | registers the two devices on a VM's bus and its irqfd, and returns them with the backend |
//!
//! # The controller's registers
//!
//! Little-endian, at [`CPU_HOTPLUG_MMIO_BASE`], [`regs::LEN`] bytes. The vCPU *index* (ACPI
//! processor UID, MADT order) selects a CPU.
//!
//! | offset | size | name | access | meaning |
//! | --- | --- | --- | --- | --- |
//! | 0x00 | 4 | `SEL` | R/W | the selected CPU index (byte writes merge) |
//! | 0x04 | 1 | `STAT` | R | bit 0 enabled (present), bit 1 insert event, bit 2 remove event; 0 for an index out of range |
//! | 0x04 | 1 | `STAT` | W | command for the selected CPU: bit 1 acknowledge insert, bit 2 acknowledge remove, bit 3 eject |
//! | 0x08 | 4 | `NEXT` | R | the lowest index with an insert or remove event, `0xFFFF_FFFF` if none |
//! | 0x0C | 4 | `COUNT` | R | the number of CPUs (possible vCPUs) |
//!
//! Bad input is ignored and counted ([`ControllerStats`]), never an error that would stop the
//! vCPU: a selection out of range (reads 0, commands ignored), command bits 0 and 4-7,
//! writes to read-only registers or beyond the layout, an acknowledgement of an event that is
//! not pending, an eject of a CPU whose removal the VMM did not request, and any eject of
//! CPU 0. An eject only changes the controller's state: vCPU threads are exited by the
//! manager alone, once the backend reports the eject, so the guest cannot make a vCPU
//! disappear that the manager still counts.
//!
//! # The GED
//!
//! One 32-bit register at [`GED_MMIO_BASE`]: pending event bits ([`ged::events`]; bit 0:
//! CPU hotplug). Write 1 to clear. [`Ged::raise`] sets bits and writes the irqfd of GSI
//! [`GED_GSI`].
//!
//! # The AML
//!
//! ```text
//! Device (\_SB.CPUS) {                      // processor container
//!     Name (_HID, "ACPI0010")  Name (_CID, EisaId ("PNP0A05"))
//!     Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, BASE, 0x10) })
//!     OperationRegion (CPHR, SystemMemory, BASE, 0x10)
//!     Field (CPHR, DWordAcc, NoLock, WriteAsZeros) { CSEL, 32, , 32, CNXT, 32, CCNT, 32 }
//!     Field (CPHR, ByteAcc, NoLock, WriteAsZeros) { Offset (4), CPEN, 1, CINS, 1, CRMV, 1, CEJF, 1 }
//!     Mutex (CPLK, 0)
//!     Method (CSTA, 1) { select Arg0; Return (CPEN ? 0x0F : 0) }
//!     Method (CEJX, 1) { select Arg0; CEJF = 1 }
//!     Method (CMAT, 2) { the MADT entry of UID Arg0, APIC ID Arg1: flags Enabled if CSTA, else Online Capable }
//!     Device (C000) { Name (_HID, "ACPI0007") Name (_UID, 0)
//!                     Method (_STA) { Return (CSTA (0)) } Method (_MAT) { Return (CMAT (0, apic_id)) } }
//!     Device (C001) { ... Method (_EJ0, 1) { CEJX (1) } }   // every CPU but the BSP has _EJ0
//!     ...
//!     Method (CTFY, 2) { If (Arg0 == 0) { Notify (C000, Arg1) } ... }
//!     Method (CSCN, 0, Serialized) {        // at most CCNT rounds
//!         while (Local0 = CNXT) != 0xFFFFFFFF:
//!             CSEL = Local0
//!             If (CINS) { CTFY (Local0, 1); CINS = 1 }      // device check, acknowledge
//!             ElseIf (CRMV) { CTFY (Local0, 3); CRMV = 1 }  // eject request, acknowledge
//!     }
//! }
//! Device (\_SB.GED0) {
//!     Name (_HID, "ACPI0013")  Name (_CRS, ResourceTemplate () { Interrupt (, Edge, ActiveHigh) { GSI } })
//!     OperationRegion (GDRG, SystemMemory, GED_BASE, 4)  Field (GDRG, DWordAcc, ...) { GDAT, 32 }
//!     Method (_EVT, 1, Serialized) { Local0 = GDAT; GDAT = Local0; If (Local0 & 1) { \_SB.CPUS.CSCN () } }
//! }
//! ```
//!
//! A guest OS then does what Linux's ACPI processor driver does: on device check it reads
//! `_STA` and `_MAT` (the APIC ID), brings the CPU up with INIT/SIPI; on eject request it
//! takes the CPU offline and calls `_EJ0`.
//!
//! # When a hot-add is complete
//!
//! [`AcpiBackend`]'s `add` marks the CPUs inserted, raises the GED and waits until the guest
//! acknowledged every insert event (the scan does, after notifying). The manager then
//! confirms with KVM: it reads each new vCPU's MP state (`KVM_GET_MP_STATE`, after pausing it
//! for a moment) and counts the hot-add done only if every new vCPU left the wait-for-SIPI
//! state (see [`HotplugBackend::confirm_wake_by_mp_state`](crate::HotplugBackend::confirm_wake_by_mp_state)). A
//! vCPU the guest acknowledged but did not start is exited again and the resize fails
//! ([`BackendError::NotWoken`](crate::BackendError::NotWoken)). A hot-remove is complete when
//! the guest ejected every CPU; only then are their threads exited. Timeouts and
//! reconciliation are the upcall backend's ([`crate::resize`]).

pub mod aml;
pub mod backend;
pub mod controller;
pub mod ged;

use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use aml::HotplugAml;
pub use backend::AcpiBackend;
pub use controller::{ControllerStats, CpuHotplugController, CpuSlotState};
pub use ged::Ged;

use crate::bus::{BusSpace, IoBus};
use crate::error::BusError;

/// A register read at `offset` of a device whose registers are `image`: the bytes of `image`
/// from `offset` on, 0 beyond its end.
fn read_image(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| image.get(o).copied())
            .unwrap_or(0);
    }
}

/// The controller's registers: the block's layout, its offsets and the `STAT` bits.
pub mod regs {
    use std::mem::{offset_of, size_of};

    use crate::arch::x86_64::layout::const_u32;

    /// The register block as the guest sees it: little-endian fields at their `repr(C)`
    /// offsets, the one source of the offsets for the device model and the AML.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Block {
        /// `SEL` (R/W): the selected CPU index.
        pub sel: u32,
        /// `STAT` (`u8`): read, the selected CPU's [`status`] bits; write, [`command`] bits
        /// for it.
        pub stat: u8,
        /// The bytes between `STAT` and `NEXT`: no register, they read as these.
        pub reserved: [u8; 3],
        /// `NEXT` (read only): the lowest index with a pending event, [`NEXT_NONE`] if none.
        pub next: u32,
        /// `COUNT` (read only): the number of CPUs.
        pub count: u32,
    }

    impl Block {
        /// The bytes the guest reads: each field at its offset.
        pub fn to_bytes(&self) -> [u8; LEN as usize] {
            let mut bytes = [0u8; LEN as usize];
            bytes[offset_of!(Block, sel)..][..4].copy_from_slice(&self.sel.to_le_bytes());
            bytes[offset_of!(Block, stat)] = self.stat;
            bytes[offset_of!(Block, reserved)..][..3].copy_from_slice(&self.reserved);
            bytes[offset_of!(Block, next)..][..4].copy_from_slice(&self.next.to_le_bytes());
            bytes[offset_of!(Block, count)..][..4].copy_from_slice(&self.count.to_le_bytes());
            bytes
        }
    }

    /// `SEL`'s offset ([`Block::sel`]).
    pub const SEL: u64 = offset_of!(Block, sel) as u64;
    /// `STAT`'s offset ([`Block::stat`]).
    pub const STAT: u64 = offset_of!(Block, stat) as u64;
    /// `NEXT`'s offset ([`Block::next`]).
    pub const NEXT: u64 = offset_of!(Block, next) as u64;
    /// `COUNT`'s offset ([`Block::count`]).
    pub const COUNT: u64 = offset_of!(Block, count) as u64;
    /// The register block's length.
    pub const LEN: u32 = const_u32(size_of::<Block>() as u64);
    /// `NEXT` when no event is pending.
    pub const NEXT_NONE: u32 = u32::MAX;

    /// The bits of a `STAT` read.
    pub mod status {
        consts! {
            ENABLED: u8 = 1 << 0, "The CPU is present.";
            INSERT: u8 = 1 << 1, "An insert event is pending.";
            REMOVE: u8 = 1 << 2, "A remove event is pending.";
        }
    }

    /// The bits of a `STAT` write: commands for the selected CPU.
    pub mod command {
        consts! {
            ACK_INSERT: u8 = 1 << 1, "Acknowledge the insert event.";
            ACK_REMOVE: u8 = 1 << 2, "Acknowledge the remove event.";
            EJECT: u8 = 1 << 3, "Eject the CPU (only after the VMM asked for its removal).";
        }
    }
}

/// The controller's MMIO base (in the MMIO gap, below the I/O APIC).
pub const CPU_HOTPLUG_MMIO_BASE: u32 = 0xfeb0_0000;
/// The GED's MMIO base (its own page).
pub const GED_MMIO_BASE: u32 = 0xfeb0_1000;
/// The GED's interrupt line (I/O APIC pin; COM1 has 4).
pub const GED_GSI: u32 = 5;
/// How long the backend waits for the guest by default.
pub const DEFAULT_GUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the hotplug devices are, as the AML names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiHotplugLayout {
    /// The controller's MMIO base.
    pub controller_base: u32,
    /// The GED's MMIO base.
    pub ged_base: u32,
    /// The GED's GSI.
    pub gsi: u32,
}

impl Default for AcpiHotplugLayout {
    fn default() -> Self {
        Self {
            controller_base: CPU_HOTPLUG_MMIO_BASE,
            ged_base: GED_MMIO_BASE,
            gsi: GED_GSI,
        }
    }
}

/// Setting up ACPI CPU hotplug failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcpiHotplugError {
    /// A CPU list the AML cannot describe.
    #[error("ACPI CPU hotplug describes 1 to {max} vCPUs, got {count}: lower max_vcpu_count")]
    Cpus {
        /// How many were given.
        count: usize,
        /// The most.
        max: usize,
    },
    /// A device range is taken on the bus.
    #[error("registering the ACPI hotplug devices: {0}")]
    Bus(#[from] BusError),
    /// The GED's EventFd could not be made.
    #[error("creating the GED's interrupt EventFd: {0}")]
    EventFd(#[source] std::io::Error),
    /// `KVM_IRQFD` for the GED failed.
    #[error("KVM_IRQFD (GED, GSI {gsi}): {source}: is the in-kernel irqchip created?")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The ACPI hotplug devices of one VM and the backend that drives them.
#[derive(Debug, Clone)]
pub struct AcpiHotplug {
    /// The CPU hotplug controller.
    pub controller: Arc<CpuHotplugController>,
    /// The Generic Event Device.
    pub ged: Arc<Ged>,
    /// The backend to give the vCPU manager
    /// ([`set_hotplug_backend`](crate::VcpuManager::set_hotplug_backend)).
    pub backend: Arc<AcpiBackend>,
    /// Where the devices are.
    pub layout: AcpiHotplugLayout,
}

/// Registers the controller (for the vCPUs with `apic_ids`, in index order, the first `boot`
/// present) and the GED on `bus` at the default [`AcpiHotplugLayout`], the GED's interrupt as
/// an irqfd of `vm_fd` (none: polled only); returns them with a backend waiting at most
/// `guest_timeout` for the guest.
///
/// # Errors
///
/// [`AcpiHotplugError`]: bad CPU list, a taken bus range, or the irqfd.
pub fn attach(
    bus: &IoBus,
    vm_fd: Option<&kvm_ioctls::VmFd>,
    apic_ids: Vec<u32>,
    boot: usize,
    guest_timeout: Duration,
) -> Result<AcpiHotplug, AcpiHotplugError> {
    if apic_ids.is_empty() || apic_ids.len() > aml::MAX_CPUS {
        return Err(AcpiHotplugError::Cpus {
            count: apic_ids.len(),
            max: aml::MAX_CPUS,
        });
    }
    let layout = AcpiHotplugLayout::default();
    let irq = match vm_fd {
        Some(fd) => {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(AcpiHotplugError::EventFd)?;
            fd.register_irqfd(&evt, layout.gsi)
                .map_err(|source| AcpiHotplugError::Irqfd {
                    gsi: layout.gsi,
                    source,
                })?;
            Some(evt)
        }
        None => None,
    };
    let controller = Arc::new(CpuHotplugController::new(apic_ids, boot));
    let ged = Arc::new(Ged::new(irq));
    bus.register(
        BusSpace::Mmio,
        u64::from(layout.controller_base),
        u64::from(regs::LEN),
        "cpu-hotplug",
        controller.clone(),
    )?;
    if let Err(e) = bus.register(
        BusSpace::Mmio,
        u64::from(layout.ged_base),
        4,
        "ged",
        ged.clone(),
    ) {
        bus.unregister(BusSpace::Mmio, u64::from(layout.controller_base));
        return Err(e.into());
    }
    let backend = Arc::new(AcpiBackend::new(
        Arc::clone(&controller),
        Arc::clone(&ged),
        guest_timeout,
    ));
    Ok(AcpiHotplug {
        controller,
        ged,
        backend,
        layout,
    })
}

#[cfg(test)]
mod tests;
