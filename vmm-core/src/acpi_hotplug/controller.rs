//! The CPU hotplug controller: a small MMIO device through which the guest learns which
//! CPUs were inserted or are to be removed, acknowledges those events and ejects CPUs (see
//! the register table in [the module](super)).
//!
//! The device's state is its own small mutex; a guest access locks it for a few loads and
//! stores and never waits for anything else (not the vCPU manager, not a backend). The
//! backend waits on the device's condition variable, which every guest write that changes a
//! CPU's state signals.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use vcpu_actor::{DeviceError, IoOutcome};

use super::{read_image, regs};
use crate::bus::{BusAccess, BusDevice};

/// One CPU's state as the controller holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuSlotState {
    /// Present (`_STA` 0xF): a boot CPU, or one inserted and not ejected since.
    pub enabled: bool,
    /// Insert event pending: the guest has not acknowledged the insertion yet.
    pub inserting: bool,
    /// Remove event pending: the guest has not acknowledged the removal request yet.
    pub removing: bool,
    /// The VMM asked for this CPU's removal: only such a CPU may be ejected.
    pub remove_requested: bool,
}

/// What the controller refused or ignored of the guest's input, for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ControllerStats {
    /// Writes to a register that takes none, of a width a register does not take, or of
    /// command bits the layout does not define.
    pub ignored_writes: u64,
    /// Commands while the selection names no CPU (index at or above the count).
    pub out_of_range: u64,
    /// Ejects refused: CPU 0, or a CPU whose removal the VMM did not request.
    pub refused_ejects: u64,
    /// Acknowledgements of an event that was not pending.
    pub stray_acks: u64,
    /// CPUs ejected.
    pub ejects: u64,
}

#[derive(Debug)]
struct State {
    selected: u32,
    cpus: Vec<CpuSlotState>,
    stats: ControllerStats,
}

/// The CPU hotplug controller of one VM: one slot per possible vCPU, by vCPU index (the ACPI
/// processor UID).
#[derive(Debug)]
pub struct CpuHotplugController {
    /// The APIC ID of each index.
    apic_ids: Vec<u32>,
    state: Mutex<State>,
    changed: Condvar,
}

