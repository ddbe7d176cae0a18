//! Snapshots on disk: a paused VM's vCPU and VM state, its configuration and its guest memory,
//! in a directory of two integrity-checked files.
//!
//! # The format
//!
//! A snapshot directory holds:
//!
//! | file | content |
//! | --- | --- |
//! | [`STATE_FILE`] (`state.snap`) | header, then JSON: [`StateFile`] |
//! | [`MEMORY_FILE`] (`memory.snap`) | header, then guest memory: every region in address order, back to back |
//!
//! Each file starts with a 32-byte [`FileHeader`]: the magic `VCPUSNAP`, the format version
//! ([`FORMAT_VERSION`]), what the file is, the content's length and CRC32, and the header's
//! own CRC32. The state file also records the memory file's length and CRC32 and the memory
//! regions, so that files of two snapshots are never mixed. Files are written under a
//! temporary name, synced, and renamed into place (the memory file first, the state file
//! last: a directory with a state file is complete).
//!
//! The JSON holds: the format version; the host the snapshot was taken on ([`HostInfo`]: CPU
//! vendor, family/model/stepping, brand string, the KVM capabilities that matter); the
//! configuration ([`SnapshotConfig`]: topology, vPMU level, boot and max vCPU counts, interrupt
//! mode, CPU template); each
//! present vCPU's index, APIC ID and state ([`VcpuSnapshot`], [`X86VcpuState`]); the VM state
//! ([`X86VmState`]); the memory regions. KVM's own structures are stored as arrays of bytes
//! (their layout is KVM's ABI).
//!
//! # Compatibility rules
//!
//! [`read`] accepts a snapshot only if every file has an intact header of this
//! [`FORMAT_VERSION`], the expected kind and length, and a matching CRC32, and the JSON
//! parses. [`VerifiedSnapshot::check_host`] then refuses a snapshot from another CPU vendor,
//! one whose vCPUs' CPUID has feature bits this host's KVM does not support (leaves 1, 7.0
//! and 0x8000_0001; bits the snapshot's CPU template sets count as provided), one with an MSR
//! this host's KVM does not know (nor the template sets), and one whose XSAVE area
//! is larger than this host's. Every refusal is a typed [`SnapshotError`] naming what
//! differs, before anything is restored. The same family and model are not required (KVM
//! restores across them when the CPUID features are there).

mod file;
mod host;
pub mod memory;

use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use topology::CpuTopology;
use vm_memory::GuestMemoryMmap;
use vpmu::VpmuFeatureLevel;

use crate::arch::x86_64::state::X86VcpuState;
use crate::arch::x86_64::vm_state::X86VmState;
use crate::error::{SnapshotError, SnapshotFile, StateError, StateOp};
use crate::template::CpuTemplate;
use crate::{CpuidEntry, InterruptMode, VcpuConfig};

pub use file::{FileHeader, HEADER_LEN, MAGIC};
pub use host::{check_cpuid_supported, kvm_provided_cpuid, HostInfo};
pub use memory::MemoryRegionInfo;

/// The snapshot format this build writes and reads. A change to what the files hold
/// increments it; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state.snap";
/// The guest memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.snap";

/// The vCPU configuration a snapshot was taken with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotConfig {
    /// vCPUs at boot.
    pub boot_vcpu_count: u32,
    /// The most vCPUs the VM can have.
    pub max_vcpu_count: u32,
    /// The topology of all `max_vcpu_count` vCPUs.
    pub topology: CpuTopology,
    /// The vPMU level.
    pub vpmu: VpmuFeatureLevel,
    /// The interrupt mode the VM ran in (xAPIC or x2APIC; `Auto` where unknown, e.g. a
    /// snapshot written before this field existed: the restore then resolves it from the
    /// topology as a new VM would).
    #[serde(default)]
    pub interrupt_mode: InterruptMode,
    /// The CPU template the VM was built with (`None` without one, and for a snapshot
    /// written before this field existed). A restore applies it again
    /// ([`VcpuConfig::with_template`]): its KVM capabilities are checked, and vCPUs added
    /// after the restore get its CPUID and MSRs. The restored vCPUs themselves get their
    /// saved CPUID and MSRs, which already hold the template's values (its MSRs are saved
    /// beside KVM's list).
    #[serde(default)]
    pub template: Option<CpuTemplate>,
}

impl From<&VcpuConfig> for SnapshotConfig {
    /// The configuration with the interrupt mode `Auto`; the vCPU manager records the mode
    /// it resolved.
    fn from(c: &VcpuConfig) -> Self {
        Self {
            boot_vcpu_count: c.boot_vcpu_count,
            max_vcpu_count: c.max_vcpu_count,
            topology: c.topology,
            vpmu: c.vpmu,
            interrupt_mode: InterruptMode::Auto,
            template: c.template.clone(),
        }
    }
}

