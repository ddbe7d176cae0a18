//! hwloc's view of a CPUID dump directory: runs
//! `HWLOC_CPUID_PATH=DIR HWLOC_COMPONENTS=x86,stop lstopo-no-graphics --of xml -` and reads
//! the object tree (packages, dies, caches, cores, PUs) from its XML, so that tests can compare it with the configured topology.
//!
//! ```
//! use integration::lstopo::HwlocTopology;
//!
//! let xml = r#"<topology><object type="Machine" os_index="0">
//!   <object type="Package" os_index="0"><object type="Core" os_index="0">
//!     <object type="PU" os_index="0"/><object type="PU" os_index="1"/>
//!   </object></object></object></topology>"#;
//! let t = HwlocTopology::parse(xml);
//! assert_eq!(t.count("PU"), 2);
//! assert_eq!(t.groups_of_pus("Core"), vec![vec![0, 1]]);
//! ```

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

use crate::IntegrationError;

/// The hwloc tool run (Debian package `hwloc`).
pub const LSTOPO: &str = "lstopo-no-graphics";

/// One `<object>` of lstopo's XML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwlocObject {
    /// Its `type` attribute: `Package`, `Die`, `L3Cache`, `Core`, `PU`, `NUMANode` ...
    pub kind: String,
    /// Its `os_index` attribute (for PUs: the dump file number, i.e. the vCPU index).
    pub os_index: Option<u32>,
    /// The enclosing object (index into [`HwlocTopology::objects`]).
    pub parent: Option<usize>,
}

/// The object tree lstopo printed.
#[derive(Clone, Debug, Default)]
pub struct HwlocTopology {
    /// Every object, parents before children.
    pub objects: Vec<HwlocObject>,
    /// The XML as printed.
    pub xml: String,
}

fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let (_, rest) = tag.split_once(&format!(" {name}=\""))?;
    rest.split_once('"').map(|(value, _)| value)
}

impl HwlocTopology {
    /// Reads the `<object type=".." os_index="..">` tree from lstopo's XML (other elements
    /// are skipped).
    pub fn parse(xml: &str) -> Self {
        let mut objects: Vec<HwlocObject> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        let mut rest = xml;
        while let Some(lt) = rest.find('<') {
            let Some(len) = rest[lt..].find('>') else {
                break;
            };
            let tag = &rest[lt..=lt + len];
            rest = &rest[lt + len + 1..];
            if tag.starts_with("</object") {
                open.pop();
            } else if tag.starts_with("<object ") {
                objects.push(HwlocObject {
                    kind: attribute(tag, "type").unwrap_or_default().to_string(),
                    os_index: attribute(tag, "os_index").and_then(|v| v.parse().ok()),
                    parent: open.last().copied(),
                });
                if !tag.ends_with("/>") {
                    open.push(objects.len() - 1);
                }
            }
        }
        Self {
            objects,
            xml: xml.to_string(),
        }
    }

    /// How many objects of type `kind`.
    pub fn count(&self, kind: &str) -> usize {
        self.objects.iter().filter(|o| o.kind == kind).count()
    }

    /// The OS indexes of the PUs, sorted.
    pub fn pus(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .objects
            .iter()
            .filter(|o| o.kind == "PU")
            .filter_map(|o| o.os_index)
            .collect();
        v.sort_unstable();
        v
    }

    /// The PUs grouped by their nearest ancestor of type `kind` (each group sorted, groups
    /// sorted); PUs without such an ancestor are left out.
    pub fn groups_of_pus(&self, kind: &str) -> Vec<Vec<u32>> {
        let mut groups: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for pu in self.objects.iter().filter(|o| o.kind == "PU") {
            let mut at = pu.parent;
            while let Some(i) = at {
                if self.objects[i].kind == kind {
                    break;
                }
                at = self.objects[i].parent;
            }
            if let (Some(anc), Some(os)) = (at, pu.os_index) {
                groups.entry(anc).or_default().push(os);
            }
        }
        let mut out: Vec<Vec<u32>> = groups
            .into_values()
            .map(|mut g| {
                g.sort_unstable();
                g
            })
            .collect();
        out.sort();
        out
    }

    /// Whether hwloc built this from the x86 CPUID backend.
    pub fn from_x86_backend(&self) -> bool {
        self.xml.contains("name=\"Backend\" value=\"x86\"")
    }
}

/// Whether a missing lstopo fails the run instead of skipping: under `VCPU_REQUIRE_KVM=1`
/// ([`crate::kvm_required`]) or `CI=true` (CI installs hwloc).
pub fn lstopo_required() -> bool {
    crate::kvm_required() || std::env::var("CI").is_ok_and(|v| v == "true")
}

/// What a test does when [`lstopo_dump`] found no lstopo: panics when [`lstopo_required`],
/// else prints a loud `SKIPPED` line naming `what` was not checked.
pub fn skip_without_lstopo(what: &str) {
    assert!(
        !lstopo_required(),
        "{LSTOPO} not found but CI=true or VCPU_REQUIRE_KVM=1: apt-get install hwloc"
    );
    eprintln!("SKIPPED (no {LSTOPO}; apt-get install hwloc): {what}");
}

/// Runs lstopo on the CPUID dump in `dir`. `Ok(None)` when lstopo is not installed. Fails when
/// lstopo fails or says on stderr that the dump is incomplete or rejected.
pub fn lstopo_dump(dir: &Path) -> Result<Option<HwlocTopology>, IntegrationError> {
    let out = Command::new(LSTOPO)
        .args(["--of", "xml", "-"])
        .env("HWLOC_CPUID_PATH", dir)
        .env("HWLOC_COMPONENTS", "x86,stop")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IntegrationError::Guest(format!("cannot run {LSTOPO}: {e}"))),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success()
        || stderr.contains("Couldn't find")
        || stderr.contains("Ignoring dumped cpuid")
    {
        return Err(IntegrationError::Guest(format!(
            "{LSTOPO} did not accept the CPUID dump in {}: {}",
            dir.display(),
            stderr.trim()
        )));
    }
    Ok(Some(HwlocTopology::parse(&String::from_utf8_lossy(
        &out.stdout,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_follows_nesting_and_self_closing_tags() {
        let xml = r#"<?xml version="1.0"?><topology>
            <object type="Machine" os_index="0"><info name="Backend" value="x86"/>
            <object type="Package" os_index="1"><object type="PU" os_index="3"/>
            <object type="PU" os_index="2" cpuset="0x4"/></object>
            <object type="Package" os_index="0"><object type="PU" os_index="0"/></object>
            </object></topology>"#;
        let t = HwlocTopology::parse(xml);
        assert_eq!(t.count("Package"), 2);
        assert_eq!(t.pus(), [0, 2, 3]);
        assert_eq!(t.groups_of_pus("Package"), [vec![0], vec![2, 3]]);
        assert!(t.groups_of_pus("Die").is_empty());
        assert!(t.from_x86_backend());
    }
}
