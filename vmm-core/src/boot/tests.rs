//! Loading synthetic kernels (a minimal bzImage header, a minimal ELF), every error case, the
//! zero page read back at the boot protocol's offsets, and the BSP's registers on real KVM.

use std::io::Write;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

/// Guest memory like `Vm::new` makes it (one region from 0).
fn mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

fn cpus(n: u8) -> Vec<MpCpu> {
    (0..n)
        .map(|i| MpCpu {
            apic_id: i,
            enabled: i == 0,
            bsp: i == 0,
        })
        .collect()
}

/// The fields of a synthetic bzImage's setup header.
struct FakeBzImage {
    version: u16,
    xloadflags: u16,
    cmdline_size: u32,
    initrd_addr_max: u32,
    pref_address: u64,
    init_size: u32,
    payload: Vec<u8>,
}

impl Default for FakeBzImage {
    fn default() -> Self {
        Self {
            version: 0x020f,
            xloadflags: 1,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            pref_address: 0x100_0000,
            init_size: 0x20_0000,
            payload: vec![0x90; 4096],
        }
    }
}

impl FakeBzImage {
    /// The file: one setup sector after the boot sector, then the payload. Offsets from the
    /// boot protocol's header layout.
    fn bytes(&self) -> Vec<u8> {
        let mut f = vec![0u8; 2 * 512];
        let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
        put(&mut f, 0x1f1, &[1]); // setup_sects
        put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
        put(&mut f, 0x202, b"HdrS");
        put(&mut f, 0x206, &self.version.to_le_bytes());
        put(&mut f, 0x211, &[1]); // loadflags: LOADED_HIGH
        put(&mut f, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut f, 0x22c, &self.initrd_addr_max.to_le_bytes());
        put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
        put(&mut f, 0x234, &[1]); // relocatable_kernel
        put(&mut f, 0x236, &self.xloadflags.to_le_bytes());
        put(&mut f, 0x238, &self.cmdline_size.to_le_bytes());
        put(&mut f, 0x258, &self.pref_address.to_le_bytes());
        put(&mut f, 0x260, &self.init_size.to_le_bytes());
        f.extend_from_slice(&self.payload);
        f
    }
}

/// A minimal ELF64 x86-64 executable: one PT_LOAD of `code` at `paddr`, entered there.
fn fake_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x40 + 0x38];
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    put(&mut f, 0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]); // 64-bit, LSB, version 1
    put(&mut f, 0x10, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 0x12, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut f, 0x14, &1u32.to_le_bytes());
    put(&mut f, 0x18, &paddr.to_le_bytes()); // e_entry
    put(&mut f, 0x20, &0x40u64.to_le_bytes()); // e_phoff
    put(&mut f, 0x34, &0x40u16.to_le_bytes()); // e_ehsize
    put(&mut f, 0x36, &0x38u16.to_le_bytes()); // e_phentsize
    put(&mut f, 0x38, &1u16.to_le_bytes()); // e_phnum
    let ph = 0x40;
    let data_off = (0x40 + 0x38) as u64;
    put(&mut f, ph, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut f, ph + 4, &7u32.to_le_bytes()); // RWX
    put(&mut f, ph + 0x08, &data_off.to_le_bytes()); // p_offset
    put(&mut f, ph + 0x10, &paddr.to_le_bytes()); // p_vaddr
    put(&mut f, ph + 0x18, &paddr.to_le_bytes()); // p_paddr
    put(&mut f, ph + 0x20, &(code.len() as u64).to_le_bytes()); // p_filesz
    put(&mut f, ph + 0x28, &memsz.to_le_bytes()); // p_memsz
    f.extend_from_slice(code);
    f
}

