//! Booting a Linux kernel: image loading, boot parameters, MP table, 64-bit entry.
//!
//! [`load_linux`] writes everything a 64-bit Linux kernel needs into guest memory, following
//! the Linux x86 boot protocol (`Documentation/arch/x86/boot.rst`), and returns a
//! [`LinuxBootEntry`], the [`BootEntry`] that puts the BSP at the kernel's 64-bit entry:
//! - the kernel, a bzImage or an ELF vmlinux ([`kernel`], with linux-loader), at 1 MiB or
//!   where the ELF says;
//! - an optional initrd, as high as the kernel's `initrd_addr_max`, the end of low RAM and the
//!   kernel's own footprint allow ([`params::place_initrd`]);
//! - the command line, checked against the kernel's `cmdline_size`;
//! - the zero page (`struct boot_params`) with an e820 map of guest memory
//!   ([`build_e820`]);
//! - the ACPI tables ([`setup_acpi`]: RSDP, XSDT, FADT, DSDT, and a MADT listing every
//!   possible vCPU, with Local x2APIC entries for APIC IDs above 254) in the BIOS area
//!   `0xE0000..0x100000`, announced in the zero page (`acpi_rsdp_addr`) and reserved in the
//!   e820 map;
//! - the MP table listing every possible vCPU ([`setup_mptable`]), in the EBDA, which the BIOS
//!   data area points to and the e820 map reserves, when every APIC ID fits its 8 bits (below
//!   255); with larger IDs there is none (the guest must use ACPI, and x2APIC);
//! - a GDT (`__BOOT_CS` 0x10, `__BOOT_DS` 0x18) and identity page tables for the first
//!   4 GiB ([`cpu`]).
//!
//! This module knows the boot protocol; the x86 pieces it writes (e820, MP table, GDT, page
//! tables, registers) come from [`crate::arch::x86_64`].
//!
//! The APs are not touched: the vCPU manager leaves them waiting for INIT/SIPI, which the
//! kernel sends when it brings them up. The console is the VM's 16550 at 0x3F8, whose IRQ 4
//! reaches the in-kernel irqchip through an irqfd on GSI 4 ([`crate::Vm::new`]); the MP table
//! wires ISA IRQ 4 to I/O APIC pin 4 to match. Memory layout: [`crate::arch::x86_64::layout`].
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmm_core::boot::{boot_cpus, load_linux, LinuxBootConfig};
//! use vmm_core::{build_vm, VcpuConfig, VcpuManagerOptions, VmOptions};
//!
//! # fn main() -> Result<(), vmm_core::VmmError> {
//! let kvm = kvm_ioctls::Kvm::new().map_err(vmm_core::VmError::KvmOpen)?;
//! let config = VcpuConfig::with_counts(2, 4)?;
//! let vm_options = VmOptions {
//!     memory_size: 256 << 20,
//!     serial_output: Box::new(std::io::stdout()),
//!     ..VmOptions::default()
//! };
//! let (vm, mut vcpus) = build_vm(kvm, vm_options, config.clone(), VcpuManagerOptions::default())?;
//! let mut boot = LinuxBootConfig::new("/boot/vmlinuz");
//! boot.cmdline = "console=ttyS0 noxsave".into();
//! let entry = load_linux(vm.memory(), &boot, &boot_cpus(&config)?)?;
//! vcpus.create_boot_vcpus(Arc::new(entry))?;
//! vcpus.start_boot_vcpus()?;
//! println!("{}", vcpus.run_until_exit()?);
//! # Ok(())
//! # }
//! ```

pub mod cpu;
pub mod kernel;
pub mod params;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::PathBuf;

use kvm_ioctls::VcpuFd;
use slog::{info, o, Logger};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

pub use crate::arch::x86_64::acpi::{setup_acpi, AcpiCpu, AcpiTable, AcpiTables};
pub use crate::arch::x86_64::e820::{build_e820, E820Entry, E820Type};
pub use crate::arch::x86_64::mptable::{setup_mptable, MpCpu};
pub use kernel::{KernelFormat, LoadedKernel};
pub use params::InitrdPlacement;

