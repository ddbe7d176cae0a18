//! Guest memory to and from a byte stream: every region in address order, back to back.

use serde::{Deserialize, Serialize};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::file::CHUNK;
use crate::error::SnapshotError;

/// One guest memory region as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionInfo {
    /// Guest physical address of its first byte.
    pub guest_addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// The regions of `mem`, in address order.
pub fn regions(mem: &GuestMemoryMmap) -> Vec<MemoryRegionInfo> {
    let mut r: Vec<MemoryRegionInfo> = mem
        .iter()
        .map(|r| MemoryRegionInfo {
            guest_addr: r.start_addr().raw_value(),
            size: r.len(),
        })
        .collect();
    r.sort_by_key(|r| r.guest_addr);
    r
}

fn pairs(r: &[MemoryRegionInfo]) -> Vec<(u64, u64)> {
    r.iter().map(|r| (r.guest_addr, r.size)).collect()
}

/// Calls `sink` with every byte of `mem`, region after region in address order, in chunks
/// of at most 1 MiB. Returns the regions.
///
/// # Errors
///
/// [`SnapshotError::GuestMemory`] if reading guest memory fails; what `sink` returns.
pub fn dump_memory(
    mem: &GuestMemoryMmap,
    mut sink: impl FnMut(&[u8]) -> Result<(), SnapshotError>,
) -> Result<Vec<MemoryRegionInfo>, SnapshotError> {
    let regions = regions(mem);
    let mut buf = vec![0u8; CHUNK];
    for r in &regions {
        let mut off = 0u64;
        while off < r.size {
            let n = usize::try_from((r.size - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            let addr = r.guest_addr + off;
            mem.read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|e| SnapshotError::GuestMemory {
                    addr,
                    reason: e.to_string(),
                })?;
            sink(&buf[..n])?;
            off += n as u64;
        }
    }
    Ok(regions)
}

/// Fills `mem` from `source` (which fills the buffer it is given and returns how many
/// bytes it wrote, 0 at the end), region after region in address order, after checking that
/// `mem` has exactly the `saved` regions. Returns the bytes loaded.
///
/// # Errors
///
/// [`SnapshotError::MemoryLayout`] if the regions differ (nothing is written then);
/// [`SnapshotError::GuestMemory`] if `source` ends early or writing fails; what `source`
/// returns.
pub fn load_memory(
    mem: &GuestMemoryMmap,
    saved: &[MemoryRegionInfo],
    mut source: impl FnMut(&mut [u8]) -> Result<usize, SnapshotError>,
) -> Result<u64, SnapshotError> {
    let target = regions(mem);
    if target != saved {
        return Err(SnapshotError::MemoryLayout {
            saved: pairs(saved),
            target: pairs(&target),
        });
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for r in saved {
        let mut off = 0u64;
        while off < r.size {
            let want = usize::try_from((r.size - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            let addr = r.guest_addr + off;
            let mut filled = 0;
            while filled < want {
                let n = source(&mut buf[filled..want])?;
                if n == 0 {
                    return Err(SnapshotError::GuestMemory {
                        addr,
                        reason: format!(
                            "the memory content ends {} bytes early",
                            r.size - off - filled as u64
                        ),
                    });
                }
                filled += n;
            }
            mem.write_slice(&buf[..want], GuestAddress(addr))
                .map_err(|e| SnapshotError::GuestMemory {
                    addr,
                    reason: e.to_string(),
                })?;
            off += want as u64;
            total += want as u64;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(regions: &[(u64, usize)]) -> GuestMemoryMmap {
        let r: Vec<(GuestAddress, usize)> =
            regions.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
        GuestMemoryMmap::from_ranges(&r).unwrap()
    }

    #[test]
    fn dump_then_load_round_trips_and_checks_layout() {
        let a = mem(&[(0, 0x20_0000), (0x100_0000, 0x1000)]);
        a.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        a.write_slice(b"world", GuestAddress(0x100_0ffb)).unwrap();
        let mut bytes = Vec::new();
        let saved = dump_memory(&a, |c| {
            bytes.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(bytes.len(), 0x20_1000);

        let b = mem(&[(0, 0x20_0000), (0x100_0000, 0x1000)]);
        let mut pos = 0;
        let loaded = load_memory(&b, &saved, |buf| {
            let n = buf.len().min(bytes.len() - pos);
            buf[..n].copy_from_slice(&bytes[pos..pos + n]);
            pos += n;
            Ok(n)
        })
        .unwrap();
        assert_eq!(loaded, 0x20_1000);
        let mut got = [0u8; 5];
        b.read_slice(&mut got, GuestAddress(0x100_0ffb)).unwrap();
        assert_eq!(&got, b"world");

        let c = mem(&[(0, 0x20_0000)]);
        let e = load_memory(&c, &saved, |_| Ok(0)).unwrap_err();
        assert!(matches!(e, SnapshotError::MemoryLayout { .. }), "{e}");
        // A short source is an error, not a panic.
        let e = load_memory(&b, &saved, |_| Ok(0)).unwrap_err();
        assert!(matches!(e, SnapshotError::GuestMemory { .. }), "{e}");
    }
}
