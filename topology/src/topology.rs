//! CPU topology shape and APIC ID assignment.
//!
//! Each level occupies a bit field of the APIC ID, lowest first: thread, core, die, socket.
//! A level with `n` members per parent takes `ceil(log2(n))` bits (0 bits when `n == 1`), so
//! with non-power-of-two levels the APIC IDs are sparse. vCPU indexes run thread fastest, then
//! core, die, socket (as QEMU does), and APIC IDs grow strictly with the index.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::TopologyError;

/// The first APIC ID that the 8-bit xAPIC / MP table / upcall encodings cannot carry
/// (0xFF is the broadcast ID).
pub const XAPIC_ID_LIMIT: u32 = 0xFF;

/// The most APIC ID bits a topology may use. x2APIC IDs are 32 bits wide; the topology leaves
/// carry shift widths in 5 bits (at most 31), so the package shift must stay below 32.
pub const MAX_APIC_ID_BITS: u32 = 31;

/// `ceil(log2(n))`: the bits needed to number `n` members (0 for `n <= 1`).
pub fn field_width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - (n - 1).leading_zeros()
    }
}

/// The shape of the virtual CPU: sockets x dies x cores x threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuTopology {
    /// Sockets (packages).
    pub sockets: u32,
    /// Dies per socket.
    pub dies_per_socket: u32,
    /// Cores per die.
    pub cores_per_die: u32,
    /// Threads per core.
    pub threads_per_core: u32,
}

/// Where a vCPU sits: its socket, die (within the socket), core (within the die) and thread
/// (within the core).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct CpuLocation {
    /// Socket (package) number.
    pub socket: u32,
    /// Die number within the socket.
    pub die: u32,
    /// Core number within the die.
    pub core: u32,
    /// Thread number within the core.
    pub thread: u32,
}

impl fmt::Display for CpuLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket {} die {} core {} thread {}",
            self.socket, self.die, self.core, self.thread
        )
    }
}

/// The bit fields of the APIC ID for one topology: their widths and shifts. Every vCPU of a
/// topology uses the same layout, which is what the CPUID topology leaves advertise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ApicIdLayout {
    /// Bits of the thread field (`ceil(log2(threads_per_core))`).
    pub thread_bits: u32,
    /// Bits of the core field (`ceil(log2(cores_per_die))`).
    pub core_bits: u32,
    /// Bits of the die field (`ceil(log2(dies_per_socket))`).
    pub die_bits: u32,
    /// Bits of the socket field (`ceil(log2(sockets))`).
    pub socket_bits: u32,
}

impl ApicIdLayout {
    /// Shift of the core field (= thread bits): `apic_id >> core_shift()` identifies the core.
    pub fn core_shift(&self) -> u32 {
        self.thread_bits
    }

    /// Shift of the die field: `apic_id >> die_shift()` identifies the die.
    pub fn die_shift(&self) -> u32 {
        self.thread_bits + self.core_bits
    }

    /// Shift of the socket field: `apic_id >> package_shift()` is the package (socket) ID.
    pub fn package_shift(&self) -> u32 {
        self.thread_bits + self.core_bits + self.die_bits
    }

    /// Bits of the whole APIC ID.
    pub fn total_bits(&self) -> u32 {
        self.package_shift() + self.socket_bits
    }

    /// Addressable APIC IDs per core: `1 << thread_bits`.
    pub fn ids_per_core(&self) -> u32 {
        1 << self.thread_bits
    }

    /// Addressable APIC IDs per die: `1 << die_shift()`.
    pub fn ids_per_die(&self) -> u32 {
        1 << self.die_shift()
    }

    /// Addressable APIC IDs per package: `1 << package_shift()`.
    pub fn ids_per_package(&self) -> u32 {
        1 << self.package_shift()
    }

    /// Addressable core IDs per package: `1 << (core_bits + die_bits)`.
    pub fn core_ids_per_package(&self) -> u32 {
        1 << (self.core_bits + self.die_bits)
    }
}

impl CpuTopology {
    /// A topology of `sockets` x `dies` x `cores` x `threads`. Each must be at least 1, and
    /// the APIC IDs must fit [`MAX_APIC_ID_BITS`].
    pub fn new(sockets: u32, dies: u32, cores: u32, threads: u32) -> Result<Self, TopologyError> {
        let t = Self {
            sockets,
            dies_per_socket: dies,
            cores_per_die: cores,
            threads_per_core: threads,
        };
        t.validate()?;
        Ok(t)
    }

