//! The upcall wire format: fixed 1024-byte, zero-padded, little-endian messages.
//!
//! Layout (see the repository's `docs/upcall-protocol.md`):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | `magic_version` = [`MSG_MAGIC_VERSION`] |
//! | 4 | 4 | `msg_size`: payload bytes |
//! | 8 | 4 | `msg_type`: [`MsgType`] |
//! | 12 | 4 | `msg_flags` = 0 |
//! | 16.. | | payload |
//!
//! CPU request payload (x86_64, `msg_size` = 258): `count: u8` at 16, `apic_ver: u8` at 17,
//! `apic_ids: [u8; 256]` at 18. Reply payload: `result: i32` at 16, `apic_index: u32` at 20
//! (`msg_size` = 4 on success, 0 on failure).
//!
//! Decoding is strict and never allocates: every function here works on one [`MsgBuf`].

use std::io::{self, Read};

use crate::error::{HotplugError, Phase};

/// `magic_version` of every message: "DM" and protocol version 1.0.
pub const MSG_MAGIC_VERSION: u32 = 0x444D_0100;
/// Every message, in both directions, is exactly this many bytes.
pub const MSG_SIZE: usize = 1024;
/// Size of [`MsgHeader`] on the wire.
pub const MSG_HEADER_SIZE: usize = 16;
/// Number of APIC ID slots in a CPU request (only the first `count` are used).
pub const APIC_ID_SLOTS: usize = 256;
// The request's msg_size counts the slots (written as a literal to stay a `u32` constant).
const _: () = assert!(CPU_REQUEST_PAYLOAD_SIZE as usize == 2 + APIC_ID_SLOTS);
/// `msg_size` of an x86_64 CPU request: `count` + `apic_ver` + 256 APIC IDs.
pub const CPU_REQUEST_PAYLOAD_SIZE: u32 = 2 + 256;
/// `msg_size` of a successful CPU reply (the guest counts only `apic_index`).
pub const CPU_REPLY_SUCCESS_SIZE: u32 = 4;
/// `msg_size` of a failed CPU reply.
pub const CPU_REPLY_FAILURE_SIZE: u32 = 0;
/// The most APIC IDs one request can carry (`count` is a `u8`).
pub const MAX_APIC_IDS_PER_REQUEST: usize = u8::MAX as usize;
/// The xAPIC broadcast ID; never a CPU's APIC ID.
pub const BROADCAST_APIC_ID: u8 = 0xFF;
/// The APIC version Dragonball writes into the MP table (integrated APIC).
pub const DEFAULT_APIC_VERSION: u8 = 0x14;
/// The guest vsock port of the upcall server (0xDB).
pub const UPCALL_GUEST_PORT: u32 = 219;
/// The service byte that selects the device-manager service.
pub const DEV_MGR_SERVICE_BYTE: u8 = b'd';

/// One message on the wire.
pub type MsgBuf = [u8; MSG_SIZE];

/// The documented payload layouts as `repr(C)` structs after a [`MsgHeader`] (never built:
/// messages are encoded field by field, little-endian), from which [`offset`] takes the field
/// offsets.
#[allow(dead_code)] // Only their layout is used.
mod layout {
    use super::{MsgHeader, APIC_ID_SLOTS};

    /// An x86_64 CPU request.
    #[repr(C)]
    pub struct CpuRequest {
        pub header: MsgHeader,
        pub count: u8,
        pub apic_ver: u8,
        pub apic_ids: [u8; APIC_ID_SLOTS],
    }

    /// A CPU reply.
    #[repr(C)]
    pub struct CpuReply {
        pub header: MsgHeader,
        pub result: i32,
        pub apic_index: u32,
    }
}

/// Byte offsets of the fields, from the documented layout.
pub mod offset {
    use std::mem::offset_of;

    use super::layout::{CpuReply, CpuRequest};
    use super::MsgHeader as Header;

