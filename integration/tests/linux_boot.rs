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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use integration::kvm_or_skip;
use topology::CpuTopology;
use vcpu_actor::VcpuExitReason;
use vmm_core::boot::{load_linux, mp_cpus, E820Entry, E820Type, LinuxBootConfig};
use vmm_core::{
    build_vm, ExitMonitor, StopCause, VcpuConfig, VcpuManagerOptions, VmOptions, VmStopReason,
};

/// Guest RAM.
const MEMORY: u64 = 256 << 20;
/// Turns a hang into a failure. On PVM the smpboot line comes about 45 s in, the emulation
/// failure about 70 s in; the bound leaves room for a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(300);
/// The command line: the serial console from the first message on (`earlyprintk`), and no
/// XSAVE (the emulator cannot run `xrstor`).
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 noxsave";
/// What the kernel says once it has counted the MP table's processors.
const SMPBOOT_LINE: &str = "smpboot: Allowing 6 CPUs, 4 hotplug CPUs";
/// `kvm_run.internal.suberror` for an emulation failure.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// Each boot keeps a host core busy for a minute or more: one at a time.
static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The kernel to boot, from `env_var` or the fetch script's folder (`prefix*`), or `None`
/// after a loud SKIPPED (a panic when a kernel is required).
fn kernel_or_skip(test: &str, env_var: &str, prefix: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "{test}: {env_var}={} is not a file",
            p.display()
        );
        return Some(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-kernel/boot");
    let dir = dir.canonicalize().unwrap_or(dir);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.ends_with(".partial"))
        })
        .collect();
    found.sort();
    if let Some(p) = found.pop() {
        return Some(p);
    }
    let why = format!(
        "no {prefix}* in {} and {env_var} is not set: run scripts/fetch-test-kernel.sh",
        dir.display()
    );
    let required = std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("VCPU_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    if required {
        panic!("{test}: a test kernel is required (CI=true or VCPU_REQUIRE_KERNEL=1): {why}");
    }
    eprintln!("SKIPPED (no test kernel): {test}: {why}");
    None
}

/// KVM and the kernel to boot, or `None` after a loud SKIPPED for what is missing.
fn kvm_and_kernel_or_skip(
    test: &str,
    env_var: &str,
    prefix: &str,
) -> Option<(kvm_ioctls::Kvm, PathBuf)> {
    let kvm = kvm_or_skip(test)?;
    Some((kvm, kernel_or_skip(test, env_var, prefix)?))
}

/// The serial console: keeps every byte, and asks the VM to stop when a line contains
/// `stop_at` (from the vCPU thread that writes it: no polling). It runs on the vCPU thread,
/// under its seccomp filter: no printing there (stderr is not allowed), only the stop request
/// (whose fd the VMM allows); the test thread prints when the pattern came.
#[derive(Clone)]
struct Console {
    bytes: Arc<Mutex<Vec<u8>>>,
    line_start: Arc<Mutex<usize>>,
    stop_at: Option<&'static str>,
    seen: Arc<AtomicBool>,
    /// Seconds from the start to the `stop_at` line.
    seen_after: Arc<OnceLock<f64>>,
    monitor: Arc<OnceLock<ExitMonitor>>,
    started: Instant,
}

