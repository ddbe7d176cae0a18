//! vCPU and VM state save/restore and snapshot files on real KVM, without the vCPU manager:
//! a guest counts in memory on two vCPUs with sparse APIC IDs, is paused, saved to a
//! snapshot directory, restored into a new VM, and continues; and every kind of damaged or
//! foreign snapshot is refused with its typed error.

use std::path::Path;
use std::time::Duration;

mod common;

use integration::bench::snapshot::{wait_for, StateVm};
use integration::guest::{counter_addr, smp_counter};
use integration::kvm_or_skip;
use vmm_core::arch::x86_64::msr::IA32_TSC;
use vmm_core::error::SnapshotFile;
use vmm_core::snapshot::{
    self, HostInfo, SnapshotState, StateFile, FORMAT_VERSION, HEADER_LEN, MEMORY_FILE, STATE_FILE,
};
use vmm_core::{CpuTopology, SnapshotError};

const MEMORY: u64 = 16 << 20;
/// Long enough for the emulated start of an AP on a loaded 2-core host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// 2 sockets x 3 cores: indices 0 and 4 have APIC IDs 0 and 5 (sparse).
fn topology() -> CpuTopology {
    CpuTopology::new(2, 1, 3, 1).unwrap()
}

/// Runs `vm` until every vCPU's counter is above `above` (by APIC ID), then pauses it.
/// Returns the port-I/O exits seen.
fn run_until_counting(vm: &mut StateVm, above: &[u64]) -> u64 {
    let runner = vm.start().unwrap();
    let apic_ids: Vec<u32> = vm.ids.iter().map(|&(_, a)| a).collect();
    let counting = wait_for(GUEST_TIMEOUT, || {
        Ok(apic_ids
            .iter()
            .zip(above)
            .all(|(&a, &min)| vm.read_u64(counter_addr(a)).unwrap() > min))
    })
    .unwrap();
    let exits = runner.io_exits();
    vm.fds = runner.pause(PAUSE_TIMEOUT).unwrap();
    assert!(
        counting,
        "the guest did not count past {above:?} within {GUEST_TIMEOUT:?}"
    );
    exits
}

fn counters(vm: &StateVm) -> Vec<u64> {
    vm.ids
        .iter()
        .map(|&(_, a)| vm.read_u64(counter_addr(a)).unwrap())
        .collect()
}

/// A running guest, paused and saved into `dir`; returns the state and the counters at
/// the save.
fn take_snapshot(dir: &Path) -> Option<(SnapshotState, Vec<u64>)> {
    kvm_or_skip("vmm_state")?;
    let mut vm = StateVm::with_program(topology(), MEMORY, &smp_counter(), &[0, 4]).unwrap();
    assert_eq!(vm.ids, vec![(0, 0), (4, 5)]);
    run_until_counting(&mut vm, &[0, 0]);
    let saved = vm.save().unwrap();
    let at_save = counters(&vm);
    snapshot::write(dir, &saved, vm.vm.memory()).unwrap();
    Some((saved, at_save))
}