use crate::arch::x86_64::{e820, layout};
use crate::error::{BootError, VcpuSetupError};
use crate::vm::write_guest;
use crate::{BootEntry, VcpuConfig};

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxBootConfig {
    /// The kernel: a bzImage or an uncompressed 64-bit ELF vmlinux.
    pub kernel: PathBuf,
    /// An optional initrd (initramfs), loaded as is.
    pub initrd: Option<PathBuf>,
    /// The kernel command line, e.g. `console=ttyS0`.
    pub cmdline: String,
    /// Logger (default: discard).
    pub logger: Logger,
    /// Put the ACPI CPU hotplug objects for these device addresses into the DSDT
    /// ([`crate::acpi_hotplug`]; the devices themselves are registered with
    /// [`crate::acpi_hotplug::attach`]). `None` (the default): an empty DSDT.
    pub acpi_cpu_hotplug: Option<crate::acpi_hotplug::AcpiHotplugLayout>,
}

impl LinuxBootConfig {
    /// Boots `kernel` without initrd, with an empty command line.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            logger: Logger::root(slog::Discard, o!()),
            acpi_cpu_hotplug: None,
        }
    }
}

/// A loaded kernel, ready to run: the [`BootEntry`] for the BSP, plus what was placed where.
#[derive(Clone, Debug)]
pub struct LinuxBootEntry {
    /// The kernel as loaded (format, entry point, footprint).
    pub kernel: LoadedKernel,
    /// The zero page's address (`RSI` at the entry).
    pub zero_page: u64,
    /// Where the initrd went, if there is one.
    pub initrd: Option<InitrdPlacement>,
    /// The command line as written (without the NUL).
    pub cmdline: String,
    /// The e820 map given to the kernel.
    pub e820: Vec<E820Entry>,
    /// Every possible vCPU, as the MADT (and the MP table, if written) lists them.
    pub cpus: Vec<BootCpu>,
    /// The ACPI tables as written (the RSDP's address is also in the zero page).
    pub acpi: AcpiTables,
    /// Whether an MP table was written (only when every APIC ID is below 255).
    pub mptable: bool,
}

impl LinuxBootEntry {
    /// The kernel's 64-bit entry point.
    pub fn entry_point(&self) -> u64 {
        self.kernel.entry
    }
}

impl BootEntry for LinuxBootEntry {
    /// Long mode at CPL 0 with the boot GDT and identity paging, `RIP` = the 64-bit entry,
    /// `RSI` = the zero page, interrupts off.
    fn setup_bsp(&self, vcpu: &VcpuFd, _mem: &GuestMemoryMmap) -> Result<(), VcpuSetupError> {
        // The BSP is vCPU index 0, whose APIC ID is 0 in every topology.
        let regs = cpu::entry_regs(self.kernel.entry, self.zero_page);
        cpu::entry().apply(vcpu, 0, &regs)
    }
}

/// One possible vCPU for Linux boot: the MADT lists it (and the MP table too, when every
/// APIC ID fits 8 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BootCpu {
    /// Its APIC ID (= KVM vCPU id), any 32-bit value.
    pub apic_id: u32,
    /// Present at boot; the others are hotplug slots (MADT `Online Capable`, MP table
    /// disabled).
    pub enabled: bool,
    /// The bootstrap processor (exactly one, the first, and enabled).
    pub bsp: bool,
}

impl From<MpCpu> for BootCpu {
    fn from(c: MpCpu) -> Self {
        Self {
            apic_id: u32::from(c.apic_id),
            enabled: c.enabled,
            bsp: c.bsp,
        }
    }
}

impl BootCpu {
    /// The MP table's entry, if the APIC ID fits one (below 255).
    pub fn to_mp_cpu(self) -> Option<MpCpu> {
        let apic_id = u8::try_from(self.apic_id).ok().filter(|id| *id != 0xff)?;
        Some(MpCpu {
            apic_id,
            enabled: self.enabled,
            bsp: self.bsp,
        })
    }

    /// The MADT's entry.
    pub fn to_acpi_cpu(self) -> AcpiCpu {
        AcpiCpu {
            apic_id: self.apic_id,
            enabled: self.enabled,
        }
    }
}

