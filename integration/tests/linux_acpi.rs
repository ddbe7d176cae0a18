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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use integration::kvm_or_skip;
use topology::CpuTopology;
use vmm_core::boot::{boot_cpus, load_linux, LinuxBootConfig};
use vmm_core::{
    build_vm, ExitMonitor, InterruptMode, StopCause, VcpuConfig, VcpuManagerOptions, VmOptions,
};

/// Guest RAM.
const MEMORY: u64 = 256 << 20;
/// Turns a hang into a failure (two boots share the 2 cores: room for both).
const BOUND: Duration = Duration::from_secs(400);
/// The serial console from the first message on, no XSAVE (see `linux_boot.rs`).
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 noxsave";

/// The vmlinux to boot, or `None` after a loud SKIPPED (a panic when one is required).
fn kernel_or_skip(test: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("VCPU_TEST_KERNEL") {
        return Some(PathBuf::from(p));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel/boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinux-") && !n.ends_with(".partial"))
        })
        .collect();
    found.sort();
    if let Some(p) = found.pop() {
        return Some(p);
    }
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("VCPU_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: a test kernel is required: run scripts/fetch-test-kernel.sh"
    );
    eprintln!("SKIPPED (no test kernel): {test}: run scripts/fetch-test-kernel.sh");
    None
}

/// The serial console: keeps every byte and asks the VM to stop (from the vCPU thread that
/// writes it) once a line contains `stop_at`.
#[derive(Clone)]
struct Console {
    bytes: Arc<Mutex<Vec<u8>>>,
    stop_at: &'static str,
    seen: Arc<AtomicBool>,
    monitor: Arc<OnceLock<ExitMonitor>>,
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).replace('\r', "")
    }

    /// The messages, without printk's `[    0.000000] ` timestamps.
    fn messages(&self) -> Vec<String> {
        self.text()
            .lines()
            .map(|l| match (l.starts_with('['), l.find("] ")) {
                (true, Some(i)) => l[i + 2..].to_owned(),
                _ => l.to_owned(),
            })
            .collect()
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.lock().unwrap();
        let start = bytes.len();
        bytes.extend_from_slice(buf);
        // Look at the lines this write completed (and the one it continued).
        let from = bytes[..start]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let text = String::from_utf8_lossy(&bytes[from..]);
        if text.contains(self.stop_at) && !self.seen.swap(true, Ordering::AcqRel) {
            if let Some(m) = self.monitor.get() {
                let _ = m.request_stop();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots `kernel` with `config`; returns the console once the VM stopped at `stop_at`, and
/// whether an MP table was written. Panics if the VM stops otherwise or not in time.
fn boot(
    test: &str,
    kernel: &Path,
    config: VcpuConfig,
    stop_at: &'static str,
    mode: InterruptMode,
) -> (Console, bool) {
    let kvm = kvm_or_skip(test).expect("KVM (checked by the caller)");
    let console = Console {
        bytes: Arc::default(),
        stop_at,
        seen: Arc::default(),
        monitor: Arc::default(),
    };
    let vm_options = VmOptions {
        memory_size: MEMORY,
        serial_output: Box::new(console.clone()),
        ..VmOptions::default()
    };
    let (vm, mut vcpus) = build_vm(
        kvm,
        vm_options,
        config.clone(),
        VcpuManagerOptions::default(),
    )
    .expect("build the VM");
    assert_eq!(vcpus.interrupt_mode(), mode, "{test}");
    let mut boot = LinuxBootConfig::new(kernel);
    boot.cmdline = CMDLINE.to_owned();
    let entry = load_linux(vm.memory(), &boot, &boot_cpus(&config).unwrap()).expect("load");
    let mptable = entry.mptable;
    let _ = console.monitor.set(vcpus.exit_monitor());
    let t = Instant::now();
    vcpus
        .create_boot_vcpus(Arc::new(entry))
        .expect("boot vCPUs");
    vcpus.start_boot_vcpus().expect("start");
    let stop = vcpus.wait_for_exit(Some(BOUND)).expect("wait for the VM");
    if stop.is_none() {
        let _ = vcpus.exit_monitor().request_stop();
        let _ = vcpus.wait_for_exit(Some(Duration::from_secs(30)));
    }
    eprintln!(
        "----- {test}: console ({:.1} s) -----\n{}\n----- end of console -----",
        t.elapsed().as_secs_f64(),
        console.text()
    );
    match stop {
        Some(r) if r.reason == StopCause::StopRequested => {}
        other => panic!("{test}: no {stop_at:?} (stop: {other:?})"),
    }
    (console, mptable)
}

fn vcpus(boot: u32, (s, c, t): (u32, u32, u32)) -> VcpuConfig {
    VcpuConfig {
        boot_vcpu_count: boot,
        max_vcpu_count: s * c * t,
        topology: CpuTopology::new(s, 1, c, t).unwrap(),
        vpmu: Default::default(),
        template: None,
        vcpu_affinity: Default::default(),
    }
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
        m.iter()
            .any(|l| l.starts_with("ACPI: LAPIC_NMI (acpi_id[0xff]") && l.contains("lint[0x1]")),
        "{test}: no LINT1 NMI line"
    );
    assert!(
        m.iter()
            .any(|l| l.starts_with("IOAPIC[0]: apic_id ")
                && l.contains("address 0xfec00000, GSI 0-23")),
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
    let kernel = kernel_or_skip(test)?;
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
        m.iter()
            .any(|l| l.starts_with("ACPI: X2APIC_NMI (uid[0xffffffff]") && l.contains("lint[0x1]")),
        "{test}: no x2APIC LINT1 NMI line"
    );
    assert!(
        !m.iter().any(|l| l.contains("x2apic entry ignored")),
        "{test}: the kernel ignored x2APIC entries"
    );
}
