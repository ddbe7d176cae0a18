//! Parsing, printing and serde of the vPMU level.

use vpmu::{VpmuError, VpmuFeatureLevel};

#[test]
fn default_is_disabled() {
    assert_eq!(VpmuFeatureLevel::default(), VpmuFeatureLevel::Disabled);
}

#[test]
fn canonical_spellings_round_trip() {
    for (text, level) in [
        ("off", VpmuFeatureLevel::Disabled),
        ("limited", VpmuFeatureLevel::LimitedlyEnabled),
        ("full", VpmuFeatureLevel::FullyEnabled),
    ] {
        assert_eq!(level.to_string(), text);
        assert_eq!(text.parse::<VpmuFeatureLevel>().expect(text), level);
        assert_eq!(
            level.to_string().parse::<VpmuFeatureLevel>().expect(text),
            level
        );
    }
}

#[test]
fn dragonball_and_other_spellings_any_case() {
    let cases: [(VpmuFeatureLevel, &[&str]); 3] = [
        (
            VpmuFeatureLevel::Disabled,
            &["disabled", "DISABLED", "Off", "0"],
        ),
        (VpmuFeatureLevel::LimitedlyEnabled, &["1", "LiMiTeD"]),
        (VpmuFeatureLevel::FullyEnabled, &["2", " FULL "]),
    ];
    for (level, spellings) in cases {
        for text in spellings {
            assert_eq!(
                text.parse::<VpmuFeatureLevel>().expect(text),
                level,
                "{text:?}"
            );
        }
    }
}

#[test]
fn unknown_spellings_are_rejected_with_the_accepted_list() {
    for text in ["", "on", "3", "-1", "fully", "limitedly", "0x1", "enabled"] {
        let err = text
            .parse::<VpmuFeatureLevel>()
            .expect_err(&format!("{text:?} must be rejected"));
        assert!(matches!(err, VpmuError::UnknownLevel { .. }));
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{text}`")), "{msg}");
        for accepted in ["off", "limited", "full", "disabled", "0", "1", "2"] {
            assert!(msg.contains(accepted), "{msg} lacks {accepted}");
        }
    }
}

#[test]
fn a_long_unknown_value_is_quoted_truncated() {
    let long = "x".repeat(10_000);
    let msg = long.parse::<VpmuFeatureLevel>().unwrap_err().to_string();
    assert!(msg.len() < 300, "{msg}");
    assert!(msg.contains("..."), "{msg}");
}

#[test]
fn serde_uses_the_canonical_string() {
    for level in VpmuFeatureLevel::ALL {
        let json = serde_json::to_string(&level).expect("serialize");
        assert_eq!(json, format!("\"{level}\""));
        let back: VpmuFeatureLevel = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, level);
    }
}

#[test]
fn serde_accepts_other_spellings_and_dragonball_integers() {
    let de = |s: &str| serde_json::from_str::<VpmuFeatureLevel>(s);
    assert_eq!(
        de("\"Disabled\"").expect("string"),
        VpmuFeatureLevel::Disabled
    );
    assert_eq!(
        de("\"1\"").expect("string"),
        VpmuFeatureLevel::LimitedlyEnabled
    );
    assert_eq!(de("0").expect("int"), VpmuFeatureLevel::Disabled);
    assert_eq!(de("1").expect("int"), VpmuFeatureLevel::LimitedlyEnabled);
    assert_eq!(de("2").expect("int"), VpmuFeatureLevel::FullyEnabled);
    for bad in ["3", "-1", "\"maybe\"", "true", "1.5", "null"] {
        let err = de(bad).expect_err(bad).to_string();
        assert!(err.contains("off") || err.contains("vPMU"), "{bad}: {err}");
    }
    let msg = de("7").unwrap_err().to_string();
    assert!(msg.contains("`7`") && msg.contains("limited"), "{msg}");
}
