//! The backend against a stand-in guest (a thread driving the registers as the agent guest
//! and the AML scan do), the attach step, and the AML's size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use slog::{o, Logger};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::arch::x86_64::acpi::{setup_acpi_with, AcpiCpu};
use crate::bus::BusDevice;
use crate::{BusAccess, HotplugBackend, IoBus};

/// 2 sockets x 7 cores (sparse APIC IDs: socket 1 from 8), 2 present.
fn ids() -> Vec<u32> {
    (0..14).map(|i| (i / 7) * 8 + i % 7).collect()
}

fn bus() -> IoBus {
    IoBus::new(Logger::root(slog::Discard, o!()))
}

/// What the stand-in guest does with the CPUs it is told about.
#[derive(Clone, Copy)]
enum Guest {
    /// Acknowledges inserts, acknowledges removals and ejects.
    Obliging,
    /// Acknowledges removals but ejects only the first CPU it sees.
    EjectsOne,
}

/// A guest thread polling the GED through the bus and scanning the controller, until
/// `stop`. Returns the indices it saw inserted and removed.
fn guest(
    bus: Arc<IoBus>,
    behaviour: Guest,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u32>, Vec<u32>)> {
    std::thread::spawn(move || {
        let (ctl, ged) = (u64::from(CPU_HOTPLUG_MMIO_BASE), u64::from(GED_MMIO_BASE));
        let rd = |addr: u64| {
            let mut b = [0u8; 4];
            bus.read(crate::BusSpace::Mmio, 0, addr, &mut b).unwrap();
            u32::from_le_bytes(b)
        };
        let wr = |addr: u64, data: &[u8]| {
            bus.write(crate::BusSpace::Mmio, 0, addr, data).unwrap();
        };
        let (mut inserted, mut removed) = (Vec::new(), Vec::new());
        let mut ejected = 0;
        while !stop.load(Ordering::SeqCst) {
            let events = rd(ged);
            if events & ged::events::CPU_HOTPLUG == 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            wr(ged, &events.to_le_bytes());
            loop {
                let next = rd(ctl + regs::NEXT);
                if next == regs::NEXT_NONE {
                    break;
                }
                wr(ctl + regs::SEL, &next.to_le_bytes());
                let stat = rd(ctl + regs::STAT).to_le_bytes()[0];
                if stat & regs::status::INSERT != 0 {
                    inserted.push(next);
                    wr(ctl + regs::STAT, &[regs::command::ACK_INSERT]);
                } else if stat & regs::status::REMOVE != 0 {
                    removed.push(next);
                    wr(ctl + regs::STAT, &[regs::command::ACK_REMOVE]);
                    let eject = match behaviour {
                        Guest::Obliging => true,
                        Guest::EjectsOne => ejected == 0,
                    };
                    if eject {
                        ejected += 1;
                        wr(ctl + regs::STAT, &[regs::command::EJECT]);
                    }
                }
            }
        }
        (inserted, removed)
    })
}

fn attached(timeout: Duration) -> (Arc<IoBus>, AcpiHotplug) {
    let bus = Arc::new(bus());
    let hp = attach(&bus, None, ids(), 2, timeout).unwrap();
    (bus, hp)
}