    /// `magic_version: u32`.
    pub const MAGIC_VERSION: usize = offset_of!(Header, magic_version);
    /// `msg_size: u32`.
    pub const MSG_SIZE: usize = offset_of!(Header, msg_size);
    /// `msg_type: u32`.
    pub const MSG_TYPE: usize = offset_of!(Header, msg_type);
    /// `msg_flags: u32`.
    pub const MSG_FLAGS: usize = offset_of!(Header, msg_flags);
    /// CPU request `count: u8`.
    pub const CPU_COUNT: usize = offset_of!(CpuRequest, count);
    /// CPU request `apic_ver: u8`.
    pub const CPU_APIC_VER: usize = offset_of!(CpuRequest, apic_ver);
    /// CPU request `apic_ids: [u8; 256]`.
    pub const CPU_APIC_IDS: usize = offset_of!(CpuRequest, apic_ids);
    /// Reply `result: i32`.
    pub const REPLY_RESULT: usize = offset_of!(CpuReply, result);
    /// Reply `apic_index: u32`.
    pub const REPLY_APIC_INDEX: usize = offset_of!(CpuReply, apic_index);
}

// The structs have the documented offsets and sizes.
const _: () = assert!(std::mem::size_of::<MsgHeader>() == MSG_HEADER_SIZE);
const _: () = assert!(offset::MSG_FLAGS == 12 && offset::CPU_COUNT == 16);
const _: () = assert!(offset::CPU_APIC_IDS == 18 && offset::REPLY_APIC_INDEX == 20);
// Every fixed field lies inside one message.
const _: () = assert!(offset::CPU_APIC_IDS + APIC_ID_SLOTS <= MSG_SIZE);
const _: () = assert!(offset::REPLY_APIC_INDEX + 4 <= MSG_SIZE);

/// Reads the little-endian `u32` at a fixed field offset.
fn read_u32(buf: &MsgBuf, at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Writes a little-endian `u32` at a fixed field offset.
fn write_u32(buf: &mut MsgBuf, at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// Message types (`msg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum MsgType {
    /// The greeting the guest sends once the service byte arrived.
    Connect = 0,
    /// Online CPUs.
    AddCpu = 1,
    /// Offline CPUs.
    DelCpu = 2,
    /// Defined, not handled by the guest patches.
    AddMem = 3,
    /// Defined, not handled by the guest patches.
    DelMem = 4,
    /// virtio-mmio device add.
    AddMmio = 5,
    /// virtio-mmio device remove.
    DelMmio = 6,
    /// PCI device add.
    AddPci = 7,
    /// PCI device remove.
    DelPci = 8,
}

impl MsgType {
    /// The raw `msg_type` value.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// The type for a raw `msg_type`, `None` for values the protocol does not define.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => MsgType::Connect,
            1 => MsgType::AddCpu,
            2 => MsgType::DelCpu,
            3 => MsgType::AddMem,
            4 => MsgType::DelMem,
            5 => MsgType::AddMmio,
            6 => MsgType::DelMmio,
            7 => MsgType::AddPci,
            8 => MsgType::DelPci,
            _ => return None,
        })
    }

    /// The protocol's name, e.g. `ADD_CPU`.
    pub const fn name(self) -> &'static str {
        match self {
            MsgType::Connect => "CONNECT",
            MsgType::AddCpu => "ADD_CPU",
            MsgType::DelCpu => "DEL_CPU",
            MsgType::AddMem => "ADD_MEM",
            MsgType::DelMem => "DEL_MEM",
            MsgType::AddMmio => "ADD_MMIO",
            MsgType::DelMmio => "DEL_MMIO",
            MsgType::AddPci => "ADD_PCI",
            MsgType::DelPci => "DEL_PCI",
        }
    }
}

impl std::fmt::Display for MsgType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Names a raw `msg_type` for messages: `ADD_CPU (1)` or `unknown (77)`.
pub fn msg_type_name(raw: u32) -> String {
    match MsgType::from_raw(raw) {
        Some(t) => format!("{} ({raw})", t.name()),
        None => format!("unknown ({raw})"),
    }
}

/// The two CPU operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CpuOp {
    /// `ADD_CPU`: the guest registers and onlines the CPUs.
    Add,
    /// `DEL_CPU`: the guest offlines and unregisters the CPUs.
    Del,
}

