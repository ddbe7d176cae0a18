//! `vcpuctl cpuid`: every possible vCPU executes CPUID in guest code; what each read, decoded,
//! what KVM holds for it (`KVM_GET_CPUID2`), and hwloc dumps of it.
//!
//! Guest code runs CPUID at CPL 0, where KVM answers with the VMM's table. On the PVM test
//! hosts some leaves still show host bits whatever the VMM set (leaf 0x1 ECX, leaf 0x7; see
//! `docs/host-notes.md`): `registers` (what the guest read) and `kvm_registers` (what KVM
//! holds) can differ there, and only there.

use std::path::PathBuf;

use serde::Serialize;
use topology::hwloc::{write_hwloc_dump_results, CpuidResult};
use topology::{find_entry, CpuidEntry};
use vmm_core::arch::x86_64::cpuid::{HYPERVISOR_BASE, HYPERVISOR_TSC_LEAF, POWER_MANAGEMENT};
use vmm_core::VcpuSlot;

use super::{open_kvm, print_json, CliError, ExitCode, Out, VmSpec, GUEST_TIMEOUT};
use crate::guest::agent::{AgentVm, ApMode};

/// A location as decoded by `raw-cpuid` from what guest code read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GuestLocation {
    /// x2APIC ID (leaf 0xB/0x1F EDX).
    pub x2apic_id: u32,
    /// Package.
    pub socket: u32,
    /// Die within the package (0 when the guest sees no die level).
    pub die: u32,
    /// Core within the die.
    pub core: u32,
    /// Thread within the core.
    pub thread: u32,
}

/// Decodes a vCPU's location with `raw-cpuid` from the leaves guest code read: leaf 0x1F if
/// it has levels (it has the die level), else leaf 0xB ([`crate::cpuid_view`]). `None` if
/// neither has a topology. Whatever the guest wrote, this does not panic.
pub fn decode_location(read: &[CpuidResult]) -> Option<GuestLocation> {
    let l = crate::cpuid_view::decode_location(read).ok()?;
    Some(GuestLocation {
        x2apic_id: l.x2apic_id,
        socket: l.socket,
        die: l.die,
        core: l.core,
        thread: l.thread,
    })
}

impl VcpuCpuidView {
    /// The view of the vCPU `slot` from what its guest code read.
    pub fn new(slot: VcpuSlot, registers: Vec<CpuidResult>) -> Self {
        Self {
            slot,
            leaf1_apic_id: registers
                .iter()
                .find(|r| r.leaf == 1 && r.subleaf == 0)
                .map(|r| r.ebx >> 24),
            location: decode_location(&registers),
            registers,
            kvm_registers: Vec::new(),
        }
    }
}

