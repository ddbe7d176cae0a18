//! The zero page (`struct boot_params`), the command line and the initrd's place.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::boot_params;

use super::kernel::{header, LoadedKernel};
use crate::arch::x86_64::e820::E820Entry;
use crate::arch::x86_64::layout::{const_u32, CMDLINE_ADDR, CMDLINE_AREA_SIZE};
use crate::error::BootError;

/// Page size, the initrd's alignment.
const PAGE_SIZE: u64 = 4096;

/// The most bytes of command line (without its NUL) that fit the VMM's command line area.
pub const CMDLINE_AREA_LIMIT: u64 = CMDLINE_AREA_SIZE - 1;

/// [`CMDLINE_AREA_LIMIT`] as a length.
const AREA_LIMIT: usize = const_u32(CMDLINE_AREA_LIMIT) as usize;

/// Checks `cmdline` against the kernel's limit (`cmdline_limit`, without the NUL) and the
/// VMM's area, and returns it as linux-loader's [`Cmdline`].
///
/// # Errors
///
/// [`BootError::CmdlineTooLong`] over either limit, [`BootError::CmdlineInvalid`] for
/// characters a command line cannot carry.
pub fn check_cmdline(cmdline: &str, cmdline_limit: u32) -> Result<Cmdline, BootError> {
    let kernel_limit = usize::try_from(cmdline_limit).unwrap_or(usize::MAX);
    let (limit, limited_by) = if kernel_limit <= AREA_LIMIT {
        (kernel_limit, "the kernel's cmdline_size")
    } else {
        (AREA_LIMIT, "the VMM's command line area")
    };
    if cmdline.len() > limit {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            limit,
            limited_by,
        });
    }
    if let Some(pos) = cmdline.find(|c: char| !(' '..='~').contains(&c)) {
        return Err(BootError::CmdlineInvalid {
            reason: format!(
                "character {:?} at byte {pos} is not printable ASCII",
                cmdline[pos..].chars().next().unwrap_or('?')
            ),
        });
    }
    // The length was checked above; limit + 1 leaves room for the NUL.
    Cmdline::try_from(cmdline, limit + 1).map_err(|e| BootError::CmdlineInvalid {
        reason: e.to_string(),
    })
}

/// Where an initrd goes in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Its first byte (page aligned).
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// The highest page-aligned place for `size` bytes that ends at or below both `ram_end` and
/// `addr_max + 1` and starts at or above `lowest`; `None` if there is none.
pub fn place_initrd(
    size: u64,
    lowest: u64,
    ram_end: u64,
    addr_max: u32,
) -> Option<InitrdPlacement> {
    let top = ram_end.min(u64::from(addr_max) + 1);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    let lowest = lowest.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (addr >= lowest).then_some(InitrdPlacement { addr, size })
}

/// The zero page for `kernel` with the command line at [`CMDLINE_ADDR`] (`cmdline_len` bytes
/// without the NUL), the optional initrd and the e820 map (at most 128 entries, as
/// [`super::build_e820`] makes it).
///
/// # Errors
///
/// [`BootError::ZeroPageField`] if the command line length or the initrd's place does not
/// fit its 32-bit field, [`BootError::TooManyE820Entries`] for an e820 map over 128 entries.
pub fn build_boot_params(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    let field32 = |field, value: u64| {
        u32::try_from(value).map_err(|_| BootError::ZeroPageField { field, value })
    };
    let mut params = boot_params::default();
    match kernel.setup_header {
        // A bzImage: its own header, as the protocol asks, with our fields filled in.
        Some(hdr) => params.hdr = hdr,
        // An ELF vmlinux has no header: make the fields the kernel reads valid.
        None => {
            params.hdr.boot_flag = header::BOOT_FLAG;
            params.hdr.header = header::MAGIC;
            params.hdr.kernel_alignment = 0x100_0000;
            let len = u64::try_from(cmdline_len).unwrap_or(u64::MAX);
            params.hdr.cmdline_size = field32("cmdline_size", len)?;
        }
    }
    params.hdr.type_of_loader = header::LOADER_OTHER;
    params.hdr.cmd_line_ptr = const { const_u32(CMDLINE_ADDR) };
    if let Some(i) = initrd {
        // Below 4 GiB when placed by `place_initrd` (initrd_addr_max is a u32).
        params.hdr.ramdisk_image = field32("ramdisk_image", i.addr)?;
        params.hdr.ramdisk_size = field32("ramdisk_size", i.size)?;
    }
    let too_many = BootError::TooManyE820Entries {
        count: e820.len(),
        max: params.e820_table.len(),
    };
    if e820.len() > params.e820_table.len() {
        return Err(too_many);
    }
    params.e820_entries = u8::try_from(e820.len()).map_err(|_| too_many)?;
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = e.to_boot_entry();
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline("console=ttyS0", 2047).is_ok());
        let long = "x".repeat(2048);
        let e = check_cmdline(&long, 2047).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::CmdlineTooLong {
                    len: 2048,
                    limit: 2047,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("cmdline_size"), "{e}");
        // A kernel that takes more than our area: our area limits.
        let huge = "x".repeat(usize::try_from(CMDLINE_AREA_SIZE).unwrap());
        let e = check_cmdline(&huge, u32::MAX).unwrap_err();
        assert!(e.to_string().contains("command line area"), "{e}");
        let e = check_cmdline("a\0b", 2047).unwrap_err();
        assert!(matches!(e, BootError::CmdlineInvalid { .. }), "{e}");
    }

    #[test]
    fn initrd_goes_as_high_as_allowed() {
        // 256 MiB of RAM, the kernel up to 80 MiB, initrd_addr_max far above.
        let p = place_initrd(0x1234, 80 << 20, 256 << 20, 0x7fff_ffff).unwrap();
        assert_eq!(p.addr, (256 << 20) - 0x2000);
        assert!(p.addr + p.size <= 256 << 20);
        // initrd_addr_max below the end of RAM (inclusive limit).
        let p = place_initrd(0x1000, 0, 256 << 20, (128 << 20) - 1).unwrap();
        assert_eq!(p.addr + p.size, 128 << 20);
        // Does not fit above the kernel.
        assert_eq!(
            place_initrd(200 << 20, 80 << 20, 256 << 20, 0x7fff_ffff),
            None
        );
        assert_eq!(place_initrd(u64::MAX, 0, 256 << 20, 0x7fff_ffff), None);
    }
}
