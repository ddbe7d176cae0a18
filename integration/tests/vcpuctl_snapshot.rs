//! Snapshots end to end on real KVM with the agent guest: `vcpuctl snapshot` in one process
//! and `vcpuctl restore` in another (hot-added vCPUs, sparse APIC IDs, every counter
//! continues from its saved value); `vcpuctl restore` refusing each kind of damaged or
//! foreign snapshot with a clear error; and, in this process, the TSC not going backwards
//! across a save and restore.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

mod common;

use common::{run_json, vcpuctl};
use integration::guest::agent::{AgentVm, AgentVmOptions, ApMode, GuestAgent};
use serde_json::Value;
use vmm_core::error::SnapshotFile;
use vmm_core::snapshot::{StateFile, FORMAT_VERSION, HEADER_LEN, MEMORY_FILE, STATE_FILE};
use vmm_core::{SnapshotError, VcpuConfig, VmmError};

/// 2 sockets x 3 cores x 2 threads: APIC IDs 6 and 7 do not exist (sparse).
const SMP: &str = "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2";
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn run(args: &[&str]) -> Output {
    vcpuctl().args(args).output().expect("run vcpuctl")
}

fn field(v: &Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or_else(|| panic!("{name} in {v}"))
}

/// `vcpuctl snapshot` of the agent guest into `dir`; returns its `vcpus`.
fn take(dir: &Path, extra: &[&str]) -> Vec<Value> {
    let to = dir.to_str().unwrap();
    let mut args = vec!["snapshot", "--smp", SMP, "--to", to, "--json"];
    args.extend_from_slice(extra);
    run_json(&args)["vcpus"].as_array().expect("vcpus").clone()
}

#[test]
fn a_snapshot_with_hot_added_vcpus_continues_in_another_process() {
    if !common::have_kvm("a_snapshot_with_hot_added_vcpus_continues_in_another_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Boot 2, hot-add 5 over upcall: indices 0..7, APIC IDs 0-5 and 8.
    let saved = take(dir.path(), &["--resize", "7"]);
    let ids: Vec<(u64, u64)> = saved
        .iter()
        .map(|v| (field(v, "index"), field(v, "apic_id")))
        .collect();
    assert_eq!(
        ids,
        [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 8)]
    );
    assert!(saved.iter().all(|v| field(v, "counter") > 0), "{saved:?}");

    let from = dir.path().to_str().unwrap();
    let restored = run_json(&["restore", "--from", from, "--json", "--run-ms", "200"]);
    let restored = restored["vcpus"].as_array().expect("vcpus");
    assert_eq!(restored.len(), saved.len());
    for (s, r) in saved.iter().zip(restored) {
        assert_eq!(field(r, "index"), field(s, "index"));
        assert_eq!(field(r, "apic_id"), field(s, "apic_id"));
        assert_eq!(
            field(r, "counter_at_restore"),
            field(s, "counter"),
            "vCPU {}: the restored memory is not the saved one",
            field(s, "index")
        );
        assert!(
            field(r, "counter_after") > field(r, "counter_at_restore"),
            "vCPU {} did not continue: {r}",
            field(s, "index")
        );
    }
    // The same snapshot restores again (restoring does not consume it).
    let again = run_json(&["restore", "--from", from, "--json", "--run-ms", "50"]);
    assert_eq!(again["vcpus"][6]["counter_at_restore"], saved[6]["counter"]);
}

fn copy_of(good: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(good.join(f), d.path().join(f)).unwrap();
    }
    d
}

/// `vcpuctl restore` of `dir` fails with exit code 1 and a message containing `words`.
fn refused(dir: &Path, case: &str, words: &[&str]) -> String {
    let out = run(&["restore", "--from", dir.to_str().unwrap(), "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
    assert!(out.stdout.is_empty(), "{case}: printed a result");
    for w in words {
        assert!(stderr.contains(w), "{case}: {w:?} not in {stderr}");
    }
    stderr
}

#[test]
fn restore_refuses_every_kind_of_damaged_or_foreign_snapshot() {
    if !common::have_kvm("restore_refuses_every_kind_of_damaged_or_foreign_snapshot") {
        return;
    }
    let good = tempfile::tempdir().unwrap();
    take(good.path(), &["--memory", "16"]);

    for (file, name) in [(STATE_FILE, "state file"), (MEMORY_FILE, "memory file")] {
        // A byte flipped in the content.
        let d = copy_of(good.path());
        let p = d.path().join(file);
        let mut b = std::fs::read(&p).unwrap();
        let mid = HEADER_LEN + (b.len() - HEADER_LEN) / 2;
        b[mid] ^= 0x5a;
        std::fs::write(&p, &b).unwrap();
        refused(d.path(), &format!("{file} flipped"), &[name, "corrupted"]);
        // Truncated.
        let d = copy_of(good.path());
        let p = d.path().join(file);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 100]).unwrap();
        refused(d.path(), &format!("{file} truncated"), &[name, "truncated"]);
    }

    // Another format version.
    let d = copy_of(good.path());
    let p = d.path().join(STATE_FILE);
    let content = std::fs::read(&p).unwrap()[HEADER_LEN..].to_vec();
    common::rewrite_snapshot_file(&p, SnapshotFile::State, FORMAT_VERSION + 1, &content);
    refused(
        d.path(),
        "format version",
        &["format version", &(FORMAT_VERSION + 1).to_string()],
    );

    // Another CPU vendor.
    let d = copy_of(good.path());
    let p = d.path().join(STATE_FILE);
    let mut s: StateFile =
        serde_json::from_slice(&std::fs::read(&p).unwrap()[HEADER_LEN..]).unwrap();
    let other = if s.state.host.vendor == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    s.state.host.vendor = other.to_string();
    common::rewrite_snapshot_file(
        &p,
        SnapshotFile::State,
        FORMAT_VERSION,
        &serde_json::to_vec(&s).unwrap(),
    );
    refused(d.path(), "vendor", &[other, "CPU"]);

    // A directory without a snapshot.
    let empty = tempfile::tempdir().unwrap();
    refused(empty.path(), "empty directory", &[STATE_FILE]);

    // The good one restores.
    run_json(&["restore", "--from", good.path().to_str().unwrap(), "--json"]);
}