#[test]
fn a_restored_guest_continues_counting_on_every_vcpu() {
    let dir = tempfile::tempdir().unwrap();
    let Some((saved, at_save)) = take_snapshot(dir.path()) else {
        return;
    };
    assert_eq!(saved.vcpus.len(), 2);
    assert_eq!(saved.vcpus[1].apic_id, 5);
    assert_eq!(saved.vcpus[1].state.lapic_apic_id(), 5);
    assert!(!saved.vcpus[0].state.msrs.is_empty());

    // A new VM from the files alone.
    let verified = snapshot::read(dir.path()).unwrap();
    let state = verified.state();
    let probe = StateVm::new(state.config.topology, MEMORY).unwrap();
    verified
        .check_host(&HostInfo::this_host(probe.vm.kvm()), probe.vm.kvm())
        .unwrap();
    drop(probe);
    let mut vm = StateVm::new(state.config.topology, MEMORY).unwrap();
    verified.restore_memory(vm.vm.memory()).unwrap();
    vm.restore_into(state).unwrap();
    assert_eq!(vm.ids, vec![(0, 0), (4, 5)]);
    // Before anything runs, memory holds the counters of the save.
    assert_eq!(counters(&vm), at_save);

    // The restored state reads back as saved (the TSC excepted: it runs on).
    let again = vm.save().unwrap();
    for (a, b) in saved.vcpus.iter().zip(&again.vcpus) {
        assert_eq!((a.index, a.apic_id), (b.index, b.apic_id));
        assert_eq!(a.state.regs, b.state.regs, "vCPU {}", a.index);
        assert_eq!(a.state.sregs, b.state.sregs, "vCPU {}", a.index);
        assert_eq!(a.state.mp_state, b.state.mp_state, "vCPU {}", a.index);
        assert_eq!(a.state.xcrs, b.state.xcrs, "vCPU {}", a.index);
        assert_eq!(a.state.cpuid, b.state.cpuid, "vCPU {}", a.index);
        assert_eq!(a.state.lapic_apic_id(), b.state.lapic_apic_id());
        let tsc_a = a.state.msr(IA32_TSC).unwrap();
        let tsc_b = b.state.msr(IA32_TSC).unwrap();
        assert!(
            tsc_b >= tsc_a,
            "vCPU {}: TSC went back from {tsc_a} to {tsc_b}",
            a.index
        );
        for m in &a.state.msrs {
            if m.index == IA32_TSC {
                continue;
            }
            assert_eq!(
                b.state.msr(m.index),
                Some(m.data),
                "vCPU {}: MSR {:#x}",
                a.index,
                m.index
            );
        }
    }

    // Run: every vCPU continues from its saved counter, without starting over (the start
    // reports its CPUID through port I/O; a continued guest makes no port I/O).
    let exits = run_until_counting(&mut vm, &at_save);
    assert_eq!(exits, 0, "the restored guest started over");
    let after = vm.save().unwrap();
    common::assert_tsc_advanced(&saved.vcpus, &after.vcpus);
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    for f in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn state_json(dir: &Path) -> StateFile {
    let b = std::fs::read(dir.join(STATE_FILE)).unwrap();
    serde_json::from_slice(&b[HEADER_LEN..]).unwrap()
}

fn write_state_json(dir: &Path, s: &StateFile) {
    let json = serde_json::to_vec(s).unwrap();
    common::rewrite_snapshot_file(
        &dir.join(STATE_FILE),
        SnapshotFile::State,
        FORMAT_VERSION,
        &json,
    );
}

/// The error of reading and checking the snapshot in `dir` on this host.
fn restore_error(dir: &Path) -> SnapshotError {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    match snapshot::read(dir) {
        Err(e) => e,
        Ok(v) => v
            .check_host(&HostInfo::this_host(&kvm), &kvm)
            .expect_err("the snapshot was accepted"),
    }
}

#[test]
fn damaged_or_foreign_snapshots_are_refused_with_their_error() {
    let good = tempfile::tempdir().unwrap();
    if take_snapshot(good.path()).is_none() {
        return;
    }
    let case = || {
        let d = tempfile::tempdir().unwrap();
        copy_dir(good.path(), d.path());
        d
    };
    let file_len = |f: &str| std::fs::read(good.path().join(f)).unwrap().len();
    let state_len = file_len(STATE_FILE);
    let mem_len = file_len(MEMORY_FILE);

    // A byte flipped in each file's content: a checksum error naming the file.
    for (file, kind, len) in [
        (STATE_FILE, SnapshotFile::State, state_len),
        (MEMORY_FILE, SnapshotFile::Memory, mem_len),
    ] {
        let d = case();
        flip(&d.path().join(file), HEADER_LEN + (len - HEADER_LEN) / 2);
        let e = restore_error(d.path());
        assert!(
            matches!(&e, SnapshotError::Checksum { file, .. } if *file == kind),
            "{file}: {e}"
        );
        // ... and in each header field: the header's own checksum.
        let d = case();
        flip(&d.path().join(file), 20);
        let e = restore_error(d.path());
        assert!(
            matches!(e, SnapshotError::HeaderCorrupted { .. }),
            "{file}: {e}"
        );
        // Truncated.
        let d = case();
        let p = d.path().join(file);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 100]).unwrap();
        let e = restore_error(d.path());
        assert!(
            matches!(&e, SnapshotError::Truncated { file, .. } if *file == kind),
            "{file}: {e}"
        );
        // Cut inside the header, and empty.
        std::fs::write(&p, &b[..HEADER_LEN - 4]).unwrap();
        assert!(matches!(
            restore_error(d.path()),
            SnapshotError::Truncated { .. }
        ));
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            restore_error(d.path()),
            SnapshotError::NotASnapshot { .. }
        ));
        // Missing.
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(restore_error(d.path()), SnapshotError::Io { .. }));
    }

    // Another format version (a valid file otherwise).
    let d = case();
    let p = d.path().join(STATE_FILE);
    let content = std::fs::read(&p).unwrap()[HEADER_LEN..].to_vec();
    common::rewrite_snapshot_file(&p, SnapshotFile::State, FORMAT_VERSION + 1, &content);
    let e = restore_error(d.path());
    assert!(
        matches!(e, SnapshotError::FormatVersion { found, supported, .. }
            if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
        "{e}"
    );

    // Valid JSON of the wrong shape, under a valid header: a parse error.
    let d = case();
    common::rewrite_snapshot_file(
        &d.path().join(STATE_FILE),
        SnapshotFile::State,
        FORMAT_VERSION,
        b"{\"vcpus\": 3}",
    );
    assert!(matches!(
        restore_error(d.path()),
        SnapshotError::Parse { .. }
    ));

    // The files swapped: each is the wrong kind.
    let d = case();
    std::fs::copy(good.path().join(MEMORY_FILE), d.path().join(STATE_FILE)).unwrap();
    assert!(matches!(
        restore_error(d.path()),
        SnapshotError::WrongFile { .. }
    ));

    // A memory file of another snapshot.
    let d = case();
    let p = d.path().join(MEMORY_FILE);
    let mut content = std::fs::read(&p).unwrap()[HEADER_LEN..].to_vec();
    content[0x30_0000] ^= 1;
    common::rewrite_snapshot_file(&p, SnapshotFile::Memory, FORMAT_VERSION, &content);
    assert!(matches!(
        restore_error(d.path()),
        SnapshotError::MemoryFileMismatch { .. }
    ));

    // Another CPU vendor.
    let d = case();
    let mut s = state_json(d.path());
    let other = if s.state.host.vendor == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    s.state.host.vendor = other.to_string();
    write_state_json(d.path(), &s);
    let e = restore_error(d.path());
    assert!(
        matches!(&e, SnapshotError::CpuVendor { saved, .. } if saved == other),
        "{e}"
    );
    assert!(e.to_string().contains(other), "{e}");

    // A CPUID feature this host's KVM does not provide (a leaf 7 EBX bit KVM lacks).
    let d = case();
    let mut s = state_json(d.path());
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let provided = snapshot::kvm_provided_cpuid(&kvm).unwrap();
    let leaf7 = provided
        .iter()
        .find(|e| e.function == 7 && e.index == 0)
        .map_or(0, |e| e.ebx);
    let missing = 1u32 << (!leaf7).trailing_zeros();
    let e7 = s.state.vcpus[1]
        .state
        .cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .unwrap();
    e7.ebx |= missing;
    write_state_json(d.path(), &s);
    let e = restore_error(d.path());
    assert!(
        matches!(e, SnapshotError::CpuidUnsupported { vcpu_index: 4, leaf: 7, register: "ebx", missing: m, .. } if m == missing),
        "{e}"
    );

    // An MSR this host's KVM does not know.
    let d = case();
    let mut s = state_json(d.path());
    s.state.vcpus[0]
        .state
        .msrs
        .push(vmm_core::arch::x86_64::state::MsrValue {
            index: 0x4b56_4dff,
            data: 0,
        });
    write_state_json(d.path(), &s);
    let e = restore_error(d.path());
    assert!(
        matches!(
            e,
            SnapshotError::MsrUnsupported {
                vcpu_index: 0,
                msr: 0x4b56_4dff
            }
        ),
        "{e}"
    );

    // The good snapshot itself is accepted.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    snapshot::read(good.path())
        .unwrap()
        .check_host(&HostInfo::this_host(&kvm), &kvm)
        .unwrap();
}

