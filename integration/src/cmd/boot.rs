//! `vcpuctl boot`: a Linux kernel with the console on this terminal.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
pub fn boot_linux<W: std::io::Write + Send + 'static>(
    spec: &VmSpec,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    cmdline: &str,
    console: Arc<std::sync::Mutex<W>>,
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

/// Runs `vcpuctl boot` with the console on stdout; says on stderr why the VM stopped.
pub fn run(
    spec: &VmSpec,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<(), CliError> {
    let console = Arc::new(Mutex::new(std::io::stdout()));
    let stop = boot_linux(spec, kernel, initrd, cmdline, console)?;
    let _ = std::io::stdout().flush();
    eprintln!("\nvcpuctl: {stop}");
    Ok(())
}
