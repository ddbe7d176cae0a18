//! The port-I/O and MMIO bus: devices registered on address ranges, and the vCPU exit handler
//! that routes guest accesses to them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use slog::{debug, o, Logger};
use vcpu_actor::{DeviceError, ExitHandler, IoOutcome};

use crate::error::BusError;

/// The two address spaces a vCPU exit can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BusSpace {
    /// x86 port I/O (`in`/`out`), 16-bit addresses.
    Pio,
    /// Memory-mapped I/O: guest physical addresses outside RAM.
    Mmio,
}

impl fmt::Display for BusSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusSpace::Pio => "port I/O",
            BusSpace::Mmio => "MMIO",
        })
    }
}

/// Where a guest access landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusAccess {
    /// The vCPU that made the access (its KVM vCPU id = APIC ID).
    pub vcpu_id: u32,
    /// The base of the range the device was registered on.
    pub base: u64,
    /// The offset of the access from `base`.
    pub offset: u64,
}

/// A device on the bus. Calls come from vCPU threads concurrently, so devices use interior
/// mutability. Everything in `data` comes from the guest: never panic on it.
pub trait BusDevice: Send + Sync {
    /// The guest reads `data.len()` bytes at `access`; fill `data`.
    fn read(&self, access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError>;
    /// The guest writes `data` at `access`.
    fn write(&self, access: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError>;
}

/// One registered range, as [`IoBus::ranges`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes (or ports).
    pub len: u64,
    /// The name given at registration.
    pub name: String,
}

struct Entry {
    len: u64,
    name: String,
    device: Arc<dyn BusDevice>,
}

#[derive(Default)]
struct Space {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Space {
    fn read_lock(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        // A panic in another registration cannot leave the map half-edited (insert/remove are
        // single calls), so a poisoned lock is still usable.
        self.ranges.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The device whose range contains `addr`, with that range's base.
    fn find(&self, addr: u64) -> Option<(u64, Arc<dyn BusDevice>)> {
        let map = self.read_lock();
        let (base, entry) = map.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (*base, Arc::clone(&entry.device)))
    }
}

/// Counters of what the bus saw, for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusStats {
    /// Guest accesses that reached a device.
    pub handled: u64,
    /// Guest accesses to addresses no device claims (reads return all ones).
    pub unhandled: u64,
    /// Device errors (logged, not fatal).
    pub device_errors: u64,
}

/// How many unclaimed accesses are logged before the bus only counts them (a guest controls
/// how many there are).
const UNHANDLED_LOG_LIMIT: u64 = 32;

/// The port-I/O and MMIO bus of a VM. Implements [`ExitHandler`], so it is what every vCPU
/// actor calls on `KVM_EXIT_IO` and `KVM_EXIT_MMIO`.
pub struct IoBus {
    pio: Space,
    mmio: Space,
    handled: AtomicU64,
    unhandled: AtomicU64,
    device_errors: AtomicU64,
    logger: Logger,
}

impl fmt::Debug for IoBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBus")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl IoBus {
    /// An empty bus.
    pub fn new(logger: Logger) -> Self {
        Self {
            pio: Space::default(),
            mmio: Space::default(),
            handled: AtomicU64::new(0),
            unhandled: AtomicU64::new(0),
            device_errors: AtomicU64::new(0),
            logger: logger.new(o!("component" => "bus")),
        }
    }

    fn space(&self, space: BusSpace) -> &Space {
        match space {
            BusSpace::Pio => &self.pio,
            BusSpace::Mmio => &self.mmio,
        }
    }

    /// Registers `device` on `base..base+len` of `space`. Fails if the range is empty, wraps
    /// around, or overlaps a registered range (naming it).
    ///
    /// # Errors
    ///
    /// [`BusError::RangeInvalid`] for an empty or wrapping range, [`BusError::RangeOverlap`]
    /// for one that overlaps a registered range.
    pub fn register(
        &self,
        space: BusSpace,
        base: u64,
        len: u64,
        name: &str,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let limit = match space {
            BusSpace::Pio => 1u64 << 16,
            BusSpace::Mmio => u64::MAX,
        };
        let end = base.checked_add(len);
        if len == 0 || end.is_none_or(|end| end > limit) {
            return Err(BusError::RangeInvalid { space, base, len });
        }
        let end = end.unwrap_or(limit);
        let mut map = self.space(space).write_lock();
        let before = map.range(..=base).next_back();
        let after = map.range(base..).next();
        for (existing_base, e) in before.into_iter().chain(after) {
            if *existing_base < end && base < existing_base.saturating_add(e.len) {
                return Err(BusError::RangeOverlap {
                    space,
                    base,
                    len,
                    existing_base: *existing_base,
                    existing_len: e.len,
                });
            }
        }
        map.insert(
            base,
            Entry {
                len,
                name: name.to_string(),
                device,
            },
        );
        debug!(self.logger, "registered device"; "name" => name, "space" => %space,
               "base" => format!("{base:#x}"), "len" => len);
        Ok(())
    }