fn file_with(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

fn config(kernel: &Path, cmdline: &str) -> LinuxBootConfig {
    let mut c = LinuxBootConfig::new(kernel);
    c.cmdline = cmdline.into();
    c
}

fn read_u8(m: &GuestMemoryMmap, a: u64) -> u8 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn read_u16(m: &GuestMemoryMmap, a: u64) -> u16 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn read_u32(m: &GuestMemoryMmap, a: u64) -> u32 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn read_u64(m: &GuestMemoryMmap, a: u64) -> u64 {
    m.read_obj(GuestAddress(a)).unwrap()
}

#[test]
fn bzimage_zero_page_initrd_and_cmdline() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = file_with(&dir, "bzImage", &FakeBzImage::default().bytes());
    let initrd = file_with(&dir, "initrd", &[0xab; 5000]);
    let m = mem(32 << 20);
    let mut c = config(&kernel, "console=ttyS0 quiet");
    c.initrd = Some(initrd);
    let entry = load_linux(&m, &c, &cpus(2)).unwrap();
    assert_eq!(entry.kernel.format, KernelFormat::BzImage);
    assert_eq!(entry.entry_point(), 0x10_0200);
    // The payload is at code32_start.
    assert_eq!(read_u8(&m, 0x10_0000), 0x90);
    // The initrd: at the top of RAM, page aligned.
    let i = entry.initrd.unwrap();
    assert_eq!((i.addr, i.size), ((32 << 20) - 0x2000, 5000));
    assert_eq!(read_u8(&m, i.addr + 4999), 0xab);

    // The zero page, at the boot protocol's offsets.
    let zp = layout::ZERO_PAGE_ADDR;
    assert_eq!(entry.zero_page, zp);
    assert_eq!(read_u16(&m, zp + 0x1fe), 0xaa55, "boot_flag");
    assert_eq!(&read_u32(&m, zp + 0x202).to_le_bytes(), b"HdrS");
    assert_eq!(read_u8(&m, zp + 0x210), 0xff, "type_of_loader");
    assert_eq!(read_u32(&m, zp + 0x214), 0x10_0000, "code32_start");
    assert_eq!(u64::from(read_u32(&m, zp + 0x218)), i.addr, "ramdisk_image");
    assert_eq!(read_u32(&m, zp + 0x21c), 5000, "ramdisk_size");
    let cmd_ptr = u64::from(read_u32(&m, zp + 0x228));
    assert_eq!(cmd_ptr, layout::CMDLINE_ADDR);
    let mut cmd = vec![0u8; 20];
    m.read_slice(&mut cmd, GuestAddress(cmd_ptr)).unwrap();
    assert_eq!(&cmd, b"console=ttyS0 quiet\0");
    // e820: count at 0x1e8, 20-byte entries from 0x2d0.
    let n = read_u8(&m, zp + 0x1e8);
    let map: Vec<(u64, u64, u32)> = (0..u64::from(n))
        .map(|k| {
            let e = zp + 0x2d0 + 20 * k;
            (read_u64(&m, e), read_u64(&m, e + 8), read_u32(&m, e + 16))
        })
        .collect();
    assert_eq!(
        map,
        [
            (0, 0x9_e000, 1),
            (0x9_e000, 0x2000, 2),
            (0xe_0000, 0x2_0000, 2),
            (0x10_0000, (32 << 20) - 0x10_0000, 1)
        ]
    );
    assert_eq!(entry.e820.len(), 4);
    // The RSDP: in the zero page (acpi_rsdp_addr at 0x70) and where a scan finds it.
    assert_eq!(read_u64(&m, zp + 0x70), layout::ACPI_START);
    assert_eq!(&read_u64(&m, layout::ACPI_START).to_le_bytes(), b"RSD PTR ");
    assert_eq!(entry.acpi.rsdp_addr(), layout::ACPI_START);
    assert!(entry.mptable);
    // The BIOS data area points at the EBDA, where the MP floating pointer is.
    assert_eq!(u64::from(read_u16(&m, 0x40e)) << 4, layout::EBDA.start);
    assert_eq!(read_u16(&m, 0x413), 632);
    assert_eq!(&read_u32(&m, layout::EBDA.start).to_le_bytes(), b"_MP_");
}

#[test]
fn elf_vmlinux_is_entered_at_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = file_with(&dir, "vmlinux", &fake_elf(0x20_0000, &[0xf4; 16], 0x1000));
    let m = mem(8 << 20);
    let entry = load_linux(&m, &config(&kernel, "console=ttyS0"), &cpus(1)).unwrap();
    assert_eq!(entry.kernel.format, KernelFormat::Elf);
    assert_eq!(entry.entry_point(), 0x20_0000);
    assert_eq!(entry.kernel.footprint_end, 0x20_1000);
    assert_eq!(read_u8(&m, 0x20_000f), 0xf4);
    // A header made up for the kernel: magic, boot flag, loader, command line.
    let zp = layout::ZERO_PAGE_ADDR;
    assert_eq!(read_u16(&m, zp + 0x1fe), 0xaa55);
    assert_eq!(&read_u32(&m, zp + 0x202).to_le_bytes(), b"HdrS");
    assert_eq!(read_u8(&m, zp + 0x210), 0xff);
    assert_eq!(u64::from(read_u32(&m, zp + 0x228)), layout::CMDLINE_ADDR);
}

