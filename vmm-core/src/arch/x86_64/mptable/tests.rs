//! The bytes are checked by a parser written from the MP specification 1.4's layout
//! (offsets as numbers), not with the writer's structs.

use super::*;
use vm_memory::{Bytes, GuestAddress};

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
}

#[derive(Debug, Default, PartialEq)]
struct Parsed {
    cpus: Vec<(u8, u8, u8)>,                    // apic id, version, flags
    buses: Vec<(u8, Vec<u8>)>,                  // id, type
    ioapics: Vec<(u8, u8, u8, u32)>,            // id, version, flags, addr
    io_ints: Vec<(u8, u16, u8, u8, u8, u8)>,    // type, flags, bus, irq, ioapic, pin
    local_ints: Vec<(u8, u16, u8, u8, u8, u8)>, // type, flags, bus, irq, lapic, lint
    lapic_addr: u32,
    oem: Vec<u8>,
    product: Vec<u8>,
}

/// Finds `_MP_` on a 16-byte boundary in `base..base+len`, checks both structures and
/// decodes every entry.
fn parse(mem: &GuestMemoryMmap, base: u64, len: usize) -> Parsed {
    let area = read(mem, base, len);
    let off = (0..len)
        .step_by(16)
        .find(|o| &area[*o..*o + 4] == b"_MP_")
        .expect("no _MP_ signature on a 16-byte boundary");
    let mpf = &area[off..off + 16];
    assert_eq!(mpf[8], 1, "floating pointer length (paragraphs)");
    assert_eq!(mpf[9], 4, "spec revision 1.4");
    assert_eq!(sum(mpf), 0, "floating pointer checksum");
    assert_eq!(
        mpf[11], 0,
        "feature byte 1: a configuration table is present"
    );
    assert_eq!(mpf[12] & 0x80, 0, "IMCRP clear: virtual wire mode");
    let table_addr = u64::from(le32(mpf, 4));
    let hdr = read(mem, table_addr, 44);
    assert_eq!(&hdr[0..4], b"PCMP");
    let base_len = usize::from(le16(&hdr, 4));
    assert_eq!(hdr[6], 4, "table spec revision");
    let table = read(mem, table_addr, base_len);
    assert_eq!(sum(&table), 0, "configuration table checksum");
    assert_eq!(le16(&hdr, 40), 0, "no extended table");
    let count = le16(&hdr, 34);
    let mut p = Parsed {
        lapic_addr: le32(&hdr, 36),
        oem: hdr[8..16].to_vec(),
        product: hdr[16..28].to_vec(),
        ..Parsed::default()
    };
    let mut o = 44;
    for _ in 0..count {
        let e = &table[o..];
        match e[0] {
            0 => {
                p.cpus.push((e[1], e[2], e[3]));
                o += 20;
            }
            1 => {
                p.buses.push((e[1], e[2..8].to_vec()));
                o += 8;
            }
            2 => {
                p.ioapics.push((e[1], e[2], e[3], le32(e, 4)));
                o += 8;
            }
            3 => {
                p.io_ints.push((e[1], le16(e, 2), e[4], e[5], e[6], e[7]));
                o += 8;
            }
            4 => {
                p.local_ints
                    .push((e[1], le16(e, 2), e[4], e[5], e[6], e[7]));
                o += 8;
            }
            t => panic!("unknown entry type {t} at offset {o}"),
        }
    }
    assert_eq!(o, base_len, "entries fill the base table exactly");
    p
}

/// 2 sockets x 3 cores x 2 threads: APIC IDs 0-5 and 8-13; 4 boot vCPUs.
fn sparse_cpus() -> Vec<MpCpu> {
    let ids = [0u8, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13];
    ids.iter()
        .enumerate()
        .map(|(i, id)| MpCpu {
            apic_id: *id,
            enabled: i < 4,
            bsp: i == 0,
        })
        .collect()
}

#[test]
fn structure_sizes_follow_the_spec() {
    assert_eq!(mptable_size(1), 16 + 44 + 20 + 8 + 8 + 16 * 8 + 2 * 8);
}

#[test]
fn table_lists_every_possible_cpu_and_the_irqchip() {
    let m = mem();
    let cpus = sparse_cpus();
    setup_mptable(&m, &cpus).unwrap();
    // Linux looks in the EBDA; search all of it.
    let p = parse(&m, 0x9_e000, 0x2000);
    let expect_cpus: Vec<(u8, u8, u8)> = [0u8, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let flags = match i {
                0 => 0b11,
                1..=3 => 0b01,
                _ => 0b00,
            };
            (*id, 0x14, flags)
        })
        .collect();
    assert_eq!(p.cpus, expect_cpus);
    assert_eq!(p.buses, [(0, b"ISA   ".to_vec())]);
    assert_eq!(p.ioapics, [(14, 0x11, 1, 0xfec0_0000)]);
    let expect_ints: Vec<_> = (0..16u8).map(|i| (0, 0, 0, i, 14, i)).collect();
    assert_eq!(p.io_ints, expect_ints);
    assert_eq!(p.local_ints, [(3, 0, 0, 0, 0xff, 0), (1, 0, 0, 0, 0xff, 1)]);
    assert_eq!(p.lapic_addr, 0xfee0_0000);
    assert_eq!(p.oem, b"VMMCORE ");
    assert_eq!(p.product, b"KVM VCPU MGR");
}

#[test]
fn largest_xapic_table_fits_the_ebda() {
    let cpus: Vec<MpCpu> = (0..254u8)
        .map(|id| MpCpu {
            apic_id: id,
            enabled: id == 0,
            bsp: id == 0,
        })
        .collect();
    let m = mem();
    setup_mptable(&m, &cpus).unwrap();
    let p = parse(&m, 0x9_e000, 0x2000);
    assert_eq!(p.cpus.len(), 254);
    assert_eq!(p.ioapics[0].0, 254);
}

#[test]
fn bad_cpu_lists_are_refused() {
    let m = mem();
    let cpu = |apic_id, enabled, bsp| MpCpu {
        apic_id,
        enabled,
        bsp,
    };
    let cases: Vec<(Vec<MpCpu>, &str)> = vec![
        (vec![], "empty"),
        (vec![cpu(0, true, false)], "0 CPUs are flagged"),
        (
            vec![cpu(0, true, true), cpu(1, true, true)],
            "2 CPUs are flagged",
        ),
        (vec![cpu(0, false, true)], "not enabled"),
        (
            vec![cpu(0, true, true), cpu(0, false, false)],
            "listed twice",
        ),
        (
            vec![cpu(0, true, true), cpu(255, false, false)],
            "broadcast",
        ),
        (vec![cpu(0, true, true), cpu(254, false, false)], "I/O APIC"),
    ];
    for (cpus, msg) in cases {
        let e = setup_mptable(&m, &cpus).unwrap_err();
        assert!(matches!(e, BootError::MpTableCpus { .. }), "{e}");
        assert!(e.to_string().contains(msg), "{e} should mention {msg:?}");
    }
}