#[test]
fn restore_in_process_continues_counting_and_the_tsc_does_not_go_back() {
    let Some(kvm) = integration::kvm_or_skip(
        "restore_in_process_continues_counting_and_the_tsc_does_not_go_back",
    ) else {
        return;
    };
    let smp: vmm_core::SmpConfig = "3,maxcpus=6,sockets=2,cores=3,threads=1".parse().unwrap();
    let config = VcpuConfig::from_smp(smp, vmm_core::VpmuFeatureLevel::Disabled);
    let vm = AgentVm::create(
        kvm,
        config,
        AgentVmOptions {
            memory_size: 16 << 20,
            ap_mode: ApMode::Count,
            ..AgentVmOptions::default()
        },
    )
    .unwrap();
    vm.start(GUEST_TIMEOUT).unwrap();
    let apic_ids = vm.present_apic_ids();
    assert_eq!(apic_ids, [0, 1, 2]);
    let before = vm.agent.progress_of(&apic_ids);
    assert!(integration::poll_until(
        GUEST_TIMEOUT,
        Duration::from_millis(1),
        || vm
            .agent
            .progress_of(&apic_ids)
            .iter()
            .zip(&before)
            .all(|(a, b)| a > b)
    ));
    // Not paused: refused.
    let e = vm.vcpus.save().unwrap_err();
    assert!(matches!(e, SnapshotError::NotPaused { .. }), "{e}");
    vm.vcpus.pause_all().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let saved = vm.vcpus.save_to(dir.path()).unwrap();
    let at_save = vm.agent.progress_of(&apic_ids);
    drop(vm);

    let (vm2, restored) = common::restore_with_defaults(dir.path()).unwrap();
    let agent = GuestAgent::new(
        vm2.memory().clone(),
        slog::Logger::root(slog::Discard, slog::o!()),
    );
    agent.register(vm2.io_bus()).unwrap();
    assert_eq!(agent.progress_of(&apic_ids), at_save);
    restored.resume_all().unwrap();
    assert!(integration::poll_until(
        GUEST_TIMEOUT,
        Duration::from_millis(1),
        || agent
            .progress_of(&apic_ids)
            .iter()
            .zip(&at_save)
            .all(|(a, b)| a > b)
    ));
    restored.pause_all().unwrap();
    let after = restored.save().unwrap();
    common::assert_tsc_advanced(&saved.state().vcpus, &after.state().vcpus);
    // The kvmclock continues from the saved value too.
    assert!(after.state().vm.clock.clock >= saved.state().vm.clock.clock);

    // A snapshot whose vCPU list was edited is refused before any vCPU exists.
    let p = dir.path().join(STATE_FILE);
    let mut s: StateFile =
        serde_json::from_slice(&std::fs::read(&p).unwrap()[HEADER_LEN..]).unwrap();
    s.state.vcpus[1].apic_id = 7;
    common::rewrite_snapshot_file(
        &p,
        SnapshotFile::State,
        FORMAT_VERSION,
        &serde_json::to_vec(&s).unwrap(),
    );
    let e = common::restore_with_defaults(dir.path()).unwrap_err();
    assert!(
        matches!(e, VmmError::Snapshot(SnapshotError::InvalidVcpus { .. })),
        "{e}"
    );
}

#[test]
fn bench_has_the_snapshot_rows_with_both_sides() {
    if !common::have_kvm("bench_has_the_snapshot_rows_with_both_sides") {
        return;
    }
    let v = run_json(&["bench", "--quick", "--boot-runs", "0", "--json"]);
    let lines = v["lines"].as_array().expect("lines");
    for n in [1u64, 8] {
        for b in [
            "save_state",
            "restore_state",
            "save_snapshot",
            "restore_snapshot",
            "vm_save",
            "vm_restore",
        ] {
            let l = lines
                .iter()
                .find(|l| l["benchmark"] == b && l["vcpus"] == n)
                .unwrap_or_else(|| panic!("{b} for {n} vCPUs missing: {lines:?}"));
            assert!(l["ours_ms"].as_f64().is_some_and(|x| x > 0.0), "{l}");
            assert!(l["bare_ms"].as_f64().is_some_and(|x| x > 0.0), "{l}");
        }
    }
    // The rows that were there before are still there.
    for b in ["startup", "pause_all", "resume_all", "pio_exit", "hot_add"] {
        assert!(lines.iter().any(|l| l["benchmark"] == b), "{b} missing");
    }
}