#[test]
fn missing_kernel_names_its_path() {
    let m = mem(8 << 20);
    let e = load_linux(
        &m,
        &config(Path::new("/nonexistent/vmlinuz-x"), ""),
        &cpus(1),
    )
    .unwrap_err();
    assert!(matches!(e, BootError::KernelRead { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/vmlinuz-x"), "{e}");
}

#[test]
fn a_directory_is_not_a_readable_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem(8 << 20);
    let e = load_linux(&m, &config(dir.path(), ""), &cpus(1)).unwrap_err();
    assert!(matches!(e, BootError::KernelRead { .. }), "{e}");
}

#[test]
fn neither_bzimage_nor_elf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem(8 << 20);
    for (name, bytes) in [
        ("text", b"#!/bin/sh\necho not a kernel\n".repeat(40)),
        ("empty", Vec::new()),
        ("elf32", {
            let mut e = fake_elf(0x20_0000, &[0x90], 0x1000);
            e[4] = 1; // ELFCLASS32
            e
        }),
    ] {
        let path = file_with(&dir, name, &bytes);
        let e = load_linux(&m, &config(&path, ""), &cpus(1)).unwrap_err();
        assert!(matches!(e, BootError::KernelFormat { .. }), "{name}: {e}");
        assert!(e.to_string().contains(name), "{e}");
    }
}

#[test]
fn bzimage_without_64_bit_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = mem(8 << 20);
    for fake in [
        FakeBzImage {
            xloadflags: 0,
            ..FakeBzImage::default()
        },
        FakeBzImage {
            version: 0x020b,
            ..FakeBzImage::default()
        },
    ] {
        let kernel = file_with(&dir, "bzImage", &fake.bytes());
        let e = load_linux(&m, &config(&kernel, ""), &cpus(1)).unwrap_err();
        assert!(matches!(e, BootError::KernelNot64Bit { .. }), "{e}");
    }
}

#[test]
fn memory_too_small_for_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    // Decompresses into 16 MiB + 64 MiB, like Debian's kernel; the VM has 32 MiB.
    let fake = FakeBzImage {
        init_size: 64 << 20,
        ..FakeBzImage::default()
    };
    let kernel = file_with(&dir, "bzImage", &fake.bytes());
    let e = load_linux(&mem(32 << 20), &config(&kernel, ""), &cpus(1)).unwrap_err();
    assert!(
        matches!(e, BootError::MemoryTooSmall { needed, available, .. }
            if needed == 80 << 20 && available == 32 << 20),
        "{e}"
    );
    assert!(e.to_string().contains("at least 80 MiB"), "{e}");
    // An ELF whose segment ends beyond RAM.
    let elf = file_with(&dir, "vmlinux", &fake_elf(0x20_0000, &[0x90], 16 << 20));
    let e = load_linux(&mem(8 << 20), &config(&elf, ""), &cpus(1)).unwrap_err();
    assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = file_with(&dir, "bzImage", &FakeBzImage::default().bytes());
    // The kernel needs up to 18 MiB; 20 MiB of RAM leaves 2 MiB.
    let initrd = file_with(&dir, "initrd.img", &vec![0u8; 3 << 20]);
    let mut c = config(&kernel, "");
    c.initrd = Some(initrd);
    let e = load_linux(&mem(20 << 20), &c, &cpus(1)).unwrap_err();
    assert!(
        matches!(e, BootError::InitrdDoesNotFit { size, lowest, highest, .. }
            if size == 3 << 20 && lowest == 18 << 20 && highest == 20 << 20),
        "{e}"
    );
    assert!(e.to_string().contains("initrd.img"), "{e}");
    // A missing initrd names its path.
    c.initrd = Some(dir.path().join("nope.img"));
    let e = load_linux(&mem(20 << 20), &c, &cpus(1)).unwrap_err();
    assert!(matches!(e, BootError::InitrdRead { .. }), "{e}");
    assert!(e.to_string().contains("nope.img"), "{e}");
}

