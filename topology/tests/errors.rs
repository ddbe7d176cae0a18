//! Each invalid input gives its own error variant, and the message names the offending value.

use std::path::Path;

use topology::{build_vcpu_cpuid, host, CpuTopology, CpuVendor, SmpConfig, TopologyError};

fn smp_err(s: &str) -> TopologyError {
    match s.parse::<SmpConfig>() {
        Ok(c) => panic!("-smp {s:?} parsed as {c}, expected an error"),
        Err(e) => e,
    }
}

/// Asserts that an error matches a pattern, printing it when it does not.
macro_rules! assert_variant {
    ($e:expr, $($pattern:tt)+) => {{
        let e = &$e;
        assert!(matches!(e, $($pattern)+), "{e:?}");
    }};
}

fn assert_mentions(e: &TopologyError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should mention {p:?}");
    }
}

#[test]
fn zero_level() {
    for (level, args) in [
        ("sockets", (0, 1, 1, 1)),
        ("dies", (1, 0, 1, 1)),
        ("cores", (1, 1, 0, 1)),
        ("threads", (1, 1, 1, 0)),
    ] {
        let from_new = CpuTopology::new(args.0, args.1, args.2, args.3).unwrap_err();
        let from_smp = smp_err(&format!("4,{level}=0"));
        for e in [from_new, from_smp] {
            assert_variant!(e, TopologyError::ZeroLevel { level: l } if *l == level);
            assert_mentions(&e, &[&format!("{level}=0")]);
        }
    }
    // No `CpuTopology` holds a zero level, so no method meets one: the only other way in,
    // deserializing, is refused the same way.
    let json = r#"{"sockets":1,"dies_per_socket":1,"cores_per_die":0,"threads_per_core":1}"#;
    let e = serde_json::from_str::<CpuTopology>(json).unwrap_err();
    assert!(e.to_string().contains("cores=0"), "{e}");
    let json = format!(r#"{{"boot_cpus":1,"max_cpus":1,"topology":{json}}}"#);
    let e = serde_json::from_str::<SmpConfig>(&json).unwrap_err();
    assert!(e.to_string().contains("cores=0"), "{e}");
}

#[test]
fn zero_cpus() {
    for key in ["cpus", "maxcpus"] {
        let e = smp_err(&format!("{key}=0"));
        assert_variant!(e, TopologyError::ZeroCpus { key: k } if *k == key);
        assert_mentions(&e, &[&format!("{key}=0")]);
    }
    assert_variant!(smp_err("0"), TopologyError::ZeroCpus { key: "cpus" });
    assert_variant!(
        CpuTopology::from_vcpu_count(0),
        Err(TopologyError::ZeroCpus { key: "cpus" })
    );
}

#[test]
fn product_mismatch() {
    let t = CpuTopology::new(2, 1, 3, 2).unwrap();
    let e = t.check_max_vcpus(16).unwrap_err();
    assert_variant!(
        e,
        TopologyError::ProductMismatch {
            sockets: 2,
            dies: 1,
            cores: 3,
            threads: 2,
            product: 12,
            max_cpus: 16
        }
    );
    assert_mentions(
        &e,
        &["sockets (2)", "cores (3)", "threads (2)", "= 12", "is 16"],
    );

    // (-smp, (product, derived cores, maxcpus), what the message names): the second and
    // third derive levels that cannot make the product (7 vCPUs over 2 sockets; a derived
    // level of 0, as QEMU reports it).
    for (input, (product, cores, max), parts) in [
        (
            "8,maxcpus=16,sockets=2,cores=3,threads=2",
            (Some(12), 3, 16),
            &["= 12", "is 16"][..],
        ),
        ("7,sockets=2", (None, 3, 7), &["cores (3)", "is 7"]),
        ("4,sockets=8", (None, 0, 4), &["sockets (8)", "cores (0)"]),
    ] {
        let e = smp_err(input);
        assert_variant!(
            e,
            TopologyError::ProductMismatch { product: p, cores: c, max_cpus: m, .. }
                if product.is_none_or(|n| *p == n) && *c == cores && *m == max
        );
        assert_mentions(&e, parts);
    }

    let e = SmpConfig::new(2, 4, CpuTopology::new(1, 1, 3, 1).unwrap()).unwrap_err();
    assert_variant!(
        e,
        TopologyError::ProductMismatch {
            product: 3,
            max_cpus: 4,
            ..
        }
    );
}

#[test]
fn boot_exceeds_max() {
    let e = smp_err("8,maxcpus=4");
    assert_variant!(e, TopologyError::BootExceedsMax { boot: 8, max: 4 });
    assert_mentions(&e, &["8 boot vCPUs", "maximum of 4"]);
}

#[test]
fn apic_id_too_large() {
    // 3 sockets x 3 dies x 5 cores x 3 threads = 135 vCPUs, but the sparse APIC IDs reach
    // 2 << 7 | 2 << 5 | 4 << 2 | 2 = 338.
    let t = CpuTopology::new(3, 3, 5, 3).unwrap();
    let e = t.check_xapic().unwrap_err();
    let max = t.max_apic_id();
    assert_eq!((max, t.max_vcpus()), (338, 135));
    assert_variant!(
        e,
        TopologyError::ApicIdTooLarge { max_apic_id, limit: 255, .. } if *max_apic_id == max
    );
    assert_mentions(
        &e,
        &[
            &max.to_string(),
            "sockets=3,dies=3,cores=5,threads=3",
            "255",
        ],
    );
    // The limit is exact: 255 vCPUs in one die of 255 cores need APIC ID 254: fine.
    assert!(CpuTopology::new(1, 1, 255, 1)
        .unwrap()
        .check_xapic()
        .is_ok());
    let e = CpuTopology::new(1, 1, 256, 1)
        .unwrap()
        .check_xapic()
        .unwrap_err();
    assert_variant!(
        e,
        TopologyError::ApicIdTooLarge {
            max_apic_id: 255,
            ..
        }
    );
}

#[test]
fn topology_too_large() {
    let e = CpuTopology::new(65536, 1, 65536, 1).unwrap_err();
    assert_variant!(
        e,
        TopologyError::TopologyTooLarge {
            bits: 32,
            max_bits: 31,
            ..
        }
    );
    assert_mentions(&e, &["sockets=65536", "32 APIC ID bits"]);
    assert_variant!(
        smp_err("sockets=100000,cores=100000"),
        TopologyError::TopologyTooLarge { .. }
    );
}

#[test]
fn index_and_apic_id_out_of_range() {
    let t = CpuTopology::new(2, 1, 3, 2).unwrap();
    let e = t.apic_id(12).unwrap_err();
    assert_variant!(
        e,
        TopologyError::IndexOutOfRange {
            index: 12,
            max_vcpus: 12
        }
    );
    assert_mentions(&e, &["index 12", "12 vCPUs"]);
    assert_variant!(
        t.location(99).unwrap_err(),
        TopologyError::IndexOutOfRange { index: 99, .. }
    );

    // Core field value 3 is a hole with 3 cores per die; socket 2 does not exist.
    for (apic_id, level, value) in [(6, "core", 3), (16, "socket", 2)] {
        let e = t.index_of_apic_id(apic_id).unwrap_err();
        assert_variant!(
            e,
            TopologyError::UnknownApicId { apic_id: a, level: l, value: v, .. }
                if (*a, *l, *v) == (apic_id, level, value)
        );
    }
    let e = t.index_of_apic_id(6).unwrap_err();
    assert_variant!(e, TopologyError::UnknownApicId { count: 3, .. });
    assert_mentions(&e, &["APIC ID 6", "core field is 3"]);

    assert_variant!(
        build_vcpu_cpuid(&host::synthetic_amd(), CpuVendor::Amd, &t, 12).unwrap_err(),
        TopologyError::IndexOutOfRange { index: 12, .. }
    );
}

#[test]
fn malformed_smp() {
    for (input, token, hint) in [
        ("", "", "empty"),
        ("4,sockets", "sockets", "key=value"),
        ("4,,cores=2", "", "key=value"),
        ("4,cores=2,", "", "key=value"),
        ("4,clusters=2", "clusters=2", "unknown key"),
        ("4,cores=two", "cores=two", "\"two\""),
        ("4,cores=-1", "cores=-1", "\"-1\""),
        ("4,cores=0x2", "cores=0x2", "decimal"),
        ("4,cores=99999999999", "cores=99999999999", "decimal"),
        ("4,cores=2,cores=2", "cores=2", "twice"),
        ("4,cpus=4", "cpus=4", "twice"),
        ("cores=2,4", "4", "bare number"),
        ("4, cores=2", " cores=2", "unknown key"),
    ] {
        let e = smp_err(input);
        match &e {
            TopologyError::MalformedSmp {
                input: i, token: t, ..
            } => {
                assert_eq!(t, token, "bad token for {input:?}: {e}");
                assert_eq!(i, input);
            }
            other => panic!("{input:?}: expected MalformedSmp, got {other:?}"),
        }
        assert_mentions(&e, &[&format!("{token:?}"), hint]);
    }
}

#[test]
fn vendor_mismatch() {
    let t = CpuTopology::new(1, 1, 2, 1).unwrap();
    let e = build_vcpu_cpuid(&host::synthetic_amd(), CpuVendor::Intel, &t, 0).unwrap_err();
    assert_variant!(
        e,
        TopologyError::VendorMismatch {
            requested: CpuVendor::Intel,
            host: CpuVendor::Amd
        }
    );
    assert_mentions(&e, &["Intel", "Amd"]);
}

#[test]
fn host_file_errors() {
    let e = host::read_host_file(Path::new("/nonexistent/cpuid-base")).unwrap_err();
    assert_variant!(e, TopologyError::HostCpuidIo { .. });
    assert_mentions(&e, &["/nonexistent/cpuid-base"]);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pu0");
    std::fs::write(
        &f,
        "# ok\n1 0 0 0 0 => d 0 0 0\n1 1 0 0 0 => 0 0 0 nothex\n",
    )
    .unwrap();
    let e = host::read_host_file(dir.path()).unwrap_err();
    assert_variant!(e, TopologyError::HostCpuidParse { line: 3, .. });
    assert_mentions(&e, &["pu0:3", "\"nothex\""]);
}