#[test]
fn grow_and_shrink_with_a_guest_that_answers() {
    let (bus, hp) = attached(Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let g = guest(Arc::clone(&bus), Guest::Obliging, Arc::clone(&stop));
    let b = &hp.backend;
    assert_eq!(b.name(), "acpi");
    assert_eq!(b.max_apic_id(), None);
    assert!(b.confirm_wake_by_mp_state());
    // Grow to 14: indices 2..14, APIC IDs 2..=6, 8..=14.
    let new: Vec<u32> = ids()[2..].to_vec();
    assert_eq!(b.add(&new).unwrap().requests, 1);
    assert_eq!(hp.controller.enabled(), (0..14).collect::<Vec<_>>());
    // Shrink to 3.
    let gone: Vec<u32> = ids()[3..].iter().rev().copied().collect();
    assert_eq!(b.remove(&gone).unwrap().requests, 11);
    assert_eq!(hp.controller.enabled(), [0, 1, 2]);
    assert_eq!(hp.controller.stats().ejects, 11);
    stop.store(true, Ordering::SeqCst);
    let (inserted, removed) = g.join().unwrap();
    assert_eq!(inserted, (2..14).collect::<Vec<_>>());
    assert_eq!(removed.len(), 11);
    assert!(hp.ged.raised() >= 2);
}

#[test]
fn a_guest_that_never_answers_times_out_and_the_controller_is_rolled_back() {
    let (_bus, hp) = attached(Duration::from_millis(50));
    let f = hp.backend.add(&[2, 3]).unwrap_err();
    match &f.source {
        crate::BackendError::GuestTimeout { apic_ids, op, .. } => {
            assert_eq!(apic_ids, &[2, 3]);
            assert_eq!(*op, crate::HotplugOp::Add);
        }
        other => panic!("expected a guest timeout, got {other:?}"),
    }
    assert!(!f.outcome_unknown());
    assert!(f.to_string().contains("did not acknowledge"), "{f}");
    assert_eq!(hp.controller.enabled(), [0, 1]);
    // Nothing is pending: a late guest finds no event.
    let mut next = [0u8; 4];
    hp.controller
        .read(
            BusAccess {
                vcpu_id: 0,
                base: 0,
                offset: regs::NEXT,
            },
            &mut next,
        )
        .unwrap();
    assert_eq!(u32::from_le_bytes(next), regs::NEXT_NONE);
    // Removal of a CPU that is present: times out too, nothing confirmed.
    let f = hp.backend.remove(&[1]).unwrap_err();
    assert_eq!((f.confirmed.len(), f.uncertain.len()), (0, 0));
    assert_eq!(hp.controller.enabled(), [0, 1]);
    // The BSP, an absent CPU, an unknown APIC ID: refused at once.
    for (ids, what) in [
        (&[0u32][..], "cannot remove"),
        (&[5], "cannot remove"),
        (&[7], "no CPU"),
    ] {
        let f = hp.backend.remove(ids).unwrap_err();
        assert!(f.to_string().contains(what), "{ids:?}: {f}");
    }
}

#[test]
fn a_partial_eject_names_the_ejected_and_the_uncertain() {
    let (bus, hp) = attached(Duration::from_millis(300));
    hp.controller.sync_present(&[0, 1, 2, 3, 4]);
    let stop = Arc::new(AtomicBool::new(false));
    let g = guest(Arc::clone(&bus), Guest::EjectsOne, Arc::clone(&stop));
    let f = hp.backend.remove(&[4, 3, 2]).unwrap_err();
    stop.store(true, Ordering::SeqCst);
    g.join().unwrap();
    assert_eq!(f.confirmed, [2]);
    assert_eq!(f.uncertain, [4, 3]);
    assert_eq!(hp.controller.enabled(), [0, 1, 3, 4]);
    // A late eject of a CPU whose removal was withdrawn is refused.
    let refused = hp.controller.stats().refused_ejects;
    let at = |offset| BusAccess {
        vcpu_id: 0,
        base: 0,
        offset,
    };
    hp.controller
        .write(at(regs::SEL), &3u32.to_le_bytes())
        .unwrap();
    hp.controller
        .write(at(regs::STAT), &[regs::command::EJECT])
        .unwrap();
    assert_eq!(hp.controller.stats().refused_ejects, refused + 1);
    hp.backend.sync_present(&[0, 1, 3, 4, 7]);
    assert_eq!(hp.controller.enabled(), [0, 1, 3, 4]);
}

#[test]
fn attach_rejects_taken_ranges_and_bad_lists() {
    let bus = bus();
    assert!(matches!(
        attach(&bus, None, Vec::new(), 0, DEFAULT_GUEST_TIMEOUT),
        Err(AcpiHotplugError::Cpus { .. })
    ));
    attach(&bus, None, ids(), 2, DEFAULT_GUEST_TIMEOUT).unwrap();
    let e = attach(&bus, None, ids(), 2, DEFAULT_GUEST_TIMEOUT).unwrap_err();
    assert!(matches!(e, AcpiHotplugError::Bus(_)), "{e}");
    assert_eq!(bus.ranges(crate::BusSpace::Mmio).len(), 2);
}

/// `n` vCPUs with APIC IDs 0..n, one present.
fn cpus(n: u32) -> Vec<AcpiCpu> {
    (0..n)
        .map(|i| AcpiCpu {
            apic_id: i,
            enabled: i == 0,
        })
        .collect()
}

#[test]
fn the_hotplug_aml_fits_the_acpi_area_up_to_1024_vcpus() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    for n in [1, 14, 255, 300, 1024] {
        let list = cpus(n);
        let aml = HotplugAml::new(&list, AcpiHotplugLayout::default()).unwrap();
        let t = setup_acpi_with(&mem, &list, &[&aml]).unwrap();
        let dsdt = t.get("DSDT").unwrap();
        let text = String::from_utf8_lossy(&dsdt.bytes);
        assert_eq!(text.matches("ACPI0007").count(), n as usize, "{n} vCPUs");
        assert_eq!(text.matches("ACPI0013").count(), 1);
        assert_eq!(text.matches("_EJ0").count(), n as usize - 1);
    }
    assert!(HotplugAml::new(&[], AcpiHotplugLayout::default()).is_err());
}
