//! Boots Debian's kernel (`scripts/fetch-test-kernel.sh` unpacks it into
//! `target/test-kernel/`) twice, in parallel, and checks that it finds its processors through
//! our ACPI tables: it reads the RSDP, XSDT and MADT, says `ACPI: Using ACPI (MADT) for SMP
//! configuration information`, and counts every possible vCPU in `smpboot: Allowing N CPUs,
//! M hotplug CPUs` (the MADT's Online Capable entries are the hotplug CPUs):
//! - 12 vCPUs (2 sockets x 3 cores x 2 threads, 2 at boot): xAPIC, Local APIC entries only;
//!   the MP table is there too, and ACPI wins;
//! - 300 vCPUs (2 sockets x 75 cores x 2 threads, 2 at boot; APIC IDs up to 405): x2APIC
//!   mode, no MP table, Local x2APIC entries for IDs above 254; the kernel finds its BSP in
//!   x2APIC mode ("x2apic enabled by BIOS") and counts 300 CPUs.
//!
//! As in `linux_boot.rs` (see there and `docs/host-notes.md`): on PVM hosts the kernel runs
//! in the emulator and the smpboot line comes about 45 s in, so the VM is stopped as soon as
//! it is printed. Kernel: `VCPU_TEST_KERNEL` or `target/test-kernel/boot/vmlinux-*`; without
//! one the tests fail when `CI=true` or `VCPU_REQUIRE_KERNEL=1` and are SKIPPED loudly
//! otherwise.

use std::path::Path;
use std::time::Duration;

mod common;

use common::linux::{self, boot_config, kernel_or_skip, vcpus, Console, StopAt, CMDLINE};
use integration::kvm_or_skip;
use vmm_core::boot::boot_cpus;
use vmm_core::{InterruptMode, StopCause, VcpuConfig};

/// Turns a hang into a failure (two boots share the 2 cores: room for both).
const BOUND: Duration = Duration::from_secs(400);

/// Boots `kernel` with `config`; returns the console once the VM stopped at `stop_at` (as
/// soon as the kernel printed it), and whether an MP table was written. Panics if the VM
/// stops otherwise or not in time.
fn boot(
    test: &str,
    kernel: &Path,
    config: VcpuConfig,
    stop_at: &'static str,
    mode: InterruptMode,
) -> (Console, bool) {
    let kvm = kvm_or_skip(test).expect("KVM (checked by the caller)");
    let b = linux::boot(
        kvm,
        &boot_config(kernel, CMDLINE),
        &config,
        &boot_cpus(&config).unwrap(),
        Console::new(StopAt::Text(stop_at)),
        BOUND,
        test,
    );
    assert_eq!(b.interrupt_mode, mode, "{test}");
    match b.stop {
        Some(r) if r.reason == StopCause::StopRequested => {}
        other => panic!("{test}: no {stop_at:?} (stop: {other:?})"),
    }
    (b.console, b.entry.mptable)
}

/// Whether one of the messages `m` starts with `prefix` and contains `part`.
fn has_message(m: &[String], prefix: &str, part: &str) -> bool {
    m.iter().any(|l| l.starts_with(prefix) && l.contains(part))
}

/// What both shapes must show: the RSDP where we put it, the tables it leads to, ACPI used for
/// SMP, the I/O APIC and LINT1 NMI from the MADT.
fn check_acpi_lines(test: &str, m: &[String]) {
    let has = |prefix: &str| m.iter().any(|l| l.starts_with(prefix));
    for prefix in [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 VMMCOR)",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    ] {
        assert!(has(prefix), "{test}: no {prefix:?}");
    }
    assert!(
        has_message(m, "ACPI: LAPIC_NMI (acpi_id[0xff]", "lint[0x1]"),
        "{test}: no LINT1 NMI line"
    );
    assert!(
        has_message(m, "IOAPIC[0]: apic_id ", "address 0xfec00000, GSI 0-23"),
        "{test}: no IOAPIC line"
    );
}

/// Boots the Debian kernel (see [`boot`]) and checks the ACPI lines every shape prints and
/// the `smpboot` line; the kernel's messages and whether an MP table was written. `None`
/// (skipped) without KVM or the kernel.
fn boot_debian(
    test: &str,
    config: VcpuConfig,
    smpboot: &'static str,
    mode: InterruptMode,
) -> Option<(Vec<String>, bool)> {
    kvm_or_skip(test)?;
    let kernel = kernel_or_skip(test, "VCPU_TEST_KERNEL", "vmlinux-")?;
    let (console, mptable) = boot(test, &kernel, config, smpboot, mode);
    let m = console.messages();
    check_acpi_lines(test, &m);
    assert!(m.iter().any(|l| l == smpboot), "{test}: {smpboot:?}");
    Some((m, mptable))
}

#[test]
fn debian_kernel_uses_our_madt_for_12_cpus() {
    const SMPBOOT: &str = "smpboot: Allowing 12 CPUs, 10 hotplug CPUs";
    let test = "debian_kernel_uses_our_madt_for_12_cpus";
    let Some((m, mptable)) = boot_debian(test, vcpus(2, (2, 3, 2)), SMPBOOT, InterruptMode::XApic)
    else {
        return;
    };
    assert!(mptable, "every APIC ID fits: the MP table is written too");
    // The largest APIC ID is 13: the I/O APIC gets 14, as in the MP table.
    assert!(m.iter().any(|l| l.starts_with("IOAPIC[0]: apic_id 14,")));
    assert!(
        !m.iter().any(|l| l.contains("x2apic")),
        "{test}: xAPIC only"
    );
}

#[test]
fn debian_kernel_uses_our_madt_and_x2apic_for_300_cpus() {
    const SMPBOOT: &str = "smpboot: Allowing 300 CPUs, 298 hotplug CPUs";
    let test = "debian_kernel_uses_our_madt_and_x2apic_for_300_cpus";
    let Some((m, mptable)) =
        boot_debian(test, vcpus(2, (2, 75, 2)), SMPBOOT, InterruptMode::X2Apic)
    else {
        return;
    };
    assert!(!mptable, "APIC IDs above 254: no MP table");
    assert!(
        !m.iter().any(|l| l.contains("found SMP MP-table")),
        "{test}: the kernel found an MP table"
    );
    assert!(
        m.iter()
            .any(|l| l.contains("x2apic") && l.contains("enabled by BIOS")),
        "{test}: the BSP is not in x2APIC mode at entry"
    );
    assert!(
        has_message(&m, "ACPI: X2APIC_NMI (uid[0xffffffff]", "lint[0x1]"),
        "{test}: no x2APIC LINT1 NMI line"
    );
    assert!(
        !m.iter().any(|l| l.contains("x2apic entry ignored")),
        "{test}: the kernel ignored x2APIC entries"
    );
}
