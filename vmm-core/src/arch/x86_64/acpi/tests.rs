//! The tables' bytes at the offsets of the ACPI specification. (ACPICA's `iasl -d` decodes
//! them in the `integration` crate's tests.)

use super::*;
use vm_memory::{Bytes, GuestAddress};

fn cpus(ids: &[u32], boot: usize) -> Vec<AcpiCpu> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| AcpiCpu {
            apic_id: *id,
            enabled: i < boot,
        })
        .collect()
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// The MADT's structures as (type, bytes).
fn structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = usize::from(madt[off + 1]);
        out.push((madt[off], madt[off..off + len].to_vec()));
        off += len;
    }
    assert_eq!(off, madt.len());
    out
}

#[test]
fn small_topology_gets_local_apic_entries_only() {
    let t = build_tables(&cpus(&[0, 1, 2, 4], 2), &[], ACPI_START).unwrap();
    let madt = &t.get("APIC").unwrap().bytes;
    assert_eq!(&madt[0..4], b"APIC");
    assert_eq!(madt[8], 5, "revision");
    assert_eq!(u32_at(madt, 4) as usize, madt.len());
    assert_eq!(sum(madt), 0);
    assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
    let s = structures(madt);
    let kinds: Vec<u8> = s.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, [0, 0, 0, 0, 1, 4]);
    // UID = index, APIC ID, flags: enabled, enabled, online capable, online capable.
    assert_eq!(s[0].1, [0, 8, 0, 0, 1, 0, 0, 0]);
    assert_eq!(s[1].1, [0, 8, 1, 1, 1, 0, 0, 0]);
    assert_eq!(s[3].1, [0, 8, 3, 4, 2, 0, 0, 0]);
    // The I/O APIC, ID one above the largest APIC ID, at 0xFEC00000, GSI base 0.
    assert_eq!(s[4].1, [1, 12, 5, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]);
    // LINT1 is NMI on every processor.
    assert_eq!(s[5].1, [4, 6, 0xff, 0, 0, 1]);
}

#[test]
fn ids_over_254_get_local_x2apic_entries() {
    let ids = [0, 1, 254, 255, 256, 0x1234];
    let t = build_tables(&cpus(&ids, 3), &[], ACPI_START).unwrap();
    let madt = &t.get("APIC").unwrap().bytes;
    assert_eq!(sum(madt), 0);
    let s = structures(madt);
    let kinds: Vec<u8> = s.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, [0, 0, 0, 9, 9, 9, 1, 4, 0xa]);
    assert_eq!(s[2].1, [0, 8, 2, 254, 1, 0, 0, 0]);
    // Type 9: reserved, x2APIC ID, flags, UID.
    let x2 = |id: u32, flags: u32, uid: u32| {
        let mut v = vec![9, 16, 0, 0];
        v.extend(id.to_le_bytes());
        v.extend(flags.to_le_bytes());
        v.extend(uid.to_le_bytes());
        v
    };
    assert_eq!(s[3].1, x2(255, 2, 3));
    assert_eq!(s[5].1, x2(0x1234, 2, 5));
    // No 8-bit ID is free above the largest APIC ID: the I/O APIC gets 0.
    assert_eq!(s[6].1[2], 0);
    assert_eq!(s[8].1, [0xa, 12, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
}

#[test]
fn tables_point_at_each_other_and_sum_to_zero() {
    let t = build_tables(&cpus(&[0, 1], 2), &[], ACPI_START).unwrap();
    let names: Vec<&str> = t.tables.iter().map(|t| t.signature.as_str()).collect();
    assert_eq!(names, ["RSD PTR ", "DSDT", "FACP", "APIC", "XSDT"]);
    let files: Vec<String> = t.tables.iter().map(AcpiTable::file_name).collect();
    assert_eq!(
        files,
        ["rsdp.dat", "dsdt.dat", "facp.dat", "apic.dat", "xsdt.dat"]
    );
    let rsdp = &t.tables[0];
    assert_eq!(rsdp.addr, ACPI_START);
    assert_eq!(rsdp.addr % 16, 0);
    assert_eq!(rsdp.bytes.len(), 36);
    assert_eq!(sum(&rsdp.bytes[..20]), 0);
    assert_eq!(sum(&rsdp.bytes), 0);
    assert_eq!(rsdp.bytes[15], 2, "revision");
    let xsdt = t.get("XSDT").unwrap();
    assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
    assert_eq!(sum(&xsdt.bytes), 0);
    assert_eq!(u64_at(&xsdt.bytes, 36), t.get("FACP").unwrap().addr);
    assert_eq!(u64_at(&xsdt.bytes, 44), t.get("APIC").unwrap().addr);
    let fadt = &t.get("FACP").unwrap().bytes;
    assert_eq!(sum(fadt), 0);
    assert_eq!(u32_at(fadt, 4) as usize, fadt.len());
    // X_DSDT at 140, flags at 112 with HW_REDUCED_ACPI (bit 20).
    assert_eq!(u64_at(fadt, 140), t.get("DSDT").unwrap().addr);
    assert_ne!(u32_at(fadt, 112) & (1 << 20), 0);
    let dsdt = &t.get("DSDT").unwrap().bytes;
    assert_eq!((dsdt.len(), sum(dsdt)), (36, 0));
    for w in t.tables.windows(2) {
        assert!(w[0].addr + w[0].bytes.len() as u64 <= w[1].addr);
        assert_eq!(w[1].addr % TABLE_ALIGN, 0);
    }
}

#[test]
fn dsdt_takes_the_callers_aml() {
    let name = acpi_tables::aml::Name::new("_S5_".into(), &acpi_tables::aml::ONE);
    let d = dsdt(&[&name]);
    assert!(d.len() > 36);
    assert_eq!(sum(&d), 0);
    assert_eq!(&d[36..41], &[0x08, b'_', b'S', b'5', b'_']);
}

#[test]
fn bad_cpu_lists_are_refused() {
    for (list, what) in [
        (cpus(&[], 0), "no vCPU"),
        (cpus(&[0, 1], 0), "BSP"),
        (cpus(&[0, 3, 3], 1), "twice"),
    ] {
        let e = build_tables(&list, &[], ACPI_START).unwrap_err();
        assert!(matches!(e, BootError::AcpiCpus { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
}

#[test]
fn written_where_a_guest_finds_them_and_1024_vcpus_fit() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let ids: Vec<u32> = (0..1024).collect();
    let t = setup_acpi(&mem, &cpus(&ids, 1)).unwrap();
    assert!(t.end() <= ACPI_END);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(ACPI_START)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    let madt = t.get("APIC").unwrap();
    assert_eq!(structures(&madt.bytes).len(), 1024 + 3);
    let mut back = vec![0u8; madt.bytes.len()];
    mem.read_slice(&mut back, GuestAddress(madt.addr)).unwrap();
    assert_eq!(back, madt.bytes);
    // 8192 vCPUs (Cloud Hypervisor's limit) still fit below 1 MiB; 9000 do not: a clear
    // error.
    let ids: Vec<u32> = (0..8192).collect();
    assert!(setup_acpi(&mem, &cpus(&ids, 1)).is_ok());
    let ids: Vec<u32> = (0..9000).collect();
    match setup_acpi(&mem, &cpus(&ids, 1)) {
        Err(e @ BootError::AcpiTablesTooLarge { cpus: 9000, .. }) => {
            assert!(e.to_string().contains("use fewer vCPUs"), "{e}");
        }
        other => panic!("{:?}", other.map(|t| t.end())),
    }
}
