//! `vcpuctl boot`: a Linux kernel with the console on this terminal.
//!
//! The VM stops, and `vcpuctl boot` exits 0 after saying why on stderr, when a vCPU stops
//! (triple fault, guest shutdown or reset, KVM error) or the guest writes the **shutdown
//! port**, I/O port `0x600` ([`vmm_core::devices::SHUTDOWN_PORT`]): a write of any size and
//! value from any vCPU stops the VM at once (the writing vCPU goes to `waiting_exit`, the
//! exit EventFd wakes the manager, which exits and joins every vCPU thread, APs that never
//! got a SIPI included). Reads of the port return all ones. This is what makes
//! `vcpuctl boot --kernel <tiny ELF> --smp N` the comparable path of the `boot_process`
//! benchmark ([`crate::bench::tiny_elf`]: the BSP writes the port as its first act).
//!
//! With `--peak-rss` it also prints, on stderr after the VM has stopped, the process's peak
//! resident memory (`VmHWM`) as `vcpuctl: peak RSS <n> KiB`.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vcpu_actor::{SeccompMode, VcpuOptions};
use vmm_core::{VcpuManagerOptions, VmOptions, VmStopReason};

use super::{open_kvm, CliError, VmSpec};

/// A writer that forwards to a shared writer (the console of `vcpuctl boot`).
struct SharedWriter<W: std::io::Write + Send>(Arc<std::sync::Mutex<W>>);

impl<W: std::io::Write + Send> std::io::Write for SharedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.write(buf)?;
        w.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// `vcpuctl boot`: boots a Linux kernel (bzImage or ELF vmlinux) with every possible vCPU in
/// the ACPI MADT (and in the MP table when every APIC ID is below 255; above, the VM runs in
/// x2APIC mode), the console going to `console`, until the VM stops.
///
/// The 16550 console runs on the vCPU threads, under their seccomp filter: `console_fd` is
/// the file descriptor `console` writes to (stdout for `vcpuctl boot`), which the filter
/// then allows `write` on; `None` for a writer that makes no system calls (memory).
pub fn boot_linux<W: std::io::Write + Send + 'static>(
    spec: &VmSpec,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    console: Arc<std::sync::Mutex<W>>,
    console_fd: Option<RawFd>,
) -> Result<VmStopReason, CliError> {
    use vmm_core::boot::{boot_cpus, load_linux, LinuxBootConfig};
    let kvm = open_kvm()?;
    let config = spec.vcpu_config(spec.smp.boot_cpus);
    let vm_options = VmOptions {
        memory_size: spec.memory_mib << 20,
        serial_output: Box::new(SharedWriter(console)),
        logger: spec.logger.clone(),
        ..VmOptions::default()
    };
    let options = VcpuManagerOptions {
        logger: spec.logger.clone(),
        vcpu: VcpuOptions {
            seccomp: SeccompMode::default().with_write_fds(console_fd),
            ..VcpuOptions::default()
        },
        ..VcpuManagerOptions::default()
    };
    let (vm, mut vcpus) = vmm_core::build_vm(kvm, vm_options, config.clone(), options)?;
    let mut boot = LinuxBootConfig::new(kernel);
    boot.initrd = initrd.map(|p| p.to_path_buf());
    boot.cmdline = cmdline.to_owned();
    boot.logger = spec.logger.clone();
    let entry = load_linux(vm.memory(), &boot, &boot_cpus(&config)?)?;
    vcpus.create_boot_vcpus(Arc::new(entry))?;
    vcpus.start_boot_vcpus()?;
    Ok(vcpus.run_until_exit()?)
}

/// What `--peak-rss` prints before the number of KiB (then ` KiB`).
pub const PEAK_RSS_PREFIX: &str = "vcpuctl: peak RSS ";

/// This process's peak resident memory in KiB (`VmHWM` of /proc/self/status), if readable.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Runs `vcpuctl boot` with the console on stdout; says on stderr why the VM stopped (and,
/// with `report_peak_rss`, the peak RSS).
pub fn run(
    spec: &VmSpec,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    report_peak_rss: bool,
) -> Result<(), CliError> {
    let console = Arc::new(Mutex::new(std::io::stdout()));
    let stop = boot_linux(
        spec,
        kernel,
        initrd,
        cmdline,
        console,
        Some(std::io::stdout().as_raw_fd()),
    )?;
    let _ = std::io::stdout().flush();
    eprintln!("\nvcpuctl: {stop}");
    if report_peak_rss {
        match peak_rss_kib() {
            Some(kib) => eprintln!("{PEAK_RSS_PREFIX}{kib} KiB"),
            None => eprintln!("vcpuctl: peak RSS unknown (no VmHWM in /proc/self/status)"),
        }
    }
    Ok(())
}
