//! `vcpuctl` as a process: demo, cpuid and bench smoke runs checked through their JSON, the
//! guest's CPUID view checked by hwloc's `lstopo` (an independent decoder) for ten topologies,
//! and the exit code of a bad `--smp`.

use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

fn vcpuctl() -> Command {
    Command::cargo_bin("vcpuctl").expect("the vcpuctl binary")
}

/// Whether this machine has KVM; `false` prints SKIPPED, and VCPU_REQUIRE_KVM=1 panics.
fn have_kvm(test: &str) -> bool {
    integration::kvm_or_skip(test).is_some()
}

fn run_json(args: &[&str]) -> Value {
    let out = vcpuctl().args(args).output().expect("run vcpuctl");
    assert!(
        out.status.success(),
        "vcpuctl {args:?} failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "vcpuctl {args:?} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn bad_smp_exits_2_naming_the_token() {
    let out = vcpuctl()
        .args(["cpuid", "--smp", "4,sockets=2,cores=0"])
        .output()
        .expect("run vcpuctl");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cores"), "{err}");
    let out = vcpuctl()
        .args(["--smp", "4,maxcpus=6,sockets=4,cores=1,threads=1"])
        .output()
        .expect("run vcpuctl");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn demo_json_shows_topology_pause_resume_resize_and_stop() {
    if !have_kvm("demo_json_shows_topology_pause_resume_resize_and_stop") {
        return;
    }
    let v = run_json(&["demo", "--json"]);
    assert_eq!(v["smp"], "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2");
    assert_eq!(
        v["apic_ids"],
        serde_json::json!([0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13])
    );
    let boot = v["boot_vcpus"].as_array().expect("boot_vcpus");
    assert_eq!(boot.len(), 2);
    for b in boot {
        assert_eq!(b["location"]["x2apic_id"], b["apic_id"]);
    }
    let pr = &v["pause_resume"];
    assert_eq!(pr["counters_paused"], pr["counters_still"]);
    let resize = v["resize"].as_array().expect("resize");
    assert_eq!(resize.len(), 2);
    assert_eq!(resize[0]["to"], 12);
    assert_eq!(resize[0]["present_apic_ids"], v["apic_ids"]);
    assert_eq!(resize[1]["present_apic_ids"], serde_json::json!([0, 1, 2]));
    assert!(
        v["stop"]
            .as_str()
            .unwrap_or("")
            .contains("device asked the VM to stop"),
        "{}",
        v["stop"]
    );
    assert_eq!(v["stop_vcpu_id"], 0);
    assert_eq!(v["metrics"].as_array().map(Vec::len), Some(3));
}

#[test]
fn bench_quick_json_has_both_sides() {
    if !have_kvm("bench_quick_json_has_both_sides") {
        return;
    }
    let v = run_json(&["bench", "--quick", "--json"]);
    let hot = v["hotplug"].as_array().expect("hotplug rows");
    assert_eq!(hot.len(), 2);
    let rows = v["vcpus"].as_array().expect("rows");
    // Startup, pause and resume (at least) for each of the 2 vCPU counts.
    assert!(rows.len() >= 6, "{rows:?}");
    for r in rows {
        for key in ["benchmark", "vcpus", "ours_ms", "bare_ms", "ratio"] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
    }
}

/// Counts lstopo's objects of one type in its XML output.
fn count(xml: &str, kind: &str) -> usize {
    xml.matches(&format!("type=\"{kind}\"")).count()
}

/// `lstopo` on the dumps, or `None` (skip) when hwloc is not installed outside CI.
fn lstopo(dir: &Path) -> Option<String> {
    let out = Command::new("lstopo-no-graphics")
        .args(["--of", "xml", "-"])
        .env("HWLOC_CPUID_PATH", dir)
        .env("HWLOC_COMPONENTS", "x86,stop")
        .output();
    match out {
        Ok(o) if o.status.success() => Some(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => panic!("lstopo failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let required = std::env::var("CI").is_ok_and(|v| v == "true")
                || std::env::var("VCPU_REQUIRE_KVM").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "lstopo-no-graphics is missing: apt-get install hwloc"
            );
            eprintln!("SKIPPED (no lstopo-no-graphics): apt-get install hwloc");
            None
        }
        Err(e) => panic!("cannot run lstopo-no-graphics: {e}"),
    }
}

/// (sockets, dies, cores, threads), non-powers of two among them.
const SHAPES: &[(u32, u32, u32, u32)] = &[
    (2, 1, 3, 2),
    (1, 3, 3, 1),
    (3, 1, 5, 1),
    (1, 1, 7, 1),
    (5, 1, 1, 1),
    (2, 2, 3, 2),
    (1, 1, 5, 3),
    (2, 3, 2, 1),
    (3, 1, 1, 2),
    (1, 1, 1, 1),
];

#[test]
fn hwloc_sees_the_configured_topology_in_what_guest_code_read() {
    if !have_kvm("hwloc_sees_the_configured_topology_in_what_guest_code_read") {
        return;
    }
    for &(s, d, c, t) in SHAPES {
        let max = s * d * c * t;
        let smp = format!("1,maxcpus={max},sockets={s},dies={d},cores={c},threads={t}");
        let dir = tempfile::tempdir().unwrap();
        let dir_arg = dir.path().to_str().unwrap();
        let v = run_json(&["cpuid", "--smp", &smp, "--hwloc-dir", dir_arg, "--json"]);
        let vcpus = v.as_array().expect("per-vCPU array");
        assert_eq!(vcpus.len() as u32, max, "{smp}");
        for cpu in vcpus {
            let regs = cpu["registers"].as_array().expect("registers");
            let leaf_b: Vec<&Value> = regs.iter().filter(|r| r["leaf"] == 0xb).collect();
            assert!(!leaf_b.is_empty(), "{smp}: leaf 0xB not read");
            for r in leaf_b {
                assert_eq!(r["edx"], cpu["apic_id"], "{smp}: leaf 0xB EDX of {cpu}");
            }
        }
        let Some(xml) = lstopo(dir.path()) else {
            return;
        };
        let what = format!("{smp}: lstopo of what the guest read");
        assert_eq!(count(&xml, "Package") as u32, s, "{what}");
        assert_eq!(count(&xml, "Core") as u32, s * d * c, "{what}");
        assert_eq!(count(&xml, "PU") as u32, max, "{what}");
        // L3 is per die (leaf 0x4 / 0x8000_001D), which is how hwloc sees dies on AMD.
        assert_eq!(count(&xml, "L3Cache") as u32, s * d, "{what}");
    }
}
