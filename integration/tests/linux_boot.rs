//! Boots Debian's kernel (`scripts/fetch-test-kernel.sh` unpacks it into
//! `target/test-kernel/`) with 2 of at most 6 vCPUs (1 socket x 3 cores x 2 threads) and checks
//! what the kernel itself prints on the serial console about what we gave it: its banner, the
//! e820 map (equal to ours), the MP table (processors, I/O APIC; booted with `acpi=off`, as
//! the kernel prefers our ACPI MADT otherwise: `linux_acpi.rs` checks that one) and
//! `smpboot: Allowing 6 CPUs, 4 hotplug CPUs`.
//!
//! On hosts whose KVM emulates guest kernel code (PVM, see `docs/host-notes.md`) the kernel
//! runs slowly (the smpboot line comes about 45 s in) and stops soon after with
//! `KVM internal error: emulation failure`; so the main test stops the VM as soon as the line
//! is seen, and boots the uncompressed ELF vmlinux that the fetch script extracts (a
//! bzImage's self-decompression alone takes many minutes in the emulator). The bzImage gets a
//! shorter test: its decompressor reads our zero page and command line and says so.
//!
//! Kernels: `VCPU_TEST_KERNEL` (any format; default: `target/test-kernel/boot/vmlinux-*`) and
//! `VCPU_TEST_BZIMAGE` (default: `target/test-kernel/boot/vmlinuz-*`). Without one, the test
//! fails when `CI=true` or `VCPU_REQUIRE_KERNEL=1`, and is SKIPPED loudly otherwise.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

mod common;

use common::linux::{
    self, boot_config, kvm_and_kernel_or_skip, message, vcpus, Boot, Console, StopAt, CMDLINE,
};
use vcpu_actor::VcpuExitReason;
use vmm_core::boot::{mp_cpus, E820Entry, E820Type};
use vmm_core::{StopCause, VcpuConfig};

/// Turns a hang into a failure. On PVM the smpboot line comes about 45 s in, the emulation
/// failure about 70 s in; the bound leaves room for a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(300);
/// What the kernel says once it has counted the MP table's processors.
const SMPBOOT_LINE: &str = "smpboot: Allowing 6 CPUs, 4 hotplug CPUs";
/// `kvm_run.internal.suberror` for an emulation failure.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// Each boot keeps a host core busy for a minute or more: one at a time.
static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());

/// 2 boot vCPUs of 6: 1 socket x 3 cores x 2 threads.
fn vcpu_config() -> VcpuConfig {
    vcpus(2, (1, 3, 2))
}

/// Boots `kernel` with `cmdline` and waits until the VM stops: when a line containing
/// `stop_at` is printed, or by itself.
fn boot(kvm: kvm_ioctls::Kvm, kernel: &Path, cmdline: &str, stop_at: Option<&'static str>) -> Boot {
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let console = Console::new(stop_at.map_or(StopAt::Never, StopAt::Line));
    let config = vcpu_config();
    let cpus = mp_cpus(&config).expect("MP table CPUs");
    let what = kernel.display().to_string();
    let boot = boot_config(kernel, cmdline);
    linux::boot(kvm, &boot, &config, &cpus, console, BOUND, &what)
}

/// Boots `kernel` with `cmdline` until the kernel prints `line` (the VM is then stopped on
/// request); panics, showing the console's tail, when the VM stopped before or the line did
/// not come within [`BOUND`].
fn boot_until_line(kvm: kvm_ioctls::Kvm, kernel: &Path, cmdline: &str, line: &'static str) -> Boot {
    let b = boot(kvm, kernel, cmdline, Some(line));
    match &b.stop {
        Some(r) if r.reason == StopCause::StopRequested => {}
        Some(r) => panic!(
            "the VM stopped before the kernel printed {line:?}: {r}\nconsole tail:\n{}",
            b.console.tail()
        ),
        None => panic!(
            "no {line:?} within {BOUND:?}\nconsole tail:\n{}",
            b.console.tail()
        ),
    }
    b
}

/// The e820 map as Linux prints it (`BIOS-e820: [mem 0x...-0x...] usable`), formatted here
/// from the entries' numbers.
fn linux_e820_lines(map: &[E820Entry]) -> Vec<String> {
    map.iter()
        .map(|e| {
            let kind = match e.kind {
                E820Type::Ram => "usable",
                E820Type::Reserved => "reserved",
            };
            format!(
                "BIOS-e820: [mem 0x{:016x}-0x{:016x}] {kind}",
                e.addr,
                e.addr + e.size - 1
            )
        })
        .collect()
}

