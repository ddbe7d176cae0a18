//! The Generic Event Device (`ACPI0013`): one 32-bit MMIO register of pending event bits
//! and an interrupt line. The VMM sets bits and pulses the line ([`Ged::raise`]); the
//! guest's `_EVT` method (or the guest agent, polling) reads the register, writes the bits
//! it saw back to clear them, and handles each.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vcpu_actor::{DeviceError, IoOutcome};
use vmm_sys_util::eventfd::EventFd;

use super::read_image;
use crate::bus::{BusAccess, BusDevice};

/// The GED's event bits.
pub mod events {
    /// A CPU was inserted or is to be removed: scan the CPU hotplug controller.
    pub const CPU_HOTPLUG: u32 = 1 << 0;
    /// Every bit this GED defines.
    pub const ALL: u32 = CPU_HOTPLUG;
}

/// The Generic Event Device.
#[derive(Debug)]
pub struct Ged {
    pending: AtomicU32,
    irq: Option<EventFd>,
    raised: AtomicU64,
}

impl Ged {
    /// A GED pulsing `irq` (an EventFd registered with `KVM_IRQFD`; `None`: polled only).
    pub fn new(irq: Option<EventFd>) -> Self {
        Self {
            pending: AtomicU32::new(0),
            irq,
            raised: AtomicU64::new(0),
        }
    }

    /// Sets `bits` pending and pulses the interrupt line.
    ///
    /// # Errors
    ///
    /// The EventFd's write error; the bits are pending anyway (a polling guest sees them).
    pub fn raise(&self, bits: u32) -> std::io::Result<()> {
        self.pending.fetch_or(bits & events::ALL, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        match &self.irq {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }

    /// The pending event bits.
    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::SeqCst)
    }

    /// How many times the interrupt was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

impl BusDevice for Ged {
    fn read(&self, access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        let value = self.pending().to_le_bytes();
        read_image(&value, access.offset, data);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        // Write 1 to clear, at offset 0, any width up to 4 bytes; anything else is ignored.
        if access.offset == 0 && data.len() <= 4 {
            let mut v = [0u8; 4];
            v[..data.len()].copy_from_slice(data);
            self.pending
                .fetch_and(!u32::from_le_bytes(v), Ordering::SeqCst);
        }
        Ok(IoOutcome::Handled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_set_by_the_vmm_and_cleared_by_the_guest() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ged = Ged::new(Some(evt.try_clone().unwrap()));
        let at = |offset| BusAccess {
            vcpu_id: 0,
            base: 0,
            offset,
        };
        ged.raise(events::CPU_HOTPLUG | 0x80).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0u8; 4];
        ged.read(at(0), &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), events::CPU_HOTPLUG);
        // Bad writes: ignored.
        ged.write(at(1), &[0xff]).unwrap();
        ged.write(at(0), &[0xff; 8]).unwrap();
        assert_eq!(ged.pending(), events::CPU_HOTPLUG);
        ged.write(at(0), &b).unwrap();
        assert_eq!(ged.pending(), 0);
        assert_eq!(ged.raised(), 1);
    }
}
