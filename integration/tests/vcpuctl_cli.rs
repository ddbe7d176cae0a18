//! `vcpuctl` as a process: demo and bench smoke runs checked through their JSON. (`vcpuctl
//! cpuid` is checked by hwloc in `cpuid_hwloc.rs`, exit codes in `vcpuctl_exit_codes.rs`.)

mod common;

use common::{have_kvm, run_json};

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
    // Grow to 12: the guest's BSP woke exactly the new (sparse) APIC IDs, each read its own
    // APIC ID from CPUID and runs guest code.
    let grow = &resize[0];
    assert_eq!(grow["to"], 12);
    assert_eq!(grow["present_apic_ids"], v["apic_ids"]);
    let new_ids = serde_json::json!([2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    assert_eq!(grow["woken_by_guest"], new_ids);
    let added = grow["added"].as_array().expect("added");
    assert_eq!(added.len(), 10);
    for a in added {
        assert_eq!(a["location"]["x2apic_id"], a["apic_id"], "{a}");
    }
    let counters = grow["added_counters"].as_array().expect("added_counters");
    assert!(
        counters.iter().all(|c| c.as_u64() > Some(0)),
        "{counters:?}"
    );
    // Back to 3: the guest parked the removed ones before their threads were exited; they
    // stopped, and their fds are kept.
    let shrink = &resize[1];
    assert_eq!(shrink["present_apic_ids"], serde_json::json!([0, 1, 2]));
    let removed = serde_json::json!([3, 4, 5, 8, 9, 10, 11, 12, 13]);
    assert_eq!(shrink["parked_by_guest"], removed);
    assert_eq!(shrink["kept_fds"], removed);
    assert_eq!(
        shrink["removed_counters"][0], shrink["removed_counters"][1],
        "removed vCPUs kept running"
    );
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
    // Every vCPU thread (2 boot, 10 hot-added) ran under the default seccomp filter.
    let threads = v["vcpu_threads"].as_array().expect("vcpu_threads");
    assert_eq!(threads.len(), 12, "{threads:?}");
    for t in threads {
        assert_eq!(t["seccomp_mode"], 2, "{t}");
        assert_eq!(t["seccomp_mode_name"], "filter", "{t}");
    }
}

#[test]
fn bench_quick_json_has_every_benchmark_with_both_sides() {
    if !have_kvm("bench_quick_json_has_every_benchmark_with_both_sides") {
        return;
    }
    let v = run_json(&["bench", "--quick", "--json"]);
    let lines = v["lines"].as_array().expect("lines");
    let has = |benchmark: &str, vcpus: u64| {
        lines
            .iter()
            .any(|l| l["benchmark"] == benchmark && l["vcpus"] == vcpus)
    };
    // The manager's rows and the actor's idle rows for both quick counts; the exit path; the
    // hot-add of 1 and 7 with its vCPU-work share, and the removals.
    for n in [1, 8] {
        for b in [
            "startup",
            "pause_all",
            "resume_all",
            "pause_idle",
            "resume_idle",
        ] {
            assert!(has(b, n), "{b} for {n} vCPUs missing: {lines:?}");
        }
    }
    assert!(has("pio_exit", 1), "{lines:?}");
    for n in [1, 7] {
        for b in [
            "hot_add",
            "hot_add_vcpu",
            "hot_remove",
            "hot_add_acpi",
            "hot_add_vcpu_acpi",
            "hot_remove_acpi",
        ] {
            assert!(has(b, n), "{b} +{n} missing: {lines:?}");
        }
    }
    for l in lines {
        assert!(l["ours_ms"].as_f64().is_some_and(|x| x > 0.0), "{l}");
        if l["benchmark"] != "hot_remove" && l["benchmark"] != "hot_remove_acpi" {
            assert!(l["bare_ms"].as_f64().is_some_and(|x| x > 0.0), "{l}");
            assert!(l["ratio"].as_f64().is_some_and(|x| x > 0.0), "{l}");
        } else {
            assert!(l["bare_ms"].is_null(), "no bare equivalent: {l}");
        }
    }
    // Each hot-add and its removal, as resize samples, over upcall and over ACPI.
    let samples = v["hotplug"].as_array().expect("hotplug samples");
    for channel in ["upcall", "acpi"] {
        let hot: Vec<(u64, u64)> = samples
            .iter()
            .filter(|s| s["channel"] == channel)
            .map(|s| {
                (
                    s["from"].as_u64().unwrap_or(0),
                    s["to"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(hot, [(1, 2), (2, 1), (1, 8), (8, 1)], "{channel}");
    }
}
