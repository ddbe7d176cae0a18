//! QEMU's `-smp` syntax: `[cpus=]N[,maxcpus=M][,sockets=S][,dies=D][,cores=C][,threads=T]`.
//!
//! Omitted values are derived the way modern QEMU (6.2 and later) derives them, which
//! *prefers cores over sockets*:
//!
//! - `dies` defaults to 1.
//! - With neither `cpus` nor `maxcpus`: missing levels are 1, `maxcpus` is their product and
//!   `cpus` equals `maxcpus`.
//! - Otherwise `maxcpus` defaults to `cpus`; then, if `cores` is missing, `sockets` and
//!   `threads` default to 1 and `cores = maxcpus / (sockets * dies * threads)`; else if
//!   `sockets` is missing, `threads` defaults to 1 and
//!   `sockets = maxcpus / (dies * cores * threads)`; a still missing `threads` is
//!   `maxcpus / (sockets * dies * cores)`; finally `cpus` defaults to `maxcpus`.
//!
//! The result must satisfy `sockets * dies * cores * threads == maxcpus` and
//! `cpus <= maxcpus`. An explicit 0 anywhere is an error (as in QEMU 9). Values are decimal;
//! each key may appear once; a bare number is only allowed first (it means `cpus=`).

use std::fmt;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::TopologyError;
use crate::topology::CpuTopology;

/// A parsed `-smp` configuration: boot vCPUs, maximum vCPUs and the topology.
///
/// Parsing, [`SmpConfig::new`] and deserialization check it ([`SmpConfig::validate`]); the
/// fields are public, so code that edits them calls [`SmpConfig::validate`] again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SmpConfig {
    /// vCPUs present at boot (`cpus`).
    pub boot_cpus: u32,
    /// The most vCPUs the VM can have, hot-added ones included (`maxcpus`).
    pub max_cpus: u32,
    /// The shape; its product is `max_cpus`.
    pub topology: CpuTopology,
}

impl<'de> Deserialize<'de> for SmpConfig {
    /// The serialized fields, checked by [`SmpConfig::new`].
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Unchecked {
            boot_cpus: u32,
            max_cpus: u32,
            topology: CpuTopology,
        }
        let u = Unchecked::deserialize(deserializer)?;
        Self::new(u.boot_cpus, u.max_cpus, u.topology).map_err(D::Error::custom)
    }
}

impl SmpConfig {
    /// A validated configuration.
    ///
    /// # Errors
    ///
    /// As [`SmpConfig::validate`].
    pub fn new(
        boot_cpus: u32,
        max_cpus: u32,
        topology: CpuTopology,
    ) -> Result<Self, TopologyError> {
        let c = Self {
            boot_cpus,
            max_cpus,
            topology,
        };
        c.validate()?;
        Ok(c)
    }

    /// `n` vCPUs, all present at boot, in the default shape (1 socket of `n` cores).
    ///
    /// # Errors
    ///
    /// As [`CpuTopology::from_vcpu_count`].
    pub fn from_vcpu_count(n: u32) -> Result<Self, TopologyError> {
        Self::new(n, n, CpuTopology::from_vcpu_count(n)?)
    }

    /// Checks `1 <= boot_cpus <= max_cpus` and that the topology has exactly `max_cpus`
    /// vCPUs.
    ///
    /// # Errors
    ///
    /// [`TopologyError::ZeroCpus`] for a zero count, [`TopologyError::ProductMismatch`] when
    /// the topology's product is not `max_cpus`, [`TopologyError::BootExceedsMax`].
    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.boot_cpus == 0 {
            return Err(TopologyError::ZeroCpus { key: "cpus" });
        }
        self.topology.check_max_vcpus(self.max_cpus)?;
        if self.boot_cpus > self.max_cpus {
            return Err(TopologyError::BootExceedsMax {
                boot: self.boot_cpus,
                max: self.max_cpus,
            });
        }
        Ok(())
    }
}

impl fmt::Display for SmpConfig {
    /// The canonical full form, e.g. `2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},maxcpus={},{}",
            self.boot_cpus, self.max_cpus, self.topology
        )
    }
}

