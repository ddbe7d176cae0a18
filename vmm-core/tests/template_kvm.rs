//! CPU templates, normalisation and vCPU affinity on real KVM: what the manager builds for
//! each vCPU, what KVM holds afterwards (`KVM_GET_CPUID2`), the template's MSRs, and the CPU
//! set the kernel shows for each vCPU thread. (What guest code reads is checked end to end in
//! the integration crate: `integration/tests/cpu_template.rs`.)

use std::sync::Arc;

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use topology::find_entry;
use vcpu_actor::test_util::kvm_or_skip;
use vm_memory::GuestMemoryMmap;
use vmm_core::arch::x86_64::cpuid::{
    brand_string, HYPERVISOR_BASE, HYPERVISOR_TSC_LEAF, INVARIANT_TSC, KVM_LAPIC_TIMER_KHZ,
};
use vmm_core::template::VMM_OWNED_LEAVES;
use vmm_core::{
    build_vm, parse_vcpu_affinity, BootEntry, CpuTemplate, SmpConfig, VcpuConfig,
    VcpuManagerOptions, VcpuSetupError, VmOptions, VpmuFeatureLevel,
};

const EXT: &str = include_str!("data/cpu_templates/ext-features.json");
const T2S: &str = include_str!("data/cpu_templates/T2S.json");

/// CPUID leaves 0x1d (tile palettes) and 0x1e (TMUL).
const AMX_TILE_LEAVES: [u32; 2] = [0x1d, 0x1e];

/// The template's own bits of 0x8000_0001 ECX: bit 0 and bit 12 set, bit 5 cleared.
const EXT_MASK: u32 = (1 << 12) | (1 << 5) | 1;
const EXT_BITS: u32 = (1 << 12) | 1;

/// The BSP is never started: creating the vCPUs is what is checked.
struct NoEntry;

impl BootEntry for NoEntry {
    fn setup_bsp(&self, _: &VcpuFd, _: &GuestMemoryMmap) -> Result<(), VcpuSetupError> {
        Ok(())
    }
}

fn config(template: Option<CpuTemplate>) -> VcpuConfig {
    // 2 sockets x 3 cores x 2 threads: sparse APIC IDs.
    let smp: SmpConfig = "12,sockets=2,cores=3,threads=2".parse().unwrap();
    VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled).with_template(template)
}

