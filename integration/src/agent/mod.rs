//! The guest agent: a guest program that behaves like a small guest kernel for the vCPU
//! manager (it reads CPUID on every vCPU, wakes and parks APs through its local APIC, stops
//! the VM), and [`GuestAgent`], the VMM-side device it talks to. `vcpuctl demo`, `vcpuctl
//! cpuid`, the hotplug end-to-end tests and the hotplug benchmark run on it.
//!
//! # What the guest does
//!
//! Every vCPU, BSP and APs, enters at CPL 0 and executes CPUID for each (leaf, subleaf) of the
//! query list ([`GuestAgent::write_queries`], normally [`topology::hwloc::topology_queries`])
//! into its own result table ([`layout::results_addr`]), then reports its x2APIC ID (CPUID
//! leaf 0xB EDX) through [`ports::ONLINE`]. Everything the VMM shows about a vCPU's CPUID is
//! read from these tables: what guest code read, not what the VMM configured.
//!
//! Then the BSP enables its LAPIC, wakes the boot APs with one broadcast INIT/SIPI and drops to
//! CPL 3, where it counts its progress counter ([`layout::counter_addr`]) and polls the
//! mailbox ([`layout::MAILBOX_ADDR`], in guest memory so that polling costs no exits). For
//! each new request it carries out the [`AgentCommand`] (INIT + SIPI to one APIC ID through
//! the xAPIC ICR; INIT alone, which parks the AP in wait-for-SIPI as an offlined CPU; or a
//! write to the VM's shutdown port) and acknowledges the sequence number through
//! [`ports::ACK`].
//!
//! An AP, once reported, either counts at CPL 3 ([`ApMode::Count`]) or halts at CPL 0 with
//! interrupts off ([`ApMode::Halt`]: it uses no host CPU, for benchmarks with many vCPUs).
//! Either way the VMM can pause it, and only INIT takes it out of its loop.
//!
//! For hotplug, [`attach_upcall`] puts the guest-side upcall server of `hotplug` (whose
//! callback is [`GuestAgent::cpu_callback`]) behind a vsock muxer stub and gives the VM's
//! manager a connected client, so that `resize_vcpus` runs end to end; [`bench::bench_resize`]
//! times it.
//!
//! # Ports (the agent device)
//!
//! | port | width | direction | meaning |
//! | --- | --- | --- | --- |
//! | [`ports::ONLINE`] `0x620` | 4 | write | the writer's CPUID leaf 0xB EDX; its result table is complete |
//! | [`ports::ACK`] `0x624` | 4 | write | (BSP) the mailbox sequence number just carried out |
//! | [`ports::BENCH`] `0x628` | 4 | write | the port-I/O benchmark loop ([`pio_loop`]); not the agent's |
//!
//! The other guest programs' ports are listed in [`crate::guest`]; none overlap.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use integration::agent::{AgentVm, AgentVmOptions};
//! use vmm_core::VcpuConfig;
//!
//! # fn main() -> Result<(), integration::IntegrationError> {
//! let kvm = kvm_ioctls::Kvm::new().map_err(vmm_core::VmmError::KvmOpen)?;
//! let mut vm = AgentVm::create(kvm, VcpuConfig::with_counts(2, 4)?, AgentVmOptions::default())?;
//! vm.start(Duration::from_secs(30))?;
//! // Grow by hand (the hotplug path does the same through upcall):
//! vm.vcpus.create_vcpu(2)?;
//! vm.vcpus.start_vcpus(&[2])?;
//! vm.agent.online(2, Duration::from_secs(30))?;
//! assert_eq!(vm.agent.reported_apic_ids(), [0, 1, 2]);
//! vm.agent.request_shutdown()?;
//! # Ok(())
//! # }
//! ```

mod asm;
pub mod bench;
pub mod upcall;