#[test]
fn debian_kernel_reports_our_e820_map_and_hotplug_cpus() {
    let test = "debian_kernel_reports_our_e820_map_and_hotplug_cpus";
    let Some((kvm, kernel)) = kvm_and_kernel_or_skip(test, "VCPU_TEST_KERNEL", "vmlinux-") else {
        return;
    };
    // `acpi=off`: the kernel ignores our ACPI tables (linux_acpi.rs checks those) and reads
    // the MP table, as a guest without ACPI does.
    let b = boot_until_line(kvm, &kernel, &format!("{CMDLINE} acpi=off"), SMPBOOT_LINE);
    let lines = b.console.lines();
    let messages: Vec<&str> = lines.iter().map(|l| message(l)).collect();
    let has = |prefix: &str| messages.iter().any(|m| m.starts_with(prefix));
    assert!(has("Linux version "), "no banner:\n{}", b.console.tail());
    assert!(
        has(&format!("Command line: {CMDLINE}")),
        "command line not echoed"
    );
    // The map the kernel took from the zero page, in its order, equals ours.
    let printed: Vec<&str> = messages
        .iter()
        .copied()
        .filter(|m| m.starts_with("BIOS-e820: "))
        .collect();
    assert_eq!(printed, linux_e820_lines(&b.entry.e820), "e820 map");
    // The MP table: found in the EBDA, two enabled processors, the I/O APIC after the
    // largest APIC ID (5), four disabled processors counted as hotplug CPUs.
    assert!(has("found SMP MP-table at [mem 0x0009e000-0x0009e00f]"));
    assert!(has("Intel MultiProcessor Specification v1.4"));
    assert!(has("Processor #0 (Bootup-CPU)"));
    assert!(messages.contains(&"Processor #1"));
    assert!(has(
        "IOAPIC[0]: apic_id 6, version 17, address 0xfec00000, GSI 0-23"
    ));
    assert!(messages.contains(&SMPBOOT_LINE));
}

#[test]
fn guest_stopping_by_itself_is_reported_through_the_exit_path() {
    // On PVM hosts the kernel stops on an instruction KVM cannot emulate (`cmpxchg16b` in
    // SLUB's setup); elsewhere it boots on, finds no root file system and panics, and
    // `panic=-1` turns that into a reset. Either way the VM stops by itself and the stop
    // reason names vCPU 0.
    let test = "guest_stopping_by_itself_is_reported_through_the_exit_path";
    let Some((kvm, kernel)) = kvm_and_kernel_or_skip(test, "VCPU_TEST_KERNEL", "vmlinux-") else {
        return;
    };
    let b = boot(kvm, &kernel, &format!("{CMDLINE} panic=-1"), None);
    let Some(stop) = &b.stop else {
        panic!(
            "the guest did not stop within {BOUND:?}\nconsole tail:\n{}",
            b.console.tail()
        );
    };
    eprintln!("{test}: {stop}");
    let StopCause::VcpuExit(reason) = &stop.reason else {
        panic!("the VM stopped but not through a vCPU exit: {stop}");
    };
    assert_eq!(reason.vcpu_id(), 0, "{stop}");
    match reason {
        VcpuExitReason::InternalError { suberror, .. } => {
            assert_eq!(*suberror, KVM_INTERNAL_ERROR_EMULATION, "{stop}");
            // It comes after everything the other test checks.
            assert!(
                b.console.text().contains(SMPBOOT_LINE),
                "{}",
                b.console.tail()
            );
        }
        VcpuExitReason::GuestReset { .. }
        | VcpuExitReason::TripleFault { .. }
        | VcpuExitReason::GuestShutdown { .. } => {}
        other => panic!(
            "unexpected stop: {other}\nconsole tail:\n{}",
            b.console.tail()
        ),
    }
}

#[test]
fn debian_bzimage_decompressor_reads_our_command_line() {
    // The bzImage's 64-bit entry runs its decompressor, which reads the zero page's command
    // line and prints (always, with a serial earlyprintk) that `nokaslr` disabled KASLR.
    const KASLR_LINE: &str = "KASLR disabled: 'nokaslr' on cmdline.";
    let test = "debian_bzimage_decompressor_reads_our_command_line";
    let Some((kvm, kernel)) = kvm_and_kernel_or_skip(test, "VCPU_TEST_BZIMAGE", "vmlinuz-") else {
        return;
    };
    boot_until_line(kvm, &kernel, &format!("{CMDLINE} nokaslr"), KASLR_LINE);
}
