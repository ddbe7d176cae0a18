//! Property tests over many shapes (non-powers of two and 1-wide levels included): APIC IDs
//! are unique, index <-> APIC ID <-> location round-trips, and the order is thread fastest,
//! then core, die, socket.

use std::collections::HashSet;

use proptest::prelude::*;
use topology::{
    build_vcpu_cpuid, find_entry, host, CpuLocation, CpuTopology, CpuVendor, SmpConfig,
    TopologyError,
};

/// `ceil(log2(n))`, written independently of the crate's helper.
fn bits_for(n: u32) -> u32 {
    let mut bits = 0;
    while (1u64 << bits) < u64::from(n) {
        bits += 1;
    }
    bits
}

fn shapes() -> impl Strategy<Value = CpuTopology> {
    (1u32..=6, 1u32..=4, 1u32..=9, 1u32..=4)
        .prop_map(|(s, d, c, t)| CpuTopology::new(s, d, c, t).expect("valid shape"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn apic_ids_unique_round_trip_and_ordered(t in shapes()) {
        let n = t.max_vcpus();
        prop_assert_eq!(
            n,
            t.sockets() * t.dies() * t.cores() * t.threads()
        );
        let (tw, cw, dw) = (
            bits_for(t.threads()),
            bits_for(t.cores()),
            bits_for(t.dies()),
        );
        let mut seen = HashSet::new();
        let mut prev: Option<(u32, CpuLocation)> = None;
        for i in 0..n {
            let id = t.apic_id(i).unwrap();
            let loc = t.location(i).unwrap();
            prop_assert!(seen.insert(id), "APIC ID {} repeated at index {}", id, i);

            // The fields of the APIC ID are the location.
            prop_assert_eq!(id & ((1 << tw) - 1), loc.thread);
            prop_assert_eq!((id >> tw) & ((1 << cw) - 1), loc.core);
            prop_assert_eq!((id >> (tw + cw)) & ((1 << dw) - 1), loc.die);
            prop_assert_eq!(id >> (tw + cw + dw), loc.socket);
            prop_assert!(loc.thread < t.threads() && loc.core < t.cores());
            prop_assert!(loc.die < t.dies() && loc.socket < t.sockets());

            // Round trips.
            prop_assert_eq!(t.index_of_apic_id(id).unwrap(), i);
            prop_assert_eq!(t.location_of_apic_id(id).unwrap(), loc);
            prop_assert_eq!(t.index_of_location(loc).unwrap(), i);
            prop_assert_eq!(t.apic_id_of_location(loc).unwrap(), id);

            // Order: thread fastest, then core, die, socket; APIC IDs grow with the index.
            if let Some((prev_id, p)) = prev {
                prop_assert!(id > prev_id);
                let expected = if p.thread + 1 < t.threads() {
                    CpuLocation { thread: p.thread + 1, ..p }
                } else if p.core + 1 < t.cores() {
                    CpuLocation { core: p.core + 1, thread: 0, ..p }
                } else if p.die + 1 < t.dies() {
                    CpuLocation { die: p.die + 1, core: 0, thread: 0, ..p }
                } else {
                    CpuLocation { socket: p.socket + 1, die: 0, core: 0, thread: 0 }
                };
                prop_assert_eq!(loc, expected);
            } else {
                prop_assert_eq!(loc, CpuLocation::default());
                prop_assert_eq!(id, 0);
            }
            prev = Some((id, loc));
        }
        prop_assert_eq!(t.max_apic_id(), prev.map(|p| p.0).unwrap_or(0));
        prop_assert_eq!(t.apic_ids().len(), n as usize);

        // Every other ID up to the largest is a hole that maps to no vCPU.
        for id in 0..=t.max_apic_id() + 1 {
            if !seen.contains(&id) {
                let unknown = matches!(
                    t.index_of_apic_id(id),
                    Err(TopologyError::UnknownApicId { .. })
                );
                prop_assert!(unknown, "APIC ID {} should be unknown", id);
            }
        }
        prop_assert_eq!(t.check_xapic().is_ok(), t.max_apic_id() < 255);
    }

    #[test]
    fn smp_display_parse_round_trip(t in shapes(), boot_seed in any::<u32>()) {
        let max = t.max_vcpus();
        let boot = 1 + boot_seed % max;
        let c = SmpConfig::new(boot, max, t).unwrap();
        let parsed: SmpConfig = c.to_string().parse().unwrap();
        prop_assert_eq!(parsed, c);
    }

    /// QEMU's derivation: any one of sockets / cores / threads may be left out and is derived.
    #[test]
    fn smp_derives_one_omitted_level(t in shapes()) {
        let (s, d, c, th, max) = (
            t.sockets(),
            t.dies(),
            t.cores(),
            t.threads(),
            t.max_vcpus(),
        );
        for spec in [
            format!("{max},dies={d},cores={c},threads={th}"),
            format!("{max},sockets={s},dies={d},threads={th}"),
            format!("{max},sockets={s},dies={d},cores={c}"),
        ] {
            let parsed: SmpConfig = spec.parse().unwrap();
            prop_assert_eq!(parsed.topology, t, "-smp {}", spec);
        }
    }

    /// Every vCPU of a shape reports the same shift widths and counts, and its own APIC ID.
    #[test]
    fn cpuid_shifts_identical_on_every_vcpu(t in shapes(), amd in any::<bool>()) {
        let (vendor, base) = if amd {
            (CpuVendor::Amd, host::synthetic_amd())
        } else {
            (CpuVendor::Intel, host::synthetic_intel())
        };
        let mut first: Option<Vec<(u32, u32, u32)>> = None;
        for i in 0..t.max_vcpus() {
            let cpuid = build_vcpu_cpuid(&base, vendor, &t, i).unwrap();
            let id = t.apic_id(i).unwrap();
            let mut shape = Vec::new();
            for (leaf, subs) in [(0xbu32, 3u32), (0x1f, 4)] {
                for sub in 0..subs {
                    let e = find_entry(&cpuid, leaf, sub).unwrap();
                    prop_assert_eq!(e.edx, id);
                    shape.push((e.eax, e.ebx, e.ecx));
                }
            }
            let l1 = find_entry(&cpuid, 1, 0).unwrap();
            prop_assert_eq!(l1.ebx >> 24, id & 0xff);
            shape.push((l1.ebx & 0x00ff_0000, l1.edx & (1 << 28), 0));
            match &first {
                None => first = Some(shape),
                Some(f) => prop_assert_eq!(f, &shape),
            }
        }
    }
}

#[test]
fn explicit_shapes_from_the_design_doc() {
    // 2 sockets x 3 cores x 2 threads: vCPU 6 is socket 1, core 0, thread 0, APIC ID 8.
    let t = CpuTopology::new(2, 1, 3, 2).unwrap();
    assert_eq!(t.apic_id(6).unwrap(), 8);
    // 1-wide levels take no bits: 7 cores are APIC IDs 0..7.
    let t = CpuTopology::new(1, 1, 7, 1).unwrap();
    assert_eq!(t.apic_ids(), (0..7).collect::<Vec<_>>());
    // 5 sockets of one CPU: the socket field is the whole ID.
    let t = CpuTopology::new(5, 1, 1, 1).unwrap();
    assert_eq!(t.apic_ids(), [0, 1, 2, 3, 4]);
    // 3 dies x 3 cores: 2 bits each.
    let t = CpuTopology::new(1, 3, 3, 1).unwrap();
    assert_eq!(t.apic_ids(), [0, 1, 2, 4, 5, 6, 8, 9, 10]);
}
