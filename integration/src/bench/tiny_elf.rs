//! The smallest kernel `vcpuctl boot` accepts: a 64-bit x86 ELF whose entry code writes the
//! shutdown port (0x600) and halts, so the VM stops as soon as the BSP runs. The `boot_process`
//! row boots it with N vCPUs: the APs never run (they wait for an INIT/SIPI nobody sends), so
//! the time from exec to exit is the VMM's cost of starting and stopping N vCPUs.
//!
//! The file: an ELF header, one program header (`PT_LOAD`, physical = virtual address
//! [`LOAD_ADDR`], the whole file), then the code. Linux's 64-bit boot protocol enters the ELF
//! entry at CPL 0 in long mode with identity paging; CPL-0 code is emulated on PVM hosts, which
//! costs nothing noticeable for three instructions.
//!
//! ```
//! let elf = integration::bench::tiny_elf::bytes();
//! assert_eq!(&elf[..4], b"\x7fELF");
//! ```

use std::path::Path;

/// Where the segment is loaded (and linked): 1 MiB, the lowest address Linux boot loads at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The entry code: `mov dx, 0x600; out dx, al; hlt; jmp <hlt>` (the loop only matters if the
/// port write did not stop the VM).
pub const CODE: [u8; 8] = [0x66, 0xba, 0x00, 0x06, 0xee, 0xf4, 0xeb, 0xfd];

const EHDR_SIZE: u16 = 64;
const PHDR_SIZE: u16 = 56;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PF_R_X: u32 = 0x5;

/// The file's bytes.
pub fn bytes() -> Vec<u8> {
    let code_offset = u64::from(EHDR_SIZE + PHDR_SIZE);
    let file_size = code_offset + CODE.len() as u64;
    let mut b = Vec::with_capacity(128);
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    b.extend_from_slice(b"\x7fELF");
    b.extend_from_slice(&[2, 1, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&ET_EXEC.to_le_bytes());
    b.extend_from_slice(&EM_X86_64.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // e_version
    b.extend_from_slice(&(LOAD_ADDR + code_offset).to_le_bytes()); // e_entry
    b.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    b.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    b.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    b.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    b.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    b.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // The program header: the whole file at LOAD_ADDR.
    b.extend_from_slice(&PT_LOAD.to_le_bytes());
    b.extend_from_slice(&PF_R_X.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    b.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    b.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    b.extend_from_slice(&file_size.to_le_bytes()); // p_filesz
    b.extend_from_slice(&file_size.to_le_bytes()); // p_memsz
    b.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    b.extend_from_slice(&CODE);
    b
}

/// Writes the tiny ELF to `path`.
///
/// # Errors
///
/// The I/O error of writing the file.
pub fn write(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut v = [0; 8];
        v.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(v)
    }

    #[test]
    fn one_load_segment_whose_entry_is_the_code() {
        let b = bytes();
        assert_eq!(b.len(), 128);
        assert_eq!(u16_at(&b, 0x12), EM_X86_64);
        assert_eq!(u16_at(&b, 0x38), 1, "one program header");
        let entry = u64_at(&b, 0x18);
        let phdr = &b[64..120];
        assert_eq!(
            u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]),
            PT_LOAD
        );
        let paddr = u64_at(phdr, 0x18);
        let filesz = u64_at(phdr, 0x20);
        assert_eq!(filesz, b.len() as u64);
        let code_at = usize::try_from(entry - paddr).unwrap();
        assert_eq!(&b[code_at..], CODE);
    }
}