/// Every possible vCPU of `config` in index order with its topology APIC ID, the boot vCPUs
/// enabled, vCPU 0 the BSP: what [`load_linux`] lists in the MADT (and in the MP table when
/// every APIC ID fits it). Any APIC ID the topology gives is accepted; the configuration's
/// validation ([`VcpuConfig::validate`]) holds them to KVM's limits.
///
/// # Errors
///
/// [`BootError::AcpiCpus`] if the topology cannot place a vCPU.
pub fn boot_cpus(config: &VcpuConfig) -> Result<Vec<BootCpu>, BootError> {
    placed_cpus(config).map_err(|reason| BootError::AcpiCpus { reason })
}

/// Every possible vCPU of `config` as [`boot_cpus`] lists it; on an error, why the topology
/// cannot place a vCPU.
fn placed_cpus(config: &VcpuConfig) -> Result<Vec<BootCpu>, String> {
    (0..config.max_vcpu_count)
        .map(|index| {
            let apic_id = config
                .topology
                .apic_id(index)
                .map_err(|e| format!("vCPU index {index}: {e}"))?;
            Ok(BootCpu {
                apic_id,
                enabled: index < config.boot_vcpu_count,
                bsp: index == 0,
            })
        })
        .collect()
}

/// The MP table's processors for `config`: every possible vCPU in index order with its
/// topology APIC ID, the boot vCPUs enabled, vCPU 0 the BSP.
///
/// # Errors
///
/// [`BootError::MpTableCpus`] if the topology cannot place a vCPU or gives it an APIC ID an
/// MP table cannot hold.
pub fn mp_cpus(config: &VcpuConfig) -> Result<Vec<MpCpu>, BootError> {
    let cpus = placed_cpus(config).map_err(|reason| BootError::MpTableCpus { reason })?;
    cpus.into_iter()
        .enumerate()
        .map(|(index, cpu)| {
            let apic_id = u8::try_from(cpu.apic_id)
                .ok()
                .filter(|id| *id != 0xff)
                .ok_or_else(|| BootError::MpTableCpus {
                    reason: format!(
                        "vCPU index {index} has APIC ID {}, which an MP table (8-bit \
                         xAPIC IDs, 255 = broadcast) cannot hold: use a smaller topology",
                        cpu.apic_id
                    ),
                })?;
            Ok(MpCpu {
                apic_id,
                enabled: cpu.enabled,
                bsp: cpu.bsp,
            })
        })
        .collect()
}