impl CpuOp {
    /// The message type of this operation.
    pub const fn msg_type(self) -> MsgType {
        match self {
            CpuOp::Add => MsgType::AddCpu,
            CpuOp::Del => MsgType::DelCpu,
        }
    }

    /// The operation of a message type, `None` for non-CPU types.
    pub const fn from_msg_type(t: MsgType) -> Option<Self> {
        match t {
            MsgType::AddCpu => Some(CpuOp::Add),
            MsgType::DelCpu => Some(CpuOp::Del),
            _ => None,
        }
    }
}

impl std::fmt::Display for CpuOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.msg_type().name())
    }
}

/// The 16-byte header of every message, with raw fields as they are on the wire (in their
/// wire order: `repr(C)` gives [`offset`] their offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct MsgHeader {
    /// Must be [`MSG_MAGIC_VERSION`].
    pub magic_version: u32,
    /// Payload size in bytes.
    pub msg_size: u32,
    /// Raw [`MsgType`] (kept raw: a peer may send undefined values).
    pub msg_type: u32,
    /// Always 0 in this protocol version.
    pub msg_flags: u32,
}

impl MsgHeader {
    /// A header with the right magic and no flags.
    pub const fn new(msg_type: MsgType, msg_size: u32) -> Self {
        MsgHeader {
            magic_version: MSG_MAGIC_VERSION,
            msg_size,
            msg_type: msg_type.raw(),
            msg_flags: 0,
        }
    }

    /// Reads the header fields of a message (no validation).
    pub fn read_from(buf: &MsgBuf) -> Self {
        MsgHeader {
            magic_version: read_u32(buf, offset::MAGIC_VERSION),
            msg_size: read_u32(buf, offset::MSG_SIZE),
            msg_type: read_u32(buf, offset::MSG_TYPE),
            msg_flags: read_u32(buf, offset::MSG_FLAGS),
        }
    }

    /// Writes the header fields into a message.
    pub fn write_to(&self, buf: &mut MsgBuf) {
        write_u32(buf, offset::MAGIC_VERSION, self.magic_version);
        write_u32(buf, offset::MSG_SIZE, self.msg_size);
        write_u32(buf, offset::MSG_TYPE, self.msg_type);
        write_u32(buf, offset::MSG_FLAGS, self.msg_flags);
    }

    /// The message type, `None` if the raw value is undefined.
    pub const fn kind(&self) -> Option<MsgType> {
        MsgType::from_raw(self.msg_type)
    }

    /// Whether `magic_version` is [`MSG_MAGIC_VERSION`].
    pub const fn has_valid_magic(&self) -> bool {
        self.magic_version == MSG_MAGIC_VERSION
    }

    /// Checks the magic, reporting `during` on failure.
    ///
    /// # Errors
    ///
    /// [`HotplugError::BadMagic`] when `magic_version` is not [`MSG_MAGIC_VERSION`].
    pub fn check_magic(&self, during: Phase) -> Result<(), HotplugError> {
        if self.has_valid_magic() {
            Ok(())
        } else {
            Err(HotplugError::BadMagic {
                during,
                found: self.magic_version,
            })
        }
    }
}

/// The greeting the guest sends after the service byte: magic, everything else 0.
pub fn encode_greeting() -> MsgBuf {
    let mut buf = [0u8; MSG_SIZE];
    MsgHeader::new(MsgType::Connect, 0).write_to(&mut buf);
    buf
}

/// Checks a greeting: magic, and `msg_size`, `msg_type`, `msg_flags` all 0.
///
/// # Errors
///
/// [`HotplugError::BadMagic`] for a wrong magic, [`HotplugError::BadGreeting`] naming the
/// first header field that is not 0.
pub fn decode_greeting(buf: &MsgBuf) -> Result<(), HotplugError> {
    let header = MsgHeader::read_from(buf);
    header.check_magic(Phase::Greeting)?;
    if header.msg_type != MsgType::Connect.raw() {
        return Err(HotplugError::BadGreeting {
            field: "msg_type",
            value: header.msg_type,
        });
    }
    if header.msg_size != 0 {
        return Err(HotplugError::BadGreeting {
            field: "msg_size",
            value: header.msg_size,
        });
    }
    if header.msg_flags != 0 {
        return Err(HotplugError::BadGreeting {
            field: "msg_flags",
            value: header.msg_flags,
        });
    }
    Ok(())
}