/// KVM's entries as results of the queries they answer.
pub fn kvm_results(entries: &[CpuidEntry]) -> Vec<CpuidResult> {
    entries
        .iter()
        .map(|e| CpuidResult {
            leaf: e.function,
            subleaf: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The queries beyond hwloc's that show the normalisation: leaf 6, and the hypervisor leaves
/// 0x4000_0000, 0x4000_0001 and the TSC frequency leaf 0x4000_0010 where `entries` (a vCPU's
/// CPUID set) has them. The brand string leaves are among hwloc's already.
pub fn normalisation_queries(entries: &[CpuidEntry]) -> Vec<(u32, u32)> {
    let mut q = Vec::new();
    if find_entry(entries, 0, 0).is_some_and(|e| e.eax >= POWER_MANAGEMENT) {
        q.push((POWER_MANAGEMENT, 0));
    }
    for leaf in [HYPERVISOR_BASE, HYPERVISOR_BASE + 1, HYPERVISOR_TSC_LEAF] {
        if find_entry(entries, leaf, 0).is_some() {
            q.push((leaf, 0));
        }
    }
    q
}

/// Adds `extra` to the queries every vCPU of `vm` executes (before the vCPUs start).
pub fn add_queries(vm: &mut AgentVm, extra: &[(u32, u32)]) -> Result<(), CliError> {
    for q in extra {
        if !vm.queries.contains(q) {
            vm.queries.push(*q);
        }
    }
    vm.agent.write_queries(&vm.queries)?;
    Ok(())
}

/// What one vCPU's guest code read and what it means.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuCpuidView {
    /// The vCPU's index and the APIC ID (= KVM vCPU id) the VMM gave it.
    #[serde(flatten)]
    pub slot: VcpuSlot,
    /// The APIC ID in leaf 0x1 EBX\[31:24\] as the guest read it.
    pub leaf1_apic_id: Option<u32>,
    /// Decoded by `raw-cpuid` from what the guest read.
    pub location: Option<GuestLocation>,
    /// Every (leaf, subleaf) the guest executed, with its result.
    pub registers: Vec<CpuidResult>,
    /// What KVM holds as this vCPU's CPUID (`KVM_GET_CPUID2`, read once the vCPU exited):
    /// every entry, as the query it answers. Empty where it was not read (`vcpuctl demo`).
    pub kvm_registers: Vec<CpuidResult>,
}

/// What the present vCPUs of `vm` read from CPUID (those in `only`, if given), by index.
pub fn agent_views(vm: &AgentVm, only: Option<&[u32]>) -> Result<Vec<VcpuCpuidView>, CliError> {
    let mut views = Vec::new();
    for v in vm.vcpus.present_vcpus() {
        if only.is_some_and(|ids| !ids.contains(&v.apic_id)) {
            continue;
        }
        let slot = VcpuSlot {
            index: v.index,
            apic_id: v.apic_id,
        };
        views.push(VcpuCpuidView::new(slot, vm.cpuid_results(v.apic_id)?));
    }
    Ok(views)
}

/// `vcpuctl cpuid`: boots every possible vCPU of the guest agent (APs halt once they read
/// their CPUID), returns what each read and writes hwloc dumps of it to `hwloc_dir`.
pub fn cpuid(spec: &VmSpec, hwloc_dir: Option<&PathBuf>) -> Result<Vec<VcpuCpuidView>, CliError> {
    let kvm = open_kvm()?;
    let mut vm = AgentVm::create(
        kvm,
        spec.vcpu_config(spec.smp.max_cpus),
        spec.agent_options(ApMode::Halt),
    )?;
    let extra = normalisation_queries(&vm.vcpus.vcpu_cpuid(0)?);
    add_queries(&mut vm, &extra)?;
    vm.start(GUEST_TIMEOUT)?;
    let mut views = agent_views(&vm, None)?;
    if let Some(dir) = hwloc_dir {
        let per_cpu: Vec<Vec<CpuidResult>> = views.iter().map(|v| v.registers.clone()).collect();
        write_hwloc_dump_results(dir, &per_cpu).map_err(|e| CliError {
            code: ExitCode::Failure,
            message: format!("writing hwloc dumps to {}: {e}", dir.display()),
        })?;
    }
    vm.vcpus.exit_all()?;
    for v in &mut views {
        v.kvm_registers = kvm_results(&vm.vcpus.kept_vcpu_kvm_cpuid(v.slot.apic_id)?);
    }
    Ok(views)
}

/// A table of index, APIC IDs and decoded location per vCPU.
pub fn location_table(views: &[VcpuCpuidView]) -> String {
    let mut s = String::from("  index  APIC ID  leaf1 ID  socket  die  core  thread\n");
    for v in views {
        let opt = |x: Option<u32>| x.map_or("-".to_string(), |x| x.to_string());
        let l = v.location;
        s.push_str(&format!(
            "  {:>5}  {:>7}  {:>8}  {:>6}  {:>3}  {:>4}  {:>6}\n",
            v.slot.index,
            opt(l.map(|l| l.x2apic_id)),
            opt(v.leaf1_apic_id),
            opt(l.map(|l| l.socket)),
            opt(l.map(|l| l.die)),
            opt(l.map(|l| l.core)),
            opt(l.map(|l| l.thread)),
        ));
    }
    s
}

/// Runs `vcpuctl cpuid` and prints its result (JSON with `json`).
pub fn run(
    spec: &VmSpec,
    out: &Out,
    hwloc_dir: Option<PathBuf>,
    json: bool,
) -> Result<(), CliError> {
    let views = {
        let _p = out.progress(format!(
            "booting all {} vCPUs of -smp {}; each reads its CPUID in guest code",
            spec.smp.max_cpus, spec.smp
        ));
        cpuid(spec, hwloc_dir.as_ref())?
    };
    if json {
        return print_json(&views);
    }
    for v in &views {
        let l = v.location;
        println!(
            "vCPU {:>3}  APIC ID {:>3}  {}",
            v.slot.index,
            v.slot.apic_id,
            l.map_or("no topology leaves".into(), |l| format!(
                "socket {} die {} core {} thread {} (x2APIC ID {})",
                l.socket, l.die, l.core, l.thread, l.x2apic_id
            ))
        );
    }
    if let Some(dir) = hwloc_dir {
        println!(
            "hwloc dumps in {0}; see them with: HWLOC_CPUID_PATH={0} \
             HWLOC_COMPONENTS=x86,stop lstopo-no-graphics",
            dir.display()
        );
    }
    Ok(())
}
