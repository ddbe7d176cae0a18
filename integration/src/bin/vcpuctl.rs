//! `vcpuctl`: see the vCPU manager work on this machine's KVM. This file parses the arguments,
//! dispatches to the subcommand's module in [`integration::cmd`] and turns its error into the
//! exit code.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use integration::cmd::{self, bench::BenchOptions, CliError, Out, VmSpec};
use slog::{o, Drain};
use topology::SmpConfig;
use vpmu::VpmuFeatureLevel;

const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure (the message says what); \
2 bad arguments (e.g. an --smp that cannot be); 3 /dev/kvm missing or not accessible; \
4 this host's KVM lacks a capability or vPMU level the configuration needs.";

/// The vCPU manager, end to end on this machine's KVM.
#[derive(Parser, Debug)]
#[command(name = "vcpuctl", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Args, Debug, Clone)]
struct VmArgs {
    /// vCPUs and topology in QEMU's -smp syntax.
    #[arg(long, global = true, default_value = "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2",
          value_parser = parse_smp)]
    smp: SmpConfig,
    /// vPMU level: off, limited or full.
    #[arg(long, global = true, default_value = "off", value_parser = parse_vpmu)]
    vpmu: VpmuFeatureLevel,
    /// Guest memory in MiB (at least 16).
    #[arg(long, global = true, default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(16..=1 << 20))]
    memory: u64,
    /// Machine-readable output (JSON on stdout; progress goes to stderr).
    #[arg(long, global = true)]
    json: bool,
    /// A CPU template in Firecracker's custom CPU template JSON format, applied to every
    /// vCPU (demo, cpuid, boot).
    #[arg(long, global = true, value_name = "FILE")]
    template: Option<PathBuf>,
    /// Host CPUs per vCPU index, e.g. 0=0-1,1=1 (demo, cpuid, boot).
    #[arg(long, global = true, value_name = "INDEX=CPUS,...",
          value_parser = vmm_core::parse_vcpu_affinity)]
    vcpu_affinity: Option<vmm_core::VcpuAffinity>,
    /// Log the VMM's work to stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot vCPUs, show what the guest reads from CPUID, pause/resume, hotplug, stop (default).
    Demo {
        /// How the guest is asked to online and offline CPUs: upcall (a patched guest
        /// kernel's vsock channel) or acpi (the CPU hotplug controller and GED, what stock
        /// kernels understand).
        #[arg(long, value_enum, default_value_t = cmd::demo::HotplugChannel::Upcall)]
        hotplug: cmd::demo::HotplugChannel,
        /// Print the final per-vCPU metrics in this format (openmetrics: OpenMetrics text on
        /// stdout, after the demo's own output).
        #[arg(long, value_parser = ["openmetrics"])]
        metrics: Option<String>,
    },
    /// Boot every possible vCPU; each executes CPUID for what hwloc reads and the results are
    /// dumped (JSON, hwloc's format).
    Cpuid {
        /// Write hwloc CPUID dumps here (then: HWLOC_CPUID_PATH=DIR lstopo).
        #[arg(long)]
        hwloc_dir: Option<PathBuf>,
    },
    /// Every benchmark in one table: ours, bare KVM, ratio.
    Bench {
        #[command(flatten)]
        options: BenchOptions,
    },
    /// Resize against a misbehaving guest while another thread pauses and resumes the VM,
    /// then resize back; exit code 0 when the manager behaved, whatever the guest did.
    Chaos {
        /// The guest's misbehaviour: partial-add:K, partial-remove:K, silent, stray-reply,
        /// never-read or hang-up.
        #[arg(long)]
        fault: String,
        /// The resize target (default: maxcpus; for partial-remove, the boot count).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Write the ACPI tables a VM with this --smp gets (apic.dat, dsdt.dat, facp.dat,
    /// rsdp.dat, xsdt.dat), for `iasl -d`.
    Acpi {
        /// The folder to write them into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot the agent guest (every vCPU counts in guest memory), hot-add vCPUs over upcall
    /// if asked, pause and save it into a snapshot directory; print each vCPU's counter.
    Snapshot {
        /// Grow to this many vCPUs over upcall before saving (above the boot count, at most
        /// maxcpus).
        #[arg(long)]
        resize: Option<u32>,
        /// The snapshot directory (created if missing).
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a snapshot of `vcpuctl snapshot` in this process, run it and show every vCPU
    /// continuing (exit code 0 only then). --smp, --vpmu and --memory come from the snapshot.
    Restore {
        /// The snapshot directory.
        #[arg(long)]
        from: PathBuf,
        /// How long to run the restored guest, in milliseconds.
        #[arg(long, default_value_t = 200)]
        run_ms: u64,
    },
    /// This host's CPU fingerprint (CPU model, KVM's CPUID, KVM capabilities) as JSON, or the
    /// differences between two, and whether a template hides them.
    Fingerprint {
        #[command(subcommand)]
        action: FingerprintAction,
    },
    /// Boot a Linux kernel, console on this terminal.
    Boot {
        /// bzImage or ELF vmlinux.
        #[arg(long)]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(
            long,
            default_value = "console=ttyS0 earlyprintk=serial,ttyS0 noxsave panic=-1"
        )]
        cmdline: String,
        /// Once the VM has stopped, print the process's peak RSS (VmHWM) on stderr.
        #[arg(long)]
        peak_rss: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FingerprintAction {
    /// Print this host's fingerprint as JSON (to a file with --out).
    Dump {
        /// Write it here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Compare two fingerprints: exit code 0 when they match (or --template hides every
    /// difference), 1 otherwise.
    Compare {
        /// The first fingerprint (JSON from `dump`).
        a: PathBuf,
        /// The second.
        b: PathBuf,
    },
}

fn parse_smp(s: &str) -> Result<SmpConfig, String> {
    s.parse::<SmpConfig>().map_err(|e| e.to_string())
}

fn parse_vpmu(s: &str) -> Result<VpmuFeatureLevel, String> {
    s.parse::<VpmuFeatureLevel>().map_err(|e| e.to_string())
}

fn logger(verbose: u8) -> slog::Logger {
    if verbose == 0 {
        return slog::Logger::root(slog::Discard, o!());
    }
    let level = if verbose > 1 {
        slog::Level::Debug
    } else {
        slog::Level::Info
    };
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let format = slog_term::FullFormat::new(decorator).build().fuse();
    // The vCPU threads log too, and their seccomp filter forbids writing to stderr: the
    // lines go through a channel to slog-async's own thread, which writes them.
    let drain = slog_async::Async::new(format)
        .build()
        .filter_level(level)
        .fuse();
    slog::Logger::root(drain, o!())
}

fn run(cli: Cli) -> Result<(), CliError> {
    let a = cli.vm;
    let mut spec = VmSpec::new(a.smp, a.vpmu, a.memory, logger(a.verbose));
    if let Some(path) = &a.template {
        spec.template = Some(
            vmm_core::CpuTemplate::from_file(path).map_err(|e| CliError {
                code: cmd::ExitCode::Usage,
                message: e.to_string(),
            })?,
        );
    }
    spec.vcpu_affinity = a.vcpu_affinity.unwrap_or_default();
    let command = cli.command.unwrap_or(Command::Demo {
        hotplug: cmd::demo::HotplugChannel::Upcall,
        metrics: None,
    });
    // With --metrics, stdout carries only the metrics: the demo's lines go to stderr.
    let out = Out::new(
        a.json
            || matches!(
                command,
                Command::Demo {
                    metrics: Some(_),
                    ..
                }
            ),
    );
    match command {
        Command::Demo { hotplug, metrics } => {
            cmd::demo::run(&spec, &out, hotplug, a.json, metrics.as_deref())
        }
        Command::Fingerprint { action } => match action {
            FingerprintAction::Dump { out: file } => cmd::fingerprint::run_dump(file.as_deref()),
            FingerprintAction::Compare {
                a: first,
                b: second,
            } => cmd::fingerprint::run_compare(&first, &second, spec.template.as_ref(), a.json),
        },
        Command::Cpuid { hwloc_dir } => cmd::cpuid::run(&spec, &out, hwloc_dir, a.json),
        Command::Bench { options } => cmd::bench::run(&spec, &out, options, a.json),
        Command::Chaos { fault, to } => cmd::chaos::run(&spec, &out, &fault, to, a.json),
        Command::Acpi { out: dir } => cmd::acpi::run(&spec, &out, &dir, a.json),
        Command::Snapshot { resize, to } => cmd::snapshot::run(&spec, &out, resize, &to, a.json),
        Command::Restore { from, run_ms } => cmd::restore::run(&spec, &out, &from, run_ms, a.json),
        Command::Boot {
            kernel,
            initrd,
            cmdline,
            peak_rss,
        } => cmd::boot::run(&spec, &kernel, initrd.as_deref(), &cmdline, peak_rss),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("vcpuctl: {}", e.message);
        std::process::exit(e.code as i32);
    }
}