/// Checks a list of APIC IDs for a CPU request: 1 to 255 of them, each below 255, no repeats.
///
/// # Errors
///
/// [`HotplugError::NoApicIds`] (empty), [`HotplugError::TooManyApicIds`] (over 255),
/// [`HotplugError::InvalidApicId`] (255, the broadcast ID), [`HotplugError::DuplicateApicId`]
/// (the first repeated ID).
pub fn validate_apic_ids(apic_ids: &[u8]) -> Result<(), HotplugError> {
    if apic_ids.is_empty() {
        return Err(HotplugError::NoApicIds);
    }
    if apic_ids.len() > MAX_APIC_IDS_PER_REQUEST {
        return Err(HotplugError::TooManyApicIds {
            count: apic_ids.len(),
        });
    }
    let mut seen = [false; APIC_ID_SLOTS];
    for &apic_id in apic_ids {
        if apic_id == BROADCAST_APIC_ID {
            return Err(HotplugError::InvalidApicId { apic_id });
        }
        let slot = &mut seen[usize::from(apic_id)];
        if *slot {
            return Err(HotplugError::DuplicateApicId { apic_id });
        }
        *slot = true;
    }
    Ok(())
}

/// The payload of an `ADD_CPU` / `DEL_CPU` request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CpuDevRequest {
    /// The APIC IDs to add or remove, in the order the guest handles them.
    pub apic_ids: Vec<u8>,
    /// The APIC version written in the MP table (Dragonball: [`DEFAULT_APIC_VERSION`]).
    pub apic_ver: u8,
}

impl CpuDevRequest {
    /// A validated request.
    ///
    /// # Errors
    ///
    /// As [`validate_apic_ids`].
    pub fn new(apic_ids: &[u8], apic_ver: u8) -> Result<Self, HotplugError> {
        validate_apic_ids(apic_ids)?;
        Ok(CpuDevRequest {
            apic_ids: apic_ids.to_vec(),
            apic_ver,
        })
    }

    /// Checks the APIC IDs again (the fields are public).
    ///
    /// # Errors
    ///
    /// As [`validate_apic_ids`].
    pub fn validate(&self) -> Result<(), HotplugError> {
        validate_apic_ids(&self.apic_ids)
    }

    /// The `count` field: how many APIC IDs (saturates at 255; validation rejects more).
    pub fn count(&self) -> u8 {
        u8::try_from(self.apic_ids.len()).unwrap_or(u8::MAX)
    }
}

/// Encodes a CPU request message after validating it.
///
/// # Errors
///
/// As [`validate_apic_ids`]; nothing is encoded then.
pub fn encode_cpu_request(op: CpuOp, request: &CpuDevRequest) -> Result<MsgBuf, HotplugError> {
    request.validate()?;
    let mut buf = [0u8; MSG_SIZE];
    MsgHeader::new(op.msg_type(), CPU_REQUEST_PAYLOAD_SIZE).write_to(&mut buf);
    buf[offset::CPU_COUNT] = request.count();
    buf[offset::CPU_APIC_VER] = request.apic_ver;
    let ids = &mut buf[offset::CPU_APIC_IDS..offset::CPU_APIC_IDS + request.apic_ids.len()];
    ids.copy_from_slice(&request.apic_ids);
    Ok(buf)
}

/// The CPU payload of a message as the guest kernel sees it: raw, unvalidated, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawCpuPayload<'a> {
    /// The `count` field.
    pub count: u8,
    /// The `apic_ver` field.
    pub apic_ver: u8,
    /// The first `count` APIC ID slots.
    pub apic_ids: &'a [u8],
}