    /// Removes the device registered at exactly `base`, returning it.
    pub fn unregister(&self, space: BusSpace, base: u64) -> Option<Arc<dyn BusDevice>> {
        self.space(space)
            .write_lock()
            .remove(&base)
            .map(|e| e.device)
    }

    /// The registered ranges of `space`, in address order.
    pub fn ranges(&self, space: BusSpace) -> Vec<BusRange> {
        self.space(space)
            .read_lock()
            .iter()
            .map(|(base, e)| BusRange {
                base: *base,
                len: e.len,
                name: e.name.clone(),
            })
            .collect()
    }

    /// What the bus has seen so far.
    pub fn stats(&self) -> BusStats {
        BusStats {
            handled: self.handled.load(Ordering::Relaxed),
            unhandled: self.unhandled.load(Ordering::Relaxed),
            device_errors: self.device_errors.load(Ordering::Relaxed),
        }
    }

    fn unhandled(&self, space: BusSpace, vcpu_id: u32, addr: u64, write: bool) {
        let n = self.unhandled.fetch_add(1, Ordering::Relaxed);
        if n < UNHANDLED_LOG_LIMIT {
            debug!(self.logger, "guest access to an address no device claims";
                   "vcpu_id" => vcpu_id, "space" => %space, "addr" => format!("{addr:#x}"),
                   "write" => write);
        }
    }