#[test]
fn the_template_reaches_kvm_on_every_vcpu_and_leaves_topology_and_pmu_alone() {
    let Some(kvm) = kvm_or_skip("the_template_reaches_kvm_on_every_vcpu") else {
        return;
    };
    let template = CpuTemplate::from_json(EXT).unwrap();
    let (_vm, mut with) = build_vm(
        kvm,
        VmOptions::default(),
        config(Some(template)),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    let (_vm2, without) = build_vm(
        Kvm::new().unwrap(),
        VmOptions::default(),
        config(None),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    with.create_boot_vcpus(Arc::new(NoEntry)).unwrap();
    let ids: Vec<u32> = with.present_vcpus().iter().map(|v| v.apic_id).collect();
    with.exit_all().unwrap();
    for (index, apic_id) in ids.iter().enumerate() {
        let index = u32::try_from(index).unwrap();
        let built = with.vcpu_cpuid(index).unwrap();
        let plain = without.vcpu_cpuid(index).unwrap();
        // The VMM keeps the topology and PMU leaves.
        for leaf in VMM_OWNED_LEAVES {
            let a: Vec<_> = built.iter().filter(|e| e.function == *leaf).collect();
            let b: Vec<_> = plain.iter().filter(|e| e.function == *leaf).collect();
            assert_eq!(a, b, "vCPU {index}: leaf {leaf:#x}");
        }
        let b1 = find_entry(&built, 1, 0).unwrap();
        let p1 = find_entry(&plain, 1, 0).unwrap();
        assert_eq!(b1.ebx, p1.ebx, "vCPU {index}: leaf 1 EBX (APIC ID)");
        // KVM's table holds the template's bits, in every leaf we set.
        let kvm = with.kept_vcpu_kvm_cpuid(*apic_id).unwrap();
        let ecx = find_entry(&kvm, 0x8000_0001, 0).unwrap().ecx;
        assert_eq!(
            ecx & EXT_MASK,
            EXT_BITS,
            "vCPU {index}: KVM's 0x8000_0001 ECX {ecx:#x}"
        );
        for e in &built {
            let Some(k) = find_entry(&kvm, e.function, e.index) else {
                // The AMX tile leaves: KVM on the AMX hosts here keeps neither (the process
                // has not asked for AMX guest permission); every other leaf must be there.
                assert!(
                    AMX_TILE_LEAVES.contains(&e.function),
                    "KVM lost leaf {:#x}.{}",
                    e.function,
                    e.index
                );
                continue;
            };
            // KVM edits a few bits at KVM_SET_CPUID2 (OSXSAVE, the APIC bit ...): compare the
            // leaves KVM leaves alone.
            if [
                0x4,
                0xb,
                0x1f,
                0x8000_0001,
                0x8000_001e,
                HYPERVISOR_TSC_LEAF,
            ]
            .contains(&e.function)
            {
                assert_eq!(
                    (k.eax, k.ebx, k.ecx, k.edx),
                    (e.eax, e.ebx, e.ecx, e.edx),
                    "vCPU {index}: leaf {:#x}.{}",
                    e.function,
                    e.index
                );
            }
        }
    }
}

#[test]
fn normalisation_on_this_host() {
    let Some(kvm) = kvm_or_skip("normalisation_on_this_host") else {
        return;
    };
    let (_vm, vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        config(None),
        VcpuManagerOptions::default(),
    )
    .unwrap();
    let base = vcpus.base_cpuid();
    let brand = brand_string(base).expect("a brand string");
    assert!(!brand.is_empty());
    // The host's brand, read from its three CPUID leaves: what the kernel says too.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map(|(_, v)| v.trim());
    assert_eq!(Some(brand.as_str()), model, "the guest's brand string");
    let six = find_entry(base, 6, 0).map(|e| (e.eax, e.ebx, e.ecx, e.edx));
    assert!(matches!(six, None | Some((0, 0, 0, 0))), "{six:?}");
    let invariant = find_entry(base, 0x8000_0007, 0).is_some_and(|e| e.edx & INVARIANT_TSC != 0);
    let tsc = find_entry(base, HYPERVISOR_TSC_LEAF, 0);
    if invariant {
        let t = tsc.expect("an invariant TSC gets the TSC leaf");
        assert!(t.eax > 100_000, "TSC {} kHz", t.eax);
        assert_eq!(t.ebx, KVM_LAPIC_TIMER_KHZ);
        assert!(find_entry(base, HYPERVISOR_BASE, 0).unwrap().eax >= HYPERVISOR_TSC_LEAF);
    } else {
        assert!(tsc.is_none());
    }
    if vcpus.vendor() != vmm_core::CpuVendor::Intel {
        assert_eq!(find_entry(base, 7, 0).unwrap().edx & (1 << 29), 0);
    }
}

#[test]
fn template_msrs_are_set_at_vcpu_setup() {
    let Some(kvm) = kvm_or_skip("template_msrs_are_set_at_vcpu_setup") else {
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let read = |index: u32| {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut m).unwrap(), 1);
        m.as_slice()[0].data
    };
    // IA32_MISC_ENABLE: bit 0 set by the template, the other bits kept.
    let before = read(0x1a0);
    let t = CpuTemplate::from_json(EXT).unwrap();
    let written = t.apply_msrs(&vcpu, 0).unwrap();
    assert_eq!(written, vec![(0x1a0, before | 1)]);
    assert_eq!(read(0x1a0), before | 1);
    // An MSR KVM does not know is refused, naming it.
    let bad = CpuTemplate::from_json(
        r#"{"msr_modifiers": [{"addr": "0xdead", "bitmap": "0b0000000000000000000000000000000000000000000000000000000000000001"}]}"#,
    )
    .unwrap();
    let e = bad.apply_msrs(&vcpu, 0).unwrap_err();
    assert!(e.to_string().contains("0xdead"), "{e}");
    // Firecracker's T2S sets IA32_ARCH_CAPABILITIES (0x10a) whole: KVM takes it or says which.
    let t2s = CpuTemplate::from_json(T2S).unwrap();
    match t2s.apply_msrs(&vcpu, 0) {
        Ok(w) => assert_eq!(w[0].0, 0x10a),
        Err(e) => assert!(e.to_string().contains("0x10a"), "{e}"),
    }
}

#[test]
fn a_template_needing_a_capability_kvm_lacks_is_refused() {
    let Some(kvm) = kvm_or_skip("a_template_needing_a_capability_kvm_lacks_is_refused") else {
        return;
    };
    // Capability 100000 does not exist.
    let t = CpuTemplate::from_json(r#"{"kvm_capabilities": ["100000"]}"#).unwrap();
    let e = build_vm(
        kvm,
        VmOptions::default(),
        config(Some(t)),
        VcpuManagerOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("KVM capability 100000"), "{e}");
}

#[test]
fn every_vcpu_thread_gets_its_cpu_set() {
    let Some(kvm) = kvm_or_skip("every_vcpu_thread_gets_its_cpu_set") else {
        return;
    };
    let allowed = vcpu_actor::thread_affinity(0).unwrap();
    let first = allowed[0];
    let last = *allowed.last().unwrap();
    let spec = format!("0={first},1={last},3={first}-{last}");
    let affinity = parse_vcpu_affinity(&spec).unwrap();
    let smp: SmpConfig = "4,cores=4".parse().unwrap();
    let config =
        VcpuConfig::from_smp(smp, VpmuFeatureLevel::Disabled).with_vcpu_affinity(affinity.clone());
    let (_vm, mut vcpus) = build_vm(
        kvm,
        VmOptions::default(),
        config,
        VcpuManagerOptions::default(),
    )
    .unwrap();
    vcpus.create_boot_vcpus(Arc::new(NoEntry)).unwrap();
    for v in vcpus.present_vcpus() {
        let want = match affinity.get(&v.index) {
            Some(cpus) => cpus
                .iter()
                .copied()
                .filter(|c| allowed.contains(c))
                .collect(),
            // Not listed: wherever the process may run.
            None => allowed.clone(),
        };
        assert_eq!(v.affinity.as_ref(), Some(&want), "vCPU {}", v.index);
        let tid = v.tid.unwrap();
        assert_eq!(vcpu_actor::thread_affinity(tid).unwrap(), want);
    }
    vcpus.exit_all().unwrap();
}
