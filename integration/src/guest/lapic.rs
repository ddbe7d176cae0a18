//! The local APIC registers and ICR values the guest programs use: MMIO at [`LAPIC_ADDR`]
//! (mapped for CPL 3 by the loader) in xAPIC mode, MSRs in x2APIC mode (which the VMM picks
//! when an APIC ID is above 254; CPL 0 only).

use crate::loader::memory_map::{LAPIC_ADDR, SIPI_VECTOR};

/// Spurious-interrupt vector register.
pub const SVR: u64 = LAPIC_ADDR + 0xf0;
/// Interrupt command register, low half (writing it sends the IPI).
pub const ICR_LOW: u64 = LAPIC_ADDR + 0x300;
/// Interrupt command register, high half (destination APIC ID in bits 31:24).
pub const ICR_HIGH: u64 = LAPIC_ADDR + 0x310;
/// SVR: APIC software-enabled, spurious vector 0xFF.
pub const SVR_ENABLE: u32 = 0x1ff;
/// ICR: level assert (bit 14).
const ICR_ASSERT: u32 = 1 << 14;
/// ICR: delivery mode INIT (101 in bits 10:8).
pub const ICR_INIT: u32 = ICR_ASSERT | (0b101 << 8);
/// ICR: delivery mode STARTUP (110) with the loader's SIPI vector.
pub const ICR_SIPI: u32 = ICR_ASSERT | (0b110 << 8) | SIPI_VECTOR as u32;
/// ICR destination shorthand "all excluding self" (bits 19:18 = 11).
pub const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
/// `IA32_APIC_BASE`, whose [`APIC_BASE_EXTD`] bit says x2APIC mode.
pub const X2APIC_APIC_BASE_MSR: u32 = vmm_core::arch::x86_64::x2apic::IA32_APIC_BASE;
/// `IA32_APIC_BASE` bit 10: x2APIC mode.
pub const APIC_BASE_EXTD: u32 = 1 << 10;
/// The x2APIC spurious-interrupt vector register (MSR).
pub const X2APIC_SVR_MSR: u32 = 0x80f;
/// The x2APIC interrupt command register (MSR): destination in bits 63:32 (EDX of `wrmsr`),
/// the low half as [`ICR_LOW`]'s.
pub const X2APIC_ICR_MSR: u32 = vmm_core::arch::x86_64::x2apic::X2APIC_ICR_MSR;
/// LVT timer register.
pub const LVT_TIMER: u64 = LAPIC_ADDR + LVT_TIMER_OFFSET as u64;
/// LVT timer: periodic mode (bits 18:17 = 01).
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Timer initial-count register (writing it arms the timer).
pub const TMICT: u64 = LAPIC_ADDR + TMICT_OFFSET as u64;
/// Timer current-count register.
pub const TMCCT: u64 = LAPIC_ADDR + 0x390;
/// Timer divide-configuration register.
pub const TDCR: u64 = LAPIC_ADDR + 0x3e0;
/// TDCR: divide by 1 (0b1011).
pub const TDCR_DIVIDE_BY_1: u32 = 0b1011;
/// Offset of the timer initial-count register in the LAPIC page (and in KVM's
/// `kvm_lapic_state`).
pub const TMICT_OFFSET: usize = 0x380;
/// Offset of the LVT timer register in the LAPIC page (and in KVM's `kvm_lapic_state`).
pub const LVT_TIMER_OFFSET: usize = 0x320;
