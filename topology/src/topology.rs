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
///
/// A `CpuTopology` only exists validated: [`CpuTopology::new`] (and deserialization, which
/// goes through it) checks that every level is at least 1 and that the APIC IDs fit
/// [`MAX_APIC_ID_BITS`]. Since each level `n` takes `ceil(log2(n))` bits, the vCPU count
/// (the product of the levels) is then below `2^31`, so nothing computed from a topology
/// overflows a `u32` and the methods need not check the shape again.
///
/// ```
/// use topology::{CpuTopology, TopologyError};
///
/// let t = CpuTopology::new(2, 1, 3, 2)?;
/// assert_eq!((t.sockets(), t.dies(), t.cores(), t.threads()), (2, 1, 3, 2));
/// assert_eq!(t.max_vcpus(), 12);
///
/// assert!(matches!(
///     CpuTopology::new(1, 1, 0, 1),
///     Err(TopologyError::ZeroLevel { level: "cores" })
/// ));
/// # Ok::<(), TopologyError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "TopologyFields")]
pub struct CpuTopology {
    sockets: u32,
    #[serde(rename = "dies_per_socket")]
    dies: u32,
    #[serde(rename = "cores_per_die")]
    cores: u32,
    #[serde(rename = "threads_per_core")]
    threads: u32,
}

/// What deserialization reads (the names [`CpuTopology`] serializes) before
/// [`CpuTopology::new`] checks it.
#[derive(Deserialize)]
struct TopologyFields {
    sockets: u32,
    dies_per_socket: u32,
    cores_per_die: u32,
    threads_per_core: u32,
}

impl TryFrom<TopologyFields> for CpuTopology {
    type Error = TopologyError;

    fn try_from(f: TopologyFields) -> Result<Self, Self::Error> {
        Self::new(
            f.sockets,
            f.dies_per_socket,
            f.cores_per_die,
            f.threads_per_core,
        )
    }
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

    /// The APIC ID of `loc`: its fields shifted into place. Fields wider than their bits
    /// spill into the next field; [`CpuTopology`]'s methods check `loc` first.
    fn apic_id(&self, loc: CpuLocation) -> u32 {
        (loc.socket << self.package_shift())
            | (loc.die << self.die_shift())
            | (loc.core << self.core_shift())
            | loc.thread
    }
}

impl CpuTopology {
    /// A topology of `sockets` x `dies` (per socket) x `cores` (per die) x `threads` (per
    /// core).
    ///
    /// # Errors
    ///
    /// [`TopologyError::ZeroLevel`] when a level is 0, [`TopologyError::TopologyTooLarge`]
    /// when the APIC IDs need more than [`MAX_APIC_ID_BITS`] bits.
    pub fn new(sockets: u32, dies: u32, cores: u32, threads: u32) -> Result<Self, TopologyError> {
        let t = Self {
            sockets,
            dies,
            cores,
            threads,
        };
        if let Some((level, _)) = t.levels().into_iter().find(|&(_, n)| n == 0) {
            return Err(TopologyError::ZeroLevel { level });
        }
        let bits = t.apic_id_layout().total_bits();
        // Each level `n` fits its `ceil(log2(n))` bits, so with the bits in range the product
        // is below 2^31; the checked product says so without relying on that argument.
        let product = t
            .levels()
            .iter()
            .try_fold(1u32, |acc, &(_, n)| acc.checked_mul(n));
        if bits > MAX_APIC_ID_BITS || product.is_none() {
            return Err(TopologyError::TopologyTooLarge {
                topology: t.to_string(),
                bits,
                max_bits: MAX_APIC_ID_BITS,
            });
        }
        Ok(t)
    }

    /// The default shape for `n` vCPUs: 1 socket, 1 die, `n` cores, 1 thread.
    ///
    /// # Errors
    ///
    /// [`TopologyError::ZeroCpus`] for `n == 0`; [`TopologyError::TopologyTooLarge`] when
    /// `n` cores need more than [`MAX_APIC_ID_BITS`] bits.
    pub fn from_vcpu_count(n: u32) -> Result<Self, TopologyError> {
        if n == 0 {
            return Err(TopologyError::ZeroCpus { key: "cpus" });
        }
        Self::new(1, 1, n, 1)
    }

    /// Sockets (packages).
    pub fn sockets(&self) -> u32 {
        self.sockets
    }

    /// Dies per socket.
    pub fn dies(&self) -> u32 {
        self.dies
    }