impl From<SnapshotConfig> for VcpuConfig {
    fn from(c: SnapshotConfig) -> Self {
        VcpuConfig {
            boot_vcpu_count: c.boot_vcpu_count,
            max_vcpu_count: c.max_vcpu_count,
            topology: c.topology,
            vpmu: c.vpmu,
            template: c.template,
            vcpu_affinity: Default::default(),
        }
    }
}

/// One present vCPU in a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// Its index in the topology.
    pub index: u32,
    /// Its APIC ID (its KVM vCPU id).
    pub apic_id: u32,
    /// Its state.
    pub state: X86VcpuState,
}

/// What a snapshot holds besides guest memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The host it was taken on.
    pub host: HostInfo,
    /// The vCPU configuration.
    pub config: SnapshotConfig,
    /// Every present vCPU (hot-added ones included), by index.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The VM-scope state.
    pub vm: X86VmState,
}

/// Where the memory file's content is described in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// The regions, in address order (the order of the memory file's content).
    pub regions: Vec<MemoryRegionInfo>,
    /// The memory file's content length.
    pub len: u64,
    /// The memory file's content CRC32.
    pub crc32: u32,
}

/// The state file's JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    /// [`FORMAT_VERSION`] when written (also in the header; the header's is checked first).
    pub format_version: u32,
    /// The memory file.
    pub memory: MemoryInfo,
    /// The state.
    pub state: SnapshotState,
}

/// Writes a snapshot of `state` and `mem` into `dir` (created if missing; existing snapshot
/// files are replaced only once the new ones are complete).
///
/// # Errors
///
/// [`SnapshotError::Io`] for a file operation, [`SnapshotError::GuestMemory`] if reading
/// guest memory fails, [`SnapshotError::Encode`] if the state does not encode. No temporary
/// file is left behind on error.
pub fn write(
    dir: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(SnapshotError::io("creating", dir))?;
    let mut memory = file::PendingFile::create(&dir.join(MEMORY_FILE), SnapshotFile::Memory)?;
    let regions = memory::dump_memory(mem, |chunk| memory.write(chunk))?;
    let (mem_header, mem_ready) = memory.finish(FORMAT_VERSION)?;
    let state_file = StateFile {
        format_version: FORMAT_VERSION,
        memory: MemoryInfo {
            regions,
            len: mem_header.len,
            crc32: mem_header.crc32,
        },
        state: state.clone(),
    };
    let written = (|| {
        let json = serde_json::to_vec(&state_file).map_err(SnapshotError::Encode)?;
        let mut st = file::PendingFile::create(&dir.join(STATE_FILE), SnapshotFile::State)?;
        st.write(&json)?;
        st.finish(FORMAT_VERSION)
    })();
    let (_, state_ready) = match written {
        Ok(r) => r,
        Err(e) => {
            mem_ready.discard();
            return Err(e);
        }
    };
    // Memory first: a state file in place means its memory file is too.
    if let Err(e) = mem_ready.commit() {
        state_ready.discard();
        return Err(e);
    }
    state_ready.commit()
}

/// `supported` plus every bit `template` sets: a template may set bits KVM does not report,
/// and a VM built with it on this host gets them too. Bits the template clears stay (the
/// VMM may set some again, e.g. topology bits, after the template).
fn with_template_bits(supported: Vec<CpuidEntry>, template: &CpuTemplate) -> Vec<CpuidEntry> {
    let mut templated = supported.clone();
    crate::template::apply_cpuid_modifiers(template, &mut templated);
    for e in &mut templated {
        if let Some(s) = topology::find_entry(&supported, e.function, e.index) {
            e.eax |= s.eax;
            e.ebx |= s.ebx;
            e.ecx |= s.ecx;
            e.edx |= s.edx;
        }
    }
    templated
}

/// A snapshot read from a directory whose files are verified: headers, lengths, CRC32s, the
/// format version, the JSON, and that the memory file is the state file's.
#[derive(Debug)]
pub struct VerifiedSnapshot {
    /// The state file's content.
    pub file: StateFile,
    memory_path: PathBuf,
}

