//! Reading what hwloc's `lstopo --of xml` prints: the object tree (packages, dies, caches,
//! cores, PUs), so that tests can compare hwloc's view of a CPUID dump ([`crate::hwloc`]) with
//! the configured topology.
//!
//! ```
//! use topology::lstopo::HwlocTopology;
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

    #[test]
    fn parser_skips_other_elements_and_attributes() {
        let xml = r#"<topology><object type="Machine" os_index="0"><info name="a" value="b"/>
            <object type="Package" os_index="3"><object type="PU" os_index="1"/>
            <object type="PU" os_index="0" cpuset="0x1"/></object></object></topology>"#;
        let t = HwlocTopology::parse(xml);
        assert_eq!(t.objects.len(), 4);
        assert_eq!(t.groups_of_pus("Package"), [vec![0, 1]]);
        assert_eq!(t.objects[1].os_index, Some(3));
    }
}
