//! The ACPI CPU hotplug AML checked with ACPICA, an independent implementation:
//! - `iasl -d` decodes the DSDT without an error or a warning, with one `ACPI0007` processor
//!   device per possible vCPU (`_UID` = index, `_STA`, `_MAT`, `_EJ0` on all but the BSP),
//!   the GED (`ACPI0013`) with its `_EVT` and the scan method;
//! - `acpiexec` loads it without errors and evaluates each chosen processor's `_STA` and
//!   `_MAT`, with the controller's registers simulated by acpiexec: a register image taken
//!   from a real [`CpuHotplugController`] (after a hot-add, the selected CPU's `STAT` byte) is
//!   written into the simulated region by a small SSDT before each evaluation. `_STA` must be
//!   0xF for a hot-added CPU and 0 for a not-present one; `_MAT` must be the CPU's MADT entry
//!   (type 0 up to APIC ID 254, type 9 above, UID = index) with the flags Enabled for the
//!   hot-added CPU and Online Capable, as the MADT says, for the absent one.
//!
//! Needs `iasl` and `acpiexec` (Debian package `acpica-tools`): fails under `CI=true` when
//! missing, skipped loudly otherwise. No KVM needed.

mod common;

use common::{have_acpica_tool, run_tool};
use vmm_core::acpi_hotplug::{regs, AcpiHotplugLayout, CpuHotplugController, HotplugAml};
use vmm_core::arch::x86_64::acpi::{build_tables, AcpiCpu};
use vmm_core::arch::x86_64::layout::ACPI_START;
use vmm_core::{BusAccess, BusDevice};

/// The vCPUs of `sockets` x `cores` (1 thread, 1 die), APIC IDs from the topology rule
/// (core bits = ceil(log2(cores))), the first `boot` present.
fn cpus(sockets: u32, cores: u32, boot: u32) -> Vec<AcpiCpu> {
    let bits = if cores <= 1 {
        0
    } else {
        32 - (cores - 1).leading_zeros()
    };
    (0..sockets * cores)
        .map(|i| AcpiCpu {
            apic_id: ((i / cores) << bits) | (i % cores),
            enabled: i < boot,
        })
        .collect()
}

/// The MADT processor entry of vCPU `index` with `flags`, as ACPI lays it out.
fn madt_entry(index: u32, apic_id: u32, flags: u32) -> Vec<u8> {
    let mut e = Vec::new();
    if apic_id <= 254 {
        e.extend_from_slice(&[
            0,
            8,
            u8::try_from(index).unwrap(),
            u8::try_from(apic_id).unwrap(),
        ]);
        e.extend_from_slice(&flags.to_le_bytes());
    } else {
        e.extend_from_slice(&[9, 16, 0, 0]);
        e.extend_from_slice(&apic_id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&index.to_le_bytes());
    }
    e
}

/// The bytes acpiexec prints for a buffer (`0000: 00 08 07 08 01 00 00 00 // ...` lines).
fn buffer_after(text: &str, marker: &str) -> Vec<u8> {
    let rest = &text[text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker}:\n{text}"))..];
    let mut bytes = Vec::new();
    for line in rest.lines().skip(1) {
        let Some((_, data)) = line.split_once(": ") else {
            if bytes.is_empty() {
                continue;
            }
            break;
        };
        let data = data.split("//").next().unwrap_or("");
        let before = bytes.len();
        bytes.extend(
            data.split_whitespace()
                .filter_map(|h| u8::from_str_radix(h, 16).ok()),
        );
        if bytes.len() == before {
            break;
        }
    }
    bytes
}

/// The integer acpiexec prints after `marker`.
fn integer_after(text: &str, marker: &str) -> u64 {
    let rest = &text[text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker}:\n{text}"))..];
    let line = rest
        .lines()
        .find(|l| l.contains("[Integer] ="))
        .unwrap_or_else(|| panic!("no integer after {marker}:\n{text}"));
    u64::from_str_radix(line.rsplit("= ").next().unwrap().trim(), 16).unwrap()
}

/// The controller's `STAT` byte for CPU `index`.
fn stat(controller: &CpuHotplugController, index: u32) -> u8 {
    let at = |offset| BusAccess {
        vcpu_id: 0,
        base: 0,
        offset,
    };
    controller
        .write(at(regs::SEL), &index.to_le_bytes())
        .unwrap();
    let mut b = [0u8];
    controller.read(at(regs::STAT), &mut b).unwrap();
    b[0]
}

