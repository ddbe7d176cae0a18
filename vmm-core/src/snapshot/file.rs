//! The one framing every snapshot file has: a 32-byte header ([`FileHeader`]) that names the
//! format version and what the file holds, and carries the content's length and CRC32 and
//! its own CRC32; then the content. Written to a temporary file and renamed into place.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{SnapshotError, SnapshotFile};

/// The first 8 bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"VCPUSNAP";
/// Bytes of the header.
pub const HEADER_LEN: usize = 32;
/// Bytes read or written at a time when streaming a file.
pub(crate) const CHUNK: usize = 1 << 20;

/// A snapshot file's header, little-endian on disk:
///
/// | bytes | field |
/// | --- | --- |
/// | 0..8 | [`MAGIC`] |
/// | 8..12 | format version |
/// | 12..16 | kind: 1 state, 2 memory |
/// | 16..24 | content length in bytes |
/// | 24..28 | CRC32 (IEEE) of the content |
/// | 28..32 | CRC32 of bytes 0..28 |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// The format version the file was written with.
    pub version: u32,
    /// What the file holds.
    pub kind: SnapshotFile,
    /// Content bytes after the header.
    pub len: u64,
    /// CRC32 of the content.
    pub crc32: u32,
}

fn kind_code(kind: SnapshotFile) -> u32 {
    match kind {
        SnapshotFile::State => 1,
        SnapshotFile::Memory => 2,
    }
}

impl FileHeader {
    /// The header of a `kind` file of format `version` holding `content`.
    pub fn for_content(kind: SnapshotFile, version: u32, content: &[u8]) -> Self {
        Self {
            version,
            kind,
            len: content.len() as u64,
            crc32: crc32fast::hash(content),
        }
    }

    /// The header's bytes, its own CRC32 last.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&kind_code(self.kind).to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc32.to_le_bytes());
        let own = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&own.to_le_bytes());
        b
    }

    /// Decodes and checks the header of `path`, which should be a `expected` file: magic,
    /// the header's own CRC32, the format version against `supported`, then the kind.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::NotASnapshot`], [`SnapshotError::HeaderCorrupted`],
    /// [`SnapshotError::FormatVersion`], [`SnapshotError::WrongFile`], in that order of
    /// checking.
    pub fn decode(
        bytes: &[u8; HEADER_LEN],
        path: &Path,
        expected: SnapshotFile,
        supported: u32,
    ) -> Result<Self, SnapshotError> {
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if bytes[0..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot {
                file: expected,
                path: path.to_path_buf(),
            });
        }
        if crc32fast::hash(&bytes[0..28]) != u32_at(28) {
            return Err(SnapshotError::HeaderCorrupted {
                file: expected,
                path: path.to_path_buf(),
            });
        }
        let version = u32_at(8);
        if version != supported {
            return Err(SnapshotError::FormatVersion {
                path: path.to_path_buf(),
                found: version,
                supported,
            });
        }
        let kind = match u32_at(12) {
            1 => SnapshotFile::State,
            2 => SnapshotFile::Memory,
            // A valid CRC with an unknown kind: not a file this build wrote.
            _ => {
                return Err(SnapshotError::NotASnapshot {
                    file: expected,
                    path: path.to_path_buf(),
                })
            }
        };
        if kind != expected {
            return Err(SnapshotError::WrongFile {
                path: path.to_path_buf(),
                expected,
                found: kind,
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[16..24]);
        Ok(Self {
            version,
            kind,
            len: u64::from_le_bytes(len),
            crc32: u32_at(24),
        })
    }
}

/// The temporary name `path` is written under before the rename.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A snapshot file being written: content goes to a temporary file through
/// [`PendingFile::writer`]; [`PendingFile::finish`] writes the header, syncs it to disk and
/// leaves it ready for [`PendingFile::commit`], which renames it into place.
#[derive(Debug)]
pub(crate) struct PendingFile {
    path: PathBuf,
    temp: PathBuf,
    out: BufWriter<File>,
    hasher: crc32fast::Hasher,
    len: u64,
    kind: SnapshotFile,
}

impl PendingFile {
    /// Creates the temporary file for `path`, with room for the header.
    pub(crate) fn create(path: &Path, kind: SnapshotFile) -> Result<Self, SnapshotError> {
        let temp = temp_path(path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)
            .map_err(SnapshotError::io("creating", &temp))?;
        let mut out = BufWriter::with_capacity(CHUNK, file);
        out.write_all(&[0u8; HEADER_LEN])
            .map_err(SnapshotError::io("writing", &temp))?;
        Ok(Self {
            path: path.to_path_buf(),
            temp,
            out,
            hasher: crc32fast::Hasher::new(),
            len: 0,
            kind,
        })
    }

    /// Appends content.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(SnapshotError::io("writing", &self.temp))
    }

    /// Writes the header and syncs the temporary file; returns the header and the file
    /// to [`commit`](Self::commit).
    pub(crate) fn finish(mut self, version: u32) -> Result<(FileHeader, ReadyFile), SnapshotError> {
        let header = FileHeader {
            version,
            kind: self.kind,
            len: self.len,
            crc32: self.hasher.clone().finalize(),
        };
        let io = |action| SnapshotError::io(action, self.temp.clone());
        self.out.flush().map_err(io("writing"))?;
        let mut file = self
            .out
            .into_inner()
            .map_err(|e| SnapshotError::io("writing", self.temp.clone())(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io("writing"))?;
        file.write_all(&header.encode()).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))?;
        Ok((
            header,
            ReadyFile {
                path: self.path,
                temp: self.temp,
            },
        ))
    }
}

