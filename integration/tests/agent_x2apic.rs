//! The guest agent in x2APIC mode on real KVM: 300 vCPUs (1 socket x 300 cores, APIC IDs
//! 0..299, so the VM runs in x2APIC mode), 2 at boot. The agent's BSP stays at CPL 0 and
//! wakes single APs through the x2APIC ICR MSR with 32-bit destinations: vCPUs 255, 256 and 299
//! are created and started (waiting for SIPI), then woken one by one; each reports its full
//! APIC ID from CPUID leaf 0xB EDX, reads its CPUID into its own result table, and counts. A
//! wake of APIC ID 255 (0xFF, xAPIC's broadcast ID) reaches that vCPU only: in x2APIC mode it
//! is an ordinary destination. A park (INIT) of 256 stops it.

use std::time::Duration;

mod common;

use common::kvm_allowing;
use integration::guest::agent::{AgentVm, AgentVmOptions};
use vmm_core::{InterruptMode, VcpuConfig};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn agent_wakes_and_parks_x2apic_ids_one_by_one() {
    let Some(kvm) = kvm_allowing("agent_wakes_and_parks_x2apic_ids_one_by_one", 300) else {
        return;
    };
    let config = VcpuConfig {
        boot_vcpu_count: 2,
        max_vcpu_count: 300,
        topology: topology::CpuTopology::new(1, 1, 300, 1).unwrap(),
        vpmu: Default::default(),
        template: None,
        vcpu_affinity: Default::default(),
    };
    let mut vm = AgentVm::create(kvm, config, AgentVmOptions::default()).expect("agent VM");
    assert_eq!(vm.vcpus.interrupt_mode(), InterruptMode::X2Apic);
    vm.start(TIMEOUT).expect("boot vCPUs report");
    assert_eq!(vm.agent.reported_apic_ids(), [0, 1]);

    for index in [255, 256, 299] {
        vm.vcpus.create_vcpu(index).unwrap();
    }
    vm.vcpus.start_vcpus(&[255, 256, 299]).unwrap();
    // Started, but waiting for SIPI: nobody reported yet.
    assert_eq!(vm.agent.reported_apic_ids(), [0, 1]);

    vm.agent
        .online(255, TIMEOUT)
        .expect("APIC ID 255 comes online");
    // One more round trip through the BSP: had the wake to 0xFF reached everyone, 256 would
    // have reported by now.
    vm.agent
        .online(299, TIMEOUT)
        .expect("APIC ID 299 comes online");
    assert_eq!(vm.agent.reported_apic_ids(), [0, 1, 255, 299]);
    vm.agent
        .online(256, TIMEOUT)
        .expect("APIC ID 256 comes online");
    assert_eq!(vm.agent.reported_apic_ids(), [0, 1, 255, 256, 299]);
    for r in vm.agent.online_reports() {
        assert_eq!(
            r.cpuid_apic_id, r.vcpu_id,
            "leaf 0xB EDX = the APIC ID: {r:?}"
        );
    }
    // Each woken vCPU read its own CPUID into its own table: leaf 0xB EDX there too.
    for id in [255, 256, 299] {
        let read = vm.cpuid_results(id).unwrap();
        let b = read
            .iter()
            .find(|r| r.leaf == 0xb && r.subleaf == 0)
            .expect("leaf 0xB in the query list");
        assert_eq!(b.edx, id, "vCPU {id}'s result table");
        let l1 = read.iter().find(|r| r.leaf == 1).expect("leaf 1");
        assert_eq!(l1.ebx >> 24, id & 0xff, "leaf 1 has the low 8 bits of {id}");
    }
    // They count at CPL 3.
    let before = vm.agent.progress(299);
    assert!(
        integration::poll_until(TIMEOUT, Duration::from_millis(5), || vm.agent.progress(299)
            > before),
        "APIC ID 299 does not count"
    );
    vm.agent.offline(256, TIMEOUT).expect("APIC ID 256 parks");
    assert_eq!(vm.agent.parked_apic_ids(), [256]);
    vm.agent.request_shutdown().unwrap();
    let stop = vm.vcpus.wait_for_exit(Some(TIMEOUT)).unwrap();
    assert!(stop.is_some(), "the agent's shutdown stops the VM");
}

#[test]
fn vcpuctl_cpuid_boots_as_many_vcpus_as_kvm_allows() {
    if kvm_allowing("vcpuctl_cpuid_boots_as_many_vcpus_as_kvm_allows", 1024).is_none() {
        return;
    }
    let out = common::succeeded(
        "vcpuctl cpuid --smp 1,maxcpus=1024",
        assert_cmd::Command::cargo_bin("vcpuctl")
            .unwrap()
            .args([
                "cpuid",
                "--json",
                "--smp",
                "1,maxcpus=1024,sockets=4,cores=128,threads=2",
            ])
            .timeout(Duration::from_secs(300))
            .output(),
    );
    let vcpus: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vcpus = vcpus.as_array().unwrap();
    assert_eq!(vcpus.len(), 1024);
    for (i, v) in (0u64..).zip(vcpus) {
        // 4 x 128 x 2 is a power of two per level: the APIC ID is the index.
        assert_eq!(v["apic_id"], i);
        assert_eq!(v["location"]["x2apic_id"], i, "vCPU {i}: leaf 0xB EDX");
        assert_eq!(
            v["leaf1_apic_id"],
            i & 0xff,
            "vCPU {i}: leaf 1's low 8 bits"
        );
        assert_eq!(v["location"]["socket"], i / 256, "vCPU {i}");
    }
}