/// Loads the initrd at `path` as high as it may go, above `lowest`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
    lowest: u64,
    ram_end: u64,
    addr_max: u32,
) -> Result<InitrdPlacement, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let highest = ram_end.min(u64::from(addr_max) + 1);
    let placement = params::place_initrd(size, lowest, ram_end, addr_max).ok_or_else(|| {
        BootError::InitrdDoesNotFit {
            path: path.to_path_buf(),
            size,
            lowest,
            highest,
        }
    })?;
    // Fits in memory, so it fits in usize.
    let len = usize::try_from(size).map_err(|_| BootError::InitrdDoesNotFit {
        path: path.to_path_buf(),
        size,
        lowest,
        highest,
    })?;
    mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut file, len)
        .map_err(|e| BootError::InitrdRead {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(placement)
}

/// Writes the kernel, initrd, command line, zero page, ACPI tables and (when every APIC ID
/// fits 8 bits) MP table for `cpus`, GDT and page tables into `mem` (see the module
/// documentation), and returns the BSP's boot entry.
///
/// `cpus` lists every possible vCPU in index order, the BSP first: [`BootCpu`]s from
/// [`boot_cpus`] (any APIC IDs), or [`MpCpu`]s from [`mp_cpus`] (8-bit IDs).
///
/// # Errors
///
/// An unreadable kernel or initrd ([`BootError::KernelRead`], [`BootError::InitrdRead`]), a
/// file that is neither bzImage nor ELF ([`BootError::KernelFormat`]), a kernel without 64-bit
/// entry ([`BootError::KernelNot64Bit`]), memory too small for the kernel
/// ([`BootError::MemoryTooSmall`]), an initrd that does not fit
/// ([`BootError::InitrdDoesNotFit`]), a command line too long ([`BootError::CmdlineTooLong`])
/// or invalid ([`BootError::CmdlineInvalid`]), a bad CPU list ([`BootError::AcpiCpus`],
/// [`BootError::AcpiTablesTooLarge`], [`BootError::MpTableCpus`],
/// [`BootError::MpTableTooLarge`]).
pub fn load_linux<C: Copy + Into<BootCpu>>(
    mem: &GuestMemoryMmap,
    config: &LinuxBootConfig,
    cpus: &[C],
) -> Result<LinuxBootEntry, BootError> {
    let cpus: Vec<BootCpu> = cpus.iter().map(|c| (*c).into()).collect();
    let logger = config.logger.new(o!("component" => "linux_boot"));
    let e820 = build_e820(mem)?;
    let ram_end = e820::low_ram_end(&e820).ok_or(BootError::MemoryTooSmall {
        what: "the kernel (no RAM above 1 MiB)",
        needed: layout::HIGH_MEMORY_START + 1,
        available: layout::HIGH_MEMORY_START,
    })?;
    // The cheap checks first: nothing else is written if the CPU list is bad.
    let acpi_cpus: Vec<AcpiCpu> = cpus.iter().map(|c| c.to_acpi_cpu()).collect();
    let acpi = match config.acpi_cpu_hotplug {
        Some(layout) => {
            let aml = crate::acpi_hotplug::HotplugAml::new(&acpi_cpus, layout).map_err(|e| {
                BootError::AcpiCpus {
                    reason: e.to_string(),
                }
            })?;
            crate::arch::x86_64::acpi::setup_acpi_with(mem, &acpi_cpus, &[&aml])?
        }
        None => setup_acpi(mem, &acpi_cpus)?,
    };
    let mp_cpus: Option<Vec<MpCpu>> = cpus.iter().map(|c| c.to_mp_cpu()).collect();
    if let Some(mp_cpus) = &mp_cpus {
        setup_mptable(mem, mp_cpus)?;
    }
    let kernel = kernel::load_kernel(mem, &config.kernel, ram_end)?;
    let cmdline = params::check_cmdline(&config.cmdline, kernel.cmdline_limit())?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(
            mem,
            path,
            kernel.footprint_end,
            ram_end,
            kernel.initrd_addr_max(),
        )?),
        None => None,
    };
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline).map_err(
        |e| BootError::CmdlineInvalid {
            reason: e.to_string(),
        },
    )?;
    let cmdline = cmdline
        .as_cstring()
        .map_err(|e| BootError::CmdlineInvalid {
            reason: e.to_string(),
        })?
        .into_string()
        .unwrap_or_default();
    let mut zero_page = params::build_boot_params(&kernel, cmdline.len(), initrd, &e820)?;
    zero_page.acpi_rsdp_addr = acpi.rsdp_addr();
    write_guest(mem, layout::ZERO_PAGE_ADDR, zero_page.as_slice())?;
    // The BIOS data area: where the EBDA is, and the base memory below it in KiB.
    write_guest(
        mem,
        layout::BDA_EBDA_SEGMENT,
        &layout::EBDA_SEGMENT.to_le_bytes(),
    )?;
    write_guest(
        mem,
        layout::BDA_BASE_MEMORY_KB,
        &layout::BASE_MEMORY_KB.to_le_bytes(),
    )?;
    cpu::write_cpu_tables(mem)?;
    info!(logger, "Linux kernel loaded";
          "kernel" => %config.kernel.display(), "format" => %kernel.format,
          "entry" => format!("{:#x}", kernel.entry),
          "footprint_end" => format!("{:#x}", kernel.footprint_end),
          "initrd" => ?initrd, "cmdline" => &cmdline, "e820_entries" => e820.len(),
          "cpus" => cpus.len(), "rsdp" => format!("{:#x}", acpi.rsdp_addr()),
          "mptable" => mp_cpus.is_some());
    Ok(LinuxBootEntry {
        kernel,
        zero_page: layout::ZERO_PAGE_ADDR,
        initrd,
        cmdline,
        e820,
        cpus,
        acpi,
        mptable: mp_cpus.is_some(),
    })
}
