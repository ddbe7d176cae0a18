//! vCPU hotplug end to end on real KVM: 2 of max 12 vCPUs (2 sockets x 3 cores x 2 threads,
//! sparse APIC IDs) of the CPUID probe guest; the upcall client talks to the guest-side server
//! through a Unix socket muxer stub; the guest's BSP wakes each new APIC ID with INIT/SIPI and
//! the new vCPU reports its APIC ID from CPUID.

use std::collections::BTreeSet;
use std::time::Duration;

use hotplug::guest::GuestFault;
use hotplug::HotplugError;
use integration::cli::{ProbeVm, VmSpec};
use integration::hotplug_demo::attach_upcall;
use integration::kvm_or_skip;
use topology::SmpConfig;
use vmm_core::VmmError;
use vpmu::VpmuFeatureLevel;

fn spec() -> VmSpec {
    VmSpec {
        smp: "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2"
            .parse::<SmpConfig>()
            .unwrap(),
        vpmu: VpmuFeatureLevel::Disabled,
        memory_mib: 64,
        logger: slog::Logger::root(slog::Discard, slog::o!()),
    }
}

fn present_ids(p: &ProbeVm) -> Vec<u32> {
    p.guest
        .vcpus
        .present_vcpus()
        .iter()
        .map(|v| v.apic_id)
        .collect()
}

/// The APIC IDs that reported, from what guest code read (leaf 0x1 and leaf 0xB).
fn reported(p: &ProbeVm) -> BTreeSet<u32> {
    p.guest
        .reports
        .reports()
        .iter()
        .filter(|r| r.leafb_edx == Some(r.vcpu_id) && r.leaf1_apic_id() == Some(r.vcpu_id))
        .map(|r| r.vcpu_id)
        .collect()
}

#[test]
fn resize_grows_shrinks_reuses_fds_and_rejects_out_of_range() {
    let Some(kvm) = kvm_or_skip("resize_grows_shrinks_reuses_fds_and_rejects_out_of_range") else {
        return;
    };
    let spec = spec();
    let mut p = ProbeVm::boot(kvm, &spec, 2).expect("boot 2 vCPUs");
    let dir = tempfile::tempdir().unwrap();
    let guest = attach_upcall(
        &mut p.guest,
        &dir.path().join("upcall.sock"),
        &spec.logger,
        Duration::from_secs(60),
    )
    .expect("upcall");
    assert_eq!(present_ids(&p), [0, 1]);

    // Out of range: nothing changes.
    for bad in [0, 13] {
        let e = p.guest.vcpus.resize_vcpus(bad).unwrap_err();
        assert!(
            matches!(e, VmmError::ResizeOutOfRange { target, max: 12 } if target == bad),
            "{e}"
        );
        assert!(e.to_string().contains(&bad.to_string()), "{e}");
        assert_eq!(present_ids(&p), [0, 1]);
    }

    // Grow to 12: the guest wakes exactly the requested sparse APIC IDs, each reports.
    let all = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13];
    let out = p.guest.vcpus.resize_vcpus(12).expect("grow to 12");
    assert_eq!(
        out.added.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
        all[2..]
    );
    assert_eq!(present_ids(&p), all);
    assert_eq!(reported(&p), all.iter().copied().collect());
    assert_eq!(
        guest.server.present_apic_ids(),
        all.map(|i| i as u8).to_vec()
    );
    for v in p.views().unwrap() {
        let loc = v.location.expect("topology leaves");
        assert_eq!(loc.x2apic_id, v.apic_id);
    }

    // Shrink to 3: highest indices first; threads gone, fds kept.
    let out = p.guest.vcpus.resize_vcpus(3).expect("shrink to 3");
    assert_eq!(
        out.removed.iter().map(|s| s.apic_id).collect::<Vec<_>>(),
        [13, 12, 11, 10, 9, 8, 5, 4, 3]
    );
    assert_eq!(present_ids(&p), [0, 1, 2]);
    assert_eq!(
        p.guest.vcpus.kept_vcpu_fds(),
        [3, 4, 5, 8, 9, 10, 11, 12, 13]
    );

    // Grow to 6 again: kept fds reused, the guests report again.
    for id in [3, 4, 5] {
        p.guest.reports.forget(id);
    }
    p.guest.vcpus.resize_vcpus(6).expect("grow to 6");
    assert_eq!(present_ids(&p), [0, 1, 2, 3, 4, 5]);
    assert_eq!(p.guest.vcpus.kept_vcpu_fds(), [8, 9, 10, 11, 12, 13]);
    assert!([3, 4, 5].iter().all(|id| reported(&p).contains(id)));

    // The guest hangs up mid-request: the new threads are rolled back, nothing changes, and
    // the error says the guest's state is unknown.
    guest.server.inject_fault(GuestFault::HangUp);
    let e = p.guest.vcpus.resize_vcpus(8).unwrap_err();
    assert!(
        matches!(
            &e,
            VmmError::HotplugFailed {
                op: "hot-add",
                source: HotplugError::ConnectionReset { .. },
                guest_state_unknown: true,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(present_ids(&p), [0, 1, 2, 3, 4, 5]);
    assert_eq!(p.guest.vcpus.kept_vcpu_fds(), [8, 9, 10, 11, 12, 13]);

    // Same for a removal: every vCPU keeps running.
    guest.server.inject_fault(GuestFault::HangUp);
    let e = p.guest.vcpus.resize_vcpus(2).unwrap_err();
    assert!(
        matches!(
            &e,
            VmmError::HotplugFailed {
                op: "hot-remove",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(present_ids(&p), [0, 1, 2, 3, 4, 5]);

    // The channel reconnects by itself afterwards; vCPU 0 is never removed.
    p.guest.vcpus.resize_vcpus(1).expect("shrink to 1");
    assert_eq!(present_ids(&p), [0]);
    p.guest.vcpus.exit_all().expect("exit all");
}

#[test]
fn silent_guest_times_out_and_the_new_vcpus_are_rolled_back() {
    let Some(kvm) = kvm_or_skip("silent_guest_times_out_and_the_new_vcpus_are_rolled_back") else {
        return;
    };
    let spec = spec();
    let mut p = ProbeVm::boot(kvm, &spec, 2).expect("boot 2 vCPUs");
    let dir = tempfile::tempdir().unwrap();
    let guest = attach_upcall(
        &mut p.guest,
        &dir.path().join("upcall.sock"),
        &spec.logger,
        Duration::from_millis(300),
    )
    .expect("upcall");
    guest.server.inject_fault(GuestFault::Silent);
    let e = p.guest.vcpus.resize_vcpus(4).unwrap_err();
    assert!(
        matches!(
            &e,
            VmmError::HotplugFailed {
                source: HotplugError::Timeout { .. },
                guest_state_unknown: true,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(present_ids(&p), [0, 1]);
    // The threads of vCPUs 2 and 3 were created, then exited: their fds are kept.
    assert_eq!(p.guest.vcpus.kept_vcpu_fds(), [2, 3]);
    let e = p.guest.vcpus.resize_vcpus(0).unwrap_err();
    assert!(matches!(e, VmmError::ResizeOutOfRange { .. }), "{e}");
    p.guest.vcpus.exit_all().expect("exit all");
}