    /// Cores per die.
    pub fn cores(&self) -> u32 {
        self.cores
    }

    /// Threads per core.
    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// Checks that the topology has exactly `max_vcpu_count` vCPUs (the `-smp` rule
    /// `sockets * dies * cores * threads == maxcpus`).
    ///
    /// # Errors
    ///
    /// [`TopologyError::ZeroCpus`] for `max_vcpu_count == 0`,
    /// [`TopologyError::ProductMismatch`] when the product differs.
    pub fn check_max_vcpus(&self, max_vcpu_count: u32) -> Result<(), TopologyError> {
        if max_vcpu_count == 0 {
            return Err(TopologyError::ZeroCpus { key: "maxcpus" });
        }
        if self.max_vcpus() != max_vcpu_count {
            return Err(TopologyError::ProductMismatch {
                sockets: self.sockets,
                dies: self.dies,
                cores: self.cores,
                threads: self.threads,
                product: u128::from(self.max_vcpus()),
                max_cpus: max_vcpu_count,
            });
        }
        Ok(())
    }

    /// The vCPU count: `sockets * dies * cores * threads` (below `2^31`, see the type's
    /// documentation).
    pub fn max_vcpus(&self) -> u32 {
        self.sockets * self.threads_per_socket()
    }

    /// Logical processors per die: `cores * threads`.
    pub fn threads_per_die(&self) -> u32 {
        self.cores * self.threads
    }

    /// Logical processors per socket: `dies * cores * threads`.
    pub fn threads_per_socket(&self) -> u32 {
        self.dies * self.threads_per_die()
    }

    /// The APIC ID bit layout of this topology.
    pub fn apic_id_layout(&self) -> ApicIdLayout {
        ApicIdLayout {
            thread_bits: field_width(self.threads),
            core_bits: field_width(self.cores),
            die_bits: field_width(self.dies),
            socket_bits: field_width(self.sockets),
        }
    }

    /// The location of vCPU `index` (thread fastest, then core, die, socket).
    ///
    /// # Errors
    ///
    /// [`TopologyError::IndexOutOfRange`] for an index at or beyond [`Self::max_vcpus`].
    pub fn location(&self, index: u32) -> Result<CpuLocation, TopologyError> {
        self.check_index(index)?;
        let thread = index % self.threads;
        let rest = index / self.threads;
        let core = rest % self.cores;
        let rest = rest / self.cores;
        let die = rest % self.dies;
        let socket = rest / self.dies;
        Ok(CpuLocation {
            socket,
            die,
            core,
            thread,
        })
    }

    /// The vCPU index at `loc`.
    ///
    /// # Errors
    ///
    /// [`TopologyError::UnknownApicId`] when a field of `loc` is beyond its level.
    pub fn index_of_location(&self, loc: CpuLocation) -> Result<u32, TopologyError> {
        self.check_location(loc, u32::MAX)?;
        // Below max_vcpus: each field is below its level's count.
        Ok(
            ((loc.socket * self.dies + loc.die) * self.cores + loc.core) * self.threads
                + loc.thread,
        )
    }

    /// The APIC ID of the vCPU at `loc`.
    ///
    /// # Errors
    ///
    /// [`TopologyError::UnknownApicId`] when a field of `loc` is beyond its level.
    pub fn apic_id_of_location(&self, loc: CpuLocation) -> Result<u32, TopologyError> {
        self.check_location(loc, u32::MAX)?;
        Ok(self.apic_id_layout().apic_id(loc))
    }

    /// The APIC ID of vCPU `index`. This is also the vCPU id to give `KVM_CREATE_VCPU`.
    ///
    /// # Errors
    ///
    /// [`TopologyError::IndexOutOfRange`] for an index at or beyond [`Self::max_vcpus`].
    pub fn apic_id(&self, index: u32) -> Result<u32, TopologyError> {
        let loc = self.location(index)?;
        Ok(self.apic_id_layout().apic_id(loc))
    }

