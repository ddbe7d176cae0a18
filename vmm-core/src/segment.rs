//! x86 segment descriptors, by field: what the GDTs of the guest-program loader and of the
//! Linux boot path are made of, and the matching KVM segment register state.

use kvm_bindings::kvm_segment;

/// One segment descriptor, by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Base address (32 bits in a code/data descriptor).
    pub base: u32,
    /// Limit (20 bits), in pages when `granularity` is set.
    pub limit: u32,
    /// Segment type (4 bits): 0xb execute/read accessed code, 0x3 read/write accessed data,
    /// 0xb busy 64-bit TSS when `system`.
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
        type_: 0xb,
        system: true,
        dpl: 0,
        long: false,
        db: false,
        granularity: false,
    };

    /// The 8-byte descriptor.
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
