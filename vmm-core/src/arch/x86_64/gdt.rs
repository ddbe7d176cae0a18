//! Segment descriptors and global descriptor tables.
//!
//! A [`Descriptor`] is one segment by field: [`Descriptor::encode`] gives its GDT entry and
//! [`Descriptor::to_kvm_segment`] the matching KVM segment register state. A [`Gdt`] places
//! descriptors at the selectors a guest expects (the Linux boot protocol's `__BOOT_CS` and
//! `__BOOT_DS`, or any other fixed layout) and writes the table into guest memory.

use kvm_bindings::kvm_segment;
use vm_memory::GuestMemoryMmap;

use super::write_guest;
use crate::error::BootError;

/// Type of an available 64-bit TSS (system descriptor), as the GDT holds it before `ltr`.
pub const TSS64_AVAILABLE: u8 = 0x9;
/// Type of a busy 64-bit TSS: what `ltr` turns [`TSS64_AVAILABLE`] into, and what the task
/// register holds.
pub const TSS64_BUSY: u8 = 0xb;

/// One segment descriptor, by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Base address (32 bits in a code/data descriptor).
    pub base: u32,
    /// Limit (20 bits), in pages when `granularity` is set.
    pub limit: u32,
    /// Segment type (4 bits): 0xb execute/read accessed code, 0x3 read/write accessed data;
    /// [`TSS64_AVAILABLE`] or [`TSS64_BUSY`] when `system`.
    pub type_: u8,
    /// A system descriptor (TSS) rather than code/data (the S bit clear).
    pub system: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// 64-bit code segment (the L bit).
    pub long: bool,
    /// 32-bit default operand size (the D/B bit).
    pub db: bool,
    /// Limit in 4 KiB units (the G bit).
    pub granularity: bool,
}

impl Descriptor {
    /// The flat 64-bit code segment.
    pub const CODE64: Descriptor = Descriptor {
        base: 0,
        limit: 0xf_ffff,
        type_: 0xb,
        system: false,
        dpl: 0,
        long: true,
        db: false,
        granularity: true,
    };
    /// The flat data segment.
    pub const DATA: Descriptor = Descriptor {
        base: 0,
        limit: 0xf_ffff,
        type_: 0x3,
        system: false,
        dpl: 0,
        long: false,
        db: true,
        granularity: true,
    };
    /// A busy 64-bit TSS of 104 bytes at address 0 (never used: no privilege changes or
    /// I/O bitmap happen before Linux loads its own).
    pub const TSS: Descriptor = Descriptor {
        base: 0,
        limit: 0x67,
        type_: TSS64_BUSY,
        system: true,
        dpl: 0,
        long: false,
        db: false,
        granularity: false,
    };

    /// A 64-bit TSS of `limit + 1` bytes at `base` (below 4 GiB), available or busy.
    pub const fn tss64(base: u32, limit: u32, busy: bool) -> Descriptor {
        Descriptor {
            base,
            limit,
            type_: if busy { TSS64_BUSY } else { TSS64_AVAILABLE },
            ..Descriptor::TSS
        }
    }

    /// This descriptor at privilege level `dpl`.
    pub const fn with_dpl(self, dpl: u8) -> Descriptor {
        Descriptor { dpl, ..self }
    }

    /// The 8-byte descriptor (for a system descriptor: its lower half).
    pub fn encode(&self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        let access = u64::from(self.type_ & 0xf)
            | u64::from(!self.system) << 4
            | u64::from(self.dpl & 3) << 5
            | 1 << 7; // present
        let flags =
            u64::from(self.long) << 1 | u64::from(self.db) << 2 | u64::from(self.granularity) << 3;
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | access << 40
            | ((limit >> 16) & 0xf) << 48
            | flags << 52
            | (base >> 24 & 0xff) << 56
    }

    /// The descriptor as KVM's segment register state, loaded with `selector`.
    pub fn to_kvm_segment(&self, selector: u16) -> kvm_segment {
        let limit = if self.granularity {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: u64::from(self.base),
            limit,
            selector,
            type_: self.type_,
            present: 1,
            dpl: self.dpl,
            db: u8::from(self.db),
            s: u8::from(!self.system),
            l: u8::from(self.long),
            g: u8::from(self.granularity),
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// A GDT under construction: descriptors placed at fixed selectors, unused slots null.
///
/// System descriptors (a 64-bit TSS) take two slots; their upper half (base bits 63:32) is 0,
/// since [`Descriptor::base`] is 32 bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gdt {
    entries: Vec<u64>,
}

impl Gdt {
    /// A GDT with only the null descriptor.
    pub fn new() -> Self {
        Self { entries: vec![0] }
    }

    /// Places `descriptor` at `selector` (its RPL bits are ignored), growing the table with
    /// null entries as needed; a system descriptor also takes the next slot.
    pub fn with(mut self, selector: u16, descriptor: Descriptor) -> Self {
        let slot = usize::from(selector >> 3);
        let len = slot + if descriptor.system { 2 } else { 1 };
        if self.entries.len() < len {
            self.entries.resize(len, 0);
        }
        self.entries[slot] = descriptor.encode();
        if descriptor.system {
            self.entries[slot + 1] = 0;
        }
        self
    }

    /// The entries, slot by slot.
    pub fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// The limit for `lgdt` and `kvm_sregs.gdt` (the table's size in bytes, minus one).
    pub fn limit(&self) -> u16 {
        u16::try_from(self.entries.len() * 8 - 1).unwrap_or(u16::MAX)
    }

    /// Writes the table at guest address `addr`.
    pub fn write(&self, mem: &GuestMemoryMmap, addr: u64) -> Result<(), BootError> {
        let bytes: Vec<u8> = self.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        write_guest(mem, addr, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_the_usual_flat_segments() {
        // The values every x86-64 boot loader uses for these segments.
        assert_eq!(Descriptor::CODE64.encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(Descriptor::DATA.encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(Descriptor::TSS.encode(), 0x0000_8b00_0000_0067);
        let cs = Descriptor::CODE64.to_kvm_segment(0x10);
        assert_eq!(
            (cs.selector, cs.limit, cs.l, cs.db, cs.s),
            (0x10, 0xffff_ffff, 1, 0, 1)
        );
    }

    #[test]
    fn gdt_places_descriptors_at_their_selectors() {
        let tss = Descriptor::tss64(0xa000, 0x2068, false);
        let g = Gdt::new()
            .with(0x10, Descriptor::CODE64)
            .with(0x2b, Descriptor::DATA.with_dpl(3))
            .with(0x30, tss);
        let e = g.entries();
        assert_eq!(e.len(), 8);
        assert_eq!(g.limit(), 63);
        assert_eq!((e[0], e[1]), (0, 0));
        assert_eq!(e[2], Descriptor::CODE64.encode());
        assert_eq!((e[5] >> 45) & 3, 3, "DPL 3");
        assert_eq!((e[6], e[7]), (tss.encode(), 0));
        assert_eq!((e[6] >> 40) & 0xf, u64::from(TSS64_AVAILABLE));
    }
}
