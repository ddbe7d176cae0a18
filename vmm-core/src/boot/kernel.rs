//! Recognizing and loading a kernel image: a bzImage (Linux x86 boot protocol) or a 64-bit
//! ELF vmlinux, with linux-loader.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::HIGH_MEMORY_START;
use crate::error::BootError;

/// The kind of kernel image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFormat {
    /// A bzImage: real-mode setup, then a compressed protected-mode kernel that decompresses
    /// itself. Entered at its 64-bit entry (`code32_start + 0x200`).
    BzImage,
    /// An uncompressed 64-bit ELF `vmlinux`, entered at its ELF entry point (`startup_64`).
    Elf,
}

impl fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelFormat::BzImage => "bzImage",
            KernelFormat::Elf => "ELF vmlinux",
        })
    }
}

/// Boot-protocol constants of the setup header.
pub mod header {
    use std::mem::offset_of;

    use linux_loader::loader::bootparam::{boot_params, setup_header};

    consts! {
        MAGIC: u32 = 0x5372_6448, "`setup_header.header`: \"HdrS\".";
        BOOT_FLAG: u16 = 0xaa55, "`setup_header.boot_flag`.";
        OFFSET: u64 = offset_of!(boot_params, hdr) as u64, "Offset of the setup header in a bzImage (and in the zero page): 0x1f1.";
        MAGIC_OFFSET: usize = offset_of!(boot_params, hdr) + offset_of!(setup_header, header), "Offset of the \"HdrS\" magic in a bzImage: 0x202.";
        VERSION_XLOADFLAGS: u16 = 0x020c, "The first protocol version with `xloadflags` (2.12).";
        VERSION_INIT_SIZE: u16 = 0x020a, "The first protocol version with `pref_address` and `init_size` (2.10).";
        VERSION_CMDLINE_SIZE: u16 = 0x0206, "The first protocol version with `cmdline_size` (2.06).";
        XLF_KERNEL_64: u16 = 1 << 0, "`xloadflags`: the kernel has the 64-bit entry point at `code32_start + 0x200`.";
        LOADER_OTHER: u8 = 0xff, "`type_of_loader`: \"undefined\" boot loader.";
        ENTRY_64_OFFSET: u64 = 0x200, "The offset of the 64-bit entry from the protected-mode kernel's start.";
        DEFAULT_CMDLINE_SIZE: u32 = 2047, "The command line limit of kernels that do not say (`COMMAND_LINE_SIZE` - 1 on x86).";
        DEFAULT_INITRD_ADDR_MAX: u32 = 0x7fff_ffff, "Where initrds may go when the kernel does not say (`initrd_addr_max` of x86-64).";
    }
}

/// ELF identification and header fields we check before handing the file to linux-loader:
/// the values of the ELF specification as linux-loader defines them, the offsets and sizes
/// of its `repr(C)` ELF64 headers.
mod elf {
    use std::mem::{offset_of, size_of};