    /// The location of the vCPU with APIC ID `apic_id`.
    ///
    /// # Errors
    ///
    /// [`TopologyError::UnknownApicId`] for an ID no vCPU has (a hole in the sparse ID
    /// space, or beyond the last vCPU).
    pub fn location_of_apic_id(&self, apic_id: u32) -> Result<CpuLocation, TopologyError> {
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

    /// The vCPU index of APIC ID `apic_id`.
    ///
    /// # Errors
    ///
    /// [`TopologyError::UnknownApicId`] for an ID no vCPU has.
    pub fn index_of_apic_id(&self, apic_id: u32) -> Result<u32, TopologyError> {
        let loc = self.location_of_apic_id(apic_id)?;
        self.index_of_location(loc)
    }

    /// The largest APIC ID (that of the last vCPU; APIC IDs grow with the index).
    pub fn max_apic_id(&self) -> u32 {
        let last = CpuLocation {
            socket: self.sockets - 1,
            die: self.dies - 1,
            core: self.cores - 1,
            thread: self.threads - 1,
        };
        self.apic_id_layout().apic_id(last)
    }

    /// All APIC IDs, in vCPU index order.
    pub fn apic_ids(&self) -> Vec<u32> {
        let l = self.apic_id_layout();
        let mut ids = Vec::with_capacity(usize::try_from(self.max_vcpus()).unwrap_or(0));
        for socket in 0..self.sockets {
            for die in 0..self.dies {
                for core in 0..self.cores {
                    ids.extend((0..self.threads).map(|thread| {
                        l.apic_id(CpuLocation {
                            socket,
                            die,
                            core,
                            thread,
                        })
                    }));
                }
            }
        }
        ids
    }

    /// Checks that every APIC ID is below 255, so that xAPIC, the MP table and the upcall
    /// protocol (8-bit IDs, 0xFF broadcast) can carry them.
    ///
    /// # Errors
    ///
    /// [`TopologyError::ApicIdTooLarge`] naming the largest APIC ID.
    pub fn check_xapic(&self) -> Result<(), TopologyError> {
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

    /// The levels with their `-smp` keys, socket first.
    fn levels(&self) -> [(&'static str, u32); 4] {
        [
            ("sockets", self.sockets),
            ("dies", self.dies),
            ("cores", self.cores),
            ("threads", self.threads),
        ]
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
            ("die", loc.die, self.dies),
            ("core", loc.core, self.cores),
            ("thread", loc.thread, self.threads),
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
            self.sockets, self.dies, self.cores, self.threads
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
        assert_eq!(t.apic_ids(), [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(t.max_apic_id(), 13);
        assert_eq!(t.index_of_apic_id(12).unwrap(), 10);
    }

    #[test]
    fn huge_levels_are_a_typed_error_not_an_overflow() {
        // Products far beyond u32 (and bit sums beyond 32) must not panic in debug builds.
        for (s, d, c, t) in [
            (u32::MAX, u32::MAX, u32::MAX, u32::MAX),
            (u32::MAX, 1, 1, 1),
            (1, 1, 1, u32::MAX),
            (1 << 16, 1 << 16, 1, 1),
        ] {
            let e = CpuTopology::new(s, d, c, t).unwrap_err();
            assert!(matches!(e, TopologyError::TopologyTooLarge { .. }), "{e:?}");
        }
        // The largest accepted shape: 31 bits, 2^31 vCPUs; every method stays in range.
        let t = CpuTopology::new(1 << 10, 1 << 10, 1 << 10, 2).unwrap();
        assert_eq!(t.max_vcpus(), 1 << 31);
        assert_eq!(t.max_apic_id(), u32::MAX >> 1);
        let last = t.max_vcpus() - 1;
        assert_eq!(t.index_of_apic_id(t.apic_id(last).unwrap()).unwrap(), last);
        assert!(t.apic_id(t.max_vcpus()).is_err());
        assert!(t.index_of_apic_id(u32::MAX).is_err());
    }

    #[test]
    fn deserializing_validates() {
        let t = CpuTopology::new(2, 1, 3, 2).unwrap();
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"sockets":2,"dies_per_socket":1,"cores_per_die":3,"threads_per_core":2}"#
        );
        assert_eq!(serde_json::from_str::<CpuTopology>(&json).unwrap(), t);
        let zero = r#"{"sockets":1,"dies_per_socket":1,"cores_per_die":0,"threads_per_core":1}"#;
        let e = serde_json::from_str::<CpuTopology>(zero).unwrap_err();
        assert!(e.to_string().contains("cores=0"), "{e}");
        let huge =
            r#"{"sockets":65536,"dies_per_socket":1,"cores_per_die":65536,"threads_per_core":1}"#;
        let e = serde_json::from_str::<CpuTopology>(huge).unwrap_err();
        assert!(e.to_string().contains("APIC ID bits"), "{e}");
    }
}
