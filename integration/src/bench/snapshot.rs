//! Snapshot save and restore without the vCPU manager: a VM built from raw KVM calls
//! ([`StateVm`]), vCPU threads that run until kicked and hand their fds back ([`VcpuRunner`]),
//! and the benchmark of [`vmm_core::arch::x86_64::state`] and [`vmm_core::snapshot`]
//! against the bare cost of the same KVM get/set calls in one loop ([`bench_snapshot`]).
//!
//! The rows (in `vcpuctl bench`, through [`snapshot_lines`]):
//!
//! | row | ours | bare |
//! | --- | --- | --- |
//! | `save_state` | `state::save` of every vCPU + `vm_state::save_vm` | the same `KVM_GET_*` calls on every vCPU, results dropped |
//! | `restore_state` | `vm_state::restore_vm` + `state::restore` into new vCPUs | the same `KVM_SET_*` calls with the saved values |
//! | `save_snapshot` | the above + `snapshot::write` with the VM's memory | the `KVM_GET_*` loop + guest memory written to a file |
//! | `restore_snapshot` | `snapshot::read` (checks every CRC32) + `check_host` + `restore_memory` + restore | the file read back into guest memory + the `KVM_SET_*` loop |
//! | `vm_save` | the vCPU manager's `save_to` of a paused VM (every vCPU on its own thread) | `save_snapshot`'s bare column |
//! | `vm_restore` | the vCPU manager's `restore_from`, vCPU threads started, paused | `restore_snapshot`'s bare column |

use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::arch::x86_64::cpuid::{entries_from_kvm, entries_to_kvm};
use vmm_core::arch::x86_64::state::{self, SaveableMsrs, StateCaps, X86VcpuState};
use vmm_core::arch::x86_64::vm_state;
use vmm_core::snapshot::{self, HostInfo, SnapshotConfig, SnapshotState, VcpuSnapshot};
use vmm_core::{BootEntry, CpuTopology, CpuVendor, Vm, VmOptions, VpmuFeatureLevel};

use super::bare::KickSignal;
use super::BenchLine;
use crate::guest::GuestCode;
use crate::loader::load_program;
use crate::IntegrationError;

/// The kick signal of [`VcpuRunner`]: `SIGRTMIN + 5` (the vCPU actors use `SIGRTMIN + 0`,
/// the bare benchmarks `+ 3`).
const RUNNER_KICK_OFFSET: i32 = 5;

/// A VM built with raw KVM calls, its vCPUs given the topology's CPUID and the VMM's setup,
/// their fds held here (no vCPU manager, so that state can be saved and restored on the fds).
#[derive(Debug)]
pub struct StateVm {
    /// The VM.
    pub vm: Vm,
    /// The topology of all vCPUs.
    pub topology: CpuTopology,
    /// (index, APIC ID) of each present vCPU, in `fds` order.
    pub ids: Vec<(u32, u32)>,
    /// The vCPU fds, in `ids` order (empty while a [`VcpuRunner`] has them).
    pub fds: Vec<VcpuFd>,
    vendor: CpuVendor,
    supported: Vec<topology::CpuidEntry>,
}