/// A complete temporary file, waiting to be renamed into place.
#[derive(Debug)]
pub(crate) struct ReadyFile {
    path: PathBuf,
    temp: PathBuf,
}

impl ReadyFile {
    /// Renames the file into place.
    pub(crate) fn commit(self) -> Result<(), SnapshotError> {
        std::fs::rename(&self.temp, &self.path).map_err(SnapshotError::io("renaming", &self.temp))
    }

    /// Removes the temporary file (after a later step failed).
    pub(crate) fn discard(self) {
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// An opened snapshot file whose header is checked and whose length matches it.
#[derive(Debug)]
pub(crate) struct CheckedFile {
    pub(crate) header: FileHeader,
    pub(crate) path: PathBuf,
    pub(crate) reader: BufReader<File>,
}

impl CheckedFile {
    /// Opens `path` and checks its header (see [`FileHeader::decode`]) and its length.
    pub(crate) fn open(
        path: &Path,
        expected: SnapshotFile,
        supported: u32,
    ) -> Result<Self, SnapshotError> {
        let file = File::open(path).map_err(SnapshotError::io("opening", path))?;
        let size = file
            .metadata()
            .map_err(SnapshotError::io("reading the size of", path))?
            .len();
        let mut reader = BufReader::with_capacity(CHUNK, file);
        let mut bytes = [0u8; HEADER_LEN];
        if size < HEADER_LEN as u64 {
            if size < MAGIC.len() as u64 {
                return Err(SnapshotError::NotASnapshot {
                    file: expected,
                    path: path.to_path_buf(),
                });
            }
            return Err(SnapshotError::Truncated {
                file: expected,
                path: path.to_path_buf(),
                expected: HEADER_LEN as u64,
                actual: size,
            });
        }
        reader
            .read_exact(&mut bytes)
            .map_err(SnapshotError::io("reading", path))?;
        let header = FileHeader::decode(&bytes, path, expected, supported)?;
        let content = size - HEADER_LEN as u64;
        if content != header.len {
            return Err(SnapshotError::Truncated {
                file: expected,
                path: path.to_path_buf(),
                expected: header.len,
                actual: content,
            });
        }
        Ok(Self {
            header,
            path: path.to_path_buf(),
            reader,
        })
    }

    /// Reads the next content chunk into `buf` (at most its length); 0 at the end.
    pub(crate) fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        self.reader
            .read(buf)
            .map_err(SnapshotError::io("reading", self.path.clone()))
    }

    /// The content's CRC32 mismatch error, if `actual` differs from the header's.
    pub(crate) fn check_crc(&self, actual: u32) -> Result<(), SnapshotError> {
        if actual != self.header.crc32 {
            return Err(SnapshotError::Checksum {
                file: self.header.kind,
                path: self.path.clone(),
                expected: self.header.crc32,
                actual,
            });
        }
        Ok(())
    }

    /// Reads the whole content and checks its CRC32.
    pub(crate) fn read_all_checked(mut self) -> Result<Vec<u8>, SnapshotError> {
        let cap = usize::try_from(self.header.len).unwrap_or(0);
        let mut content = Vec::with_capacity(cap);
        self.reader
            .read_to_end(&mut content)
            .map_err(SnapshotError::io("reading", self.path.clone()))?;
        if content.len() as u64 != self.header.len {
            // The file changed size since it was opened.
            return Err(SnapshotError::Truncated {
                file: self.header.kind,
                path: self.path.clone(),
                expected: self.header.len,
                actual: content.len() as u64,
            });
        }
        self.check_crc(crc32fast::hash(&content))?;
        Ok(content)
    }

    /// Streams the content to compute its CRC32 and checks it.
    pub(crate) fn verify_streaming(mut self) -> Result<(), SnapshotError> {
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = self.read_chunk(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        if total != self.header.len {
            return Err(SnapshotError::Truncated {
                file: self.header.kind,
                path: self.path.clone(),
                expected: self.header.len,
                actual: total,
            });
        }
        self.check_crc(hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let h = FileHeader {
            version: 1,
            kind: SnapshotFile::Memory,
            len: 1 << 30,
            crc32: 0xdead_beef,
        };
        let p = Path::new("x");
        let b = h.encode();
        assert_eq!(
            FileHeader::decode(&b, p, SnapshotFile::Memory, 1).unwrap(),
            h
        );
        assert!(matches!(
            FileHeader::decode(&b, p, SnapshotFile::Memory, 2),
            Err(SnapshotError::FormatVersion {
                found: 1,
                supported: 2,
                ..
            })
        ));
        assert!(matches!(
            FileHeader::decode(&b, p, SnapshotFile::State, 1),
            Err(SnapshotError::WrongFile { .. })
        ));
        for i in 0..HEADER_LEN {
            let mut d = b;
            d[i] ^= 0x40;
            let e = FileHeader::decode(&d, p, SnapshotFile::Memory, 1).unwrap_err();
            assert!(
                matches!(
                    e,
                    SnapshotError::NotASnapshot { .. } | SnapshotError::HeaderCorrupted { .. }
                ),
                "byte {i}: {e}"
            );
        }
    }
}
