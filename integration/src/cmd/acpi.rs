//! `vcpuctl acpi`: the ACPI tables a VM with this `--smp` gets, one binary file per table,
//! named as ACPICA's `acpixtract` names them (`apic.dat`, `dsdt.dat`, `facp.dat`, `rsdp.dat`,
//! `xsdt.dat`), so that `iasl -d DIR/*.dat` decodes them. The DSDT holds the ACPI CPU
//! hotplug objects ([`vmm_core::acpi_hotplug`]): `\_SB_.CPUS` with one `ACPI0007` device per
//! possible vCPU, and the GED `\_SB_.GED0`. Needs no KVM: the tables depend
//! only on the topology (built by the same code Linux boot uses, laid out at the same
//! addresses).

use std::path::{Path, PathBuf};

use serde::Serialize;
use vmm_core::acpi_hotplug::{AcpiHotplugLayout, HotplugAml};
use vmm_core::arch::x86_64::acpi::{build_tables, AcpiCpu, MAX_XAPIC_ID};
use vmm_core::arch::x86_64::layout::ACPI_START;
use vmm_core::boot::boot_cpus;

use super::{print_json, CliError, ExitCode, Out, VmSpec};

/// What `vcpuctl acpi` wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AcpiReport {
    /// The files, in table order (RSDP first).
    pub files: Vec<PathBuf>,
    /// Processor entries in the MADT (one per possible vCPU).
    pub processors: u32,
    /// Of which Local x2APIC (type 9) entries: APIC IDs above 254.
    pub x2apic_entries: u32,
    /// Of which enabled (boot vCPUs); the others are Online Capable.
    pub enabled: u32,
    /// Where the RSDP goes in guest memory.
    pub rsdp_addr: u64,
}

/// Builds the tables for `spec`'s topology and writes them into `dir` (created if missing).
///
/// # Errors
///
/// A usage error if the topology cannot place a vCPU or the list cannot be a MADT; a failure
/// if `dir` cannot be written.
pub fn write_tables(spec: &VmSpec, dir: &Path) -> Result<AcpiReport, CliError> {
    let config = spec.vcpu_config(spec.smp.boot_cpus);
    let cpus: Vec<AcpiCpu> = boot_cpus(&config)
        .map_err(|e| CliError::usage(e.to_string()))?
        .iter()
        .map(|c| c.to_acpi_cpu())
        .collect();
    // The DSDT holds the ACPI CPU hotplug objects (one ACPI0007 device per possible vCPU,
    // the GED), at the addresses every VM of this project puts the devices.
    let aml = HotplugAml::new(&cpus, AcpiHotplugLayout::default())
        .map_err(|e| CliError::usage(e.to_string()))?;
    let tables =
        build_tables(&cpus, &[&aml], ACPI_START).map_err(|e| CliError::usage(e.to_string()))?;
    let io_err = |what: String| {
        move |e: std::io::Error| CliError {
            code: ExitCode::Failure,
            message: format!("{what}: {e}"),
        }
    };
    std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let mut files = Vec::new();
    for t in &tables.tables {
        let path = dir.join(t.file_name());
        std::fs::write(&path, &t.bytes)
            .map_err(io_err(format!("cannot write {}", path.display())))?;
        files.push(path);
    }
    let count = |f: &dyn Fn(&AcpiCpu) -> bool| {
        u32::try_from(cpus.iter().filter(|c| f(c)).count()).unwrap_or(u32::MAX)
    };
    Ok(AcpiReport {
        files,
        processors: count(&|_| true),
        x2apic_entries: count(&|c| c.apic_id > MAX_XAPIC_ID),
        enabled: count(&|c| c.enabled),
        rsdp_addr: tables.rsdp_addr(),
    })
}

/// Runs `vcpuctl acpi --out DIR`.
pub fn run(spec: &VmSpec, out: &Out, dir: &Path, json: bool) -> Result<(), CliError> {
    let report = write_tables(spec, dir)?;
    if json {
        return print_json(&report);
    }
    out.line(format!(
        "MADT: {} processors ({} Local APIC, {} Local x2APIC; {} enabled, {} online capable), \
         RSDP at {:#x}",
        report.processors,
        report.processors - report.x2apic_entries,
        report.x2apic_entries,
        report.enabled,
        report.processors - report.enabled,
        report.rsdp_addr
    ));
    for f in &report.files {
        out.line(format!("wrote {}", f.display()));
    }
    out.line(format!("decode with: iasl -d {}/*.dat", dir.display()));
    Ok(())
}