/// The values given explicitly in a `-smp` string.
#[derive(Default)]
struct SmpArgs {
    cpus: Option<u32>,
    maxcpus: Option<u32>,
    sockets: Option<u32>,
    dies: Option<u32>,
    cores: Option<u32>,
    threads: Option<u32>,
}

const KEYS: &str = "cpus, maxcpus, sockets, dies, cores, threads";

impl SmpArgs {
    fn slot(&mut self, key: &str) -> Option<(&mut Option<u32>, &'static str)> {
        Some(match key {
            "cpus" => (&mut self.cpus, "cpus"),
            "maxcpus" => (&mut self.maxcpus, "maxcpus"),
            "sockets" => (&mut self.sockets, "sockets"),
            "dies" => (&mut self.dies, "dies"),
            "cores" => (&mut self.cores, "cores"),
            "threads" => (&mut self.threads, "threads"),
            _ => return None,
        })
    }

    fn parse(input: &str) -> Result<Self, TopologyError> {
        let malformed = |token: &str, reason: String| TopologyError::MalformedSmp {
            input: input.to_string(),
            token: token.to_string(),
            reason,
        };
        let mut args = SmpArgs::default();
        if input.trim().is_empty() {
            return Err(malformed(
                input,
                "empty: expected e.g. `4` or `4,maxcpus=8,sockets=2,cores=2,threads=2`".into(),
            ));
        }
        for (i, token) in input.trim().split(',').enumerate() {
            let (key, value) = match token.split_once('=') {
                Some((k, v)) => (k, v),
                None if i == 0 => ("cpus", token),
                None => {
                    return Err(malformed(
                        token,
                        format!(
                            "expected key=value with a key among {KEYS} (a bare number is only \
                             allowed first, meaning cpus=)"
                        ),
                    ))
                }
            };
            let (slot, key) = args.slot(key).ok_or_else(|| {
                malformed(
                    token,
                    format!("unknown key {key:?}: supported keys are {KEYS}"),
                )
            })?;
            if slot.is_some() {
                return Err(malformed(token, format!("{key} is given twice")));
            }
            let n: u32 = parse_decimal(value).ok_or_else(|| {
                malformed(
                    token,
                    format!("{value:?} is not a decimal number from 0 to {}", u32::MAX),
                )
            })?;
            if n == 0 {
                return Err(match key {
                    "cpus" | "maxcpus" => TopologyError::ZeroCpus { key },
                    level => TopologyError::ZeroLevel { level },
                });
            }
            *slot = Some(n);
        }
        Ok(args)
    }

    /// Derives the omitted values as modern QEMU does (cores preferred over sockets).
    fn resolve(self) -> Result<SmpConfig, TopologyError> {
        let dies = self.dies.unwrap_or(1);
        let (mut sockets, mut cores, mut threads) = (self.sockets, self.cores, self.threads);
        let div = |n: u32, d: u128| u32::try_from(u128::from(n) / d).unwrap_or(u32::MAX);
        let max_cpus = match (self.cpus, self.maxcpus) {
            (None, None) => {
                let (s, c, t) = (
                    sockets.unwrap_or(1),
                    cores.unwrap_or(1),
                    threads.unwrap_or(1),
                );
                let product: u128 = [s, dies, c, t].iter().map(|&n| u128::from(n)).product();
                sockets = Some(s);
                cores = Some(c);
                threads = Some(t);
                // A product beyond u32 fails validation (TopologyTooLarge) below.
                u32::try_from(product).unwrap_or(u32::MAX)
            }
            (cpus, maxcpus) => {
                let max = maxcpus.or(cpus).unwrap_or(1);
                if cores.is_none() {
                    let (s, t) = (sockets.unwrap_or(1), threads.unwrap_or(1));
                    sockets = Some(s);
                    threads = Some(t);
                    cores = Some(div(max, u128::from(s) * u128::from(dies) * u128::from(t)));
                } else if sockets.is_none() {
                    let (c, t) = (cores.unwrap_or(1), threads.unwrap_or(1));
                    threads = Some(t);
                    sockets = Some(div(max, u128::from(dies) * u128::from(c) * u128::from(t)));
                }
                if threads.is_none() {
                    let (s, c) = (sockets.unwrap_or(1), cores.unwrap_or(1));
                    threads = Some(div(max, u128::from(s) * u128::from(dies) * u128::from(c)));
                }
                max
            }
        };
        let (sockets, cores, threads) = (
            sockets.unwrap_or(1),
            cores.unwrap_or(1),
            threads.unwrap_or(1),
        );
        // A derived level of 0 (e.g. `4,sockets=8`) is a product mismatch, as in QEMU.
        if sockets == 0 || cores == 0 || threads == 0 {
            return Err(TopologyError::ProductMismatch {
                sockets,
                dies,
                cores,
                threads,
                product: 0,
                max_cpus,
            });
        }
        let topology = CpuTopology::new(sockets, dies, cores, threads)?;
        SmpConfig::new(self.cpus.unwrap_or(max_cpus), max_cpus, topology)
    }
}

