//! `vcpuctl demo --hotplug upcall|acpi` as a process, checked through its JSON: both channels
//! grow to the maximum and shrink to 3, and each resize names, in `guest_reported_apic_ids`,
//! what the added vCPUs' guest code read from CPUID: their APIC IDs.

mod common;

use common::run_json;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn check(channel: &str) {
    let v = run_json(&[
        "--smp",
        "2,maxcpus=14,sockets=2,cores=7",
        "demo",
        "--hotplug",
        channel,
        "--json",
    ]);
    assert_eq!(v["hotplug"], channel);
    let resize = v["resize"].as_array().expect("resize");
    assert_eq!(resize.len(), 2);
    let (grow, shrink) = (&resize[0], &resize[1]);
    assert_eq!(
        (grow["from"].as_u64(), grow["to"].as_u64()),
        (Some(2), Some(14))
    );
    let all: Vec<u64> = (0..7).chain(8..15).collect();
    assert_eq!(ids(&grow["present_apic_ids"]), all);
    assert_eq!(ids(&grow["guest_reported_apic_ids"]), all[2..]);
    assert_eq!(grow["hotplug"], channel);
    assert_eq!(
        (shrink["from"].as_u64(), shrink["to"].as_u64()),
        (Some(14), Some(3))
    );
    assert_eq!(ids(&shrink["present_apic_ids"]), [0, 1, 2]);
    assert!(ids(&shrink["guest_reported_apic_ids"]).is_empty());
    let [first, second] = [
        &shrink["removed_counters"][0],
        &shrink["removed_counters"][1],
    ];
    assert_eq!(first, second, "removed vCPUs stopped");
}

#[test]
fn demo_over_upcall_and_over_acpi_reports_what_the_new_vcpus_read() {
    if !common::have_kvm("demo_over_upcall_and_over_acpi_reports_what_the_new_vcpus_read") {
        return;
    }
    check("upcall");
    check("acpi");
}