impl<'a> RawCpuPayload<'a> {
    /// Reads the CPU payload fields of a message (no validation; `count` <= 255 < 256 slots).
    pub fn read_from(buf: &'a MsgBuf) -> Self {
        let count = buf[offset::CPU_COUNT];
        let start = offset::CPU_APIC_IDS;
        RawCpuPayload {
            count,
            apic_ver: buf[offset::CPU_APIC_VER],
            apic_ids: &buf[start..start + usize::from(count)],
        }
    }
}

/// Strictly decodes a CPU request: magic, type `ADD_CPU`/`DEL_CPU`, `msg_size` 258, valid IDs.
///
/// # Errors
///
/// [`HotplugError::BadMagic`], [`HotplugError::UnexpectedMsgType`] (not a CPU request),
/// [`HotplugError::UnexpectedMsgSize`] (not 258), or the errors of [`validate_apic_ids`].
pub fn decode_cpu_request(buf: &MsgBuf) -> Result<(CpuOp, CpuDevRequest), HotplugError> {
    let header = MsgHeader::read_from(buf);
    header.check_magic(Phase::Request)?;
    let op =
        header
            .kind()
            .and_then(CpuOp::from_msg_type)
            .ok_or(HotplugError::UnexpectedMsgType {
                expected: MsgType::AddCpu,
                found: header.msg_type,
            })?;
    if header.msg_size != CPU_REQUEST_PAYLOAD_SIZE {
        return Err(HotplugError::UnexpectedMsgSize {
            msg_type: op.msg_type(),
            expected: CPU_REQUEST_PAYLOAD_SIZE,
            found: header.msg_size,
        });
    }
    let raw = RawCpuPayload::read_from(buf);
    Ok((op, CpuDevRequest::new(raw.apic_ids, raw.apic_ver)?))
}

/// The reply's `result` field (0 or a negative errno), read without validation.
pub fn reply_result(buf: &MsgBuf) -> i32 {
    read_u32(buf, offset::REPLY_RESULT) as i32
}

/// The reply's `apic_index` field, read without validation (stale unless result is 0).
pub fn reply_apic_index(buf: &MsgBuf) -> u32 {
    read_u32(buf, offset::REPLY_APIC_INDEX)
}

/// Writes a reply's `result` field.
pub fn write_reply_result(buf: &mut MsgBuf, result: i32) {
    write_u32(buf, offset::REPLY_RESULT, result as u32);
}

/// Writes a reply's `apic_index` field.
pub fn write_reply_apic_index(buf: &mut MsgBuf, apic_index: u32) {
    write_u32(buf, offset::REPLY_APIC_INDEX, apic_index);
}

/// A successful CPU reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CpuDevReply {
    /// The operation it answers.
    pub op: CpuOp,
    /// The `apic_index` field: how many CPUs the guest handled (the request's count).
    pub apic_index: u32,
}

/// Strictly decodes the reply to a CPU request of `op` with `count` APIC IDs.
///
/// Reads only what the reply's type and result promise: a failure reply's `msg_size` and
/// `apic_index` are not looked at (the guest leaves them stale).
///
/// # Errors
///
/// [`HotplugError::BadMagic`], [`HotplugError::UnexpectedMsgType`] (not the request's
/// type), [`HotplugError::GuestError`] (negative result), [`HotplugError::InvalidResult`]
/// (positive or `i32::MIN`), [`HotplugError::UnexpectedMsgSize`] (success without size 4),
/// [`HotplugError::ApicIndexMismatch`] (success with `apic_index != count`).
pub fn decode_cpu_reply(buf: &MsgBuf, op: CpuOp, count: u8) -> Result<CpuDevReply, HotplugError> {
    let header = MsgHeader::read_from(buf);
    header.check_magic(Phase::Reply)?;
    if header.msg_type != op.msg_type().raw() {
        return Err(HotplugError::UnexpectedMsgType {
            expected: op.msg_type(),
            found: header.msg_type,
        });
    }
    let result = reply_result(buf);
    if result != 0 {
        return match result.checked_neg() {
            Some(errno) if errno > 0 => Err(HotplugError::GuestError { errno }),
            _ => Err(HotplugError::InvalidResult { op, result }),
        };
    }
    if header.msg_size != CPU_REPLY_SUCCESS_SIZE {
        return Err(HotplugError::UnexpectedMsgSize {
            msg_type: op.msg_type(),
            expected: CPU_REPLY_SUCCESS_SIZE,
            found: header.msg_size,
        });
    }
    let apic_index = reply_apic_index(buf);
    if apic_index != u32::from(count) {
        return Err(HotplugError::ApicIndexMismatch {
            op,
            expected: u32::from(count),
            found: apic_index,
        });
    }
    Ok(CpuDevReply { op, apic_index })
}