pub use upcall::{attach_upcall, AgentUpcall, AgentUpcallOptions};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use slog::{debug, o, Logger};
use topology::hwloc::{topology_queries, CpuidResult};
use vcpu_actor::{DeviceError, IoOutcome};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::loader::{layout as loader_layout, load_program, GuestProgram, Privilege};
use vmm_core::{
    build_vm, BusAccess, BusDevice, BusSpace, IoBus, VcpuConfig, VcpuManager, VcpuManagerOptions,
    Vm, VmOptions,
};

use crate::IntegrationError;

/// Guest physical addresses the agent program uses (all inside the first
/// [`MIN_MEMORY_SIZE`] bytes).
pub mod layout {
    /// The mailbox: the VMM's requests to the BSP.
    pub const MAILBOX_ADDR: u64 = 0x60_0000;
    /// `u32`: the request sequence number (written last).
    pub const MAILBOX_SEQ: u64 = MAILBOX_ADDR;
    /// `u32`: the [`super::AgentCommand`].
    pub const MAILBOX_CMD: u64 = MAILBOX_ADDR + 4;
    /// `u32`: the command's argument (an APIC ID).
    pub const MAILBOX_ARG: u64 = MAILBOX_ADDR + 8;
    /// `u32`: the [`super::ApMode`] (read by each AP once it reported).
    pub const MAILBOX_MODE: u64 = MAILBOX_ADDR + 12;
    /// The query list: `u32` count, `u32` 0, then `count` pairs of `u32` leaf, `u32` subleaf.
    pub const QUERIES_ADDR: u64 = 0x60_1000;
    /// The most queries the guest executes (one 4 KiB result table per vCPU).
    pub const MAX_QUERIES: u32 = 256;
    /// Per-APIC-ID lines of 64 bytes: the progress counter (`u64`) at offset 0.
    pub const CPU_LINES_ADDR: u64 = 0x61_0000;
    /// log2 of a line's size.
    pub const CPU_LINE_SHIFT: u32 = 6;
    /// Per-APIC-ID result tables: `count` x (EAX, EBX, ECX, EDX), `u32` each.
    pub const RESULTS_ADDR: u64 = 0x62_0000;
    /// log2 of the bytes between two result tables.
    pub const RESULTS_SHIFT: u32 = 12;
    /// The APIC IDs that have a line and a table (xAPIC IDs).
    pub const APIC_ID_SLOTS: u32 = 256;
    /// The end of what the agent uses.
    pub const END: u64 = RESULTS_ADDR + ((APIC_ID_SLOTS as u64) << RESULTS_SHIFT);

    /// The progress counter of the vCPU with APIC ID `apic_id` (taken modulo 256, as the
    /// guest indexes by CPUID leaf 0x1 EBX\[31:24\]).
    pub const fn counter_addr(apic_id: u32) -> u64 {
        CPU_LINES_ADDR + (((apic_id % APIC_ID_SLOTS) as u64) << CPU_LINE_SHIFT)
    }

    /// The result table of the vCPU with APIC ID `apic_id` (taken modulo 256).
    pub const fn results_addr(apic_id: u32) -> u64 {
        RESULTS_ADDR + (((apic_id % APIC_ID_SLOTS) as u64) << RESULTS_SHIFT)
    }
}

/// The layout's rules, checked when the crate compiles: the mailbox is above the program
/// area, the query list ends before the per-CPU lines, the lines end before the result tables,
/// a result table holds [`layout::MAX_QUERIES`] results, and everything fits in
/// [`MIN_MEMORY_SIZE`].
const _: () = {
    assert!(layout::MAILBOX_ADDR >= loader_layout::PROGRAM_AREA_START + 0x10_0000);
    assert!(layout::QUERIES_ADDR + 8 + 8 * (layout::MAX_QUERIES as u64) <= layout::CPU_LINES_ADDR);
    assert!(layout::counter_addr(255) + 64 <= layout::RESULTS_ADDR);
    assert!(16 * (layout::MAX_QUERIES as u64) <= 1 << layout::RESULTS_SHIFT);
    assert!(layout::END <= MIN_MEMORY_SIZE);
};

