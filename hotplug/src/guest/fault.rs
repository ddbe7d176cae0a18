//! The guest's misbehaviours on demand ([`GuestFault`]) and their `vcpuctl chaos` names.

use std::time::Duration;

use super::{EINVAL, EIO};
use crate::protocol::{CpuOp, MsgBuf};

/// A misbehaviour of the guest, queued with [`GuestUpcallServer::inject_fault`]; each is used
/// once.
///
/// Faults act at one of three moments: when a connection opens ([`SlowGreeting`]), while a
/// connection waits between requests ([`StrayReply`], [`NeverRead`]), or when a request
/// arrives (all others). At each moment the server takes the first queued fault for that
/// moment (and, for [`FailCpu`], that operation).
///
/// [`SlowGreeting`]: GuestFault::SlowGreeting
/// [`StrayReply`]: GuestFault::StrayReply
/// [`NeverRead`]: GuestFault::NeverRead
/// [`FailCpu`]: GuestFault::FailCpu
/// [`GuestUpcallServer::inject_fault`]: super::GuestUpcallServer::inject_fault
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestFault {
    /// Read the request and never answer; keep the connection open until the client closes it.
    Silent,
    /// Read the request and close the connection without acting or answering.
    HangUp,
    /// Act on the request, send only the first `bytes` bytes of the reply, then close.
    TruncatedReply {
        /// Bytes of the reply sent (capped at 1024).
        bytes: usize,
    },
    /// Answer with these bytes instead of acting on the request.
    RawReply(Box<MsgBuf>),
    /// Handle the next `op` request as the kernel does, except that its CPU at position
    /// `index` (from 0) fails with `errno` without the callback being called: the `index` CPUs
    /// before it are handled (`partial-add:K` / `partial-remove:K` with K = `index`).
    FailCpu {
        /// The operation whose next request fails.
        op: CpuOp,
        /// How many CPUs of the request are handled before the failing one.
        index: usize,
        /// The positive errno of the failure.
        errno: i32,
    },
    /// Refuse the next request with `-errno` without acting on it (`apic_index` stays stale).
    Refuse {
        /// The positive errno.
        errno: i32,
    },
    /// Act on the request, then send its reply twice (both copies in one write).
    AnswerTwice,
    /// Act on the request, then answer only after `delay` (a client may have given up).
    LateReply {
        /// How long to wait before answering.
        delay: Duration,
    },
    /// While waiting for the next request, send a success reply to `op` (`apic_index` 1)
    /// that nobody asked for; then refuse the next request (on any connection) with `-errno`.
    StrayReply {
        /// The type of the unsolicited reply.
        op: CpuOp,
        /// The errno of the refusal that follows.
        errno: i32,
    },
    /// Stop reading the connection (before the next request) and never answer on it again;
    /// it stays open until [`release_stalled`](super::GuestUpcallServer::release_stalled) or
    /// the muxer stops.
    NeverRead,
    /// Wait `delay` before sending the greeting of the next connection.
    SlowGreeting {
        /// How long to wait.
        delay: Duration,
    },
}

/// When a fault acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Moment {
    /// A connection opens.
    Connection,
    /// A connection waits between requests.
    Idle,
    /// A request of this kind arrived (`None`: not a CPU request).
    Request(Option<CpuOp>),
}

impl GuestFault {
    /// The errno [`FromStr`](std::str::FromStr) gives injected CPU failures and refusals.
    pub const DEFAULT_ERRNO: i32 = EIO;

    /// Whether this fault acts at `moment`.
    pub(super) fn acts_at(&self, moment: Moment) -> bool {
        match self {
            GuestFault::SlowGreeting { .. } => moment == Moment::Connection,
            GuestFault::StrayReply { .. } | GuestFault::NeverRead => moment == Moment::Idle,
            GuestFault::FailCpu { op, .. } => moment == Moment::Request(Some(*op)),
            _ => matches!(moment, Moment::Request(_)),
        }
    }
}

/// A fault name [`GuestFault`]'s `FromStr` does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown guest fault {0:?}: use partial-add:K, partial-remove:K, silent, stray-reply, \
     never-read, hang-up, answer-twice, late-reply:MS, slow-greeting:MS or truncated:BYTES"
)]
pub struct UnknownFault(pub String);

impl std::str::FromStr for GuestFault {
    type Err = UnknownFault;

    /// Parses the fault names of `vcpuctl chaos`: `partial-add:K`, `partial-remove:K` (fail
    /// the CPU after the first K with `EIO`), `silent`, `stray-reply` (then refuse with
    /// `EINVAL`), `never-read`, `hang-up`, `answer-twice`, `late-reply:MS`,
    /// `slow-greeting:MS`, `truncated:BYTES`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || UnknownFault(s.to_owned());
        let (name, arg) = match s.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (s, None),
        };
        let number = || -> Result<u64, UnknownFault> {
            arg.and_then(|a| a.parse().ok()).ok_or_else(unknown)
        };
        let index =
            || -> Result<usize, UnknownFault> { usize::try_from(number()?).map_err(|_| unknown()) };
        Ok(match (name, arg.is_some()) {
            ("partial-add", true) => GuestFault::FailCpu {
                op: CpuOp::Add,
                index: index()?,
                errno: Self::DEFAULT_ERRNO,
            },
            ("partial-remove", true) => GuestFault::FailCpu {
                op: CpuOp::Del,
                index: index()?,
                errno: Self::DEFAULT_ERRNO,
            },
            ("late-reply", true) => GuestFault::LateReply {
                delay: Duration::from_millis(number()?),
            },
            ("slow-greeting", true) => GuestFault::SlowGreeting {
                delay: Duration::from_millis(number()?),
            },
            ("truncated", true) => GuestFault::TruncatedReply { bytes: index()? },
            ("silent", false) => GuestFault::Silent,
            ("stray-reply", false) => GuestFault::StrayReply {
                op: CpuOp::Add,
                errno: EINVAL,
            },
            ("never-read", false) => GuestFault::NeverRead,
            ("hang-up", false) => GuestFault::HangUp,
            ("answer-twice", false) => GuestFault::AnswerTwice,
            _ => return Err(unknown()),
        })
    }
}