/// Reads and verifies the snapshot in `dir` (see the module documentation's compatibility
/// rules). Reads the whole memory file once to check its CRC32; restores nothing.
///
/// # Errors
///
/// A [`SnapshotError`] naming the file and what is wrong: [`SnapshotError::Io`],
/// [`SnapshotError::NotASnapshot`], [`SnapshotError::HeaderCorrupted`],
/// [`SnapshotError::FormatVersion`], [`SnapshotError::WrongFile`],
/// [`SnapshotError::Truncated`], [`SnapshotError::Checksum`], [`SnapshotError::Parse`],
/// [`SnapshotError::MemoryFileMismatch`].
pub fn read(dir: &Path) -> Result<VerifiedSnapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let content = file::CheckedFile::open(&state_path, SnapshotFile::State, FORMAT_VERSION)?
        .read_all_checked()?;
    let state: StateFile =
        serde_json::from_slice(&content).map_err(|source| SnapshotError::Parse {
            path: state_path.clone(),
            source,
        })?;
    if state.format_version != FORMAT_VERSION {
        return Err(SnapshotError::FormatVersion {
            path: state_path,
            found: state.format_version,
            supported: FORMAT_VERSION,
        });
    }
    let memory_path = dir.join(MEMORY_FILE);
    let memory = file::CheckedFile::open(&memory_path, SnapshotFile::Memory, FORMAT_VERSION)?;
    let h = memory.header;
    let regions_len: u64 = state.memory.regions.iter().map(|r| r.size).sum();
    if h.len != state.memory.len || h.crc32 != state.memory.crc32 || regions_len != h.len {
        return Err(SnapshotError::MemoryFileMismatch {
            path: memory_path,
            expected_len: state.memory.len,
            expected_crc: state.memory.crc32,
            actual_len: h.len,
            actual_crc: h.crc32,
        });
    }
    memory.verify_streaming()?;
    Ok(VerifiedSnapshot {
        file: state,
        memory_path,
    })
}

impl VerifiedSnapshot {
    /// The state: host, configuration, vCPUs, VM state.
    pub fn state(&self) -> &SnapshotState {
        &self.file.state
    }

    /// Whether this host (CPU `host`, KVM `kvm`) can restore the snapshot: the same CPU
    /// vendor, every vCPU's CPUID feature bits supported by KVM (or set by the snapshot's CPU
    /// template), every saved MSR known to KVM (or set by the template), an XSAVE area no
    /// larger than KVM's.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::CpuVendor`], [`SnapshotError::CpuidUnsupported`],
    /// [`SnapshotError::MsrUnsupported`], [`SnapshotError::VcpuState`] with
    /// [`StateError::XsaveTooLarge`]; [`SnapshotError::VmState`] if a KVM query fails.
    pub fn check_host(&self, host: &HostInfo, kvm: &Kvm) -> Result<(), SnapshotError> {
        let state = self.state();
        host.check_vendor(&state.host)?;
        let mut supported = kvm_provided_cpuid(kvm)?;
        if let Some(t) = &state.config.template {
            supported = with_template_bits(supported, t);
        }
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(StateError::kvm(StateOp::GetMsrIndexList))?;
        // KVM's list, and the template's MSRs (saved beside it; KVM need not list them).
        let mut known: std::collections::HashSet<u32> =
            msr_list.as_slice().iter().copied().collect();
        if let Some(t) = &state.config.template {
            known.extend(t.msr_indices());
        }
        let xsave_host = usize::try_from(kvm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(std::mem::size_of::<kvm_bindings::kvm_xsave>());
        for v in &state.vcpus {
            check_cpuid_supported(v.index, &v.state.cpuid, &supported)?;
            if let Some(m) = v.state.msrs.iter().find(|m| !known.contains(&m.index)) {
                return Err(SnapshotError::MsrUnsupported {
                    vcpu_index: v.index,
                    msr: m.index,
                });
            }
            let saved = v.state.xsave.len() * std::mem::size_of::<u32>();
            if saved > xsave_host {
                return Err(SnapshotError::VcpuState {
                    index: v.index,
                    source: StateError::XsaveTooLarge {
                        saved,
                        host: xsave_host,
                    },
                });
            }
        }
        Ok(())
    }

    /// Loads the memory file into `mem`, which must have the snapshot's regions. The file's
    /// CRC32 is computed again while loading (it was verified by [`read`]; this catches a
    /// file changed since).
    ///
    /// # Errors
    ///
    /// [`SnapshotError::MemoryLayout`] if `mem`'s regions differ (nothing is written then),
    /// [`SnapshotError::Checksum`] or [`SnapshotError::Truncated`] if the file changed since
    /// [`read`] (then `mem` is partly written: discard the VM), [`SnapshotError::Io`],
    /// [`SnapshotError::GuestMemory`].
    pub fn restore_memory(&self, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let target = memory::regions(mem);
        if target != self.file.memory.regions {
            return Err(SnapshotError::MemoryLayout {
                saved: self
                    .file
                    .memory
                    .regions
                    .iter()
                    .map(|r| (r.guest_addr, r.size))
                    .collect(),
                target: target.iter().map(|r| (r.guest_addr, r.size)).collect(),
            });
        }
        let mut f =
            file::CheckedFile::open(&self.memory_path, SnapshotFile::Memory, FORMAT_VERSION)?;
        let mut hasher = crc32fast::Hasher::new();
        memory::load_memory(mem, &self.file.memory.regions, |buf| {
            let n = f.read_chunk(buf)?;
            hasher.update(&buf[..n]);
            Ok(n)
        })?;
        f.check_crc(hasher.finalize())
    }
}
