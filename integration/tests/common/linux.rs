//! Booting Debian's kernel (`scripts/fetch-test-kernel.sh` unpacks it into
//! `target/test-kernel/`) for `linux_boot.rs` and `linux_acpi.rs`: finding the kernel, a
//! serial console that keeps what the kernel prints and stops the VM at a chosen text, and
//! one boot until the VM stops.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmm_core::boot::{load_linux, BootCpu, LinuxBootConfig, LinuxBootEntry};
use vmm_core::{
    build_vm, CpuTopology, ExitMonitor, InterruptMode, SmpConfig, VcpuConfig, VcpuManagerOptions,
    VmOptions, VmStopReason, VpmuFeatureLevel,
};

/// Guest RAM of a Linux boot.
pub const MEMORY: u64 = 256 << 20;
/// The command line: the serial console from the first message on (`earlyprintk`), and no
/// XSAVE (the emulator of PVM hosts cannot run `xrstor`).
pub const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 noxsave";

/// The kernel to boot, from `env_var` or the fetch script's folder (`prefix*`), or `None`
/// after a loud SKIPPED (a panic when a kernel is required: `CI=true` or
/// `VCPU_REQUIRE_KERNEL=1`).
pub fn kernel_or_skip(test: &str, env_var: &str, prefix: &str) -> Option<PathBuf> {
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
pub fn kvm_and_kernel_or_skip(
    test: &str,
    env_var: &str,
    prefix: &str,
) -> Option<(kvm_ioctls::Kvm, PathBuf)> {
    let kvm = integration::kvm_or_skip(test)?;
    Some((kvm, kernel_or_skip(test, env_var, prefix)?))
}

/// `boot` of `sockets * cores * threads` vCPUs on `sockets` x `cores` x `threads` (one die),
/// without vPMU, template or affinity.
pub fn vcpus(boot: u32, (sockets, cores, threads): (u32, u32, u32)) -> VcpuConfig {
    let smp = SmpConfig {
        boot_cpus: boot,
        max_cpus: sockets * cores * threads,
        topology: CpuTopology::new(sockets, 1, cores, threads).unwrap(),
    };
    VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled)
}

/// When a [`Console`] asks the VM to stop.
#[derive(Clone, Copy, Debug)]
pub enum StopAt {
    /// Never: the VM runs until it stops by itself.
    Never,
    /// Once a complete line (up to its newline) contains the text.
    Line(&'static str),
    /// As soon as the text of the lines a write completed or continued contains it, even
    /// before the line's newline came.
    Text(&'static str),
}

impl StopAt {
    /// The text it waits for, if any.
    pub fn pattern(self) -> Option<&'static str> {
        match self {
            StopAt::Never => None,
            StopAt::Line(p) | StopAt::Text(p) => Some(p),
        }
    }
}

/// The serial console: keeps every byte, and asks the VM to stop as its [`StopAt`] says
/// (from the vCPU thread that writes it: no polling). It runs on the vCPU thread, under its
/// seccomp filter: no printing there (stderr is not allowed), only the stop request (whose fd
/// the VMM allows); the test thread prints when the pattern came.
#[derive(Clone)]
pub struct Console {
    bytes: Arc<Mutex<Vec<u8>>>,
    line_start: Arc<Mutex<usize>>,
    stop_at: StopAt,
    seen: Arc<AtomicBool>,
    /// Seconds from the start to the stop text.
    seen_after: Arc<OnceLock<f64>>,
    monitor: Arc<OnceLock<ExitMonitor>>,
    started: Instant,
}

impl Console {
    /// An empty console that stops the VM as `stop_at` says.
    pub fn new(stop_at: StopAt) -> Self {
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

    /// Everything printed so far, without carriage returns.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).replace('\r', "")
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_owned).collect()
    }

    /// The messages, without printk's `[    0.000000] ` timestamps.
    pub fn messages(&self) -> Vec<String> {
        self.lines().iter().map(|l| message(l).to_owned()).collect()
    }

