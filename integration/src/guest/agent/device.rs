//! [`GuestAgent`], the VMM side of the guest agent: a device on the VM's I/O bus (the
//! online and ack ports) plus the mailbox in guest memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use slog::{debug, o, Logger};
use topology::hwloc::CpuidResult;
use vcpu_actor::{DeviceError, IoOutcome};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::{BusAccess, BusDevice, BusSpace, IoBus};

use super::{ports, shared_memory, AgentCommand, ApMode};
use crate::IntegrationError;

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

#[derive(Debug, Default)]
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
#[derive(Debug)]
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

    /// Registers the agent's ports ([`ports::AGENT_BASE`], [`ports::AGENT_LEN`]) on `bus`.
    pub fn register(self: &Arc<Self>, bus: &IoBus) -> Result<(), IntegrationError> {
        bus.register(
            BusSpace::Pio,
            u64::from(ports::AGENT_BASE),
            u64::from(ports::AGENT_LEN),
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
    /// [`shared_memory::MAX_QUERIES`].
    pub fn write_queries(&self, queries: &[(u32, u32)]) -> Result<(), IntegrationError> {
        let count = u32::try_from(queries.len())
            .ok()
            .filter(|&n| n <= shared_memory::MAX_QUERIES)
            .ok_or_else(|| {
                IntegrationError::Guest(format!(
                    "{} CPUID queries asked; the agent executes at most {}",
                    queries.len(),
                    shared_memory::MAX_QUERIES
                ))
            })?;
        let mut bytes = Vec::with_capacity(8 + 8 * queries.len());
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        for (leaf, subleaf) in queries {
            bytes.extend_from_slice(&leaf.to_le_bytes());
            bytes.extend_from_slice(&subleaf.to_le_bytes());
        }
        self.mem
            .write_slice(&bytes, GuestAddress(shared_memory::QUERIES_ADDR))
            .map_err(|e| IntegrationError::Guest(format!("writing the CPUID queries: {e}")))
    }

    /// Sets what APs do once they reported (read by each AP as it comes up).
    pub fn set_ap_mode(&self, mode: ApMode) -> Result<(), IntegrationError> {
        self.write_u32(shared_memory::MAILBOX_MODE, mode as u32)
    }

    /// What the vCPU with APIC ID `apic_id` read for `queries` (the list given to
    /// [`write_queries`](Self::write_queries)); meaningful once it reported online.
    pub fn cpuid_results(
        &self,
        apic_id: u32,
        queries: &[(u32, u32)],
    ) -> Result<Vec<CpuidResult>, IntegrationError> {
        let n = queries.len().min(shared_memory::MAX_QUERIES as usize);
        let mut raw = vec![0u8; n * 16];
        self.mem
            .read_slice(&mut raw, GuestAddress(shared_memory::results_addr(apic_id)))
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
            .read_obj::<u64>(GuestAddress(shared_memory::counter_addr(apic_id)))
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
        self.write_u32(shared_memory::MAILBOX_CMD, cmd as u32)?;
        self.write_u32(shared_memory::MAILBOX_ARG, arg)?;
        fence(Ordering::SeqCst);
        self.write_u32(shared_memory::MAILBOX_SEQ, next)?;
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

    /// Waits until the BSP went once more through its loop ([`AgentCommand::Sync`]): what
    /// the VMM wrote to the mailbox before is what it acts on from then on.
    pub fn sync(&self, timeout: Duration) -> Result<(), IntegrationError> {
        self.post(AgentCommand::Sync, 0, timeout, true)
    }

    /// Records that the guest parked these APs on its own (an ACPI hot-remove, which the BSP
    /// carries out without the mailbox): they are no longer online, and a later wake must
    /// report again.
    pub fn mark_parked(&self, apic_ids: &[u32]) {
        let mut s = lock(&self.state);
        for id in apic_ids {
            s.online.remove(id);
            s.parked.insert(*id);
        }
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

#[cfg(test)]
mod tests {
    use super::super::{AgentCommand, MIN_MEMORY_SIZE};
    use super::*;

    fn agent() -> Arc<GuestAgent> {
        let mem = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            usize::try_from(MIN_MEMORY_SIZE).unwrap(),
        )])
        .unwrap();
        GuestAgent::new(mem, Logger::root(slog::Discard, o!()))
    }

    fn access(vcpu_id: u32, port: u16) -> BusAccess {
        BusAccess {
            vcpu_id,
            base: u64::from(ports::AGENT_BASE),
            offset: u64::from(port - ports::AGENT_BASE),
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
        assert!(a.write(access(0, ports::AGENT_BASE + 2), &[0; 4]).is_err());
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
                    .read_obj::<u32>(GuestAddress(shared_memory::MAILBOX_SEQ))
                    .unwrap();
                if seq == 1 {
                    let cmd = guest
                        .mem
                        .read_obj::<u32>(GuestAddress(shared_memory::MAILBOX_CMD))
                        .unwrap();
                    let arg = guest
                        .mem
                        .read_obj::<u32>(GuestAddress(shared_memory::MAILBOX_ARG))
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
            .write_obj(
                0x1234u32,
                GuestAddress(shared_memory::results_addr(2) + 16 + 12),
            )
            .unwrap();
        let r = a.cpuid_results(2, &q).unwrap();
        assert_eq!((r[1].leaf, r[1].subleaf, r[1].edx), (0xb, 1, 0x1234));
        let too_many = vec![(0, 0); shared_memory::MAX_QUERIES as usize + 1];
        assert!(a.write_queries(&too_many).is_err());
    }
}
