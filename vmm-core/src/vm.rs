//! The KVM VM: in-kernel irqchip and PIT, guest memory, the I/O bus with the serial console
//! and the shutdown port.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use slog::{debug, o, Logger};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{BusSpace, IoBus};
use crate::devices::{
    IrqLine, SerialConsole, ShutdownPort, COM1_GSI, COM1_PORT, COM1_PORT_COUNT, SHUTDOWN_PORT,
};
use crate::error::{BootError, KvmOp, OsError, OsOp, VmError};

pub use crate::arch::x86_64::layout::MMIO_GAP;

/// The smallest guest memory accepted (what the guest-program loader needs).
pub const MIN_MEMORY_SIZE: u64 = 4 << 20;
/// Where KVM's Intel real-mode TSS goes (3 pages just below the BIOS area at the top of 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// How to build a [`Vm`].
pub struct VmOptions {
    /// Guest RAM in bytes (a multiple of 4 KiB, at least [`MIN_MEMORY_SIZE`]).
    pub memory_size: u64,
    /// Where the serial console's output goes (default: discarded).
    pub serial_output: Box<dyn Write + Send>,
    /// Create the in-kernel PIT (i8254) too.
    pub create_pit: bool,
    /// Logger.
    pub logger: Logger,
}

impl std::fmt::Debug for VmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmOptions")
            .field("memory_size", &self.memory_size)
            .field("create_pit", &self.create_pit)
            .finish_non_exhaustive()
    }
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_size: 64 << 20,
            serial_output: Box::new(std::io::sink()),
            create_pit: true,
            logger: Logger::root(slog::Discard, o!()),
        }
    }
}

/// A KVM VM with its memory and devices; vCPUs are the [`crate::VcpuManager`]'s.
pub struct Vm {
    // Field order is drop order: the VM fd goes before the memory it maps.
    fd: VmFd,
    kvm: Kvm,
    memory: GuestMemoryMmap,
    bus: Arc<IoBus>,
    serial: Arc<SerialConsole>,
    shutdown: Arc<ShutdownPort>,
    vcpu_mmap_size: usize,
    logger: Logger,
}