/// The agent device's ports.
pub mod ports {
    /// The first port of the agent device.
    pub const BASE: u16 = 0x620;
    /// The number of ports it claims.
    pub const LEN: u16 = 8;
    /// A vCPU's CPUID leaf 0xB EDX, written once its result table is complete.
    pub const ONLINE: u16 = BASE;
    /// The mailbox sequence number the BSP just carried out.
    pub const ACK: u16 = BASE + 4;
    /// The port the [`super::pio_loop`] benchmark guest writes (not claimed by the agent).
    pub const BENCH: u16 = 0x628;
}

/// The smallest guest memory the agent program fits in.
pub const MIN_MEMORY_SIZE: u64 = 16 << 20;

/// What the BSP writes to the VM's shutdown port for [`AgentCommand::Shutdown`].
pub const SHUTDOWN_VALUE: u32 = 0x5d;

/// A request the BSP carries out (the mailbox's command word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[repr(u32)]
pub enum AgentCommand {
    /// INIT then SIPI (vector [`loader_layout::SIPI_VECTOR`]) to the APIC ID: the AP starts at
    /// the loader's trampoline, then the agent's AP entry.
    Wake = 1,
    /// INIT to the APIC ID: the AP stops and waits for SIPI (an offlined CPU).
    Park = 2,
    /// Write [`SHUTDOWN_VALUE`] to the VM's shutdown port.
    Shutdown = 3,
}

/// What an AP does once it reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[repr(u32)]
pub enum ApMode {
    /// Count its progress counter at CPL 3 (native speed; competes for host CPUs).
    #[default]
    Count = 0,
    /// Halt at CPL 0 with interrupts off (no host CPU used; no progress shown).
    Halt = 1,
}

/// The agent program (BSP and AP entries at CPL 0; the loops run at CPL 3).
pub fn agent_program() -> GuestProgram<'static> {
    let (code, ap) = asm::agent();
    GuestProgram {
        name: "guest-agent",
        code,
        load_addr: loader_layout::DEFAULT_LOAD_ADDR,
        bsp_entry: 0,
        ap_entry: Some(ap),
        privilege: Privilege::Kernel,
        data: Vec::new(),
    }
}

/// A CPL-3 loop doing one 4-byte `out` to [`ports::BENCH`] per iteration, using no memory, so
/// that any number of vCPUs can run it from the same registers (the exit-path benchmark).
pub fn pio_loop() -> GuestProgram<'static> {
    GuestProgram::user("pio-loop", asm::pio_loop(), 0)
}

/// What one vCPU reported through [`ports::ONLINE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OnlineReport {
    /// The vCPU that wrote (KVM vCPU id = its configured APIC ID).
    pub vcpu_id: u32,
    /// What it read from CPUID leaf 0xB EDX (its x2APIC ID).
    pub cpuid_apic_id: u32,
    /// How many times this vCPU came online (a re-added vCPU reports again).
    pub times: u32,
}

/// At most this many vCPUs are tracked (KVM vCPU ids are below 4096 here; the guest decides
/// which vCPUs write).
const MAX_TRACKED: usize = 4096;

#[derive(Default)]
struct AgentState {
    online: BTreeMap<u32, OnlineReport>,
    parked: BTreeSet<u32>,
    acked: u32,
    /// The commands the BSP acknowledged, oldest first (at most [`MAX_TRACKED`]).
    carried_out: VecDeque<(AgentCommand, u32)>,
}

