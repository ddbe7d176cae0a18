//! `vcpuctl boot` of the tiny ELF (the `boot_process` benchmark's guest) as a process: the
//! BSP's write to the shutdown port stops the VM, with every AP still waiting for its SIPI,
//! and `vcpuctl` exits 0 saying so. A timeout kills a VM that does not stop.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::CommandCargoExt;

/// Far above what a stop takes: only a VM that does not stop reaches it.
const TIMEOUT: Duration = Duration::from_secs(60);

fn boot_tiny_elf(smp: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("tiny.elf");
    integration::bench::tiny_elf::write(&elf).unwrap();
    let mut child = Command::cargo_bin("vcpuctl")
        .unwrap()
        .args(["boot", "--kernel"])
        .arg(&elf)
        .args(["--smp", smp, "--peak-rss"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vcpuctl boot --smp {smp} did not stop within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "vcpuctl boot failed ({status}): {stderr}");
    stderr
}

#[test]
fn the_shutdown_port_stops_the_tiny_elf_at_once() {
    if integration::kvm_or_skip("the_shutdown_port_stops_the_tiny_elf_at_once").is_none() {
        return;
    }
    for smp in ["1", "8"] {
        let stderr = boot_tiny_elf(smp);
        // The BSP (vCPU 0) stopped the VM on the `out` right after the port number load.
        assert!(
            stderr.contains("vCPU 0: a device asked the VM to stop"),
            "--smp {smp}: {stderr}"
        );
        let rss = stderr
            .lines()
            .find_map(|l| l.strip_prefix(integration::cmd::boot::PEAK_RSS_PREFIX))
            .unwrap_or_else(|| panic!("no peak RSS line: {stderr}"));
        assert!(rss.ends_with(" KiB"), "{rss}");
    }
}