/// How far [`MessageReader::read_from`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadProgress {
    /// More bytes are needed; this many are buffered.
    Partial(usize),
    /// The whole message is buffered.
    Complete,
    /// The stream ended after this many bytes of the message.
    Eof(usize),
}

/// Accumulates exactly one message from a stream, whatever the read sizes.
///
/// It owns one fixed buffer and never asks the stream for more than the bytes still missing,
/// so it neither allocates nor consumes the next message.
#[derive(Clone)]
pub struct MessageReader {
    buf: MsgBuf,
    filled: usize,
}

impl Default for MessageReader {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MessageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageReader")
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

impl MessageReader {
    /// An empty reader.
    pub const fn new() -> Self {
        MessageReader {
            buf: [0u8; MSG_SIZE],
            filled: 0,
        }
    }

    /// How many bytes of the message are buffered.
    pub const fn filled(&self) -> usize {
        self.filled
    }

    /// Does one `read` for the missing bytes (retrying on `Interrupted`).
    ///
    /// # Errors
    ///
    /// The reader's I/O errors (including read timeouts) as they are, except `Interrupted`;
    /// the bytes buffered so far stay, so the caller may call again.
    pub fn read_from<R: Read + ?Sized>(&mut self, reader: &mut R) -> io::Result<ReadProgress> {
        if self.filled == MSG_SIZE {
            return Ok(ReadProgress::Complete);
        }
        loop {
            match reader.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Ok(ReadProgress::Eof(self.filled)),
                Ok(n) => {
                    // A reader reporting more than it was given is broken; never index past
                    // the buffer because of it.
                    self.filled = self.filled.saturating_add(n).min(MSG_SIZE);
                    return Ok(if self.filled == MSG_SIZE {
                        ReadProgress::Complete
                    } else {
                        ReadProgress::Partial(self.filled)
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The message, once complete.
    pub fn message(&self) -> Option<&MsgBuf> {
        (self.filled == MSG_SIZE).then_some(&self.buf)
    }

    /// Forgets the buffered bytes, to read the next message.
    pub fn reset(&mut self) {
        self.filled = 0;
    }
}

/// Reads one whole message from a blocking stream (no deadline of its own).
///
/// # Errors
///
/// End of stream before the first byte or part-way gives [`HotplugError::ConnectionReset`]
/// with the number of bytes received; a read timeout set on the stream gives
/// [`HotplugError::Timeout`] (with a zero `timeout`, as this function does not know it);
/// other read errors give [`HotplugError::Io`] (or `ConnectionReset` for resets).
pub fn read_message<R: Read + ?Sized>(
    reader: &mut R,
    during: Phase,
) -> Result<MsgBuf, HotplugError> {
    let mut msg = MessageReader::new();
    loop {
        match msg.read_from(reader) {
            Ok(ReadProgress::Complete) => {
                return msg.message().copied().ok_or(HotplugError::ConnectionReset {
                    during,
                    bytes: msg.filled(),
                })
            }
            Ok(ReadProgress::Partial(_)) => {}
            Ok(ReadProgress::Eof(bytes)) => {
                return Err(HotplugError::ConnectionReset { during, bytes })
            }
            Err(e) => {
                return Err(crate::error::io_error(
                    during,
                    msg.filled(),
                    std::time::Duration::ZERO,
                    e,
                ))
            }
        }
    }
}
