//! The vPMU level: what the configuration says and how it is written.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::VpmuError;

/// How much of the host's PMU a guest gets.
///
/// Written `off`, `limited` or `full` ([`Display`](fmt::Display), serde). Parsing also accepts
/// `disabled` and the numbers `0`, `1`, `2` that Dragonball configurations use, in any case.
/// Deserializing also accepts the JSON integers 0, 1 and 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VpmuFeatureLevel {
    /// No PMU: CPUID shows none and KVM's vPMU is turned off for the VM.
    #[default]
    Disabled,
    /// Only core cycles and instructions retired can be counted (CPUID shows a version 2 PMU
    /// with two fixed and two general purpose counters on Intel; an event filter in KVM allows
    /// nothing else on either vendor).
    LimitedlyEnabled,
    /// Every counter and event the host's KVM offers.
    FullyEnabled,
}

impl VpmuFeatureLevel {
    /// All levels, from least to most.
    pub const ALL: [VpmuFeatureLevel; 3] = [
        VpmuFeatureLevel::Disabled,
        VpmuFeatureLevel::LimitedlyEnabled,
        VpmuFeatureLevel::FullyEnabled,
    ];

    /// The spellings [`FromStr`] accepts, for messages.
    pub const ACCEPTED_SPELLINGS: &'static str =
        "off, limited, full (or disabled, 0, 1, 2), in any case";

    /// The canonical spelling: `off`, `limited` or `full`.
    pub const fn as_str(self) -> &'static str {
        match self {
            VpmuFeatureLevel::Disabled => "off",
            VpmuFeatureLevel::LimitedlyEnabled => "limited",
            VpmuFeatureLevel::FullyEnabled => "full",
        }
    }

    /// The number Dragonball's `vpmu_feature` uses: 0, 1 or 2.
    pub const fn dragonball_value(self) -> u8 {
        match self {
            VpmuFeatureLevel::Disabled => 0,
            VpmuFeatureLevel::LimitedlyEnabled => 1,
            VpmuFeatureLevel::FullyEnabled => 2,
        }
    }

    /// The level for a Dragonball `vpmu_feature` number, `None` above 2.
    pub const fn from_dragonball_value(value: u64) -> Option<Self> {
        match value {
            0 => Some(VpmuFeatureLevel::Disabled),
            1 => Some(VpmuFeatureLevel::LimitedlyEnabled),
            2 => Some(VpmuFeatureLevel::FullyEnabled),
            _ => None,
        }
    }

    /// Whether the guest sees a PMU at all.
    pub const fn is_enabled(self) -> bool {
        !matches!(self, VpmuFeatureLevel::Disabled)
    }
}

impl fmt::Display for VpmuFeatureLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VpmuFeatureLevel {
    type Err = VpmuError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let level =
            if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("disabled") || t == "0" {
                VpmuFeatureLevel::Disabled
            } else if t.eq_ignore_ascii_case("limited") || t == "1" {
                VpmuFeatureLevel::LimitedlyEnabled
            } else if t.eq_ignore_ascii_case("full") || t == "2" {
                VpmuFeatureLevel::FullyEnabled
            } else {
                return Err(VpmuError::unknown_level(s));
            };
        Ok(level)
    }
}

impl Serialize for VpmuFeatureLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for VpmuFeatureLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LevelVisitor)
    }
}

/// Accepts a string (any spelling [`FromStr`] takes) or an integer 0, 1, 2.
struct LevelVisitor;

impl Visitor<'_> for LevelVisitor {
    type Value = VpmuFeatureLevel;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a vPMU level: {}", VpmuFeatureLevel::ACCEPTED_SPELLINGS)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        VpmuFeatureLevel::from_dragonball_value(v)
            .ok_or_else(|| E::custom(VpmuError::unknown_level(&v.to_string())))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::custom(VpmuError::unknown_level(&v.to_string()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dragonball_numbers_round_trip() {
        for level in VpmuFeatureLevel::ALL {
            let n = u64::from(level.dragonball_value());
            assert_eq!(VpmuFeatureLevel::from_dragonball_value(n), Some(level));
        }
        assert_eq!(VpmuFeatureLevel::from_dragonball_value(3), None);
    }

    #[test]
    fn only_disabled_is_off() {
        assert!(!VpmuFeatureLevel::Disabled.is_enabled());
        assert!(VpmuFeatureLevel::LimitedlyEnabled.is_enabled());
        assert!(VpmuFeatureLevel::FullyEnabled.is_enabled());
    }
}
