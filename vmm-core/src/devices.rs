//! The VM's own devices: a 16550 serial console and the shutdown port.
//!
//! | ports | device |
//! | --- | --- |
//! | [`COM1_PORT`]..+8 | 16550 UART (vm-superio), interrupt on GSI [`COM1_GSI`] |
//! | [`SHUTDOWN_PORT`] | any write stops the VM ([`IoOutcome::StopVm`]) |

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use vcpu_actor::{DeviceError, IoOutcome};
use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusAccess, BusDevice};

/// The first port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// The number of ports of a 16550.
pub const COM1_PORT_COUNT: u16 = 8;
/// The interrupt line of COM1 (ISA IRQ 4).
pub const COM1_GSI: u32 = 4;
/// The VM's shutdown port: a guest write of any size and value asks the VMM to stop the VM.
pub const SHUTDOWN_PORT: u16 = 0x600;

/// The value a device access carries in `data`: its bytes as a little-endian number (the
/// first 8 bytes of a longer access).
pub fn le_value(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

/// An interrupt line driven by writing an EventFd that KVM knows as an irqfd.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// Wraps `evt` (already registered with `KVM_IRQFD`, or not: then it is only counted).
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The EventFd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> Result<(), io::Error> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// A 16550 UART whose transmitted bytes go to a writer the caller chooses.
pub struct SerialConsole {
    uart: Mutex<Uart>,
    /// The interrupt EventFd, which the vCPU threads write (their seccomp filter allows it).
    irq_fd: RawFd,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A UART raising `irq` and writing what the guest sends to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        let irq_fd = irq.eventfd().as_raw_fd();
        Self {
            uart: Mutex::new(Serial::new(irq, out)),
            irq_fd,
        }
    }

    /// The fd of the interrupt EventFd: the guest's register writes, handled on vCPU
    /// threads, write it (so their seccomp filter must allow `write` on it).
    pub fn irq_fd(&self) -> RawFd {
        self.irq_fd
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        // The UART state stays consistent across a panic in a writer (each register access
        // is one call), so a poisoned lock is still usable.
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues bytes for the guest to read (console input).
    ///
    /// # Errors
    ///
    /// A [`DeviceError`] if the UART's input FIFO is full or its interrupt cannot be raised.
    pub fn enqueue_input(&self, bytes: &[u8]) -> Result<usize, DeviceError> {
        self.uart()
            .enqueue_raw_bytes(bytes)
            .map_err(|e| crate::device_error(format!("serial input: {e:?}")))
    }
}

impl BusDevice for SerialConsole {
    fn read(&self, access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        // The 16550 has byte registers; wider accesses read the register then zeros.
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(access.offset)) {
            *first = self.uart().read(offset);
        }
        Ok(IoOutcome::Handled)
    }

    fn write(&self, access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        if let (Some(value), Ok(offset)) = (data.first(), u8::try_from(access.offset)) {
            self.uart()
                .write(offset, *value)
                .map_err(|e| crate::device_error(format!("serial write: {e:?}")))?;
        }
        Ok(IoOutcome::Handled)
    }
}

/// The shutdown port: any write stops the VM. Reads return 0.
#[derive(Debug, Default)]
pub struct ShutdownPort {
    last_value: AtomicU64,
}

impl ShutdownPort {
    /// A new port.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last value written (little-endian, up to 8 bytes), e.g. an exit code.
    pub fn last_value(&self) -> u64 {
        self.last_value.load(Ordering::Relaxed)
    }
}

impl BusDevice for ShutdownPort {
    fn read(&self, _access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, _access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        self.last_value.store(le_value(data), Ordering::Relaxed);
        Ok(IoOutcome::StopVm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_output_goes_to_the_callers_writer() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let uart = SerialConsole::new(IrqLine::new(evt), Box::new(out.clone()));
        let a = |offset| BusAccess {
            vcpu_id: 0,
            base: u64::from(COM1_PORT),
            offset,
        };
        for b in b"hi\n" {
            uart.write(a(0), &[*b]).unwrap();
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // LSR (offset 5): transmitter empty.
        let mut lsr = [0u8; 1];
        uart.read(a(5), &mut lsr).unwrap();
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn shutdown_port_stops_the_vm_and_keeps_the_value() {
        let p = ShutdownPort::new();
        let a = BusAccess {
            vcpu_id: 2,
            base: u64::from(SHUTDOWN_PORT),
            offset: 0,
        };
        assert!(matches!(
            p.write(a, &[0x2a, 0, 0, 0]),
            Ok(IoOutcome::StopVm)
        ));
        assert_eq!(p.last_value(), 0x2a);
    }
}