    /// The last 40 lines, for a failure message.
    pub fn tail(&self) -> String {
        let lines = self.lines();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Seconds from the console's creation to the stop text, once it came.
    pub fn seen_after(&self) -> Option<f64> {
        self.seen_after.get().copied()
    }

    /// Records that the stop text came and asks the VM to stop (once).
    fn stop(&self) {
        if !self.seen.swap(true, Ordering::AcqRel) {
            let _ = self.seen_after.set(self.started.elapsed().as_secs_f64());
            if let Some(m) = self.monitor.get() {
                let _ = m.request_stop();
            }
        }
    }
}

/// The text after the printk timestamp (`[    0.000000] `) of `line`, if there is one.
pub fn message(line: &str) -> &str {
    match (line.starts_with('['), line.find("] ")) {
        (true, Some(i)) => &line[i + 2..],
        _ => line,
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.bytes.lock().unwrap();
        let written_from = bytes.len();
        bytes.extend_from_slice(buf);
        let mut start = self.line_start.lock().unwrap();
        match self.stop_at {
            StopAt::Never => {}
            StopAt::Line(pattern) => {
                while let Some(nl) = bytes[*start..].iter().position(|b| *b == b'\n') {
                    let line = String::from_utf8_lossy(&bytes[*start..*start + nl]).into_owned();
                    *start += nl + 1;
                    if line.contains(pattern) {
                        self.stop();
                    }
                }
            }
            StopAt::Text(pattern) => {
                // Look at the lines this write completed (and the one it continued).
                let from = bytes[..written_from]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                if String::from_utf8_lossy(&bytes[from..]).contains(pattern) {
                    self.stop();
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a boot gave.
pub struct Boot {
    /// Why the VM stopped (`None`: it did not within the bound).
    pub stop: Option<VmStopReason>,
    /// The kernel as loaded, with our e820 map and whether an MP table was written.
    pub entry: Arc<LinuxBootEntry>,
    /// The interrupt mode the VM ran in.
    pub interrupt_mode: InterruptMode,
    /// What the kernel printed.
    pub console: Console,
}

/// A boot of `kernel` with `cmdline` (and nothing else of [`LinuxBootConfig`]).
pub fn boot_config(kernel: &Path, cmdline: &str) -> LinuxBootConfig {
    let mut boot = LinuxBootConfig::new(kernel);
    boot.cmdline = cmdline.to_owned();
    boot
}

/// Boots as `boot` says on the vCPUs of `config` (listed to the guest as `cpus`), printing to
/// `console`, and waits until the VM stops, at most `bound`: when the console's text came, or
/// by itself. Prints the console, headed by `what`, once the VM stopped.
pub fn boot<C: Copy + Into<BootCpu>>(
    kvm: kvm_ioctls::Kvm,
    boot: &LinuxBootConfig,
    config: &VcpuConfig,
    cpus: &[C],
    console: Console,
    bound: Duration,
    what: &str,
) -> Boot {
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
    let entry = Arc::new(load_linux(vm.memory(), boot, cpus).expect("load the kernel"));
    let _ = console.monitor.set(vcpus.exit_monitor());
    vcpus
        .create_boot_vcpus(entry.clone())
        .expect("create the boot vCPUs");
    vcpus.start_boot_vcpus().expect("start the boot vCPUs");
    let stop = vcpus.wait_for_exit(Some(bound)).expect("wait for the VM");
    if let (Some(pattern), Some(after)) = (console.stop_at.pattern(), console.seen_after()) {
        eprintln!("console: {pattern:?} after {after:.1} s, stopped the VM");
    }
    if stop.is_none() {
        // Leave nothing running: the Drop of the manager exits the vCPUs too.
        let _ = vcpus.exit_monitor().request_stop();
        let _ = vcpus.wait_for_exit(Some(Duration::from_secs(30)));
    }
    eprintln!(
        "----- console of {what} ({:.1} s) -----\n{}\n----- end of console -----",
        console.started.elapsed().as_secs_f64(),
        console.text()
    );
    Boot {
        stop,
        entry,
        interrupt_mode: vcpus.interrupt_mode(),
        console,
    }
}