/// The VMM side of the guest agent: a device on the VM's I/O bus plus the mailbox in guest
/// memory. Register it with [`GuestAgent::register`]; its methods are what the guest-side
/// upcall server's callback calls ([`GuestAgent::cpu_callback`]).
pub struct GuestAgent {
    mem: GuestMemoryMmap,
    state: Mutex<AgentState>,
    changed: Condvar,
    /// The last sequence number posted; held for a whole request (one at a time).
    request: Mutex<u32>,
    logger: Logger,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GuestAgent {
    /// An agent over `mem` (the VM's guest memory, which it reads and writes).
    pub fn new(mem: GuestMemoryMmap, logger: Logger) -> Arc<Self> {
        Arc::new(Self {
            mem,
            state: Mutex::new(AgentState::default()),
            changed: Condvar::new(),
            request: Mutex::new(0),
            logger: logger.new(o!("device" => "guest-agent")),
        })
    }

    /// Registers the agent's ports ([`ports::BASE`], [`ports::LEN`]) on `bus`.
    pub fn register(self: &Arc<Self>, bus: &IoBus) -> Result<(), IntegrationError> {
        bus.register(
            BusSpace::Pio,
            u64::from(ports::BASE),
            u64::from(ports::LEN),
            "guest-agent",
            Arc::clone(self) as Arc<dyn BusDevice>,
        )?;
        Ok(())
    }

    fn write_u32(&self, addr: u64, value: u32) -> Result<(), IntegrationError> {
        self.mem
            .write_obj(value, GuestAddress(addr))
            .map_err(|e| IntegrationError::Guest(format!("writing guest memory at {addr:#x}: {e}")))
    }

    /// Writes the CPUID query list the vCPUs execute (before they start). At most
    /// [`layout::MAX_QUERIES`].
    pub fn write_queries(&self, queries: &[(u32, u32)]) -> Result<(), IntegrationError> {
        if queries.len() > layout::MAX_QUERIES as usize {
            return Err(IntegrationError::Guest(format!(
                "{} CPUID queries asked; the agent executes at most {}",
                queries.len(),
                layout::MAX_QUERIES
            )));
        }
        let mut bytes = Vec::with_capacity(8 + 8 * queries.len());
        bytes.extend_from_slice(&(queries.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        for (leaf, subleaf) in queries {
            bytes.extend_from_slice(&leaf.to_le_bytes());
            bytes.extend_from_slice(&subleaf.to_le_bytes());
        }
        self.mem
            .write_slice(&bytes, GuestAddress(layout::QUERIES_ADDR))
            .map_err(|e| IntegrationError::Guest(format!("writing the CPUID queries: {e}")))
    }

    /// Sets what APs do once they reported (read by each AP as it comes up).
    pub fn set_ap_mode(&self, mode: ApMode) -> Result<(), IntegrationError> {
        self.write_u32(layout::MAILBOX_MODE, mode as u32)
    }

    /// What the vCPU with APIC ID `apic_id` read for `queries` (the list given to
    /// [`write_queries`](Self::write_queries)); meaningful once it reported online.
    pub fn cpuid_results(
        &self,
        apic_id: u32,
        queries: &[(u32, u32)],
    ) -> Result<Vec<CpuidResult>, IntegrationError> {
        let n = queries.len().min(layout::MAX_QUERIES as usize);
        let mut raw = vec![0u8; n * 16];
        self.mem
            .read_slice(&mut raw, GuestAddress(layout::results_addr(apic_id)))
            .map_err(|e| IntegrationError::Guest(format!("reading CPUID results: {e}")))?;
        let word = |r: &[u8], i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        Ok(queries
            .iter()
            .zip(raw.chunks_exact(16))
            .map(|(&(leaf, subleaf), r)| CpuidResult {
                leaf,
                subleaf,
                eax: word(r, 0),
                ebx: word(r, 4),
                ecx: word(r, 8),
                edx: word(r, 12),
            })
            .collect())
    }

    /// The progress counter of the vCPU with APIC ID `apic_id`.
    pub fn progress(&self, apic_id: u32) -> u64 {
        self.mem
            .read_obj::<u64>(GuestAddress(layout::counter_addr(apic_id)))
            .unwrap_or(0)
    }

    /// The progress counters of these APIC IDs, in order.
    pub fn progress_of(&self, apic_ids: &[u32]) -> Vec<u64> {
        apic_ids.iter().map(|&id| self.progress(id)).collect()
    }

    /// Every online report, by vCPU id.
    pub fn online_reports(&self) -> Vec<OnlineReport> {
        lock(&self.state).online.values().copied().collect()
    }

    /// The vCPU ids (APIC IDs) online now: reported, not parked since.
    pub fn reported_apic_ids(&self) -> Vec<u32> {
        lock(&self.state).online.keys().copied().collect()
    }

    /// The APIC IDs parked by [`offline`](Self::offline) and not woken since.
    pub fn parked_apic_ids(&self) -> Vec<u32> {
        lock(&self.state).parked.iter().copied().collect()
    }

    /// The commands the BSP carried out (acknowledged), oldest first, with their argument;
    /// the most recent 4096 are kept.
    pub fn commands_carried_out(&self) -> Vec<(AgentCommand, u32)> {
        lock(&self.state).carried_out.iter().copied().collect()
    }

    /// The APIC IDs the BSP sent INIT and SIPI to ([`AgentCommand::Wake`]), in order.
    pub fn woken_apic_ids(&self) -> Vec<u32> {
        lock(&self.state)
            .carried_out
            .iter()
            .filter(|(cmd, _)| *cmd == AgentCommand::Wake)
            .map(|(_, arg)| *arg)
            .collect()
    }

    /// Waits until every APIC ID of `apic_ids` reported online, or `timeout`.
    pub fn wait_online(&self, apic_ids: &[u32], timeout: Duration) -> Result<(), IntegrationError> {
        let state = lock(&self.state);
        let (state, res) = self
            .changed
            .wait_timeout_while(state, timeout, |s| {
                !apic_ids.iter().all(|id| s.online.contains_key(id))
            })
            .unwrap_or_else(PoisonError::into_inner);
        if res.timed_out() {
            let missing: Vec<u32> = apic_ids
                .iter()
                .copied()
                .filter(|id| !state.online.contains_key(id))
                .collect();
            return Err(IntegrationError::Guest(format!(
                "vCPUs with APIC IDs {missing:?} did not report online within {timeout:?} \
                 (are they created, started and woken?)"
            )));
        }
        if let Some(bad) = apic_ids
            .iter()
            .filter_map(|id| state.online.get(id))
            .find(|r| r.cpuid_apic_id != r.vcpu_id)
        {
            return Err(IntegrationError::Guest(format!(
                "vCPU {} read APIC ID {} from CPUID leaf 0xB EDX: the VMM configured its CPUID \
                 wrongly",
                bad.vcpu_id, bad.cpuid_apic_id
            )));
        }
        Ok(())
    }

    /// Posts one command and waits for the BSP's acknowledgement (if `wait_ack`).
    fn post(
        &self,
        cmd: AgentCommand,
        arg: u32,
        timeout: Duration,
        wait_ack: bool,
    ) -> Result<(), IntegrationError> {
        let mut seq = lock(&self.request);
        let next = seq.wrapping_add(1).max(1);
        // Command and argument first: the BSP reads them after it sees the new sequence
        // number (x86 keeps stores in order; the fence keeps the compiler from reordering).
        self.write_u32(layout::MAILBOX_CMD, cmd as u32)?;
        self.write_u32(layout::MAILBOX_ARG, arg)?;
        fence(Ordering::SeqCst);
        self.write_u32(layout::MAILBOX_SEQ, next)?;
        *seq = next;
        debug!(self.logger, "request posted"; "seq" => next, "cmd" => ?cmd, "arg" => arg);
        if !wait_ack {
            return Ok(());
        }
        let state = lock(&self.state);
        let (mut state, res) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.acked != next)
            .unwrap_or_else(PoisonError::into_inner);
        if !res.timed_out() {
            if state.carried_out.len() >= MAX_TRACKED {
                state.carried_out.pop_front();
            }
            state.carried_out.push_back((cmd, arg));
        }
        drop(state);
        if res.timed_out() {
            return Err(IntegrationError::Guest(format!(
                "the guest's BSP did not carry out {cmd:?} {arg} within {timeout:?} (is vCPU 0 \
                 running?)"
            )));
        }
        Ok(())
    }

    /// Brings the AP with APIC ID `apic_id` online: asks the BSP to send it INIT and SIPI,
    /// then waits until it reported its APIC ID from CPUID. Its vCPU must exist and be started
    /// (waiting for INIT/SIPI). Returns how long it took.
    pub fn online(&self, apic_id: u32, timeout: Duration) -> Result<Duration, IntegrationError> {
        let t = Instant::now();
        {
            let mut s = lock(&self.state);
            s.online.remove(&apic_id);
            s.parked.remove(&apic_id);
        }
        self.post(AgentCommand::Wake, apic_id, timeout, true)?;
        let left = timeout.saturating_sub(t.elapsed());
        self.wait_online(&[apic_id], left)?;
        debug!(self.logger, "AP online"; "apic_id" => apic_id, "took" => ?t.elapsed());
        Ok(t.elapsed())
    }

    /// Takes the AP with APIC ID `apic_id` offline: the BSP sends it INIT, after which it
    /// executes nothing until the next SIPI; its vCPU thread can then be exited. Returns how
    /// long it took.
    pub fn offline(&self, apic_id: u32, timeout: Duration) -> Result<Duration, IntegrationError> {
        let t = Instant::now();
        if apic_id == 0 {
            return Err(IntegrationError::Guest(
                "the BSP (APIC ID 0) cannot be taken offline".into(),
            ));
        }
        self.post(AgentCommand::Park, apic_id, timeout, true)?;
        let mut s = lock(&self.state);
        s.online.remove(&apic_id);
        s.parked.insert(apic_id);
        debug!(self.logger, "AP parked"; "apic_id" => apic_id);
        Ok(t.elapsed())
    }

    /// Asks the guest to stop the VM through the shutdown port (not waiting: the VM's exit
    /// event tells when it happened).
    pub fn request_shutdown(&self) -> Result<(), IntegrationError> {
        self.post(AgentCommand::Shutdown, 0, Duration::ZERO, false)
    }

    /// The callback for [`hotplug::guest::GuestUpcallServer`]: `Online(id)` runs
    /// [`online`](Self::online), `Offline(id)` [`offline`](Self::offline), each with
    /// `timeout`; a failure answers `EIO` (5) to the upcall request.
    pub fn cpu_callback(self: &Arc<Self>, timeout: Duration) -> hotplug::guest::CpuCallback {
        let agent = Arc::clone(self);
        Box::new(move |action| {
            let res = match action {
                hotplug::guest::CpuAction::Online(id) => agent.online(u32::from(id), timeout),
                hotplug::guest::CpuAction::Offline(id) => agent.offline(u32::from(id), timeout),
            };
            res.map(|_| ()).map_err(|e| {
                slog::warn!(agent.logger, "guest could not act on a CPU";
                            "action" => ?action, "error" => %e);
                hotplug::guest::EIO
            })
        })
    }
}

impl BusDevice for GuestAgent {
    fn read(&self, _access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        data.fill(0);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        let port = access.base + access.offset;
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Err(DeviceError(format!(
                "guest agent port {port:#x} takes 4-byte writes, got {} bytes",
                data.len()
            )));
        };
        let value = u32::from_le_bytes(bytes);
        let mut s = lock(&self.state);
        match u16::try_from(port) {
            Ok(ports::ONLINE) => {
                if !s.online.contains_key(&access.vcpu_id) && s.online.len() >= MAX_TRACKED {
                    return Err(DeviceError("too many vCPUs reporting".into()));
                }
                let times = s
                    .online
                    .get(&access.vcpu_id)
                    .map_or(1, |r| r.times.saturating_add(1));
                s.online.insert(
                    access.vcpu_id,
                    OnlineReport {
                        vcpu_id: access.vcpu_id,
                        cpuid_apic_id: value,
                        times,
                    },
                );
                s.parked.remove(&access.vcpu_id);
            }
            Ok(ports::ACK) => s.acked = value,
            _ => {
                return Err(DeviceError(format!(
                    "no guest agent register at port {port:#x}"
                )))
            }
        }
        drop(s);
        self.changed.notify_all();
        Ok(IoOutcome::Handled)
    }
}

/// How to build an [`AgentVm`].
pub struct AgentVmOptions {
    /// Guest RAM in bytes (at least [`MIN_MEMORY_SIZE`]).
    pub memory_size: u64,
    /// What APs do once they reported.
    pub ap_mode: ApMode,
    /// The vCPU manager's options (its logger is used for the VM and the agent too).
    pub manager: VcpuManagerOptions,
}

impl Default for AgentVmOptions {
    fn default() -> Self {
        Self {
            memory_size: 64 << 20,
            ap_mode: ApMode::Count,
            manager: VcpuManagerOptions::default(),
        }
    }
}

/// A VM running the agent program: the VM, its vCPU manager, the agent device, and the CPUID
/// queries every vCPU executes.
pub struct AgentVm {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its vCPUs (boot vCPUs created, not started, after [`AgentVm::create`]).
    pub vcpus: VcpuManager,
    /// The agent device.
    pub agent: Arc<GuestAgent>,
    /// The CPUID queries ([`topology_queries`] of vCPU 0's CPUID set).
    pub queries: Vec<(u32, u32)>,
}

impl AgentVm {
    /// Builds the VM for `config`, loads the agent program, registers the agent device and
    /// creates the boot vCPUs.
    pub fn create(
        kvm: kvm_ioctls::Kvm,
        config: VcpuConfig,
        options: AgentVmOptions,
    ) -> Result<Self, IntegrationError> {
        if options.memory_size < MIN_MEMORY_SIZE {
            return Err(IntegrationError::Guest(format!(
                "{} MiB of guest memory is too little for the agent program: use at least {} MiB",
                options.memory_size >> 20,
                MIN_MEMORY_SIZE >> 20
            )));
        }
        let logger = options.manager.logger.clone();
        let vm_options = VmOptions {
            memory_size: options.memory_size,
            logger: logger.clone(),
            ..VmOptions::default()
        };
        let (vm, mut vcpus) = build_vm(kvm, vm_options, config, options.manager)?;
        let queries = topology_queries(&vcpus.vcpu_cpuid(0)?);
        let agent = GuestAgent::new(vm.memory().clone(), logger);
        agent.register(vm.io_bus())?;
        let entry = load_program(vm.memory(), &agent_program())?;
        agent.write_queries(&queries)?;
        agent.set_ap_mode(options.ap_mode)?;
        vcpus.create_boot_vcpus(Arc::new(entry))?;
        Ok(Self {
            vm,
            vcpus,
            agent,
            queries,
        })
    }