impl StateVm {
    /// A new VM of `memory_size` bytes for `topology`, without vCPUs.
    pub fn new(topology: CpuTopology, memory_size: u64) -> Result<Self, IntegrationError> {
        let kvm = crate::open_kvm()?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(IntegrationError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let supported = entries_from_kvm(supported.as_slice());
        let vendor = CpuVendor::from_entries(&supported)
            .ok_or_else(|| IntegrationError::Guest("unknown CPU vendor in KVM's CPUID".into()))?;
        let vm = Vm::new(
            kvm,
            VmOptions {
                memory_size,
                ..VmOptions::default()
            },
        )?;
        Ok(Self {
            vm,
            topology,
            ids: Vec::new(),
            fds: Vec::new(),
            vendor,
            supported,
        })
    }

    /// The KVM vCPU fd for vCPU `index` (KVM id = its APIC ID), recorded in `ids`; not
    /// configured.
    pub fn create_bare_vcpu(&mut self, index: u32) -> Result<&VcpuFd, IntegrationError> {
        let apic_id = self
            .topology
            .apic_id(index)
            .map_err(|e| IntegrationError::Guest(e.to_string()))?;
        let fd = self
            .vm
            .fd()
            .create_vcpu(u64::from(apic_id))
            .map_err(IntegrationError::kvm("KVM_CREATE_VCPU"))?;
        self.ids.push((index, apic_id));
        self.fds.push(fd);
        self.fds
            .last()
            .ok_or_else(|| IntegrationError::Guest("no vCPU".into()))
    }

    /// Creates and configures vCPU `index` as the vCPU manager does (topology CPUID, boot
    /// MSRs, the BSP's LINT); the BSP (index 0) gets `entry`'s registers and is runnable, the
    /// others wait for INIT/SIPI.
    pub fn add_vcpu(&mut self, index: u32, entry: &dyn BootEntry) -> Result<(), IntegrationError> {
        let cpuid = topology::build_vcpu_cpuid(&self.supported, self.vendor, &self.topology, index)
            .map_err(|e| IntegrationError::Guest(e.to_string()))?;
        let cpuid: CpuId = entries_to_kvm(&cpuid)?;
        let mem = self.vm.memory().clone();
        let fd = self.create_bare_vcpu(index)?;
        fd.set_cpuid2(&cpuid)
            .map_err(IntegrationError::kvm("KVM_SET_CPUID2"))?;
        let apic_id = self.ids.last().map_or(0, |&(_, a)| a);
        let fd = self
            .fds
            .last()
            .ok_or_else(|| IntegrationError::Guest("no vCPU".into()))?;
        let start = vmm_core::arch::x86_64::VcpuStart {
            bsp: index == 0,
            fresh: true,
            // Each vCPU is added on its own.
            last_of_batch: true,
        };
        vmm_core::arch::x86_64::setup_vcpu(fd, apic_id, vmm_core::InterruptMode::XApic, start)?;
        if index == 0 {
            entry.setup_bsp(fd, &mem)?;
        }
        Ok(vmm_core::arch::x86_64::set_boot_mp_state(
            fd, apic_id, start,
        )?)
    }

    /// A VM running `code` (an SMP program such as [`crate::guest::smp_counter`]) on the
    /// vCPUs `indices` (index 0 first) of `topology`, not started.
    pub fn with_program(
        topology: CpuTopology,
        memory_size: u64,
        code: &GuestCode,
        indices: &[u32],
    ) -> Result<Self, IntegrationError> {
        let mut vm = Self::new(topology, memory_size)?;
        let entry = load_program(vm.vm.memory(), &code.program())?;
        for &i in indices {
            vm.add_vcpu(i, &entry)?;
        }
        Ok(vm)
    }

    /// The snapshot configuration: every topology slot, the present vCPUs at boot.
    pub fn config(&self) -> SnapshotConfig {
        let n = u32::try_from(self.ids.len()).unwrap_or(u32::MAX);
        SnapshotConfig {
            boot_vcpu_count: n,
            max_vcpu_count: self.topology.max_vcpus(),
            topology: self.topology,
            vpmu: VpmuFeatureLevel::Disabled,
            interrupt_mode: vmm_core::InterruptMode::XApic,
            template: None,
        }
    }

    /// Saves every vCPU (paused: not running) and the VM state.
    pub fn save(&self) -> Result<SnapshotState, IntegrationError> {
        let caps = StateCaps::query(self.vm.fd());
        let first = self
            .fds
            .first()
            .ok_or_else(|| IntegrationError::Guest("no vCPU to save".into()))?;
        let msrs = SaveableMsrs::probe(self.vm.kvm(), first)?;
        let vcpus = self
            .ids
            .iter()
            .zip(&self.fds)
            .map(|(&(index, apic_id), fd)| {
                Ok(VcpuSnapshot {
                    index,
                    apic_id,
                    state: state::save(fd, &caps, &msrs)?,
                })
            })
            .collect::<Result<Vec<_>, IntegrationError>>()?;
        let vm = vm_state::save_vm(self.vm.fd())?;
        Ok(SnapshotState {
            host: HostInfo::this_host(self.vm.kvm()),
            config: self.config(),
            vcpus,
            vm,
        })
    }

    /// A new VM with `saved`'s topology and vCPUs (created with their APIC IDs), its
    /// VM state and every vCPU's state restored; memory is the caller's (e.g.
    /// [`snapshot::VerifiedSnapshot::restore_memory`]). Nothing has run.
    pub fn restore(saved: &SnapshotState, memory_size: u64) -> Result<Self, IntegrationError> {
        let mut vm = Self::new(saved.config.topology, memory_size)?;
        vm.restore_into(saved)?;
        Ok(vm)
    }

    /// Restores `saved` into this VM, which has no vCPUs yet.
    pub fn restore_into(&mut self, saved: &SnapshotState) -> Result<(), IntegrationError> {
        // VM scope first: nothing may run before the clock and the irqchips are restored.
        vm_state::restore_vm(self.vm.fd(), &saved.vm)?;
        let caps = StateCaps::query(self.vm.fd());
        for v in &saved.vcpus {
            let fd = self.create_bare_vcpu(v.index)?;
            state::restore(fd, &caps, &v.state).map_err(|source| {
                vmm_core::SnapshotError::VcpuState {
                    index: v.index,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The 8-byte little-endian value at guest address `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64, IntegrationError> {
        let mut b = [0u8; 8];
        self.vm
            .memory()
            .read_slice(&mut b, GuestAddress(addr))
            .map_err(|e| {
                IntegrationError::Guest(format!("reading guest memory at {addr:#x}: {e}"))
            })?;
        Ok(u64::from_le_bytes(b))
    }

    /// Runs every vCPU on its own thread until [`VcpuRunner::pause`].
    pub fn start(&mut self) -> Result<VcpuRunner, IntegrationError> {
        VcpuRunner::start(std::mem::take(&mut self.fds))
    }
}

/// The kick signal of [`VcpuRunner`].
static RUNNER_KICK: KickSignal = KickSignal::new(RUNNER_KICK_OFFSET, "runner's kick signal");

/// What a runner thread returns: the fd, or why the vCPU stopped.
type RunnerResult = Result<VcpuFd, String>;

/// vCPU threads that run `KVM_RUN` in a loop (port I/O and MMIO exits are answered with
/// zeros and counted) until told to stop, then return their fds.
#[derive(Debug)]
pub struct VcpuRunner {
    threads: Vec<JoinHandle<RunnerResult>>,
    stop: Arc<AtomicBool>,
    exits: Arc<AtomicU64>,
    signal: libc::c_int,
}

fn run_loop(mut fd: VcpuFd, stop: &AtomicBool, exits: &AtomicU64) -> RunnerResult {
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(fd);
        }
        match fd.run() {
            Ok(
                VcpuExit::IoOut(..)
                | VcpuExit::IoIn(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..),
            ) => {
                exits.fetch_add(1, Ordering::Relaxed);
            }
            Ok(other) => return Err(format!("vCPU stopped: {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}

impl VcpuRunner {
    /// One thread per fd, running at once.
    pub fn start(fds: Vec<VcpuFd>) -> Result<Self, IntegrationError> {
        let signal = RUNNER_KICK.get()?;
        let stop = Arc::new(AtomicBool::new(false));
        let exits = Arc::new(AtomicU64::new(0));
        let threads = fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let (stop, exits) = (Arc::clone(&stop), Arc::clone(&exits));
                std::thread::Builder::new()
                    .name(format!("state-vcpu{i}"))
                    .spawn(move || run_loop(fd, &stop, &exits))
                    .map_err(|e| IntegrationError::Guest(format!("spawning a vCPU thread: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            threads,
            stop,
            exits,
            signal,
        })
    }

    /// Port-I/O and MMIO exits so far.
    pub fn io_exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// Stops every vCPU (kicking it out of `KVM_RUN` with the signal, again every
    /// millisecond until its thread ends, at most `timeout`) and returns the fds in order.
    pub fn pause(self, timeout: Duration) -> Result<Vec<VcpuFd>, IntegrationError> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while self.threads.iter().any(|t| !t.is_finished()) {
            if Instant::now() > deadline {
                return Err(IntegrationError::Guest(format!(
                    "vCPU threads still in KVM_RUN {timeout:?} after the kick"
                )));
            }
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread is not joined yet, so its pthread_t is valid; the
                // signal's handler is installed (empty).
                unsafe { libc::pthread_kill(t.as_pthread_t(), self.signal) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| IntegrationError::Guest("a vCPU thread panicked".into()))?
                    .map_err(IntegrationError::Guest)
            })
            .collect()
    }
}

/// Polls `cond` every millisecond until it holds or `timeout` passes.
pub fn wait_for(
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool, IntegrationError>,
) -> Result<bool, IntegrationError> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bare `KVM_GET_*` calls of a vCPU save, results dropped.
fn bare_get(
    fd: &VcpuFd,
    caps: &StateCaps,
    msrs: &mut kvm_bindings::Msrs,
) -> Result<(), IntegrationError> {
    let k = IntegrationError::kvm;
    fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?;
    fd.get_regs().map_err(k("KVM_GET_REGS"))?;
    fd.get_sregs().map_err(k("KVM_GET_SREGS"))?;
    fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?;
    if caps.xcrs {
        fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?;
    }
    fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?;
    fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?;
    if caps.get_tsc_khz {
        fd.get_tsc_khz().map_err(k("KVM_GET_TSC_KHZ"))?;
    }
    fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(k("KVM_GET_CPUID2"))?;
    fd.get_msrs(msrs).map_err(k("KVM_GET_MSRS"))?;
    fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?;
    Ok(())
}

/// The bare `KVM_SET_*` calls of a vCPU restore with `s`'s values.
fn bare_set(
    fd: &VcpuFd,
    s: &X86VcpuState,
    msrs: &kvm_bindings::Msrs,
) -> Result<(), IntegrationError> {
    let k = IntegrationError::kvm;
    let cpuid = entries_to_kvm(&s.cpuid)?;
    fd.set_cpuid2(&cpuid).map_err(k("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state).map_err(k("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
    let mut x = kvm_bindings::kvm_xsave::default();
    let n = s.xsave.len().min(x.region.len());
    x.region[..n].copy_from_slice(&s.xsave[..n]);
    // SAFETY: only the legacy 4096-byte area is passed; the vCPUs of these benchmarks use no
    // dynamically enabled XSAVE feature, so KVM reads no more than that.
    unsafe { fd.set_xsave(&x) }.map_err(k("KVM_SET_XSAVE"))?;
    if let Some(xcrs) = &s.xcrs {
        fd.set_xcrs(xcrs).map_err(k("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debug_regs)
        .map_err(k("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
    fd.set_msrs(msrs).map_err(k("KVM_SET_MSRS"))?;
    fd.set_vcpu_events(&s.vcpu_events)
        .map_err(k("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The MSRs of `s` as KVM's `Msrs` (the first `KVM_MAX_MSR_ENTRIES`: the bare loop makes one
/// call).
fn kvm_msrs(s: &X86VcpuState) -> Result<kvm_bindings::Msrs, IntegrationError> {
    let entries: Vec<kvm_bindings::kvm_msr_entry> = s
        .msrs
        .iter()
        .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
        .map(|m| vmm_core::arch::x86_64::msr::entry(m.index, m.data))
        .collect();
    kvm_bindings::Msrs::from_entries(&entries)
        .map_err(|e| IntegrationError::Guest(format!("building the MSR list: {e:?}")))
}

/// A topology of exactly `n` vCPUs (one socket, one die, `n` cores).
fn topology_of(n: u32) -> Result<CpuTopology, IntegrationError> {
    CpuTopology::new(1, 1, n, 1).map_err(|e| IntegrationError::Guest(e.to_string()))
}

/// `n` configured vCPUs that have not run (the BSP with the spin program's registers, the
/// others waiting for SIPI), in a VM of `memory_size` bytes.
fn configured_vm(n: u32, memory_size: u64) -> Result<StateVm, IntegrationError> {
    let indices: Vec<u32> = (0..n).collect();
    StateVm::with_program(
        topology_of(n)?,
        memory_size,
        &crate::guest::spin(),
        &indices,
    )
}

/// The four rows (see the module documentation) for `n` vCPUs; with `memory_size` > 0 the
/// snapshot rows include that much guest memory written to and read from `dir`, otherwise
/// only the state rows are measured.
pub fn bench_snapshot(
    n: u32,
    memory_size: Option<u64>,
    dir: &Path,
) -> Result<Vec<BenchLine>, IntegrationError> {
    let mem_size = memory_size.unwrap_or(vmm_core::vm::MIN_MEMORY_SIZE.max(16 << 20));
    let src = configured_vm(n, mem_size)?;
    let caps = StateCaps::query(src.vm.fd());

    // Ours: save.
    let t = Instant::now();
    let saved = src.save()?;
    let save_ours = t.elapsed();
    // Bare: the same gets in one loop.
    let first = saved
        .vcpus
        .first()
        .ok_or_else(|| IntegrationError::Guest("a benchmark needs at least one vCPU".into()))?;
    let mut msrs = kvm_msrs(&first.state)?;
    let t = Instant::now();
    for fd in &src.fds {
        bare_get(fd, &caps, &mut msrs)?;
    }
    vm_state::save_vm(src.vm.fd())?;
    let save_bare = t.elapsed();

    // Ours: restore into a fresh VM.
    // (Both sides time from an existing VM without vCPUs.)
    let mut restored = StateVm::new(saved.config.topology, mem_size)?;
    let t = Instant::now();
    restored.restore_into(&saved)?;
    let restore_ours = t.elapsed();
    drop(restored);
    // Bare: create the same vCPUs and set the same state.
    let mut bare = StateVm::new(saved.config.topology, mem_size)?;
    let set_msrs: Vec<kvm_bindings::Msrs> = saved
        .vcpus
        .iter()
        .map(|v| kvm_msrs(&v.state))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    vm_state::restore_vm(bare.vm.fd(), &saved.vm)?;
    for (v, m) in saved.vcpus.iter().zip(&set_msrs) {
        let fd = bare.create_bare_vcpu(v.index)?;
        bare_set(fd, &v.state, m)?;
    }
    let restore_bare = t.elapsed();
    drop(bare);

    let mut lines = vec![
        BenchLine::new(
            "save_state",
            "state::save + save_vm vs the same KVM_GET_* loop",
            n,
            save_ours,
            Some(save_bare),
        ),
        BenchLine::new(
            "restore_state",
            "new vCPUs + restore_vm + state::restore vs new vCPUs + the same KVM_SET_* loop",
            n,
            restore_ours,
            Some(restore_bare),
        ),
    ];
    if memory_size.is_none() {
        return Ok(lines);
    }

    // Ours: save + write the snapshot.
    let t = Instant::now();
    let saved = src.save()?;
    snapshot::write(dir, &saved, src.vm.memory())?;
    let snap_ours = t.elapsed();
    // Bare: the gets + memory to a plain file.
    let raw = dir.join("bare-memory.raw");
    let t = Instant::now();
    for fd in &src.fds {
        bare_get(fd, &caps, &mut msrs)?;
    }
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&raw)
            .map_err(|e| IntegrationError::Guest(format!("{}: {e}", raw.display())))?,
    );
    snapshot::memory::dump_memory(src.vm.memory(), |c| {
        std::io::Write::write_all(&mut out, c).map_err(|e| vmm_core::SnapshotError::GuestMemory {
            addr: 0,
            reason: e.to_string(),
        })
    })?;
    drop(out);
    let snap_bare = t.elapsed();

    // Ours: read (verify) + check + restore memory and state.
    let mut dst = StateVm::new(saved.config.topology, mem_size)?;
    let t = Instant::now();
    let verified = snapshot::read(dir)?;
    verified.check_host(&HostInfo::this_host(dst.vm.kvm()), dst.vm.kvm())?;
    verified.restore_memory(dst.vm.memory())?;
    dst.restore_into(verified.state())?;
    let unsnap_ours = t.elapsed();
    drop(dst);
    // Bare: a VM, the plain file into memory, the sets.
    let mut bare = StateVm::new(saved.config.topology, mem_size)?;
    let t = Instant::now();
    let regions = snapshot::memory::regions(bare.vm.memory());
    let mut input = std::io::BufReader::new(
        std::fs::File::open(&raw)
            .map_err(|e| IntegrationError::Guest(format!("{}: {e}", raw.display())))?,
    );
    snapshot::memory::load_memory(bare.vm.memory(), &regions, |buf| {
        std::io::Read::read(&mut input, buf).map_err(|e| vmm_core::SnapshotError::GuestMemory {
            addr: 0,
            reason: e.to_string(),
        })
    })?;
    vm_state::restore_vm(bare.vm.fd(), &saved.vm)?;
    for (v, m) in saved.vcpus.iter().zip(&set_msrs) {
        let fd = bare.create_bare_vcpu(v.index)?;
        bare_set(fd, &v.state, m)?;
    }
    let unsnap_bare = t.elapsed();
    let _ = std::fs::remove_file(&raw);

    lines.push(BenchLine::new(
        "save_snapshot",
        "save + snapshot::write (CRC32, temp + rename) vs the KVM_GET_* loop + memory to a plain file",
        n,
        snap_ours,
        Some(snap_bare),
    ));
    lines.push(BenchLine::new(
        "restore_snapshot",
        "snapshot::read (verify) + check_host + restore_memory + restore vs plain file + KVM_SET_* loop",
        n,
        unsnap_ours,
        Some(unsnap_bare),
    ));
    Ok(lines)
}

/// The whole table: state only and with 64 MiB, for each of `counts` (1, 8, 64, 254 in the
/// issue), snapshot files in `dir`.
pub fn bench_snapshots(counts: &[u32], dir: &Path) -> Result<Vec<BenchLine>, IntegrationError> {
    let mut lines = Vec::new();
    for &n in counts {
        lines.extend(bench_snapshot(n, Some(64 << 20), dir)?);
    }
    Ok(lines)
}

/// The vCPU manager's own save and restore of `n` vCPUs with `memory_size` bytes of memory,
/// snapshot files in `dir`: `vm_save` ([`VcpuManager::save_to`] of the paused VM: every vCPU
/// saved on its own thread, then the files written) and `vm_restore`
/// ([`VcpuManager::restore_from`]: read and verify, check the host, a new VM, memory, VM
/// state, vCPUs with their threads, paused). `bare` is the bare cost of the same work
/// (`save_snapshot` and `restore_snapshot`'s bare columns of [`bench_snapshot`] for `n`).
///
/// [`VcpuManager::save_to`]: vmm_core::VcpuManager::save_to
/// [`VcpuManager::restore_from`]: vmm_core::VcpuManager::restore_from
pub fn bench_manager_snapshot(
    n: u32,
    memory_size: u64,
    dir: &Path,
    bare: Option<(Duration, Duration)>,
) -> Result<Vec<BenchLine>, IntegrationError> {
    let kvm = crate::open_kvm()?;
    let config = vmm_core::VcpuConfig {
        boot_vcpu_count: n,
        max_vcpu_count: n,
        topology: topology_of(n)?,
        vpmu: VpmuFeatureLevel::Disabled,
        template: None,
        vcpu_affinity: Default::default(),
    };
    let options = || vmm_core::VcpuManagerOptions {
        ack_timeout: super::ACK_TIMEOUT,
        ..vmm_core::VcpuManagerOptions::default()
    };
    let vm_options = || VmOptions {
        memory_size,
        ..VmOptions::default()
    };
    let mut vm =
        crate::guest::GuestVm::create(kvm, crate::guest::spin(), config, vm_options(), options())?;
    vm.vcpus.start_boot_vcpus()?;
    vm.vcpus.pause_all()?;
    let t = Instant::now();
    vm.vcpus.save_to(dir)?;
    let save = t.elapsed();
    vm.vcpus.exit_all()?;
    drop(vm);

    let kvm = crate::open_kvm()?;
    let t = Instant::now();
    let (restored_vm, mut restored) =
        vmm_core::VcpuManager::restore_from(kvm, dir, vm_options(), options())?;
    let restore = t.elapsed();
    restored.exit_all()?;
    drop(restored);
    drop(restored_vm);
    Ok(vec![
        BenchLine::new(
            "vm_save",
            "VcpuManager::save_to of the paused VM (SaveState on every vCPU thread + files) vs the bare save_snapshot",
            n,
            save,
            bare.map(|b| b.0),
        ),
        BenchLine::new(
            "vm_restore",
            "VcpuManager::restore_from (verify, check host, VM, memory, vCPUs + threads, paused) vs the bare restore_snapshot",
            n,
            restore,
            bare.map(|b| b.1),
        ),
    ])
}

/// Every snapshot row for each of `counts`: [`bench_snapshot`]'s four (state only, then with
/// `memory_size` bytes) and [`bench_manager_snapshot`]'s two, snapshot files in `dir`.
pub fn snapshot_lines(
    counts: &[u32],
    memory_size: u64,
    dir: &Path,
) -> Result<Vec<BenchLine>, IntegrationError> {
    let mut lines = Vec::new();
    for &n in counts {
        let raw = bench_snapshot(n, Some(memory_size), dir)?;
        let bare = |name: &str| {
            raw.iter()
                .find(|l| l.benchmark == name)
                .filter(|l| l.bare_ms.is_finite())
                .map(|l| Duration::from_secs_f64(l.bare_ms / 1e3))
        };
        let bare = bare("save_snapshot").zip(bare("restore_snapshot"));
        lines.extend(raw.iter().cloned());
        lines.extend(bench_manager_snapshot(n, memory_size, dir, bare)?);
    }
    Ok(lines)
}