    fn counted(&self, result: Result<IoOutcome, DeviceError>) -> Result<IoOutcome, DeviceError> {
        match &result {
            Ok(_) => self.handled.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.device_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// The device that claims `addr` and the access it sees; `None` (counted and logged as
    /// unhandled) if no device claims it.
    fn claim(
        &self,
        space: BusSpace,
        vcpu_id: u32,
        addr: u64,
        write: bool,
    ) -> Option<(Arc<dyn BusDevice>, BusAccess)> {
        let Some((base, dev)) = self.space(space).find(addr) else {
            self.unhandled(space, vcpu_id, addr, write);
            return None;
        };
        let offset = addr - base;
        Some((
            dev,
            BusAccess {
                vcpu_id,
                base,
                offset,
            },
        ))
    }

    /// Routes a guest read; unclaimed addresses read as all ones, like an empty ISA bus.
    ///
    /// # Errors
    ///
    /// The device's [`DeviceError`], which stops the vCPU that made the access.
    pub fn read(
        &self,
        space: BusSpace,
        vcpu_id: u32,
        addr: u64,
        data: &mut [u8],
    ) -> Result<IoOutcome, DeviceError> {
        if let Some((dev, access)) = self.claim(space, vcpu_id, addr, false) {
            return self.counted(dev.read(access, data));
        }
        data.fill(0xff);
        Ok(IoOutcome::Handled)
    }

    /// Routes a guest write; writes to unclaimed addresses are dropped.
    ///
    /// # Errors
    ///
    /// The device's [`DeviceError`], which stops the vCPU that made the access.
    pub fn write(
        &self,
        space: BusSpace,
        vcpu_id: u32,
        addr: u64,
        data: &[u8],
    ) -> Result<IoOutcome, DeviceError> {
        match self.claim(space, vcpu_id, addr, true) {
            Some((dev, access)) => self.counted(dev.write(access, data)),
            None => Ok(IoOutcome::Handled),
        }
    }
}

impl ExitHandler for IoBus {
    fn pio_read(&self, vcpu_id: u32, port: u16, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
        self.read(BusSpace::Pio, vcpu_id, u64::from(port), data)
    }

    fn pio_write(&self, vcpu_id: u32, port: u16, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        self.write(BusSpace::Pio, vcpu_id, u64::from(port), data)
    }

    fn mmio_read(
        &self,
        vcpu_id: u32,
        addr: u64,
        data: &mut [u8],
    ) -> Result<IoOutcome, DeviceError> {
        self.read(BusSpace::Mmio, vcpu_id, addr, data)
    }

    fn mmio_write(&self, vcpu_id: u32, addr: u64, data: &[u8]) -> Result<IoOutcome, DeviceError> {
        self.write(BusSpace::Mmio, vcpu_id, addr, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// (vCPU, base, offset, bytes) of each write.
    type Write = (u32, u64, u64, Vec<u8>);

    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<Write>>,
    }

    impl BusDevice for Recorder {
        fn read(&self, access: BusAccess, data: &mut [u8]) -> Result<IoOutcome, DeviceError> {
            data.fill(access.offset.to_le_bytes()[0]);
            Ok(IoOutcome::Handled)
        }
        fn write(&self, a: BusAccess, data: &[u8]) -> Result<IoOutcome, DeviceError> {
            self.writes
                .lock()
                .unwrap()
                .push((a.vcpu_id, a.base, a.offset, data.to_vec()));
            Ok(IoOutcome::StopVm)
        }
    }

    fn bus() -> IoBus {
        IoBus::new(Logger::root(slog::Discard, o!()))
    }

    /// A bus with a [`Recorder`] named `name` at `base..base + len` of `space`.
    fn bus_with(space: BusSpace, base: u64, len: u64, name: &str) -> (IoBus, Arc<Recorder>) {
        let bus = bus();
        let dev = Arc::new(Recorder::default());
        bus.register(space, base, len, name, dev.clone()).unwrap();
        (bus, dev)
    }

    #[test]
    fn overlapping_ranges_are_rejected_naming_the_existing_one() {
        let (bus, dev) = bus_with(BusSpace::Pio, 0x3f8, 8, "com1");
        for (base, len) in [
            (0x3f8, 8),
            (0x3f0, 9),
            (0x3ff, 1),
            (0x3fa, 2),
            (0x300, 0x200),
        ] {
            match bus.register(BusSpace::Pio, base, len, "x", dev.clone()) {
                Err(BusError::RangeOverlap {
                    existing_base,
                    existing_len,
                    ..
                }) => assert_eq!((existing_base, existing_len), (0x3f8, 8)),
                other => panic!("{base:#x}+{len}: expected an overlap, got {other:?}"),
            }
        }
        // Adjacent ranges are fine, and the same range in the other space is too.
        bus.register(BusSpace::Pio, 0x3f0, 8, "below", dev.clone())
            .unwrap();
        bus.register(BusSpace::Pio, 0x400, 1, "above", dev.clone())
            .unwrap();
        bus.register(BusSpace::Mmio, 0x3f8, 8, "mmio", dev.clone())
            .unwrap();
        let names: Vec<_> = bus
            .ranges(BusSpace::Pio)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["below", "com1", "above"]);
    }

    #[test]
    fn invalid_ranges_are_rejected() {
        let bus = bus();
        let dev = Arc::new(Recorder::default());
        for (space, base, len) in [
            (BusSpace::Pio, 0x10, 0),
            (BusSpace::Pio, 0xffff, 2),
            (BusSpace::Mmio, u64::MAX, 2),
        ] {
            assert!(matches!(
                bus.register(space, base, len, "bad", dev.clone()),
                Err(BusError::RangeInvalid { .. })
            ));
        }
        bus.register(BusSpace::Pio, 0xffff, 1, "last", dev).unwrap();
    }

    #[test]
    fn accesses_are_routed_with_offsets_and_unclaimed_reads_are_all_ones() {
        let (bus, dev) = bus_with(BusSpace::Mmio, 0x1000, 0x100, "dev");
        let mut data = [0u8; 4];
        bus.mmio_read(3, 0x1010, &mut data).unwrap();
        assert_eq!(data, [0x10; 4]);
        let outcome = bus.mmio_write(3, 0x10ff, &[7]).ok();
        assert_eq!(outcome, Some(IoOutcome::StopVm));
        let writes = dev.writes.lock().unwrap().clone();
        assert_eq!(writes, [(3, 0x1000, 0xff, vec![7])]);
        bus.mmio_read(3, 0x1100, &mut data).unwrap();
        assert_eq!(data, [0xff; 4]);
        let outcome = bus.pio_write(0, 0x1000, &[1]).ok();
        assert_eq!(outcome, Some(IoOutcome::Handled));
        assert_eq!(
            bus.stats(),
            BusStats {
                handled: 2,
                unhandled: 2,
                device_errors: 0
            }
        );
        assert!(bus.unregister(BusSpace::Mmio, 0x1000).is_some());
        assert!(bus.ranges(BusSpace::Mmio).is_empty());
    }
}