fn check_shape(sockets: u32, cores: u32, boot: u32, hot_added: u32, absent: u32) {
    let dir = tempfile::tempdir().unwrap();
    let list = cpus(sockets, cores, boot);
    let n = list.len();
    let aml = HotplugAml::new(&list, AcpiHotplugLayout::default()).unwrap();
    let tables = build_tables(&list, &[&aml], ACPI_START).unwrap();
    std::fs::write(
        dir.path().join("dsdt.dat"),
        &tables.get("DSDT").unwrap().bytes,
    )
    .unwrap();

    // iasl -d: clean, and the devices are all there.
    let text = run_tool(dir.path(), "iasl", &["-d", "dsdt.dat"]);
    for bad in ["Error", "Warning"] {
        assert!(
            text.lines()
                .filter(|l| l.contains(bad))
                .all(|l| l.contains("0 Errors") || l.contains("0 Warnings")),
            "iasl -d: {text}"
        );
    }
    let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
    assert_eq!(dsl.matches("\"ACPI0007\"").count(), n, "{n} processors");
    assert_eq!(dsl.matches("Method (_STA, 0").count(), n);
    assert_eq!(dsl.matches("Method (_MAT, 0").count(), n);
    assert_eq!(dsl.matches("Method (_EJ0, 1").count(), n - 1);
    for i in 0..n {
        let dev = format!("Device (C{i:03X})");
        let at = dsl.find(&dev).unwrap_or_else(|| panic!("{dev} missing"));
        let uid = match i {
            0 => "Name (_UID, Zero)".to_owned(),
            1 => "Name (_UID, One)".to_owned(),
            2..=0xff => format!("Name (_UID, 0x{i:02X})"),
            _ => format!("Name (_UID, 0x{i:04X})"),
        };
        assert!(dsl[at..].contains(&uid), "{dev}: {uid}");
    }
    assert_eq!(dsl.matches("\"ACPI0013\"").count(), 1);
    assert!(dsl.contains("Method (_EVT, 1, Serialized)"));
    assert!(dsl.contains("\\_SB.CPUS.CSCN ()"));
    assert!(dsl.contains("Method (CSCN, 0, Serialized)"));

    // The controller after a hot-add of `hot_added` (acknowledged by the guest).
    let controller = CpuHotplugController::new(
        list.iter().map(|c| c.apic_id).collect(),
        usize::try_from(boot).unwrap(),
    );
    controller.mark_inserted(&[usize::try_from(hot_added).unwrap()]);
    controller.sync_present(
        &(0..usize::try_from(boot).unwrap())
            .chain([usize::try_from(hot_added).unwrap()])
            .collect::<Vec<_>>(),
    );
    // The register image of each CPU goes into acpiexec's simulated region through an SSDT
    // method per CPU (the status bits are the only state _STA and _MAT read).
    let image = |index: u32| {
        format!(
            "    Method (\\I{index:03X}, 0) {{ ISTA = 0x{:02X} }}\n",
            stat(&controller, index)
        )
    };
    assert_eq!(stat(&controller, hot_added), regs::status::ENABLED);
    assert_eq!(stat(&controller, absent), 0);
    // The image's own view of the register block: the STAT byte, written whole.
    let asl = format!(
        "DefinitionBlock (\"\", \"SSDT\", 2, \"VMMCOR\", \"REGIMAGE\", 1)\n{{\n\
         OperationRegion (IMRG, SystemMemory, 0x{:X}, 0x{:X})\n\
         Field (IMRG, ByteAcc, NoLock, Preserve) {{ Offset (0x{:X}), ISTA, 8 }}\n{}{}}}\n",
        AcpiHotplugLayout::default().controller_base,
        regs::LEN,
        regs::STAT,
        image(hot_added),
        image(absent)
    );
    std::fs::write(dir.path().join("img.asl"), asl).unwrap();
    run_tool(dir.path(), "iasl", &["img.asl"]);
    let eval = |index: u32| {
        format!(
            "evaluate \\I{index:03X}; evaluate \\_SB.CPUS.C{index:03X}._STA; \
             evaluate \\_SB.CPUS.C{index:03X}._MAT"
        )
    };
    let batch = format!(
        "{}; {}; evaluate \\_SB.GED0._EVT 5",
        eval(hot_added),
        eval(absent)
    );
    let out = run_tool(
        dir.path(),
        "acpiexec",
        &["-b", &batch, "dsdt.dat", "img.aml"],
    );
    assert!(
        out.contains("2 ACPI AML tables successfully acquired and loaded"),
        "{out}"
    );
    for bad in ["AE_", "Exception", "ACPI Error"] {
        assert!(!out.contains(bad), "acpiexec says {bad}:\n{out}");
    }
    let (added, gone) = (
        list[usize::try_from(hot_added).unwrap()],
        list[usize::try_from(absent).unwrap()],
    );
    let sta = |i: u32| integer_after(&out, &format!("Evaluation of \\_SB.CPUS.C{i:03X}._STA"));
    let mat = |i: u32| buffer_after(&out, &format!("Evaluation of \\_SB.CPUS.C{i:03X}._MAT"));
    assert_eq!(sta(hot_added), 0xf, "{out}");
    assert_eq!(sta(absent), 0, "{out}");
    assert_eq!(
        mat(hot_added),
        madt_entry(hot_added, added.apic_id, 1),
        "{out}"
    );
    assert_eq!(mat(absent), madt_entry(absent, gone.apic_id, 2), "{out}");
    // The absent CPU's _MAT is exactly its MADT entry.
    let madt = &tables.get("APIC").unwrap().bytes;
    let entry = madt_entry(absent, gone.apic_id, 2);
    assert!(
        madt.windows(entry.len()).any(|w| w == entry.as_slice()),
        "the MADT lists {entry:02x?}"
    );
}

/// `iasl` and `acpiexec` are there (see [`have_acpica_tool`]).
fn have_tools() -> bool {
    have_acpica_tool("iasl", "acpi_hotplug_aml") && have_acpica_tool("acpiexec", "acpi_hotplug_aml")
}

#[test]
fn dsdt_decodes_and_processors_evaluate_for_2_sockets_of_7_cores() {
    if !have_tools() {
        return;
    }
    // 2 of 14: CPU 7 (APIC ID 8, socket 1) hot-added, CPU 13 (APIC ID 14) absent.
    check_shape(2, 7, 2, 7, 13);
}

#[test]
fn dsdt_decodes_and_processors_evaluate_beyond_255_apic_ids() {
    if !have_tools() {
        return;
    }
    // 2 sockets of 150 cores: socket 1 from APIC ID 256 (x2APIC entries).
    check_shape(2, 150, 2, 150, 299);
}
