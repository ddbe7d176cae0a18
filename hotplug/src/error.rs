//! The crate's one error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::{msg_type_name, CpuOp, MsgType, MSG_MAGIC_VERSION};

/// A step of an upcall conversation; errors say where they happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Opening the stream to the vsock muxer.
    Connect,
    /// The hybrid-vsock `CONNECT <port>\n` / `OK <port>\n` exchange.
    Handshake,
    /// Sending (client) or receiving (guest) the service byte `d`.
    ServiceByte,
    /// Receiving (client) or sending (guest) the 1024-byte greeting.
    Greeting,
    /// Sending (client) or receiving (guest) a request message.
    Request,
    /// Receiving (client) or sending (guest) the reply message.
    Reply,
    /// Between two requests, when nothing may arrive.
    Idle,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Handshake => "the CONNECT handshake",
            Phase::ServiceByte => "the service byte",
            Phase::Greeting => "the greeting",
            Phase::Request => "the request",
            Phase::Reply => "the reply",
            Phase::Idle => "the time between two requests",
        })
    }
}

/// What the client was doing when a second caller got [`HotplugError::Busy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Operation {
    /// An explicit [`connect`](crate::UpcallClient::connect) or
    /// [`disconnect`](crate::UpcallClient::disconnect).
    Connect,
    /// An `ADD_CPU` or `DEL_CPU` request (including its reconnect, if one was needed).
    Cpu(CpuOp),
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::Connect => f.write_str("connect"),
            Operation::Cpu(op) => write!(f, "{op} request"),
        }
    }
}

impl From<CpuOp> for Operation {
    fn from(op: CpuOp) -> Self {
        Operation::Cpu(op)
    }
}