impl Console {
    fn new(stop_at: Option<&'static str>) -> Self {
        Self {
            bytes: Arc::default(),
            line_start: Arc::default(),
            stop_at,
            seen: Arc::default(),
            seen_after: Arc::default(),
            monitor: Arc::default(),
            started: Instant::now(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).replace('\r', "")
    }

    fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_owned).collect()
    }

    fn tail(&self) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.lock().unwrap();
        bytes.extend_from_slice(buf);
        let mut start = self.line_start.lock().unwrap();
        while let Some(nl) = bytes[*start..].iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&bytes[*start..*start + nl]).into_owned();
            *start += nl + 1;
            if let Some(pattern) = self.stop_at {
                if line.contains(pattern) && !self.seen.swap(true, Ordering::AcqRel) {
                    let _ = self.seen_after.set(self.started.elapsed().as_secs_f64());
                    if let Some(m) = self.monitor.get() {
                        let _ = m.request_stop();
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 2 boot vCPUs of 6: 1 socket x 3 cores x 2 threads.
fn vcpu_config() -> VcpuConfig {
    VcpuConfig {
        boot_vcpu_count: 2,
        max_vcpu_count: 6,
        topology: CpuTopology::new(1, 1, 3, 2).unwrap(),
        vpmu: Default::default(),
        template: None,
        vcpu_affinity: Default::default(),
    }
}

/// What a boot gave: why the VM stopped (`None`: it did not within [`BOUND`]), our e820 map
/// and the console.
struct Boot {
    stop: Option<VmStopReason>,
    e820: Vec<E820Entry>,
    console: Console,
}

/// Boots `kernel` with `cmdline` and waits until the VM stops: when `stop_at` is printed, or
/// by itself.
fn boot(kvm: kvm_ioctls::Kvm, kernel: &Path, cmdline: &str, stop_at: Option<&'static str>) -> Boot {
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let console = Console::new(stop_at);
    let config = vcpu_config();
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
    let mut boot = LinuxBootConfig::new(kernel);
    boot.cmdline = cmdline.to_owned();
    let cpus = mp_cpus(&config).expect("MP table CPUs");
    let entry = load_linux(vm.memory(), &boot, &cpus).expect("load the kernel");
    let e820 = entry.e820.clone();
    let _ = console.monitor.set(vcpus.exit_monitor());
    vcpus
        .create_boot_vcpus(Arc::new(entry))
        .expect("create the boot vCPUs");
    vcpus.start_boot_vcpus().expect("start the boot vCPUs");
    let stop = vcpus.wait_for_exit(Some(BOUND)).expect("wait for the VM");
    if let (Some(pattern), Some(after)) = (stop_at, console.seen_after.get()) {
        eprintln!("console: {pattern:?} after {after:.1} s, stopped the VM");
    }
    if stop.is_none() {
        // Leave nothing running: the Drop of the manager exits the vCPUs too.
        let _ = vcpus.exit_monitor().request_stop();
        let _ = vcpus.wait_for_exit(Some(Duration::from_secs(30)));
    }
    eprintln!(
        "----- console of {} ({:.1} s) -----\n{}\n----- end of console -----",
        kernel.display(),
        console.started.elapsed().as_secs_f64(),
        console.text()
    );
    Boot {
        stop,
        e820,
        console,
    }
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

/// The text after the printk timestamp (`[    0.000000] `), if there is one.
fn message(line: &str) -> &str {
    match (line.starts_with('['), line.find("] ")) {
        (true, Some(i)) => &line[i + 2..],
        _ => line,
    }
}

#[test]
fn debian_kernel_reports_our_e820_map_and_hotplug_cpus() {
    let test = "debian_kernel_reports_our_e820_map_and_hotplug_cpus";
    let Some((kvm, kernel)) = kvm_and_kernel_or_skip(test, "VCPU_TEST_KERNEL", "vmlinux-") else {
        return;
    };
    // `acpi=off`: the kernel ignores our ACPI tables (linux_acpi.rs checks those) and reads
    // the MP table, as a guest without ACPI does.
    let b = boot(
        kvm,
        &kernel,
        &format!("{CMDLINE} acpi=off"),
        Some(SMPBOOT_LINE),
    );
    let lines = b.console.lines();
    match &b.stop {
        Some(r) if r.reason == StopCause::StopRequested => {}
        Some(r) => panic!(
            "the VM stopped before the kernel printed {SMPBOOT_LINE:?}: {r}\nconsole tail:\n{}",
            b.console.tail()
        ),
        None => panic!(
            "no {SMPBOOT_LINE:?} within {BOUND:?}\nconsole tail:\n{}",
            b.console.tail()
        ),
    }
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
    assert_eq!(printed, linux_e820_lines(&b.e820), "e820 map");
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
    let b = boot(
        kvm,
        &kernel,
        &format!("{CMDLINE} nokaslr"),
        Some(KASLR_LINE),
    );
    match &b.stop {
        Some(r) if r.reason == StopCause::StopRequested => {}
        other => panic!(
            "no {KASLR_LINE:?} (stop: {other:?})\nconsole tail:\n{}",
            b.console.tail()
        ),
    }
}