    /// The default shape for `n` vCPUs: 1 socket, 1 die, `n` cores, 1 thread.
    pub fn from_vcpu_count(n: u32) -> Result<Self, TopologyError> {
        if n == 0 {
            return Err(TopologyError::ZeroCpus { key: "cpus" });
        }
        Self::new(1, 1, n, 1)
    }

    /// Checks that every level is at least 1 and that the topology fits
    /// [`MAX_APIC_ID_BITS`] and `u32` vCPU counts. The fields are public, so every method
    /// that needs a sane shape calls this first.
    pub fn validate(&self) -> Result<(), TopologyError> {
        for (level, n) in self.levels() {
            if n == 0 {
                return Err(TopologyError::ZeroLevel { level });
            }
        }
        let layout = self.apic_id_layout();
        let product = self.product();
        if layout.total_bits() > MAX_APIC_ID_BITS || product > u128::from(u32::MAX) {
            return Err(TopologyError::TopologyTooLarge {
                topology: self.to_string(),
                bits: layout.total_bits(),
                max_bits: MAX_APIC_ID_BITS,
            });
        }
        Ok(())
    }

    /// Checks [`CpuTopology::validate`] and that the topology has exactly `max_vcpu_count`
    /// vCPUs.
    pub fn validate_for(&self, max_vcpu_count: u32) -> Result<(), TopologyError> {
        if max_vcpu_count == 0 {
            return Err(TopologyError::ZeroCpus { key: "maxcpus" });
        }
        self.validate()?;
        if self.product() != u128::from(max_vcpu_count) {
            return Err(TopologyError::ProductMismatch {
                sockets: self.sockets,
                dies: self.dies_per_socket,
                cores: self.cores_per_die,
                threads: self.threads_per_core,
                product: self.product(),
                max_cpus: max_vcpu_count,
            });
        }
        Ok(())
    }

    /// The vCPU count: `sockets * dies * cores * threads` (saturating; see
    /// [`CpuTopology::validate`]).
    pub fn max_vcpus(&self) -> u32 {
        u32::try_from(self.product()).unwrap_or(u32::MAX)
    }

    /// Logical processors per die: `cores * threads` (saturating).
    pub fn threads_per_die(&self) -> u32 {
        self.cores_per_die.saturating_mul(self.threads_per_core)
    }

    /// Logical processors per socket: `dies * cores * threads` (saturating).
    pub fn threads_per_socket(&self) -> u32 {
        self.dies_per_socket.saturating_mul(self.threads_per_die())
    }

    /// The APIC ID bit layout of this topology.
    pub fn apic_id_layout(&self) -> ApicIdLayout {
        ApicIdLayout {
            thread_bits: field_width(self.threads_per_core),
            core_bits: field_width(self.cores_per_die),
            die_bits: field_width(self.dies_per_socket),
            socket_bits: field_width(self.sockets),
        }
    }

    /// The location of vCPU `index` (thread fastest, then core, die, socket).
    pub fn location(&self, index: u32) -> Result<CpuLocation, TopologyError> {
        self.validate()?;
        self.check_index(index)?;
        let thread = index % self.threads_per_core;
        let rest = index / self.threads_per_core;
        let core = rest % self.cores_per_die;
        let rest = rest / self.cores_per_die;
        let die = rest % self.dies_per_socket;
        let socket = rest / self.dies_per_socket;
        Ok(CpuLocation {
            socket,
            die,
            core,
            thread,
        })
    }

    /// The vCPU index at `loc`.
    pub fn index_of_location(&self, loc: CpuLocation) -> Result<u32, TopologyError> {
        self.validate()?;
        self.check_location(loc, u32::MAX)?;
        // Fits in u32: each field is below its count and the product fits (validate).
        let index = ((loc.socket * self.dies_per_socket + loc.die) * self.cores_per_die + loc.core)
            * self.threads_per_core
            + loc.thread;
        Ok(index)
    }

    /// The APIC ID of the vCPU at `loc`.
    pub fn apic_id_of_location(&self, loc: CpuLocation) -> Result<u32, TopologyError> {
        self.validate()?;
        self.check_location(loc, u32::MAX)?;
        let l = self.apic_id_layout();
        Ok((loc.socket << l.package_shift())
            | (loc.die << l.die_shift())
            | (loc.core << l.core_shift())
            | loc.thread)
    }

    /// The APIC ID of vCPU `index`. This is also the vCPU id to give `KVM_CREATE_VCPU`.
    pub fn apic_id(&self, index: u32) -> Result<u32, TopologyError> {
        let loc = self.location(index)?;
        self.apic_id_of_location(loc)
    }