    use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr};
    pub use linux_loader::elf::{
        EI_CLASS as OFF_CLASS, EI_DATA as OFF_DATA, ELFCLASS64 as CLASS_64,
        ELFDATA2LSB as DATA_LSB, ELFMAG as MAGIC, EM_X86_64 as MACHINE_X86_64, PT_LOAD,
    };

    pub const OFF_MACHINE: usize = offset_of!(Elf64_Ehdr, e_machine);
    pub const OFF_PHOFF: usize = offset_of!(Elf64_Ehdr, e_phoff);
    pub const OFF_PHENTSIZE: usize = offset_of!(Elf64_Ehdr, e_phentsize);
    pub const OFF_PHNUM: usize = offset_of!(Elf64_Ehdr, e_phnum);
    pub const HEADER_SIZE: usize = size_of::<Elf64_Ehdr>();
    pub const PHDR_SIZE: usize = size_of::<Elf64_Phdr>();
    /// Offsets in a program header.
    pub const PH_TYPE: usize = offset_of!(Elf64_Phdr, p_type);
    pub const PH_PADDR: usize = offset_of!(Elf64_Phdr, p_paddr);
    pub const PH_FILESZ: usize = offset_of!(Elf64_Phdr, p_filesz);
    pub const PH_MEMSZ: usize = offset_of!(Elf64_Phdr, p_memsz);
}
// The sizes the checks and messages below rely on.
const _: () = assert!(elf::HEADER_SIZE == 0x40 && elf::PHDR_SIZE == 56);
const _: () = assert!(header::OFFSET == 0x1f1 && header::MAGIC_OFFSET == 0x202);

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// What the file was.
    pub format: KernelFormat,
    /// The 64-bit entry point (physical; paging is identity-mapped at entry).
    pub entry: u64,
    /// Where the image was loaded.
    pub load_addr: u64,
    /// The end (exclusive) of the loaded image.
    pub image_end: u64,
    /// The end (exclusive) of the memory the kernel needs while it starts: for a bzImage,
    /// `pref_address + init_size` (where it decompresses itself), for an ELF the end of its
    /// last segment in memory. The initrd goes above this.
    pub footprint_end: u64,
    /// The bzImage's setup header (with `code32_start` as loaded); `None` for an ELF.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// The most bytes of command line the kernel takes (without the NUL).
    pub fn cmdline_limit(&self) -> u32 {
        match &self.setup_header {
            Some(h) if h.version >= header::VERSION_CMDLINE_SIZE => h.cmdline_size,
            Some(_) => 255,
            None => header::DEFAULT_CMDLINE_SIZE,
        }
    }

    /// The highest address the initrd may occupy (inclusive).
    pub fn initrd_addr_max(&self) -> u32 {
        match &self.setup_header {
            Some(h) if h.initrd_addr_max != 0 => h.initrd_addr_max,
            _ => header::DEFAULT_INITRD_ADDR_MAX,
        }
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::KernelRead {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads up to `buf.len()` bytes from the start of `file`; returns how many.
fn read_prefix(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    file.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Tells a bzImage from a 64-bit x86 ELF by their magic numbers; anything else is refused.
///
/// # Errors
///
/// [`BootError::KernelRead`] if the file cannot be read, [`BootError::KernelFormat`] if it is
/// neither.
pub fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; header::MAGIC_OFFSET + 4];
    let n = read_prefix(file, &mut head).map_err(read_err(path))?;
    let head = &head[..n];
    if head.starts_with(elf::MAGIC) {
        let is_x86_64 = head.len() >= elf::HEADER_SIZE
            && head[elf::OFF_CLASS] == elf::CLASS_64
            && head[elf::OFF_DATA] == elf::DATA_LSB
            && u16_at(head, elf::OFF_MACHINE) == elf::MACHINE_X86_64;
        return if is_x86_64 {
            Ok(KernelFormat::Elf)
        } else {
            Err(BootError::KernelFormat {
                path: path.to_path_buf(),
                detail: "an ELF file, but not 64-bit little-endian x86-64",
            })
        };
    }
    if head.len() == header::MAGIC_OFFSET + 4 && u32_at(head, header::MAGIC_OFFSET) == header::MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::KernelFormat {
        path: path.to_path_buf(),
        detail: "neither an ELF magic at offset 0 nor the bzImage magic \"HdrS\" at 0x202",
    })
}

/// Reads a bzImage's setup header (at 0x1f1).
fn read_setup_header(path: &Path, file: &mut File) -> Result<setup_header, BootError> {
    let mut hdr = setup_header::default();
    file.seek(SeekFrom::Start(header::OFFSET))
        .and_then(|_| file.read_exact(hdr.as_mut_slice()))
        .map_err(read_err(path))?;
    Ok(hdr)
}

/// The end (exclusive) of the memory a bzImage needs: its payload at `code32_start`, and
/// (protocol 2.10+) `init_size` bytes from `pref_address`, where it decompresses itself.
fn bzimage_footprint(hdr: &setup_header, file_len: u64) -> u64 {
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let payload = file_len.saturating_sub((setup_sects + 1) * 512);
    let image_end = u64::from(hdr.code32_start).saturating_add(payload);
    if hdr.version >= header::VERSION_INIT_SIZE {
        let pref = hdr.pref_address.max(u64::from(hdr.code32_start));
        image_end.max(pref.saturating_add(u64::from(hdr.init_size)))
    } else {
        image_end
    }
}