#[test]
fn cmdline_longer_than_the_kernel_takes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBzImage {
        cmdline_size: 16,
        ..FakeBzImage::default()
    };
    let kernel = file_with(&dir, "bzImage", &fake.bytes());
    let m = mem(32 << 20);
    assert!(load_linux(&m, &config(&kernel, "console=ttyS0..."), &cpus(1)).is_ok());
    let e = load_linux(&m, &config(&kernel, "console=ttyS0 quiet"), &cpus(1)).unwrap_err();
    assert!(
        matches!(
            e,
            BootError::CmdlineTooLong {
                len: 19,
                limit: 16,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn debian_kernel_loads_if_present() {
    // Without KVM: only the loading (the boot is integration/tests/linux_boot.rs).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel/boot");
    let Some(kernel) = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    else {
        eprintln!(
            "(no Debian kernel in {}: loading test not run)",
            dir.display()
        );
        return;
    };
    let e = load_linux(&mem(64 << 20), &config(&kernel, ""), &cpus(1)).unwrap_err();
    assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
    let entry = load_linux(&mem(256 << 20), &config(&kernel, "console=ttyS0"), &cpus(1)).unwrap();
    assert_eq!(entry.kernel.format, KernelFormat::BzImage);
    assert_eq!(entry.entry_point(), 0x10_0200);
    assert!(entry.kernel.cmdline_limit() >= 255);
}

#[test]
fn bsp_registers_follow_the_64_bit_boot_protocol() {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            if std::env::var("VCPU_REQUIRE_KVM").is_ok_and(|v| v == "1") {
                panic!("VCPU_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!("SKIPPED (no /dev/kvm): bsp_registers_follow_the_64_bit_boot_protocol: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let kernel = file_with(&dir, "vmlinux", &fake_elf(0x20_0000, &[0xf4], 0x1000));
    let m = mem(8 << 20);
    let entry = load_linux(&m, &config(&kernel, ""), &cpus(1)).unwrap();
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    entry.setup_bsp(&vcpu, &m).unwrap();
    let r = vcpu.get_regs().unwrap();
    assert_eq!((r.rip, r.rsi), (0x20_0000, layout::ZERO_PAGE_ADDR));
    assert_eq!(r.rflags & (1 << 9), 0, "interrupts off");
    let s = vcpu.get_sregs().unwrap();
    assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (0x10, 1, 0));
    for seg in [s.ds, s.es, s.ss] {
        assert_eq!((seg.selector, seg.base, seg.limit), (0x18, 0, 0xffff_ffff));
    }
    assert_ne!(s.cr0 & (1 << 31), 0, "paging");
    assert_ne!(s.cr4 & (1 << 5), 0, "PAE");
    assert_eq!(s.efer & 0x500, 0x500, "LME|LMA");
    assert_eq!(
        s.cr3,
        crate::arch::x86_64::paging::IdentityMap::LINUX_BOOT.pml4
    );
    assert_eq!(s.gdt.base, layout::GDT_ADDR);
}

/// `boot` of `max` vCPUs on `sockets` x `cores` x `threads` (one die), default vPMU.
fn vcpu_config(boot: u32, max: u32, (sockets, cores, threads): (u32, u32, u32)) -> VcpuConfig {
    let topology = topology::CpuTopology::new(sockets, 1, cores, threads).unwrap();
    let smp = topology::SmpConfig::new(boot, max, topology).unwrap();
    VcpuConfig::from_smp(smp, Default::default())
}

#[test]
fn mp_cpus_follow_the_topology() {
    let config = vcpu_config(4, 12, (2, 3, 2));
    let cpus = mp_cpus(&config).unwrap();
    let ids: Vec<u8> = cpus.iter().map(|c| c.apic_id).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    assert_eq!(cpus.iter().filter(|c| c.enabled).count(), 4);
    assert!(cpus[0].bsp && cpus.iter().skip(1).all(|c| !c.bsp));
    // boot_cpus lists the same vCPUs with 32-bit IDs.
    let boot: Vec<BootCpu> = cpus.iter().map(|c| BootCpu::from(*c)).collect();
    assert_eq!(boot_cpus(&config).unwrap(), boot);
}

#[test]
fn apic_ids_over_254_get_acpi_tables_and_no_mp_table() {
    // 2 sockets x 75 cores x 2 threads: core field 7 bits, so socket 1 starts at APIC ID 256.
    let vcpus = vcpu_config(2, 300, (2, 75, 2));
    let cpus = boot_cpus(&vcpus).unwrap();
    assert_eq!(cpus.last().unwrap().apic_id, 256 + 74 * 2 + 1);
    assert!(mp_cpus(&vcpus).is_err());
    let dir = tempfile::tempdir().unwrap();
    let kernel = file_with(&dir, "bzImage", &FakeBzImage::default().bytes());
    let m = mem(32 << 20);
    let entry = load_linux(&m, &config(&kernel, ""), &cpus).unwrap();
    assert!(!entry.mptable);
    assert_ne!(&read_u32(&m, layout::EBDA.start).to_le_bytes(), b"_MP_");
    assert_eq!(
        read_u64(&m, layout::ZERO_PAGE_ADDR + 0x70),
        layout::ACPI_START
    );
    let madt = entry.acpi.get("APIC").unwrap();
    // 150 type-0 entries of 8 bytes, 150 type-9 entries of 16, I/O APIC, two NMI entries.
    assert_eq!(madt.bytes.len(), 44 + 150 * 8 + 150 * 16 + 12 + 6 + 12);
}