#[test]
fn memory_of_another_size_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    if take_snapshot(dir.path()).is_none() {
        return;
    }
    let verified = snapshot::read(dir.path()).unwrap();
    let vm = StateVm::new(topology(), MEMORY * 2).unwrap();
    vmm_core::vm::write_guest(vm.vm.memory(), 0x30_0000, &[0xab; 8]).unwrap();
    let e = verified.restore_memory(vm.vm.memory()).unwrap_err();
    assert!(matches!(e, SnapshotError::MemoryLayout { .. }), "{e}");
    assert_eq!(
        vm.read_u64(0x30_0000).unwrap(),
        u64::from_le_bytes([0xab; 8])
    );
}

#[test]
fn the_snapshot_benchmark_gives_every_row() {
    if kvm_or_skip("the_snapshot_benchmark_gives_every_row").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lines =
        integration::bench::snapshot::bench_snapshot(2, Some(16 << 20), dir.path()).unwrap();
    let names: Vec<&str> = lines.iter().map(|l| l.benchmark).collect();
    assert_eq!(
        names,
        [
            "save_state",
            "restore_state",
            "save_snapshot",
            "restore_snapshot"
        ]
    );
    assert!(lines
        .iter()
        .all(|l| l.vcpus == 2 && l.ours_ms.is_finite() && l.bare_ms.is_finite()));
    let lines = integration::bench::snapshot::bench_snapshot(1, None, dir.path()).unwrap();
    assert_eq!(lines.len(), 2);
}

/// The numbers for the README: `cargo test -p integration --test vmm_state -- --ignored
/// --nocapture`.
#[test]
#[ignore = "a benchmark: prints the table, asserts nothing"]
fn snapshot_benchmark_table() {
    if kvm_or_skip("snapshot_benchmark_table").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for n in [1, 8, 64, 254] {
        lines.extend(integration::bench::snapshot::bench_snapshot(n, None, dir.path()).unwrap());
        let with_memory =
            integration::bench::snapshot::bench_snapshot(n, Some(64 << 20), dir.path()).unwrap();
        lines.extend(with_memory.into_iter().skip(2));
    }
    println!("{}", integration::bench::table(&lines));
}