/// The end (exclusive) of the highest `PT_LOAD` segment of an ELF64 file, in physical memory.
fn elf_footprint(path: &Path, file: &mut File) -> Result<u64, BootError> {
    let mut ehdr = [0u8; elf::HEADER_SIZE];
    let n = read_prefix(file, &mut ehdr).map_err(read_err(path))?;
    let bad = |detail| BootError::KernelFormat {
        path: path.to_path_buf(),
        detail,
    };
    if n < elf::HEADER_SIZE {
        return Err(bad("an ELF file shorter than its header"));
    }
    let phoff = u64_at(&ehdr, elf::OFF_PHOFF);
    let phentsize = usize::from(u16_at(&ehdr, elf::OFF_PHENTSIZE));
    let phnum = usize::from(u16_at(&ehdr, elf::OFF_PHNUM));
    if phentsize != elf::PHDR_SIZE {
        return Err(bad("an ELF file whose program header size is not 56"));
    }
    // At most 65535 * 56 bytes (u16 count): bounded.
    let mut phdrs = vec![0u8; phnum * phentsize];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(read_err(path))?;
    let mut end = 0u64;
    for ph in phdrs.chunks_exact(phentsize) {
        let p_type = u32_at(ph, elf::PH_TYPE);
        let p_paddr = u64_at(ph, elf::PH_PADDR);
        let p_filesz = u64_at(ph, elf::PH_FILESZ);
        let p_memsz = u64_at(ph, elf::PH_MEMSZ);
        if p_type == elf::PT_LOAD && p_filesz != 0 {
            end = end.max(p_paddr.saturating_add(p_memsz));
        }
    }
    if end == 0 {
        return Err(bad("an ELF file without loadable segments"));
    }
    Ok(end)
}

/// Loads the kernel at `path` into `mem`, whose RAM from 1 MiB ends at `ram_end`.
///
/// Checks before writing anything that the kernel fits: a bzImage needs room for its
/// decompression (`pref_address + init_size`), an ELF for its segments.
///
/// # Errors
///
/// [`BootError::KernelRead`], [`BootError::KernelFormat`], [`BootError::KernelNot64Bit`],
/// [`BootError::MemoryTooSmall`] if it does not fit, [`BootError::KernelLoad`] if
/// linux-loader refuses it.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    ram_end: u64,
) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(read_err(path))?;
    let file_len = file.metadata().map_err(read_err(path))?.len();
    let format = detect_format(path, &mut file)?;
    let too_small = |needed| BootError::MemoryTooSmall {
        what: "the kernel",
        needed,
        available: ram_end,
    };
    let load_err = |source| BootError::KernelLoad {
        path: path.to_path_buf(),
        format,
        source,
    };
    match format {
        KernelFormat::BzImage => {
            let hdr = read_setup_header(path, &mut file)?;
            if hdr.version < header::VERSION_XLOADFLAGS
                || hdr.xloadflags & header::XLF_KERNEL_64 == 0
            {
                return Err(BootError::KernelNot64Bit {
                    path: path.to_path_buf(),
                    version: hdr.version,
                    xloadflags: hdr.xloadflags,
                });
            }
            let footprint_end = bzimage_footprint(&hdr, file_len);
            if footprint_end > ram_end {
                return Err(too_small(footprint_end));
            }
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
                .map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + header::ENTRY_64_OFFSET,
                load_addr: r.kernel_load.0,
                image_end: r.kernel_end,
                footprint_end,
                setup_header: r.setup_header,
            })
        }
        KernelFormat::Elf => {
            let footprint_end = elf_footprint(path, &mut file)?;
            if footprint_end > ram_end {
                return Err(too_small(footprint_end));
            }
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
                .map_err(load_err)?;
            if r.kernel_load.0 >= ram_end {
                return Err(BootError::KernelFormat {
                    path: path.to_path_buf(),
                    detail: "an ELF file whose entry point is not a physical address in RAM",
                });
            }
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                load_addr: r.kernel_load.0,
                image_end: r.kernel_end,
                footprint_end: footprint_end.max(r.kernel_end),
                setup_header: None,
            })
        }
    }
}
