//! `vcpuctl` as a process: demo and bench smoke runs checked through their JSON. (`vcpuctl
//! cpuid` is checked by hwloc in `cpuid_hwloc.rs`, exit codes in `vcpuctl_exit_codes.rs`.)

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