/// Everything that can go wrong in this crate: request validation, the connection, the wire
/// format and the guest's answer.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// A CPU request with no APIC IDs.
    #[error("no APIC IDs given: a CPU request carries between 1 and 255 APIC IDs")]
    NoApicIds,

    /// More APIC IDs than the one-byte `count` field can carry.
    #[error("{count} APIC IDs given, but a CPU request carries at most 255: split the request")]
    TooManyApicIds {
        /// How many were given.
        count: usize,
    },

    /// APIC ID 255 (the xAPIC broadcast ID) cannot name a CPU.
    #[error(
        "APIC ID {apic_id} cannot be hot-plugged: xAPIC IDs must be below 255 \
         (255 is the broadcast ID); use a topology whose largest APIC ID is below 255"
    )]
    InvalidApicId {
        /// The offending APIC ID.
        apic_id: u8,
    },

    /// The same APIC ID twice in one request.
    #[error("APIC ID {apic_id} is listed twice in one request: list each CPU once")]
    DuplicateApicId {
        /// The repeated APIC ID.
        apic_id: u8,
    },

    /// Another operation is in flight; requests are never queued.
    #[error("an upcall {in_flight} is already in flight: wait for it to finish and retry")]
    Busy {
        /// What the client is busy with.
        in_flight: Operation,
    },

    /// No (complete) answer within the configured time. The connection was dropped.
    #[error(
        "no complete upcall message during {during} within {timeout:?}: the connection was \
         dropped (the next request reconnects); if this was a request, the guest may still act \
         on it, so check the guest's CPUs before retrying"
    )]
    Timeout {
        /// Where it happened.
        during: Phase,
        /// The limit that ran out.
        timeout: Duration,
    },

    /// The peer closed or reset the connection before a whole message went through.
    #[error(
        "the upcall connection was closed or reset during {during} after {bytes} of the \
         expected bytes: this is NOT a success; if this was a request, the guest may have acted \
         on part of it, so check the guest's CPUs before retrying"
    )]
    ConnectionReset {
        /// Where it happened.
        during: Phase,
        /// How many bytes of the message had gone through (sent or received).
        bytes: usize,
    },

    /// Any other I/O error on an established stream.
    #[error("upcall I/O error during {during}: {source}")]
    Io {
        /// Where it happened.
        during: Phase,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The vsock muxer's Unix socket could not be opened.
    #[error(
        "cannot connect to the vsock muxer socket {}: {source}; check that the VMM's vsock \
         device is up and uses this path",
        path.display()
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The muxer closed the stream instead of answering `CONNECT <port>`: the guest does not
    /// listen on that port (yet).
    #[error(
        "the vsock muxer closed the connection after `CONNECT {port}`: nothing listens on guest \
         port {port} yet (has the guest kernel booted, with the upcall patches?)"
    )]
    HandshakeClosed {
        /// The guest port asked for.
        port: u32,
    },

    /// The muxer answered `CONNECT <port>` with something other than `OK ...`.
    #[error(
        "the vsock muxer refused `CONNECT {port}`: it answered {reply:?} instead of `OK <port>`"
    )]
    HandshakeRejected {
        /// The guest port asked for.
        port: u32,
        /// The answer (at most [`HANDSHAKE_LINE_LIMIT`](crate::HANDSHAKE_LINE_LIMIT) bytes,
        /// lossily decoded).
        reply: String,
    },

    /// The muxer's answer line did not end within the limit.
    #[error(
        "the vsock muxer's answer to CONNECT has no newline within {limit} bytes: the socket is \
         probably not a hybrid-vsock muxer"
    )]
    HandshakeLineTooLong {
        /// The limit in bytes.
        limit: usize,
    },

    /// A custom [`UpcallConnector`](crate::UpcallConnector) failed.
    #[error("the upcall connector failed: {reason}")]
    Connector {
        /// What went wrong, in the connector's words.
        reason: String,
        /// Whether the client may retry (within its budget).
        retryable: bool,
    },

    /// Every connection attempt of the budget failed.
    #[error(
        "gave up connecting to the guest's upcall server after {attempts} attempts; the last \
         error was: {last}"
    )]
    ConnectBudgetExhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last: Box<HotplugError>,
    },

    /// Bytes arrived while no request was in flight: a duplicate, late or unsolicited reply.
    #[error(
        "the guest sent {bytes} or more bytes while no request was in flight (a duplicate, late \
         or unsolicited reply): they were discarded with the connection and never taken as an \
         answer, and the fresh connection got more of them; the guest's upcall server \
         misbehaves, check its kernel log"
    )]
    UnsolicitedData {
        /// How many bytes were found (a lower bound).
        bytes: usize,
    },

    /// A message whose `magic_version` is not [`MSG_MAGIC_VERSION`].
    #[error(
        "upcall message during {during} has magic 0x{found:08x}, expected 0x{:08x}: the peer \
         does not speak this upcall version",
        MSG_MAGIC_VERSION
    )]
    BadMagic {
        /// Where it happened.
        during: Phase,
        /// The magic found.
        found: u32,
    },

    /// The greeting has a non-zero `msg_size`, `msg_type` or `msg_flags`.
    #[error("the guest's upcall greeting has {field} = {value}, expected 0: not an upcall server")]
    BadGreeting {
        /// Which header field.
        field: &'static str,
        /// Its value.
        value: u32,
    },

    /// A message of another type than expected (for a reply: not the request's type).
    #[error(
        "expected a {expected} message, got type {}: the guest answered another request",
        msg_type_name(*.found)
    )]
    UnexpectedMsgType {
        /// The type expected.
        expected: MsgType,
        /// The raw type found.
        found: u32,
    },

    /// A message whose `msg_size` does not match its type and result.
    #[error("a {msg_type} message has msg_size {found}, expected {expected}")]
    UnexpectedMsgSize {
        /// The message's type.
        msg_type: MsgType,
        /// The size expected.
        expected: u32,
        /// The size found.
        found: u32,
    },

    /// A success reply whose `apic_index` is not the number of CPUs requested.
    #[error(
        "the guest acknowledged {op} with apic_index {found}, but {expected} CPUs were \
         requested: a stale or foreign reply; check the guest's CPUs"
    )]
    ApicIndexMismatch {
        /// The request.
        op: CpuOp,
        /// The request's count.
        expected: u32,
        /// The reply's `apic_index`.
        found: u32,
    },

    /// A reply whose result is neither 0 nor a negative errno.
    #[error(
        "the guest answered {op} with result {result}, which is neither 0 nor a negative errno"
    )]
    InvalidResult {
        /// The request.
        op: CpuOp,
        /// The raw result.
        result: i32,
    },

    /// The guest refused or failed the request; `errno` is positive (22 for `-EINVAL`).
    ///
    /// For a request of several CPUs, which of them the guest handled is unknown: it stops at
    /// the first failure without undoing the CPUs before it, and its failure reply does not
    /// say how far it got. A request of one CPU that fails changes nothing.
    #[error(
        "the guest refused the CPU request with errno {errno} ({}); the guest handles the CPUs \
         of a request in order and stops at the first it cannot, keeping the ones before it \
         online (ADD_CPU) or offline (DEL_CPU), and its reply does not say how many: for a \
         request of several CPUs the progress is unknown, so check the guest's CPUs, or send \
         one APIC ID per request to know exactly; common causes: an APIC ID already present or \
         a CPU that did not come online (ADD_CPU), an unknown APIC ID, the boot CPU or every \
         CPU (DEL_CPU); see the guest's kernel log",
        errno_text(*.errno)
    )]
    GuestError {
        /// The positive errno (the reply's result is `-errno`).
        errno: i32,
    },

    /// (guest side) A service byte other than `d`.
    #[error("the client asked for upcall service byte 0x{byte:02x}, only `d` (0x64) is served")]
    UnknownService {
        /// The byte received.
        byte: u8,
    },

    /// (guest side) The vsock muxer stub could not listen on its socket.
    #[error("cannot listen on {}: {source}; remove a stale socket file or pick another path", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl HotplugError {
    /// The guest's positive errno when the guest refused the request.
    pub fn guest_errno(&self) -> Option<i32> {
        match self {
            HotplugError::GuestError { errno } => Some(*errno),
            _ => None,
        }
    }

    /// Whether a connection attempt that failed with this error may be tried again.
    ///
    /// Missing sockets, refused or closed handshakes and connections dropped before the greeting
    /// are retryable (the guest may not be listening yet); timeouts and protocol errors are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            HotplugError::Connect { .. }
            | HotplugError::HandshakeClosed { .. }
            | HotplugError::HandshakeRejected { .. } => true,
            HotplugError::Connector { retryable, .. } => *retryable,
            HotplugError::ConnectionReset { during, .. } | HotplugError::Io { during, .. } => {
                matches!(
                    during,
                    Phase::Connect | Phase::Handshake | Phase::ServiceByte | Phase::Greeting
                )
            }
            _ => false,
        }
    }

    /// Whether the guest may have acted on (part of) a request that failed with this error:
    /// the reply was lost, not refused. The caller must find out what the guest did before
    /// rolling back.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            HotplugError::Timeout { during, .. } | HotplugError::ConnectionReset { during, .. } => {
                matches!(during, Phase::Request | Phase::Reply)
            }
            HotplugError::Io { during, .. } => matches!(during, Phase::Request | Phase::Reply),
            HotplugError::BadMagic { during, .. } => *during == Phase::Reply,
            HotplugError::UnexpectedMsgType { .. }
            | HotplugError::UnexpectedMsgSize { .. }
            | HotplugError::ApicIndexMismatch { .. }
            | HotplugError::InvalidResult { .. } => true,
            _ => false,
        }
    }
}

/// The text of an errno, e.g. "Invalid argument (os error 22)".
fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// Maps an I/O error on an established stream to the error of this crate.
///
/// `bytes` is how many bytes of the current message had gone through.
pub(crate) fn io_error(
    during: Phase,
    bytes: usize,
    timeout: Duration,
    e: io::Error,
) -> HotplugError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HotplugError::Timeout { during, timeout }
        }
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected
        | io::ErrorKind::UnexpectedEof => HotplugError::ConnectionReset { during, bytes },
        _ => HotplugError::Io { during, source: e },
    }
}