    /// The location of the vCPU with APIC ID `apic_id`; an error for an ID no vCPU has.
    pub fn location_of_apic_id(&self, apic_id: u32) -> Result<CpuLocation, TopologyError> {
        self.validate()?;
        let l = self.apic_id_layout();
        let bits = |shift: u32, width: u32| (apic_id >> shift) & ((1u32 << width) - 1);
        let loc = CpuLocation {
            socket: apic_id >> l.package_shift(),
            die: bits(l.die_shift(), l.die_bits),
            core: bits(l.core_shift(), l.core_bits),
            thread: bits(0, l.thread_bits),
        };
        self.check_location(loc, apic_id)?;
        Ok(loc)
    }

    /// The vCPU index of APIC ID `apic_id`; an error for an ID no vCPU has.
    pub fn index_of_apic_id(&self, apic_id: u32) -> Result<u32, TopologyError> {
        let loc = self.location_of_apic_id(apic_id)?;
        self.index_of_location(loc)
    }

    /// The largest APIC ID (that of the last vCPU). 0 for a topology that fails
    /// [`CpuTopology::validate`].
    pub fn max_apic_id(&self) -> u32 {
        self.apic_id(self.max_vcpus().saturating_sub(1))
            .unwrap_or(0)
    }

    /// All APIC IDs, in vCPU index order.
    pub fn apic_ids(&self) -> Result<Vec<u32>, TopologyError> {
        self.validate()?;
        (0..self.max_vcpus()).map(|i| self.apic_id(i)).collect()
    }

    /// Checks that every APIC ID is below 255, so that xAPIC, the MP table and the upcall
    /// protocol (8-bit IDs, 0xFF broadcast) can carry them.
    pub fn check_xapic(&self) -> Result<(), TopologyError> {
        self.validate()?;
        let max_apic_id = self.max_apic_id();
        if max_apic_id >= XAPIC_ID_LIMIT {
            return Err(TopologyError::ApicIdTooLarge {
                topology: self.to_string(),
                max_apic_id,
                limit: XAPIC_ID_LIMIT,
            });
        }
        Ok(())
    }

    fn levels(&self) -> [(&'static str, u32); 4] {
        [
            ("sockets", self.sockets),
            ("dies", self.dies_per_socket),
            ("cores", self.cores_per_die),
            ("threads", self.threads_per_core),
        ]
    }

    fn product(&self) -> u128 {
        self.levels().iter().map(|&(_, n)| u128::from(n)).product()
    }

    fn check_index(&self, index: u32) -> Result<(), TopologyError> {
        if index >= self.max_vcpus() {
            return Err(TopologyError::IndexOutOfRange {
                index,
                max_vcpus: self.max_vcpus(),
            });
        }
        Ok(())
    }

    /// Checks each field of `loc` against its level; `apic_id` is only for the error message.
    fn check_location(&self, loc: CpuLocation, apic_id: u32) -> Result<(), TopologyError> {
        let fields = [
            ("socket", loc.socket, self.sockets),
            ("die", loc.die, self.dies_per_socket),
            ("core", loc.core, self.cores_per_die),
            ("thread", loc.thread, self.threads_per_core),
        ];
        for (level, value, count) in fields {
            if value >= count {
                return Err(TopologyError::UnknownApicId {
                    apic_id,
                    topology: self.to_string(),
                    level,
                    value,
                    count,
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for CpuTopology {
    /// `sockets=S,dies=D,cores=C,threads=T` (the topology part of QEMU's `-smp`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sockets={},dies={},cores={},threads={}",
            self.sockets, self.dies_per_socket, self.cores_per_die, self.threads_per_core
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        let w: Vec<u32> = (0..=9).map(field_width).collect();
        assert_eq!(w, [0, 0, 1, 2, 2, 3, 3, 3, 3, 4]);
    }

    #[test]
    fn doc_example_2x3x2() {
        // 2 sockets x 3 cores x 2 threads: vCPU 6 is socket 1, core 0, thread 0, APIC ID 8.
        let t = CpuTopology::new(2, 1, 3, 2).unwrap();
        assert_eq!(
            t.location(6).unwrap(),
            CpuLocation {
                socket: 1,
                die: 0,
                core: 0,
                thread: 0
            }
        );
        assert_eq!(t.apic_id(6).unwrap(), 8);
        assert_eq!(
            t.apic_ids().unwrap(),
            [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
        );
        assert_eq!(t.max_apic_id(), 13);
        assert_eq!(t.index_of_apic_id(12).unwrap(), 10);
    }
}
