//! Prints the APIC ID and location of every vCPU of a `-smp` configuration and writes the
//! CPUID each would get in hwloc's dump format, so that hwloc can check it:
//!
//! ```text
//! cargo run -p topology --example cpuid-dump -- --smp 4,maxcpus=12,sockets=2,threads=2 \
//!     --vendor intel --hwloc-dir /tmp/dump
//! HWLOC_CPUID_PATH=/tmp/dump HWLOC_COMPONENTS=x86,stop lstopo-no-graphics
//! ```
//!
//! Options: `--smp SPEC` (QEMU syntax, required), `--vendor intel|amd|hygon` (default: the
//! host base's vendor, else intel), `--host FILE|DIR|this` (an hwloc CPUID dump file, an
//! hwloc dump directory, or this machine's CPUID; default: the vendor's synthetic base),
//! `--hwloc-dir DIR` (where to write the dump; optional). The dump covers all `maxcpus`
//! vCPUs, hot-pluggable ones included.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use topology::{build_vcpu_cpuid, host, hwloc, CpuVendor, CpuidEntry, SmpConfig};

const USAGE: &str = "usage: cpuid-dump --smp SPEC [--vendor intel|amd|hygon] \
                     [--host FILE|DIR|this] [--hwloc-dir DIR]";

struct Args {
    smp: SmpConfig,
    vendor: Option<CpuVendor>,
    host: Option<String>,
    hwloc_dir: Option<PathBuf>,
}

fn parse_vendor(s: &str) -> Result<CpuVendor, String> {
    match s.to_ascii_lowercase().as_str() {
        "intel" => Ok(CpuVendor::Intel),
        "amd" => Ok(CpuVendor::Amd),
        "hygon" => Ok(CpuVendor::Hygon),
        _ => Err(format!("--vendor {s:?}: expected intel, amd or hygon")),
    }
}

fn parse_args() -> Result<Args, String> {
    let mut smp = None;
    let mut vendor = None;
    let mut host = None;
    let mut hwloc_dir = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--smp" => smp = Some(value()?.parse::<SmpConfig>().map_err(|e| e.to_string())?),
            "--vendor" => vendor = Some(parse_vendor(&value()?)?),
            "--host" => host = Some(value()?),
            "--hwloc-dir" => hwloc_dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        smp: smp.ok_or_else(|| format!("--smp is required\n{USAGE}"))?,
        vendor,
        host,
        hwloc_dir,
    })
}

/// The host base, its description, and the vendor to build for.
fn base(args: &Args) -> Result<(Vec<CpuidEntry>, String, CpuVendor), String> {
    let Some(spec) = &args.host else {
        let vendor = args.vendor.unwrap_or(CpuVendor::Intel);
        return Ok((
            host::synthetic(vendor),
            format!("synthetic {vendor:?} base"),
            vendor,
        ));
    };
    let (entries, what) = if spec == "this" {
        (
            host::this_host().map_err(|e| e.to_string())?,
            "this machine's CPUID".to_string(),
        )
    } else {
        let path = PathBuf::from(spec);
        (
            host::read_host_file(&path).map_err(|e| e.to_string())?,
            format!("host CPUID file {}", path.display()),
        )
    };
    let host_vendor = CpuVendor::from_entries(&entries);
    let vendor = match (args.vendor, host_vendor) {
        (Some(v), Some(h)) if v != h => {
            return Err(format!(
                "--vendor {v:?} does not match the {what}, whose leaf 0 says {h:?}: drop --vendor \
                 or use a base of that vendor"
            ))
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => {
            return Err(format!(
                "the {what} names no known vendor in leaf 0: pass --vendor"
            ))
        }
    };
    Ok((entries, what, vendor))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let (base, what, vendor) = base(&args)?;
    let mut out = std::io::stdout().lock();
    // Output errors (e.g. a closed pipe) end the program with a message, not a panic.
    macro_rules! say {
        ($($arg:tt)*) => {
            writeln!(out, $($arg)*).map_err(|e| format!("cannot write to stdout: {e}"))?
        };
    }
    let smp = args.smp;
    let t = smp.topology;
    let l = t.apic_id_layout();
    say!("smp: {smp}");
    say!("base: {what}, vendor {vendor:?}");
    say!(
        "APIC ID bits: thread {}, core {}, die {}, socket {} (package shift {}); max APIC ID {}",
        l.thread_bits,
        l.core_bits,
        l.die_bits,
        l.socket_bits,
        l.package_shift(),
        t.max_apic_id()
    );
    if let Err(e) = t.check_xapic() {
        say!("warning: {e}");
    }
    say!(
        "{:>5} {:>8} {:>6} {:>4} {:>5} {:>6}  state",
        "vcpu",
        "apic_id",
        "socket",
        "die",
        "core",
        "thread"
    );
    let mut per_cpu = Vec::new();
    for i in 0..smp.max_cpus {
        let apic_id = t.apic_id(i).map_err(|e| e.to_string())?;
        let loc = t.location(i).map_err(|e| e.to_string())?;
        let state = if i < smp.boot_cpus {
            "boot"
        } else {
            "hot-pluggable"
        };
        say!(
            "{i:>5} {apic_id:>8} {:>6} {:>4} {:>5} {:>6}  {state}",
            loc.socket,
            loc.die,
            loc.core,
            loc.thread
        );
        per_cpu.push(build_vcpu_cpuid(&base, vendor, &t, i).map_err(|e| e.to_string())?);
    }
    if let Some(dir) = &args.hwloc_dir {
        hwloc::write_hwloc_dump(dir, &per_cpu)
            .map_err(|e| format!("cannot write the hwloc dump to {}: {e}", dir.display()))?;
        say!(
            "wrote {} puN files to {}; check with:\n  HWLOC_CPUID_PATH={} HWLOC_COMPONENTS=x86,stop \
             lstopo-no-graphics",
            per_cpu.len(),
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cpuid-dump: {e}");
            ExitCode::FAILURE
        }
    }
}
