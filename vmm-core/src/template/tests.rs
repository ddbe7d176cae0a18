use super::*;
use topology::{find_entry, CpuidEntry};

const T2S: &str = include_str!("../../tests/data/cpu_templates/T2S.json");
const T2CL: &str = include_str!("../../tests/data/cpu_templates/T2CL.json");
const EXT: &str = include_str!("../../tests/data/cpu_templates/ext-features.json");

/// A one-entry template with `register` and `bitmap` in leaf 0x8000_0001.
fn one(register: &str, bitmap: &str) -> String {
    format!(
        r#"{{"cpuid_modifiers": [{{"leaf": "0x80000001", "subleaf": "0x0", "flags": 0,
            "modifiers": [{{"register": "{register}", "bitmap": "{bitmap}"}}]}}]}}"#
    )
}

const ECX_OK: &str = "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1";

#[test]
fn firecrackers_published_templates_parse() {
    for (name, text) in [("T2S", T2S), ("T2CL", T2CL)] {
        let t = CpuTemplate::from_json(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.cpuid_modifiers.len(), 6, "{name}");
        assert_eq!(t.msr_indices(), vec![0x10a], "{name}");
        let l7 = &t.cpuid_modifiers[1];
        assert_eq!((l7.leaf, l7.subleaf, l7.flags), (7, 0, 1));
        // Round trip through our own serializer.
        let again = CpuTemplate::from_json(&t.to_json()).unwrap();
        assert_eq!(again, t, "{name}");
    }
    // T2S's MSR 0x10a: every bit given.
    let t = CpuTemplate::from_json(T2S).unwrap();
    let m = t.msr_modifiers[0].bits;
    assert_eq!(m.filter, u64::MAX);
    assert_eq!(m.value, 0b1100_0000_1010_0000_1100_0100_1100);
    // Leaf 1 EAX of T2S: "0bxxxx000000000011xx00011011110010".
    let eax = t.cpuid_modifiers[0].modifiers[0];
    assert_eq!(eax.register, CpuidRegister::Eax);
    assert_eq!(eax.bits.filter, 0x0fff_3fff);
    assert_eq!(eax.bits.value, 0x0003_06f2);
}

#[test]
fn our_example_template_parses() {
    let t = CpuTemplate::from_json(EXT).unwrap();
    assert_eq!(t.kvm_capabilities, vec![KvmCapabilityModifier::Remove(56)]);
    assert!(t.required_kvm_capabilities().is_empty());
    assert_eq!(t.msr_indices(), vec![0x1a0]);
}

#[test]
fn bits_apply_as_the_bitmap_says() {
    let t = CpuTemplate::from_json(&one("ecx", "0bxxxxxxxxxxxxxxxxxxxxxxxxxx0xxx11")).unwrap();
    let mut e = vec![CpuidEntry::leaf(0x8000_0001, 7, 7, 0b10_0000, 7)];
    apply_cpuid_modifiers(&t, &mut e);
    let got = find_entry(&e, 0x8000_0001, 0).unwrap();
    assert_eq!((got.eax, got.ebx, got.ecx, got.edx), (7, 7, 0b11, 7));
    // A leaf KVM did not list is added.
    let mut empty = Vec::new();
    apply_cpuid_modifiers(&t, &mut empty);
    assert_eq!(find_entry(&empty, 0x8000_0001, 0).unwrap().ecx, 0b11);
    // Numbers may be JSON numbers; `_` separates groups.
    let t2 = CpuTemplate::from_json(
        r#"{"cpuid_modifiers": [{"leaf": 2147483649, "subleaf": 0, "flags": 0,
            "modifiers": [{"register": "ECX", "bitmap": "0bxxxxxxxx_xxxxxxxx_xxxxxxxx_xx0xxx11"}]}]}"#,
    )
    .unwrap();
    assert_eq!(t2.cpuid_modifiers, t.cpuid_modifiers);
}