impl CpuHotplugController {
    /// A controller for the vCPUs with these APIC IDs (in index order); the first `boot` are
    /// enabled.
    pub fn new(apic_ids: Vec<u32>, boot: usize) -> Self {
        let cpus = (0..apic_ids.len())
            .map(|i| CpuSlotState {
                enabled: i < boot,
                ..CpuSlotState::default()
            })
            .collect();
        Self {
            apic_ids,
            state: Mutex::new(State {
                selected: 0,
                cpus,
                stats: ControllerStats::default(),
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a handful of field updates: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many CPUs the controller has (the possible vCPUs).
    pub fn count(&self) -> u32 {
        u32::try_from(self.apic_ids.len()).unwrap_or(u32::MAX)
    }

    /// The APIC IDs by index.
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids
    }

    /// The index of the CPU with `apic_id`.
    pub fn index_of(&self, apic_id: u32) -> Option<usize> {
        self.apic_ids.iter().position(|&id| id == apic_id)
    }

    /// The state of CPU `index`.
    pub fn slot(&self, index: usize) -> Option<CpuSlotState> {
        self.lock().cpus.get(index).copied()
    }

    /// The indices of the enabled CPUs.
    pub fn enabled(&self) -> Vec<usize> {
        let s = self.lock();
        (0..s.cpus.len()).filter(|&i| s.cpus[i].enabled).collect()
    }

    /// What the controller refused or ignored so far.
    pub fn stats(&self) -> ControllerStats {
        self.lock().stats
    }

    /// Marks these CPUs inserted: enabled, with an insert event for the guest.
    pub fn mark_inserted(&self, indices: &[usize]) {
        let mut s = self.lock();
        for &i in indices {
            if let Some(c) = s.cpus.get_mut(i) {
                *c = CpuSlotState {
                    enabled: true,
                    inserting: true,
                    removing: false,
                    remove_requested: false,
                };
            }
        }
    }

    /// Withdraws the insertion of those of `indices` the guest has not acknowledged: they are
    /// no longer enabled and have no event. Returns the ones withdrawn.
    pub fn cancel_insert(&self, indices: &[usize]) -> Vec<usize> {
        let mut s = self.lock();
        let mut withdrawn = Vec::new();
        for &i in indices {
            if let Some(c) = s.cpus.get_mut(i).filter(|c| c.inserting) {
                *c = CpuSlotState::default();
                withdrawn.push(i);
            }
        }
        withdrawn
    }

    /// Asks the guest to remove these CPUs: a remove event, and eject allowed. CPU 0 and CPUs
    /// that are not enabled are skipped; returns the ones marked.
    pub fn mark_for_removal(&self, indices: &[usize]) -> Vec<usize> {
        let mut s = self.lock();
        let mut marked = Vec::new();
        for &i in indices {
            if i == 0 {
                continue;
            }
            if let Some(c) = s.cpus.get_mut(i).filter(|c| c.enabled) {
                c.removing = true;
                c.remove_requested = true;
                c.inserting = false;
                marked.push(i);
            }
        }
        marked
    }

    /// Withdraws the removal request of those of `indices` not ejected yet (a later eject is
    /// refused). Returns those whose remove event the guest had acknowledged (it may be
    /// acting on them) and those it had not.
    pub fn cancel_removal(&self, indices: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let mut s = self.lock();
        let (mut acknowledged, mut untouched) = (Vec::new(), Vec::new());
        for &i in indices {
            if let Some(c) = s.cpus.get_mut(i).filter(|c| c.remove_requested) {
                if c.removing {
                    untouched.push(i);
                } else {
                    acknowledged.push(i);
                }
                c.removing = false;
                c.remove_requested = false;
            }
        }
        (acknowledged, untouched)
    }

    /// Makes the controller say what the vCPU manager has: exactly `present` (indices)
    /// enabled, no event pending. Called when no hotplug operation is in flight.
    pub fn sync_present(&self, present: &[usize]) {
        let mut s = self.lock();
        for (i, c) in s.cpus.iter_mut().enumerate() {
            *c = CpuSlotState {
                enabled: present.contains(&i),
                ..CpuSlotState::default()
            };
        }
    }

    /// Waits until `done` holds for the CPU states, or `timeout`; returns whether it holds.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[CpuSlotState]) -> bool) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut s = self.lock();
        loop {
            if done(&s.cpus) {
                return true;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The register image of the current selection: `SEL`, `STAT`, `NEXT`, `COUNT`.
    fn image(&self, s: &State) -> [u8; regs::LEN as usize] {
        let status = s.cpus.get(s.selected as usize).map_or(0, |c| {
            let bit = |on: bool, bit: u8| if on { bit } else { 0 };
            bit(c.enabled, regs::status::ENABLED)
                | bit(c.inserting, regs::status::INSERT)
                | bit(c.removing, regs::status::REMOVE)
        });
        let next = s
            .cpus
            .iter()
            .position(|c| c.inserting || c.removing)
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(regs::NEXT_NONE);
        regs::Block {
            sel: s.selected,
            stat: status,
            reserved: [0; 3],
            next,
            count: self.count(),
        }
        .to_bytes()
    }

    /// A command byte written to `STAT` for the selected CPU.
    fn command(s: &mut State, value: u8) -> bool {
        if value & !(regs::command::ACK_INSERT | regs::command::ACK_REMOVE | regs::command::EJECT)
            != 0
        {
            s.stats.ignored_writes += 1;
        }
        let index = s.selected as usize;
        let Some(mut c) = s.cpus.get(index).copied() else {
            s.stats.out_of_range += 1;
            return false;
        };
        let before = c;
        if value & regs::command::ACK_INSERT != 0 {
            if c.inserting {
                c.inserting = false;
            } else {
                s.stats.stray_acks += 1;
            }
        }
        if value & regs::command::ACK_REMOVE != 0 {
            if c.removing {
                c.removing = false;
            } else {
                s.stats.stray_acks += 1;
            }
        }
        if value & regs::command::EJECT != 0 {
            if index == 0 || !c.remove_requested {
                s.stats.refused_ejects += 1;
            } else {
                c = CpuSlotState::default();
                s.stats.ejects += 1;
            }
        }
        s.cpus[index] = c;
        c != before
    }
}

impl BusDevice for CpuHotplugController {
    fn read(&self, access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        let s = self.lock();
        let image = self.image(&s);
        drop(s);
        read_image(&image, access.offset, data);
        Ok(IoOutcome::Handled)
    }

    fn write(&self, access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        let mut s = self.lock();
        let changed = match (access.offset, data) {
            // SEL, whole or byte by byte (an AML field with byte access writes it so).
            (o, _)
                if (regs::SEL..regs::SEL + 4).contains(&o)
                    && o + data.len() as u64 <= regs::SEL + 4 =>
            {
                let mut sel = s.selected.to_le_bytes();
                let at = usize::from(u8::try_from(o - regs::SEL).unwrap_or(0));
                sel[at..][..data.len()].copy_from_slice(data);
                s.selected = u32::from_le_bytes(sel);
                false
            }
            // STAT: the command is the first byte; wider writes must leave the rest zero.
            (regs::STAT, [value, rest @ ..]) => {
                if rest.iter().any(|b| *b != 0) {
                    s.stats.ignored_writes += 1;
                }
                Self::command(&mut s, *value)
            }
            _ => {
                s.stats.ignored_writes += 1;
                false
            }
        };
        drop(s);
        if changed {
            self.changed.notify_all();
        }
        Ok(IoOutcome::Handled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn at(offset: u64) -> BusAccess {
        BusAccess {
            vcpu_id: 0,
            base: u64::from(super::super::CPU_HOTPLUG_MMIO_BASE),
            offset,
        }
    }

    fn select(c: &CpuHotplugController, index: u32) {
        c.write(at(regs::SEL), &index.to_le_bytes()).unwrap();
    }

    fn status(c: &CpuHotplugController) -> u8 {
        let mut b = [0xffu8; 1];
        c.read(at(regs::STAT), &mut b).unwrap();
        b[0]
    }

    fn read32(c: &CpuHotplugController, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(at(offset), &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn cmd(c: &CpuHotplugController, value: u8) {
        c.write(at(regs::STAT), &[value]).unwrap();
    }

    fn controller() -> CpuHotplugController {
        // 2 sockets x 7 cores: sparse APIC IDs.
        let ids = (0..14).map(|i| (i / 7) * 8 + i % 7).collect();
        CpuHotplugController::new(ids, 2)
    }

    #[test]
    fn boot_cpus_are_enabled_and_nothing_is_pending() {
        let c = controller();
        assert_eq!(read32(&c, regs::COUNT), 14);
        assert_eq!(read32(&c, regs::NEXT), regs::NEXT_NONE);
        select(&c, 1);
        assert_eq!(status(&c), regs::status::ENABLED);
        select(&c, 2);
        assert_eq!(status(&c), 0);
        assert_eq!(read32(&c, regs::SEL), 2);
        assert_eq!(c.index_of(8), Some(7));
    }

    #[test]
    fn insert_is_seen_acknowledged_and_signalled() {
        let c = Arc::new(controller());
        c.mark_inserted(&[3, 2]);
        assert_eq!(read32(&c, regs::NEXT), 2);
        let waiter = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                c.wait_until(Duration::from_secs(30), |s| {
                    !s[2].inserting && !s[3].inserting
                })
            })
        };
        for index in [2, 3] {
            select(&c, index);
            assert_eq!(status(&c), regs::status::ENABLED | regs::status::INSERT);
            cmd(&c, regs::command::ACK_INSERT);
            assert_eq!(status(&c), regs::status::ENABLED);
        }
        assert!(waiter.join().unwrap());
        assert_eq!(read32(&c, regs::NEXT), regs::NEXT_NONE);
        assert_eq!(c.enabled(), [0, 1, 2, 3]);
    }

    #[test]
    fn removal_needs_a_request_and_ends_with_an_eject() {
        let c = controller();
        c.mark_inserted(&[2]);
        select(&c, 2);
        cmd(&c, regs::command::ACK_INSERT);
        // Eject of a CPU not marked for removal: refused.
        cmd(&c, regs::command::EJECT);
        assert!(c.slot(2).unwrap().enabled);
        assert_eq!(c.stats().refused_ejects, 1);
        // CPU 0 is never marked, nor ejected.
        assert_eq!(c.mark_for_removal(&[0, 2, 5]), [2]);
        select(&c, 0);
        cmd(&c, regs::command::EJECT);
        assert!(c.slot(0).unwrap().enabled);
        assert_eq!(c.stats().refused_ejects, 2);
        assert_eq!(read32(&c, regs::NEXT), 2);
        select(&c, 2);
        assert_eq!(status(&c), regs::status::ENABLED | regs::status::REMOVE);
        cmd(&c, regs::command::ACK_REMOVE);
        assert_eq!(status(&c), regs::status::ENABLED);
        cmd(&c, regs::command::EJECT);
        assert_eq!(status(&c), 0);
        assert_eq!(c.slot(2), Some(CpuSlotState::default()));
        assert_eq!(c.stats().ejects, 1);
        // A second eject of the same CPU: refused.
        cmd(&c, regs::command::EJECT);
        assert_eq!(c.stats().refused_ejects, 3);
    }

    #[test]
    fn bad_guest_input_is_ignored_and_counted_never_an_error() {
        let c = controller();
        // Out-of-range selections: status 0, commands ignored.
        for index in [14, 1000, u32::MAX] {
            select(&c, index);
            assert_eq!(status(&c), 0);
            cmd(&c, regs::command::EJECT | regs::command::ACK_INSERT);
        }
        assert_eq!(c.stats().out_of_range, 3);
        // Unknown command bits: counted; the known ones still act.
        select(&c, 1);
        cmd(&c, 0xf0);
        assert_eq!(c.stats().ignored_writes, 1);
        assert_eq!(c.stats().stray_acks, 0);
        cmd(&c, regs::command::ACK_INSERT | regs::command::ACK_REMOVE);
        assert_eq!(c.stats().stray_acks, 2);
        // Writes to read-only registers, beyond the layout, of odd widths: ignored.
        c.write(at(regs::NEXT), &[1, 2, 3, 4]).unwrap();
        c.write(at(regs::COUNT), &[0; 4]).unwrap();
        c.write(at(0x40), &[0; 8]).unwrap();
        c.write(at(2), &[0; 4]).unwrap();
        c.write(at(regs::STAT), &[regs::command::EJECT, 1]).unwrap();
        assert_eq!(read32(&c, regs::COUNT), 14);
        assert_eq!(c.enabled(), [0, 1]);
        // Reads of any width and offset, even past the layout, are answered.
        let mut wide = [0xffu8; 8];
        c.read(at(u64::from(regs::LEN) - 2), &mut wide).unwrap();
        assert_eq!(wide[2..], [0; 6]);
        c.read(at(u64::MAX), &mut wide).unwrap();
        assert_eq!(wide, [0; 8]);
        // The selector takes byte writes too (an AML field with byte access).
        c.write(at(regs::SEL), &[3]).unwrap();
        c.write(at(regs::SEL + 1), &[0]).unwrap();
        assert_eq!(read32(&c, regs::SEL), 3);
    }

    #[test]
    fn cancelled_operations_leave_no_pending_event_and_refuse_late_ejects() {
        let c = controller();
        c.mark_inserted(&[2, 3]);
        select(&c, 2);
        cmd(&c, regs::command::ACK_INSERT);
        assert_eq!(c.cancel_insert(&[2, 3]), [3]);
        assert_eq!(c.enabled(), [0, 1, 2]);
        assert_eq!(read32(&c, regs::NEXT), regs::NEXT_NONE);
        assert_eq!(c.mark_for_removal(&[2]), [2]);
        select(&c, 2);
        cmd(&c, regs::command::ACK_REMOVE);
        assert_eq!(c.cancel_removal(&[2]), (vec![2], vec![]));
        cmd(&c, regs::command::EJECT);
        assert!(c.slot(2).unwrap().enabled);
        c.sync_present(&[0, 1, 5]);
        assert_eq!(c.enabled(), [0, 1, 5]);
        assert!(!c.wait_until(Duration::from_millis(1), |s| s[4].enabled));
    }
}