/// A plain decimal `u32` (no sign, no prefix, no spaces).
fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl FromStr for SmpConfig {
    type Err = TopologyError;

    /// Parses QEMU's `-smp` syntax (see the module documentation for the derivation rules).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SmpArgs::parse(s)?.resolve()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smp(s: &str) -> SmpConfig {
        s.parse().unwrap()
    }

    fn shape(c: &SmpConfig) -> (u32, u32, u32, u32, u32, u32) {
        let t = c.topology;
        (
            c.boot_cpus,
            c.max_cpus,
            t.sockets(),
            t.dies(),
            t.cores(),
            t.threads(),
        )
    }

    #[test]
    fn qemu_derivation_prefers_cores() {
        assert_eq!(shape(&smp("8")), (8, 8, 1, 1, 8, 1));
        assert_eq!(shape(&smp("cpus=8")), (8, 8, 1, 1, 8, 1));
        assert_eq!(shape(&smp("8,sockets=2")), (8, 8, 2, 1, 4, 1));
        assert_eq!(shape(&smp("8,cores=2")), (8, 8, 4, 1, 2, 1));
        assert_eq!(shape(&smp("8,sockets=2,cores=2")), (8, 8, 2, 1, 2, 2));
        assert_eq!(shape(&smp("8,threads=2")), (8, 8, 1, 1, 4, 2));
        assert_eq!(
            shape(&smp("4,maxcpus=12,sockets=2,threads=2")),
            (4, 12, 2, 1, 3, 2)
        );
        assert_eq!(shape(&smp("maxcpus=6")), (6, 6, 1, 1, 6, 1));
        assert_eq!(
            shape(&smp("sockets=2,cores=3,threads=2")),
            (12, 12, 2, 1, 3, 2)
        );
        assert_eq!(shape(&smp("sockets=3,dies=2")), (6, 6, 3, 2, 1, 1));
        assert_eq!(shape(&smp("9,dies=3")), (9, 9, 1, 3, 3, 1));
        assert_eq!(shape(&smp(" 2 ")), (2, 2, 1, 1, 2, 1));
    }

    #[test]
    fn canonical_display() {
        let c = smp("2,maxcpus=12,sockets=2,cores=3,threads=2");
        assert_eq!(
            c.to_string(),
            "2,maxcpus=12,sockets=2,dies=1,cores=3,threads=2"
        );
        assert_eq!(smp(&c.to_string()), c);
    }

    #[test]
    fn deserializing_validates() {
        let c = smp("2,maxcpus=12,sockets=2,cores=3,threads=2");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<SmpConfig>(&json).unwrap(), c);
        let boot_over_max = json.replace("\"boot_cpus\":2", "\"boot_cpus\":13");
        let e = serde_json::from_str::<SmpConfig>(&boot_over_max).unwrap_err();
        assert!(e.to_string().contains("13 boot vCPUs"), "{e}");
    }
}