    /// The APIC IDs of the present vCPUs, in index order.
    pub fn present_apic_ids(&self) -> Vec<u32> {
        self.vcpus
            .present_vcpus()
            .iter()
            .map(|v| v.apic_id)
            .collect()
    }

    /// Starts the boot vCPUs and waits until every one reported online. Returns how long it
    /// took.
    pub fn start(&self, timeout: Duration) -> Result<Duration, IntegrationError> {
        let t = Instant::now();
        self.vcpus.start_boot_vcpus()?;
        self.agent.wait_online(&self.present_apic_ids(), timeout)?;
        Ok(t.elapsed())
    }

    /// What the vCPU with APIC ID `apic_id` read from CPUID.
    pub fn cpuid_results(&self, apic_id: u32) -> Result<Vec<CpuidResult>, IntegrationError> {
        self.agent.cpuid_results(apic_id, &self.queries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_entries_are_inside_the_code() {
        let p = agent_program();
        assert!(!p.code.is_empty());
        let ap = p.ap_entry.expect("AP entry");
        assert!(ap > 0 && ap < p.code.len() as u64);
        assert_eq!(p.privilege, Privilege::Kernel);
        let pio = pio_loop();
        assert!(!pio.code.is_empty());
    }

    #[test]
    fn layout_fits_and_does_not_overlap() {
        // The layout's own rules are checked at compile time (the `const _` after `layout`).
        assert_eq!(layout::counter_addr(256), layout::counter_addr(0));
        // The agent's ports are clear of the other guest programs' and the VM's.
        let agent = u32::from(ports::BASE)..u32::from(ports::BASE + ports::LEN);
        for p in [
            crate::guest::ports::CPUID_LEAF1_EBX,
            crate::guest::ports::CPUID_LEAFB_EDX,
            vmm_core::devices::SHUTDOWN_PORT,
            vmm_core::devices::COM1_PORT,
        ] {
            assert!(!agent.contains(&u32::from(p)), "{p:#x}");
        }
        assert!(!agent.contains(&u32::from(ports::BENCH)));
    }

    fn agent() -> Arc<GuestAgent> {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIN_MEMORY_SIZE as usize)]).unwrap();
        GuestAgent::new(mem, Logger::root(slog::Discard, o!()))
    }

