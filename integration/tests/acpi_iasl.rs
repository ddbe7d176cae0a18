//! `vcpuctl acpi` for shapes under and over 255 vCPUs, checked with ACPICA's `iasl` (an
//! independent decoder): `iasl -d` decodes the DSDT, FADT, MADT and XSDT without an error or
//! a warning, and the decoded MADT has one processor entry per possible vCPU, in index order,
//! with the topology's APIC ID (computed here from the topology rules), the index as ACPI
//! processor UID, type 0 (Local APIC) for APIC IDs up to 254 and type 9 (Local x2APIC) above,
//! flags Enabled (1) for boot vCPUs and Online Capable (2) for the others; then the I/O APIC
//! and the NMI entries.
//!
//! The RSDP has no standard table header, so `iasl -d` does not take it as a file (it says
//! "does not contain a valid ACPI table", in every ACPICA version). It is checked the other way
//! round: `iasl` compiles an RSDP from its fields (with the XSDT address the decoded tables
//! agree on) and must produce exactly `rsdp.dat`, checksums included.
//!
//! Needs `iasl` (Debian package `acpica-tools`, installed by `.ci/run`): fails under
//! `CI=true` when missing, skipped loudly otherwise. No KVM needed.

use std::path::Path;
use std::time::Duration;

mod common;

use assert_cmd::Command;

/// (sockets, cores per socket, threads per core, boot vCPUs).
const SHAPES: &[(u32, u32, u32, u32)] = &[
    (2, 3, 2, 2),    // 12 vCPUs, sparse IDs up to 13
    (1, 254, 1, 4),  // IDs 0..=253: all type 0
    (1, 256, 1, 1),  // ID 255 is the first type-9 entry
    (2, 75, 2, 2),   // 300 vCPUs, socket 1 from APIC ID 256
    (3, 48, 2, 96),  // 288 vCPUs, IDs up to 383
    (1, 1024, 1, 1), // KVM's limit on this project's hosts
];

fn bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The topology's APIC ID of vCPU `i` (1 die per socket): thread, core, socket fields of
/// `ceil(log2(n))` bits.
fn apic_id((_, c, t, _): (u32, u32, u32, u32), i: u32) -> u32 {
    let (socket, core, thread) = (i / (c * t), (i / t) % c, i % t);
    socket << (bits(t) + bits(c)) | core << bits(t) | thread
}

/// Runs `iasl` with `args` in `dir`; returns stdout + stderr, panicking on failure, an error
/// or a warning.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let text = common::run_tool(dir, "iasl", args);
    // The compiler's summary line ("0 Errors, 0 Warnings") is the only one allowed to
    // name them.
    for line in text.lines().filter(|l| !l.contains("0 Errors, 0 Warnings")) {
        for bad in ["Error", "Warning", "Invalid", "does not contain"] {
            assert!(!line.contains(bad), "iasl {args:?} says {bad:?}:\n{text}");
        }
    }
    text
}

/// The value after `name :` on a line of iasl's data-table output.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (left, right) = line.split_once(" : ")?;
    left.trim_end()
        .ends_with(name)
        .then(|| right.split_whitespace().next().unwrap_or(""))
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_matches('"'), 16).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

/// One MADT subtable as iasl decoded it: its type and its fields (name, raw value).
#[derive(Debug, Default)]
struct Subtable {
    kind: u64,
    fields: Vec<(String, String)>,
}

impl Subtable {
    fn get(&self, name: &str) -> Option<u64> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| hex(v))
    }
}

