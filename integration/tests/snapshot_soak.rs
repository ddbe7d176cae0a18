//! Soak on real KVM: 20 save/restore cycles of the agent guest in one process (restore from
//! the directory into a new VM, run until every vCPU counted on, pause, save over the same
//! directory, drop the VM), with the process's open fds, threads and RSS compared before and
//! after (after one warm-up cycle). Nothing may leak: each cycle creates and drops a whole VM
//! with its vCPU threads, fds and guest memory.
//!
//! This file holds a single test, so that no other test of the same process opens fds or
//! threads meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::usage;
use integration::guest::agent::{AgentVm, AgentVmOptions, ApMode, GuestAgent};
use integration::kvm_or_skip;
use vmm_core::{VcpuConfig, VpmuFeatureLevel};

const CYCLES: u32 = 20;
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// RSS may move a little (allocator arenas, page cache); a leaked VM is its 16 MiB of guest
/// memory, touched by the restore, per cycle.
const RSS_SLACK_KIB: u64 = 12 << 10;

/// Restores `dir`, checks every vCPU continues from its saved counter, saves over `dir`.
/// Returns the counters at the new save.
fn cycle(dir: &Path, apic_ids: &[u32], saved: &[u64]) -> Vec<u64> {
    let (vm, mut vcpus) = common::restore_with_defaults(dir).expect("restore");
    let agent = GuestAgent::new(
        vm.memory().clone(),
        slog::Logger::root(slog::Discard, slog::o!()),
    );
    agent.register(vm.io_bus()).expect("agent ports");
    assert_eq!(agent.progress_of(apic_ids), saved, "the restored counters");
    vcpus.resume_all().expect("resume");
    assert!(
        integration::poll_until(GUEST_TIMEOUT, Duration::from_millis(1), || {
            agent
                .progress_of(apic_ids)
                .iter()
                .zip(saved)
                .all(|(now, then)| now > then)
        }),
        "a restored vCPU did not continue"
    );
    vcpus.pause_all().expect("pause");
    vcpus.save_to(dir).expect("save");
    let counters = agent.progress_of(apic_ids);
    vcpus.exit_all().expect("exit");
    counters
}

#[test]
fn save_restore_cycles_leak_no_fds_threads_or_memory() {
    let Some(kvm) = kvm_or_skip("save_restore_cycles_leak_no_fds_threads_or_memory") else {
        return;
    };
    let smp = common::smp("3,maxcpus=4,sockets=1,cores=4,threads=1");
    let vm = AgentVm::create(
        kvm,
        VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled),
        AgentVmOptions {
            memory_size: 16 << 20,
            ap_mode: ApMode::Count,
            ..AgentVmOptions::default()
        },
    )
    .expect("agent VM");
    vm.start(GUEST_TIMEOUT).expect("boot vCPU reports");
    let apic_ids = vm.present_apic_ids();
    vm.vcpus.pause_all().expect("pause");
    let dir = tempfile::tempdir().expect("a directory");
    vm.vcpus.save_to(dir.path()).expect("first save");
    let mut counters = vm.agent.progress_of(&apic_ids);
    drop(vm);

    // Warm-up: the allocator and the page cache settle.
    counters = cycle(dir.path(), &apic_ids, &counters);
    let before = usage();
    let t = Instant::now();
    for _ in 0..CYCLES {
        counters = cycle(dir.path(), &apic_ids, &counters);
    }
    let elapsed = t.elapsed();
    let after = usage();
    eprintln!(
        "{CYCLES} save/restore cycles of 3 vCPUs and 16 MiB in {elapsed:?} ({:?} per cycle); \
         before {before:?}, after {after:?}",
        elapsed / CYCLES
    );
    after.assert_kept_since(&before, RSS_SLACK_KIB);
}