    fn access(vcpu_id: u32, port: u16) -> BusAccess {
        BusAccess {
            vcpu_id,
            base: u64::from(ports::BASE),
            offset: u64::from(port - ports::BASE),
        }
    }

    #[test]
    fn device_records_reports_and_rejects_bad_writes() {
        let a = agent();
        a.write(access(8, ports::ONLINE), &8u32.to_le_bytes())
            .unwrap();
        a.write(access(8, ports::ONLINE), &8u32.to_le_bytes())
            .unwrap();
        a.write(access(2, ports::ONLINE), &3u32.to_le_bytes())
            .unwrap();
        assert_eq!(a.reported_apic_ids(), [2, 8]);
        assert_eq!(a.online_reports()[1].times, 2);
        a.wait_online(&[8], Duration::from_millis(1)).unwrap();
        // vCPU 2 read APIC ID 3: a mismatch is an error, not a hang.
        assert!(a.wait_online(&[2], Duration::from_millis(1)).is_err());
        assert!(a.wait_online(&[4], Duration::from_millis(1)).is_err());
        assert!(a.write(access(0, ports::ONLINE), &[1, 2]).is_err());
        assert!(a.write(access(0, ports::BASE + 2), &[0; 4]).is_err());
        let mut buf = [0xffu8; 4];
        a.read(access(0, ports::ACK), &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn requests_go_through_the_mailbox_and_wait_for_the_ack() {
        let a = agent();
        let guest = Arc::clone(&a);
        // A stand-in BSP: acknowledges whatever sequence number appears.
        let bsp = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let seq = guest
                    .mem
                    .read_obj::<u32>(GuestAddress(layout::MAILBOX_SEQ))
                    .unwrap();
                if seq == 1 {
                    let cmd = guest
                        .mem
                        .read_obj::<u32>(GuestAddress(layout::MAILBOX_CMD))
                        .unwrap();
                    let arg = guest
                        .mem
                        .read_obj::<u32>(GuestAddress(layout::MAILBOX_ARG))
                        .unwrap();
                    guest
                        .write(access(0, ports::ACK), &1u32.to_le_bytes())
                        .unwrap();
                    return (cmd, arg);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            (0, 0)
        });
        a.offline(4, Duration::from_secs(10)).unwrap();
        assert_eq!(bsp.join().unwrap(), (AgentCommand::Park as u32, 4));
        assert_eq!(a.parked_apic_ids(), [4]);
        // Nobody acknowledges the next one: a timeout, not a hang.
        assert!(a.offline(5, Duration::from_millis(20)).is_err());
        assert!(a.offline(0, Duration::from_millis(20)).is_err());
    }

    #[test]
    fn queries_round_trip_through_guest_memory() {
        let a = agent();
        let q = [(0, 0), (0xb, 1)];
        a.write_queries(&q).unwrap();
        a.mem
            .write_obj(0x1234u32, GuestAddress(layout::results_addr(2) + 16 + 12))
            .unwrap();
        let r = a.cpuid_results(2, &q).unwrap();
        assert_eq!((r[1].leaf, r[1].subleaf, r[1].edx), (0xb, 1, 0x1234));
        let too_many = vec![(0, 0); layout::MAX_QUERIES as usize + 1];
        assert!(a.write_queries(&too_many).is_err());
    }
}