/// Every malformed template is refused with its own variant and a message naming the entry.
#[test]
fn malformed_templates_are_refused_each_with_its_own_message() {
    let cases: Vec<(String, &str, &str)> = vec![
        (one("exx", ECX_OK), "UnknownRegister", "unknown register \"exx\""),
        (
            one("ecx", "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1"),
            "BitmapLength",
            "bitmap has 31 bits, a CPUID register needs exactly 32",
        ),
        (
            one("ecx", "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx21"),
            "BitmapCharacter",
            "bitmap has '2' at position 30",
        ),
        (
            one("ecx", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1"),
            "BitmapPrefix",
            "must start with \"0b\"",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "seven", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#
                .into(),
            "NotANumber",
            "cpuid_modifiers[0]: leaf \"seven\" is not a number",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x100000000", "modifiers": []}]}"#.into(),
            "NotANumber",
            "leaf \"0x100000000\" is not a number",
        ),
        (
            r#"{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b0101"}]}"#.into(),
            "BitmapLength",
            "msr_modifiers[0] (MSR 0x10a): bitmap has 4 bits, a MSR needs exactly 64",
        ),
        (
            r#"{"msr_modifiers": [{"addr": "0xzz", "bitmap": "0b0"}]}"#.into(),
            "NotANumber",
            "msr_modifiers[0]: addr \"0xzz\" is not a number",
        ),
        (
            r#"{"kvm_capabilities": ["!abc"]}"#.into(),
            "KvmCapability",
            "kvm_capabilities[0]: KVM capability \"!abc\"",
        ),
        (
            r#"{"cpuid_modifier": []}"#.into(),
            "Json",
            "unknown field `cpuid_modifier`",
        ),
        (
            format!(
                r#"{{"cpuid_modifiers": [{{"leaf": "0x1", "modifiers": [
                    {{"register": "eax", "bitmap": "{ECX_OK}"}},
                    {{"register": "eax", "bitmap": "{ECX_OK}"}}]}}]}}"#
            ),
            "DuplicateRegister",
            "cpuid_modifiers[0] (leaf 0x1 subleaf 0x0).modifiers[1]: register eax is modified twice",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "modifiers": []}, {"leaf": "0x1", "modifiers": []}]}"#
                .into(),
            "DuplicateEntry",
            "cpuid_modifiers[1] (leaf 0x1 subleaf 0x0): leaf 0x1 subleaf 0x0 is already modified",
        ),
    ];
    let mut messages = std::collections::BTreeSet::new();
    for (json, variant, want) in &cases {
        let e = CpuTemplate::from_json(json).expect_err(json);
        let msg = e.to_string();
        assert!(format!("{e:?}").starts_with(variant), "{variant}: {e:?}");
        assert!(msg.contains(want), "{variant}: {msg:?} lacks {want:?}");
        assert!(messages.insert(msg.clone()), "message given twice: {msg}");
        // serde's own entry point refuses it too (VcpuConfig deserializes templates).
        assert!(serde_json::from_str::<CpuTemplate>(json).is_err());
    }
    // The register's entry is named with its position.
    let e = CpuTemplate::from_json(&one("exx", ECX_OK)).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cpuid_modifiers[0] (leaf 0x80000001 subleaf 0x0).modifiers[0]"),
        "{e}"
    );
}

#[test]
fn required_capabilities_are_checked() {
    let t = CpuTemplate::from_json(r#"{"kvm_capabilities": ["171", "!56"]}"#).unwrap();
    assert_eq!(t.required_kvm_capabilities(), vec![171]);
    t.check_kvm_capabilities(|_| 1).unwrap();
    let e = t.check_kvm_capabilities(|_| 0).unwrap_err();
    assert!(matches!(
        e,
        TemplateError::KvmLacksCapability {
            cap: 171,
            answer: 0
        }
    ));
}

#[test]
fn the_vmm_keeps_topology_and_pmu_leaves() {
    let supported = topology::host::synthetic_amd();
    let t = CpuTemplate::from_json(EXT).unwrap();
    let with = guest_base_cpuid(
        &supported,
        Some(&t),
        topology::CpuVendor::Amd,
        &Default::default(),
    );
    let without = guest_base_cpuid(
        &supported,
        None,
        topology::CpuVendor::Amd,
        &Default::default(),
    );
    for leaf in VMM_OWNED_LEAVES {
        let a: Vec<_> = with.iter().filter(|e| e.function == *leaf).collect();
        let b: Vec<_> = without.iter().filter(|e| e.function == *leaf).collect();
        assert_eq!(a, b, "leaf {leaf:#x}");
    }
    // The template's own bits are there; TopoExt (bit 22, topology's) is not the template's.
    let w = find_entry(&with, 0x8000_0001, 0).unwrap().ecx;
    let wo = find_entry(&without, 0x8000_0001, 0).unwrap().ecx;
    assert_eq!(w & 0b1_0000_0010_0001, 0b1_0000_0000_0001);
    assert_eq!(w & (1 << 22), wo & (1 << 22));
    assert_eq!(w & (1 << 1), wo & (1 << 1));
}