/// The subtables of a decoded MADT (`apic.dsl`), up to the raw dump at its end.
fn madt_subtables(dsl: &str) -> Vec<Subtable> {
    let mut out: Vec<Subtable> = Vec::new();
    for line in dsl.lines() {
        if line.starts_with("Raw Table Data") {
            break;
        }
        if let Some(v) = field(line, "Subtable Type") {
            out.push(Subtable {
                kind: hex(v),
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if let Some((left, right)) = line.split_once(" : ") {
            if let Some(name) = left.split(']').nth(1) {
                let value = right.split_whitespace().next().unwrap_or("").to_owned();
                cur.fields.push((name.trim().to_owned(), value));
            }
        }
    }
    out
}

fn check(shape: (u32, u32, u32, u32)) {
    let (s, c, t, boot) = shape;
    let max = s * c * t;
    let smp = format!("{boot},maxcpus={max},sockets={s},cores={c},threads={t}");
    let (dir, report) = common::run_json_into_tempdir(
        &["acpi", "--json", "--smp", &smp],
        "--out",
        Duration::from_secs(60),
    );
    let over = (0..max).filter(|i| apic_id(shape, *i) > 254).count();
    assert_eq!(report["processors"], max, "{smp}");
    assert_eq!(report["x2apic_entries"], over as u64, "{smp}");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["apic.dat", "dsdt.dat", "facp.dat", "rsdp.dat", "xsdt.dat"],
        "{smp}"
    );

    for table in ["apic", "dsdt", "facp", "xsdt"] {
        iasl(dir.path(), &["-d", &format!("{table}.dat")]);
    }
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).expect(f);

    // The MADT: revision 5, one processor entry per possible vCPU.
    let apic = read("apic.dsl");
    assert!(
        apic.lines().any(|l| field(l, "Revision") == Some("05")),
        "{smp}: MADT revision"
    );
    let subs = madt_subtables(&apic);
    assert_eq!(
        subs.len(),
        max as usize + 2 + usize::from(over > 0),
        "{smp}"
    );
    for (i, sub) in (0u32..).zip(&subs[..max as usize]) {
        let id = u64::from(apic_id(shape, i));
        let flags = if i < boot { 1 } else { 2 };
        if id <= 254 {
            assert_eq!(sub.kind, 0, "{smp}: vCPU {i} (APIC ID {id}) entry type");
            assert_eq!(sub.get("Local Apic ID"), Some(id), "{smp}: vCPU {i}");
            assert_eq!(sub.get("Processor ID"), Some(u64::from(i)), "{smp}");
        } else {
            assert_eq!(sub.kind, 9, "{smp}: vCPU {i} (APIC ID {id}) entry type");
            assert_eq!(sub.get("Processor x2Apic ID"), Some(id), "{smp}: vCPU {i}");
            assert_eq!(sub.get("Processor UID"), Some(u64::from(i)), "{smp}");
        }
        assert_eq!(
            sub.get("Flags (decoded below)"),
            Some(flags),
            "{smp}: vCPU {i} flags"
        );
    }
    let rest = &subs[max as usize..];
    assert_eq!(rest[0].kind, 1, "{smp}: the I/O APIC");
    assert_eq!(rest[0].get("Address"), Some(0xfec0_0000), "{smp}");
    assert_eq!(rest[0].get("Interrupt"), Some(0), "{smp}: GSI base");
    assert_eq!(rest[1].kind, 4, "{smp}: Local APIC NMI");
    assert_eq!(rest[1].get("Processor ID"), Some(0xff), "{smp}");
    assert_eq!(rest[1].get("Interrupt Input LINT"), Some(1), "{smp}");
    if over > 0 {
        assert_eq!(rest[2].kind, 0xa, "{smp}: Local x2APIC NMI");
        assert_eq!(rest[2].get("Processor UID"), Some(0xffff_ffff), "{smp}");
        assert_eq!(rest[2].get("Interrupt Input LINT"), Some(1), "{smp}");
    }

    // The FADT: hardware-reduced; the XSDT lists the FADT and the MADT.
    let facp = read("facp.dsl");
    assert!(
        facp.lines()
            .any(|l| l.contains("Hardware Reduced (V5)") && l.trim_end().ends_with(": 1")),
        "{smp}: FADT not hardware-reduced:\n{facp}"
    );
    let xsdt = read("xsdt.dsl");
    let entries: Vec<u64> = xsdt
        .lines()
        .filter(|l| l.contains("ACPI Table Address"))
        .filter_map(|l| l.split_once(" : ").map(|(_, v)| hex(v.trim())))
        .collect();
    assert_eq!(entries.len(), 2, "{smp}: XSDT entries\n{xsdt}");

    // The RSDP: iasl compiles the same bytes from its fields.
    let xsdt_addr = report["rsdp_addr"].as_u64().unwrap();
    assert_eq!(xsdt_addr, 0xe0000, "{smp}: the RSDP's place");
    let rsdp = std::fs::read(dir.path().join("rsdp.dat")).unwrap();
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    // The tables follow the RSDP in the BIOS area, the XSDT last.
    assert!(
        entries.iter().all(|a| *a > 0xe0000 && *a < xsdt_addr),
        "{smp}"
    );
    let source = format!(
        "[0008] Signature : \"RSD PTR \"\n[0001] Checksum : 00\n[0006] Oem ID : \"VMMCOR\"\n\
         [0001] Revision : 02\n[0004] RSDT Address : 00000000\n[0004] Length : 00000024\n\
         [0008] XSDT Address : {xsdt_addr:016X}\n[0001] Extended Checksum : 00\n\
         [0003] Reserved : 000000\n"
    );
    let ref_dir = tempfile::tempdir().unwrap();
    std::fs::write(ref_dir.path().join("rsdp.asl"), source).unwrap();
    iasl(ref_dir.path(), &["rsdp.asl"]);
    let compiled = std::fs::read(ref_dir.path().join("rsdp.aml")).expect("iasl's rsdp.aml");
    assert_eq!(
        compiled, rsdp,
        "{smp}: rsdp.dat differs from what iasl compiles"
    );
}

#[test]
fn iasl_decodes_every_table_and_the_madt_lists_every_vcpu() {
    if !common::have_acpica_tool(
        "iasl",
        "iasl_decodes_every_table_and_the_madt_lists_every_vcpu",
    ) {
        return;
    }
    for &shape in SHAPES {
        check(shape);
    }
}

#[test]
fn acpi_needs_an_out_folder_and_a_valid_smp() {
    let out = Command::cargo_bin("vcpuctl")
        .unwrap()
        .args(["acpi", "--smp", "2,maxcpus=4"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--out is required");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("vcpuctl")
        .unwrap()
        .args(["acpi", "--smp", "2,maxcpus=5,cores=2", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a topology that is not 5 vCPUs");
}