/// The RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
///
/// # Errors
///
/// [`VmError::InvalidMemorySize`] if `size` is below the minimum or not a multiple of 4 KiB.
pub fn memory_ranges(size: u64) -> Result<Vec<(GuestAddress, usize)>, VmError> {
    let invalid = || VmError::InvalidMemorySize {
        size,
        min: MIN_MEMORY_SIZE,
    };
    if size < MIN_MEMORY_SIZE || size % 4096 != 0 {
        return Err(invalid());
    }
    let low = size.min(MMIO_GAP.start);
    let mut ranges = vec![(
        GuestAddress(0),
        usize::try_from(low).map_err(|_| invalid())?,
    )];
    if size > low {
        let high = usize::try_from(size - low).map_err(|_| invalid())?;
        ranges.push((GuestAddress(MMIO_GAP.end()), high));
    }
    Ok(ranges)
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field(
                "memory_size",
                &self.memory.iter().map(|r| r.len()).sum::<u64>(),
            )
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM: KVM VM, TSS address, in-kernel irqchip, PIT (optional), guest memory,
    /// the COM1 console (interrupt through an irqfd on GSI 4) and the shutdown port.
    ///
    /// # Errors
    ///
    /// [`VmError::InvalidMemorySize`], [`VmError::MemoryAllocation`], or [`VmError::Kvm`]
    /// naming the KVM call that failed.
    pub fn new(kvm: Kvm, options: VmOptions) -> Result<Self, VmError> {
        let logger = options.logger.new(o!("component" => "vm"));
        let ranges = memory_ranges(options.memory_size)?;
        let vm_err = |op| move |source| VmError::Kvm { op, source };
        let vcpu_mmap_size = kvm
            .get_vcpu_mmap_size()
            .map_err(vm_err(KvmOp::GetVcpuMmapSize))?;
        let fd = kvm.create_vm().map_err(vm_err(KvmOp::CreateVm))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(vm_err(KvmOp::SetTssAddr))?;
        fd.create_irq_chip().map_err(vm_err(KvmOp::CreateIrqchip))?;
        if options.create_pit {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(vm_err(KvmOp::CreatePit2))?;
        }
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(VmError::MemoryAllocation)?;
        for (slot, region) in (0u32..).zip(memory.iter()) {
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `memory`,
            // which this Vm keeps; the VM fd is declared first so it is dropped first.
            unsafe { fd.set_user_memory_region(r) }.map_err(vm_err(KvmOp::SetUserMemoryRegion))?;
        }

        let bus = Arc::new(IoBus::new(logger.clone()));
        let irq = EventFd::new(EFD_NONBLOCK).map_err(OsError::of(OsOp::CreateSerialIrqEventFd))?;
        fd.register_irqfd(&irq, COM1_GSI)
            .map_err(vm_err(KvmOp::IrqfdCom1))?;
        let serial = Arc::new(SerialConsole::new(IrqLine::new(irq), options.serial_output));
        bus.register(
            BusSpace::Pio,
            u64::from(COM1_PORT),
            u64::from(COM1_PORT_COUNT),
            "com1",
            serial.clone(),
        )?;
        let shutdown = Arc::new(ShutdownPort::new());
        bus.register(
            BusSpace::Pio,
            u64::from(SHUTDOWN_PORT),
            1,
            "shutdown",
            shutdown.clone(),
        )?;
        debug!(logger, "VM created"; "memory_size" => options.memory_size);
        Ok(Self {
            fd,
            kvm,
            memory,
            bus,
            serial,
            shutdown,
            vcpu_mmap_size,
            logger,
        })
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The I/O bus (register more devices on it).
    pub fn io_bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// The COM1 console.
    pub fn serial(&self) -> &Arc<SerialConsole> {
        &self.serial
    }

    /// The shutdown port.
    pub fn shutdown_port(&self) -> &Arc<ShutdownPort> {
        &self.shutdown
    }

    /// `KVM_GET_VCPU_MMAP_SIZE`.
    pub fn vcpu_mmap_size(&self) -> usize {
        self.vcpu_mmap_size
    }

    /// The VM's logger.
    pub fn logger(&self) -> &Logger {
        &self.logger
    }
}

/// The size [`reserve_fd_table`] has grown the fd table to so far (0: not yet).
static FD_TABLE_RESERVED: Mutex<usize> = Mutex::new(0);

/// Grows this process's fd table, once, so that fd numbers below `fds` fit without the kernel
/// growing it again. Later calls with a size not above an earlier one do nothing; the size is
/// capped below the soft `RLIMIT_NOFILE`.
///
/// Why: the kernel's fd table starts at 64 entries and doubles whenever an fd number does not
/// fit. While the process has one thread that is cheap; once it has more (vCPU threads, a
/// logger thread ...), each growth waits for an RCU grace period (`expand_fdtable` calls
/// `synchronize_rcu` when the table is shared), which takes milliseconds on a busy host. A
/// VMM that creates a vCPU fd per vCPU while other threads run (hot-add, or a boot while a
/// logger thread exists) would pay that at 64, 128, 256 ... fds. Growing the table once up
/// front pays it at most once. How: duplicate a descriptor to the lowest free number at or
/// above `fds - 1` (`F_DUPFD_CLOEXEC`, which never replaces an open fd), then close the
/// duplicate; the kernel never shrinks the table.
///
/// # Errors
///
/// The OS error of `fcntl` (e.g. `EMFILE`); the table is then only grown on demand.
pub fn reserve_fd_table(fds: usize) -> std::io::Result<()> {
    let mut reserved = FD_TABLE_RESERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if fds <= *reserved {
        return Ok(());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let cap = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    let fds = fds.min(cap);
    if fds <= *reserved || fds == 0 {
        return Ok(());
    }
    let lowest = libc::c_int::try_from(fds - 1).unwrap_or(libc::c_int::MAX);
    // Any open fd will do as the source; the process's standard streams may be closed, so
    // take one this function opens itself.
    let source = EventFd::new(EFD_NONBLOCK)?;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a valid fd only allocates a new descriptor.
    let dup = unsafe { libc::fcntl(source.as_raw_fd(), libc::F_DUPFD_CLOEXEC, lowest) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` was just allocated by fcntl above and nothing else knows it.
    unsafe { libc::close(dup) };
    *reserved = fds;
    Ok(())
}

/// Writes `bytes` at guest physical address `addr`; the error names the range that is not
/// guest RAM.
pub fn write_guest(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::GuestMemory {
            addr,
            len: bytes.len(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_ranges_skip_the_mmio_gap() {
        assert_eq!(
            memory_ranges(64 << 20).unwrap(),
            [(GuestAddress(0), 64 << 20)]
        );
        assert_eq!(
            memory_ranges(4 << 30).unwrap(),
            [
                (GuestAddress(0), 3 << 30),
                (GuestAddress(MMIO_GAP.end()), 1 << 30)
            ]
        );
        for bad in [0, 4096, (4 << 20) + 1] {
            assert!(matches!(
                memory_ranges(bad),
                Err(VmError::InvalidMemorySize { .. })
            ));
        }
    }
}
