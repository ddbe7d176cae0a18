//! A guest-side upcall server that behaves like the patched guest kernel, and a stand-in for
//! a hybrid-vsock muxer (feature `guest-server`; test and demo equipment, not for runtimes).
//!
//! # What the guest kernel does, and so does [`GuestUpcallServer`]
//!
//! This restates, in our words, the device-manager service of the guest patches that Kata
//! Containers carries for Dragonball (`tools/packaging/kernel/patches/*/dragonball-experimental/`
//! in kata-containers: `db_devmgr_process`, `add_cpu_dev`, `del_cpu_dev`, `db_devmgr_server`).
//! The wire format is in the repository's `docs/upcall-protocol.md`.
//!
//! - **One reply buffer per connection.** Each connection gets a zeroed request and reply
//!   buffer; the greeting is that reply buffer with a `CONNECT` header, and every reply reuses
//!   it without clearing it. A field a reply does not set keeps the value of an earlier reply
//!   on the same connection.
//! - **`ADD_CPU`.** First every listed APIC ID is checked: if one is already present, the
//!   request is refused (`-EINVAL`) and nothing changes. Then the CPUs are handled in the
//!   order listed: each is registered and brought online; the first that fails is
//!   unregistered again and ends the request, **the ones before it stay online**.
//! - **`DEL_CPU`.** Refused up front if `count` is not below the number of present CPUs or if
//!   an APIC ID is unknown; these two refusals write `apic_index` = 0. Then the CPUs are handled
//!   in order: the boot CPU is refused only when the loop reaches it, a CPU that fails to go
//!   offline stays, and the first failure ends the request, **the ones before it stay
//!   offline**.
//! - **Success**: `result` 0, `msg_size` 4, `apic_index` = `count`.
//! - **Failure**: `result` = -errno, `msg_size` 0, and `apic_index` is **not** written (except
//!   for the two `DEL_CPU` checks above): it holds the previous reply's value, so a failed reply
//!   says nothing of how far the request got. A VMM must find out itself which CPUs of a failed
//!   request the guest handled, or send one APIC ID per request.
//! - **No handler for the type** (memory, MMIO, PCI here): `result` -1, `msg_size` 0.
//! - **Bad magic**: only the header is rewritten (right magic, `msg_size` 0, the request's
//!   type); `result` and the payload keep their previous values.
//! - The service byte must be `d` and arrive within 10 s, or the connection is closed.
//!
//! Where the kernel's behaviour is undefined this server picks the refusal the code means:
//! `count` 0 answers success with `apic_index` 0 (the kernel returns an uninitialised
//! result); an APIC ID repeated within a request, or 255, fails with `-EINVAL` when reached; an
//! unknown APIC ID in `DEL_CPU` is refused up front (the kernel asks `cpu_possible(-1)`). The
//! kernel also takes whatever one `recvmsg` returns as a whole request; this server reassembles
//! all 1024 bytes first.
//!
//! # Misbehaviour on demand
//!
//! [`GuestUpcallServer::inject_fault`] queues a [`GuestFault`] (also parsed from the names
//! `vcpuctl chaos` uses: `partial-add:K`, `partial-remove:K`, `silent`, `stray-reply`,
//! `never-read`, `hang-up`, ...). [`GuestUpcallServer::online_apic_ids`] is the guest's own view
//! of its CPUs, to compare with what the VMM believes.
//!
//! [`VsockMuxerStub`] listens on a Unix socket, answers `CONNECT <port>\n` with
//! `OK <host_port>\n` (closing the stream for other ports or while the guest is "not
//! listening") and serves each accepted stream on its own thread.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use slog::{debug, info, o, warn, Logger};

use crate::connector::{read_line_bounded, LineError, UpcallStream};
use crate::error::{io_error, HotplugError, Phase};
use crate::protocol::{
    encode_greeting, validate_apic_ids, write_reply_apic_index, write_reply_result, CpuOp,
    MessageReader, MsgBuf, MsgHeader, MsgType, RawCpuPayload, ReadProgress, BROADCAST_APIC_ID,
    CPU_REPLY_FAILURE_SIZE, CPU_REPLY_SUCCESS_SIZE, DEV_MGR_SERVICE_BYTE, MSG_SIZE,
};

/// `EINVAL`, the errno the guest patches use for refused requests.
pub const EINVAL: i32 = 22;
/// `EIO`, used when a callback reports failure with errno 0, and by injected CPU failures.
pub const EIO: i32 = 5;
/// The result for a message type the guest has no handler for.
pub const UNKNOWN_TYPE_RESULT: i32 = -1;
/// How long the guest waits for the service byte (the patches: 10 s).
pub const DEFAULT_SERVICE_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle connection looks for faults to act on between requests.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// What the guest must do for one CPU of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuAction {
    /// Bring the CPU with this APIC ID online (on x86: INIT/SIPI it and wait until it runs).
    Online(u8),
    /// Take the CPU with this APIC ID offline (park it).
    Offline(u8),
}

impl CpuAction {
    /// The APIC ID acted on.
    pub fn apic_id(&self) -> u8 {
        match self {
            CpuAction::Online(id) | CpuAction::Offline(id) => *id,
        }
    }
}

/// Makes the guest act on one CPU; `Err(errno)` (positive, e.g. 5 for `EIO`) fails the
/// request at that CPU.
pub type CpuCallback = Box<dyn FnMut(CpuAction) -> Result<(), i32> + Send>;

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
    /// it stays open until [`GuestUpcallServer::release_stalled`] or the muxer stops.
    NeverRead,
    /// Wait `delay` before sending the greeting of the next connection.
    SlowGreeting {
        /// How long to wait.
        delay: Duration,
    },
}

/// When a fault acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
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
    fn acts_at(&self, moment: Moment) -> bool {
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

/// Options of a [`GuestUpcallServer`].
#[derive(Debug, Clone)]
pub struct GuestServerOptions {
    /// Where the server logs.
    pub logger: Logger,
    /// How long a new connection has to send the service byte (default 10 s).
    pub service_byte_timeout: Duration,
}

impl Default for GuestServerOptions {
    fn default() -> Self {
        GuestServerOptions {
            logger: Logger::root(slog::Discard, o!()),
            service_byte_timeout: DEFAULT_SERVICE_BYTE_TIMEOUT,
        }
    }
}

/// An injected failure of one CPU of a request.
#[derive(Debug, Clone, Copy)]
struct InjectedFailure {
    index: usize,
    errno: i32,
}

struct ServerInner {
    boot_apic_id: u8,
    /// The guest's CPUs, boot CPUs first, then in the order added.
    present: Mutex<Vec<u8>>,
    /// Acting on CPUs, one request at a time (like the kernel's hotplug locks).
    callback: Mutex<CpuCallback>,
    /// The reply buffer of [`GuestUpcallServer::handle_message`] (one long-lived connection).
    reply: Mutex<MsgBuf>,
    faults: Mutex<VecDeque<GuestFault>>,
    faults_used: AtomicU64,
    requests: AtomicU64,
    /// Bumped to release connections stalled by [`GuestFault::NeverRead`].
    release: (Mutex<u64>, Condvar),
    options: GuestServerOptions,
    logger: Logger,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fresh connection's reply buffer: zeroed, with the greeting's header.
fn greeting_buffer() -> MsgBuf {
    encode_greeting()
}

/// A guest-side upcall device-manager server that answers like the patched guest kernel (see
/// the [module documentation](self)).
///
/// Cloning gives another handle to the same server (same CPUs, same faults).
#[derive(Clone)]
pub struct GuestUpcallServer {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for GuestUpcallServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestUpcallServer")
            .field("boot_apic_id", &self.inner.boot_apic_id)
            .field("present", &self.present_apic_ids())
            .finish_non_exhaustive()
    }
}

impl GuestUpcallServer {
    /// A server whose guest booted with `boot_apic_ids` online (the first is the boot CPU).
    ///
    /// # Errors
    ///
    /// [`HotplugError::NoApicIds`], [`HotplugError::TooManyApicIds`],
    /// [`HotplugError::InvalidApicId`] or [`HotplugError::DuplicateApicId`] for a boot list that
    /// no CPU request could carry either.
    pub fn new(
        boot_apic_ids: &[u8],
        callback: CpuCallback,
        options: GuestServerOptions,
    ) -> Result<Self, HotplugError> {
        validate_apic_ids(boot_apic_ids)?;
        let Some(&boot_apic_id) = boot_apic_ids.first() else {
            return Err(HotplugError::NoApicIds);
        };
        let logger = options.logger.new(o!("upcall" => "guest-server"));
        Ok(GuestUpcallServer {
            inner: Arc::new(ServerInner {
                boot_apic_id,
                present: Mutex::new(boot_apic_ids.to_vec()),
                callback: Mutex::new(callback),
                reply: Mutex::new(greeting_buffer()),
                faults: Mutex::new(VecDeque::new()),
                faults_used: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                release: (Mutex::new(0), Condvar::new()),
                options,
                logger,
            }),
        })
    }

    /// The boot CPU's APIC ID (never removable).
    pub fn boot_apic_id(&self) -> u8 {
        self.inner.boot_apic_id
    }

    /// The APIC IDs of the CPUs present now: boot CPUs first, then in the order added.
    pub fn present_apic_ids(&self) -> Vec<u8> {
        lock(&self.inner.present).clone()
    }

    /// The guest's own view of the CPUs it has online (between requests the same CPUs as
    /// [`present_apic_ids`](Self::present_apic_ids)), to compare with what the VMM believes.
    pub fn online_apic_ids(&self) -> BTreeSet<u8> {
        lock(&self.inner.present).iter().copied().collect()
    }

    /// How many requests (of any type, bad ones included) reached the handler.
    pub fn requests_handled(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Queues a misbehaviour (see [`GuestFault`] for when each acts).
    pub fn inject_fault(&self, fault: GuestFault) {
        lock(&self.inner.faults).push_back(fault);
    }

    /// How many injected faults have acted so far (a [`GuestFault::StrayReply`] counts once
    /// its reply is written), e.g. to wait until an idle-time fault happened.
    pub fn faults_used(&self) -> u64 {
        self.inner.faults_used.load(Ordering::SeqCst)
    }

    /// How many injected faults have not acted yet.
    pub fn faults_pending(&self) -> usize {
        lock(&self.inner.faults).len()
    }

    /// Ends every connection stalled by [`GuestFault::NeverRead`] (the muxer stub does this
    /// when it stops).
    pub fn release_stalled(&self) {
        let (generation, wake) = &self.inner.release;
        *lock(generation) += 1;
        wake.notify_all();
    }

    /// Takes the first queued fault that acts at `moment`.
    fn take_fault(&self, moment: Moment) -> Option<GuestFault> {
        let mut faults = lock(&self.inner.faults);
        let at = faults.iter().position(|f| f.acts_at(moment))?;
        faults.remove(at)
    }

    fn fault_used(&self) {
        self.inner.faults_used.fetch_add(1, Ordering::SeqCst);
    }

    /// Handles one request message as the guest kernel does and returns the reply: a copy of
    /// the reply buffer of one long-lived connection, stale fields included.
    pub fn handle_message(&self, request: &MsgBuf) -> MsgBuf {
        let mut reply = lock(&self.inner.reply);
        self.process(request, &mut reply, None);
        *reply
    }

    /// The kernel's `db_devmgr_process`: handles `request` and writes the answer into the
    /// connection's `reply` buffer, setting only what the kernel sets.
    fn process(&self, request: &MsgBuf, reply: &mut MsgBuf, fail: Option<InjectedFailure>) {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let header = MsgHeader::read_from(request);
        // Every path but success ends with this header: size 0, the request's type echoed.
        let failure_header = MsgHeader {
            msg_type: header.msg_type,
            ..MsgHeader::new(MsgType::Connect, CPU_REPLY_FAILURE_SIZE)
        };
        if !header.has_valid_magic() {
            warn!(self.inner.logger, "request with bad magic, answering with the stale result";
                "magic" => format!("{:#010x}", header.magic_version));
            failure_header.write_to(reply);
            return;
        }
        let payload = RawCpuPayload::read_from(request);
        let outcome = match header.kind() {
            Some(MsgType::AddCpu) => self.add_cpus(payload, reply, fail),
            Some(MsgType::DelCpu) => self.del_cpus(payload, reply, fail),
            _ => {
                debug!(self.inner.logger, "no handler for message type"; "type" => header.msg_type);
                Err(-UNKNOWN_TYPE_RESULT)
            }
        };
        match outcome {
            Ok(count) => {
                // The kernel's success notification: index = count, result 0, size 4.
                write_reply_apic_index(reply, u32::from(count));
                write_reply_result(reply, 0);
                MsgHeader {
                    msg_size: CPU_REPLY_SUCCESS_SIZE,
                    ..failure_header
                }
                .write_to(reply);
            }
            Err(errno) => {
                write_reply_result(reply, -errno);
                failure_header.write_to(reply);
            }
        }
    }

    /// The kernel's `add_cpu_dev`: `Ok(count)` or `Err(positive errno)`.
    fn add_cpus(
        &self,
        payload: RawCpuPayload<'_>,
        _reply: &mut MsgBuf,
        fail: Option<InjectedFailure>,
    ) -> Result<u8, i32> {
        let log = &self.inner.logger;
        {
            let present = lock(&self.inner.present);
            if let Some(id) = payload.apic_ids.iter().find(|id| present.contains(id)) {
                info!(log, "ADD_CPU refused: APIC ID already present"; "apic_id" => id);
                return Err(EINVAL);
            }
        }
        let mut callback = lock(&self.inner.callback);
        for (position, &apic_id) in payload.apic_ids.iter().enumerate() {
            {
                let mut present = lock(&self.inner.present);
                if apic_id == BROADCAST_APIC_ID || present.contains(&apic_id) {
                    info!(log, "ADD_CPU failed part-way: cannot register"; "apic_id" => apic_id);
                    return Err(EINVAL);
                }
                present.push(apic_id);
            }
            let online = match fail {
                Some(f) if f.index == position => Err(f.errno),
                _ => (*callback)(CpuAction::Online(apic_id)),
            };
            if let Err(errno) = online {
                // Unregistered again; the CPUs before it stay online.
                lock(&self.inner.present).retain(|&id| id != apic_id);
                info!(log, "ADD_CPU failed part-way: CPU did not come online";
                    "apic_id" => apic_id, "errno" => errno, "online_before_it" => position);
                return Err(positive_errno(errno));
            }
            debug!(log, "CPU online"; "apic_id" => apic_id);
        }
        Ok(payload.count)
    }

    /// The kernel's `del_cpu_dev`: `Ok(count)` or `Err(positive errno)`.
    fn del_cpus(
        &self,
        payload: RawCpuPayload<'_>,
        reply: &mut MsgBuf,
        fail: Option<InjectedFailure>,
    ) -> Result<u8, i32> {
        let log = &self.inner.logger;
        {
            let present = lock(&self.inner.present);
            if usize::from(payload.count) >= present.len() {
                info!(log, "DEL_CPU refused: would leave no CPU";
                    "count" => payload.count, "online" => present.len());
                // The kernel reports this refusal through its notification, index 0.
                write_reply_apic_index(reply, 0);
                return Err(EINVAL);
            }
            if let Some(id) = payload.apic_ids.iter().find(|id| !present.contains(id)) {
                info!(log, "DEL_CPU refused: unknown APIC ID"; "apic_id" => id);
                write_reply_apic_index(reply, 0);
                return Err(EINVAL);
            }
        }
        let mut callback = lock(&self.inner.callback);
        for (position, &apic_id) in payload.apic_ids.iter().enumerate() {
            if apic_id == self.inner.boot_apic_id {
                info!(log, "DEL_CPU failed part-way: the boot CPU cannot be removed";
                    "offline_before_it" => position);
                return Err(EINVAL);
            }
            if !lock(&self.inner.present).contains(&apic_id) {
                info!(log, "DEL_CPU failed part-way: already removed"; "apic_id" => apic_id);
                return Err(EINVAL);
            }
            let offline = match fail {
                Some(f) if f.index == position => Err(f.errno),
                _ => (*callback)(CpuAction::Offline(apic_id)),
            };
            if let Err(errno) = offline {
                // It stays; the CPUs before it stay offline.
                info!(log, "DEL_CPU failed part-way: CPU did not go offline";
                    "apic_id" => apic_id, "errno" => errno, "offline_before_it" => position);
                return Err(positive_errno(errno));
            }
            lock(&self.inner.present).retain(|&id| id != apic_id);
            debug!(log, "CPU offline"; "apic_id" => apic_id);
        }
        Ok(payload.count)
    }

    /// Serves one connection until the client closes it: service byte, greeting, then
    /// request/reply pairs, with the injected faults. Returns `Ok` when the client closed
    /// between messages (or a fault ended the connection on purpose).
    ///
    /// # Errors
    ///
    /// [`HotplugError::UnknownService`] for a service byte other than `d`; a
    /// [`HotplugError::Timeout`] when no service byte came in time;
    /// [`HotplugError::ConnectionReset`] when the client closed part-way through a request;
    /// [`HotplugError::Io`] (or the two before) when reading or writing the stream failed.
    pub fn serve<S: UpcallStream>(&self, mut stream: S) -> Result<(), HotplugError> {
        let log = &self.inner.logger;
        let timeout = self.inner.options.service_byte_timeout;
        set_read_timeout(
            &stream,
            Some(timeout.max(Duration::from_millis(1))),
            Phase::ServiceByte,
        )?;
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(io_error(Phase::ServiceByte, 0, timeout, e)),
        }
        if byte[0] != DEV_MGR_SERVICE_BYTE {
            warn!(log, "unknown service byte, closing"; "byte" => byte[0]);
            return Err(HotplugError::UnknownService { byte: byte[0] });
        }
        if let Some(GuestFault::SlowGreeting { delay }) = self.take_fault(Moment::Connection) {
            info!(log, "fault: slow greeting"; "delay" => ?delay);
            std::thread::sleep(delay);
            self.fault_used();
        }
        // This connection's reply buffer; the greeting is its first content.
        let mut reply = greeting_buffer();
        write_message(&mut stream, &reply, MSG_SIZE, Phase::Greeting)?;
        // Short reads, so that an idle connection can act on idle-time faults.
        set_read_timeout(&stream, Some(IDLE_POLL), Phase::Request)?;
        let mut reader = MessageReader::new();
        loop {
            reader.reset();
            let request = loop {
                match reader.read_from(&mut stream) {
                    Ok(ReadProgress::Complete) => {
                        break reader.message().copied().unwrap_or([0u8; MSG_SIZE])
                    }
                    Ok(ReadProgress::Partial(_)) => {}
                    Ok(ReadProgress::Eof(0)) => return Ok(()),
                    Ok(ReadProgress::Eof(bytes)) => {
                        return Err(HotplugError::ConnectionReset {
                            during: Phase::Request,
                            bytes,
                        })
                    }
                    Err(e) if is_timeout(&e) => {
                        if reader.filled() == 0 && !self.idle_fault(&mut stream)? {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(io_error(Phase::Request, reader.filled(), timeout, e)),
                }
            };
            if !self.answer(&mut stream, &request, &mut reply)? {
                return Ok(());
            }
        }
    }

    /// Acts on a fault queued for idle time, if any; `Ok(false)` ends the connection.
    fn idle_fault<S: UpcallStream>(&self, stream: &mut S) -> Result<bool, HotplugError> {
        let log = &self.inner.logger;
        match self.take_fault(Moment::Idle) {
            Some(GuestFault::StrayReply { op, errno }) => {
                info!(log, "fault: unsolicited reply"; "op" => %op);
                let mut stray = greeting_buffer();
                MsgHeader::new(op.msg_type(), CPU_REPLY_SUCCESS_SIZE).write_to(&mut stray);
                write_reply_apic_index(&mut stray, 1);
                // The refusal comes first for the next request, whatever else is queued.
                lock(&self.inner.faults).push_front(GuestFault::Refuse { errno });
                write_message(stream, &stray, MSG_SIZE, Phase::Reply)?;
                self.fault_used();
                Ok(true)
            }
            Some(GuestFault::NeverRead) => {
                info!(log, "fault: no longer reading this connection");
                self.fault_used();
                self.stall();
                Ok(false)
            }
            Some(other) => {
                // Not an idle-time fault (cannot happen): put it back.
                lock(&self.inner.faults).push_front(other);
                Ok(true)
            }
            None => Ok(true),
        }
    }

    /// Waits until [`release_stalled`](Self::release_stalled).
    fn stall(&self) {
        let (generation, wake) = &self.inner.release;
        let mut now = lock(generation);
        let start = *now;
        while *now == start {
            now = wake.wait(now).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Answers one request, with the request-time fault if one is queued; `Ok(false)` ends
    /// the connection.
    fn answer<S: UpcallStream>(
        &self,
        stream: &mut S,
        request: &MsgBuf,
        reply: &mut MsgBuf,
    ) -> Result<bool, HotplugError> {
        let log = &self.inner.logger;
        let kind = MsgHeader::read_from(request)
            .kind()
            .and_then(CpuOp::from_msg_type);
        let fault = self.take_fault(Moment::Request(kind));
        if fault.is_some() {
            self.fault_used();
        }
        match fault {
            None => {
                self.process(request, reply, None);
                write_message(stream, reply, MSG_SIZE, Phase::Reply)?;
            }
            Some(GuestFault::FailCpu { index, errno, .. }) => {
                info!(log, "fault: failing a CPU part-way"; "index" => index, "errno" => errno);
                self.process(request, reply, Some(InjectedFailure { index, errno }));
                write_message(stream, reply, MSG_SIZE, Phase::Reply)?;
            }
            Some(GuestFault::Refuse { errno }) => {
                info!(log, "fault: refusing the request"; "errno" => errno);
                self.inner.requests.fetch_add(1, Ordering::Relaxed);
                write_reply_result(reply, -positive_errno(errno));
                let header = MsgHeader::read_from(request);
                MsgHeader {
                    msg_type: header.msg_type,
                    ..MsgHeader::new(MsgType::Connect, CPU_REPLY_FAILURE_SIZE)
                }
                .write_to(reply);
                write_message(stream, reply, MSG_SIZE, Phase::Reply)?;
            }
            Some(GuestFault::Silent) => {
                info!(log, "fault: staying silent");
                drain_until_closed(stream);
                return Ok(false);
            }
            Some(GuestFault::HangUp) => {
                info!(log, "fault: hanging up mid-request");
                return Ok(false);
            }
            Some(GuestFault::TruncatedReply { bytes }) => {
                info!(log, "fault: truncated reply"; "bytes" => bytes);
                self.process(request, reply, None);
                write_message(stream, reply, bytes.min(MSG_SIZE), Phase::Reply)?;
                return Ok(false);
            }
            Some(GuestFault::RawReply(raw)) => {
                info!(log, "fault: raw reply");
                write_message(stream, &raw[..], MSG_SIZE, Phase::Reply)?;
            }
            Some(GuestFault::AnswerTwice) => {
                info!(log, "fault: answering twice");
                self.process(request, reply, None);
                let mut twice = [0u8; 2 * MSG_SIZE];
                twice[..MSG_SIZE].copy_from_slice(reply);
                twice[MSG_SIZE..].copy_from_slice(reply);
                write_message(stream, &twice, twice.len(), Phase::Reply)?;
            }
            Some(GuestFault::LateReply { delay }) => {
                info!(log, "fault: answering late"; "delay" => ?delay);
                self.process(request, reply, None);
                std::thread::sleep(delay);
                // The client may be gone; that ends the connection quietly.
                return Ok(write_message(stream, reply, MSG_SIZE, Phase::Reply).is_ok());
            }
            Some(
                other @ (GuestFault::StrayReply { .. }
                | GuestFault::NeverRead
                | GuestFault::SlowGreeting { .. }),
            ) => {
                // Not a request-time fault (cannot happen): put it back, answer normally.
                lock(&self.inner.faults).push_front(other);
                self.process(request, reply, None);
                write_message(stream, reply, MSG_SIZE, Phase::Reply)?;
            }
        }
        Ok(true)
    }
}

fn set_read_timeout<S: UpcallStream>(
    stream: &S,
    timeout: Option<Duration>,
    during: Phase,
) -> Result<(), HotplugError> {
    stream
        .set_read_timeout(timeout)
        .map_err(|source| HotplugError::Io { during, source })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A callback's errno as the positive errno of the reply (0 becomes `EIO`).
fn positive_errno(errno: i32) -> i32 {
    match errno.checked_abs() {
        Some(0) | None => EIO,
        Some(e) => e,
    }
}

fn write_message<W: Write + ?Sized>(
    stream: &mut W,
    msg: &[u8],
    len: usize,
    during: Phase,
) -> Result<(), HotplugError> {
    let len = len.min(msg.len());
    stream
        .write_all(&msg[..len])
        .and_then(|()| stream.flush())
        .map_err(|e| io_error(during, 0, Duration::ZERO, e))
}

/// Reads and discards until the peer closes (bounded buffer, no read timeout).
fn drain_until_closed<S: UpcallStream>(stream: &mut S) {
    if stream.set_read_timeout(None).is_err() {
        return;
    }
    let mut sink = [0u8; MSG_SIZE];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

struct MuxInner {
    path: PathBuf,
    guest_port: u32,
    server: GuestUpcallServer,
    stop: AtomicBool,
    guest_listening: AtomicBool,
    next_host_port: AtomicU32,
    accepted: AtomicU64,
    conns: Mutex<Vec<(UnixStream, JoinHandle<()>)>>,
    logger: Logger,
}

/// A stand-in for a hybrid-vsock muxer (the Unix socket of a Firecracker-style vsock device)
/// with a [`GuestUpcallServer`] behind it.
///
/// Dropping it (or [`shutdown`](Self::shutdown)) stops listening, removes the socket file and
/// shuts down every open connection (their threads end on their own).
pub struct VsockMuxerStub {
    inner: Arc<MuxInner>,
    /// A second handle on the listening socket, to wake the blocked `accept` on shutdown.
    listener: UnixListener,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VsockMuxerStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxerStub")
            .field("path", &self.inner.path)
            .field("guest_port", &self.inner.guest_port)
            .finish_non_exhaustive()
    }
}

/// How long the stub waits for the `CONNECT` line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first host port the stub reports in `OK <port>`.
const FIRST_HOST_PORT: u32 = 1024;

impl VsockMuxerStub {
    /// Listens on `path` (which must not exist) for connections to `guest_port`.
    ///
    /// # Errors
    ///
    /// [`HotplugError::Bind`] when the socket cannot be created (the path exists, the
    /// directory is missing) or the accepting thread cannot start.
    pub fn start(
        path: impl Into<PathBuf>,
        guest_port: u32,
        server: GuestUpcallServer,
        logger: Logger,
    ) -> Result<Self, HotplugError> {
        let path = path.into();
        let listener = UnixListener::bind(&path).map_err(|source| HotplugError::Bind {
            path: path.clone(),
            source,
        })?;
        let logger = logger.new(o!("upcall" => "vsock-stub", "path" => path.display().to_string()));
        let inner = Arc::new(MuxInner {
            path,
            guest_port,
            server,
            stop: AtomicBool::new(false),
            guest_listening: AtomicBool::new(true),
            next_host_port: AtomicU32::new(FIRST_HOST_PORT),
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            logger,
        });
        let waker = listener.try_clone().map_err(|source| HotplugError::Bind {
            path: inner.path.clone(),
            source,
        })?;
        let thread_inner = Arc::clone(&inner);
        let accept_thread = std::thread::Builder::new()
            .name("vsock-stub".into())
            .spawn(move || accept_loop(&thread_inner, listener))
            .map_err(|source| HotplugError::Bind {
                path: inner.path.clone(),
                source,
            })?;
        Ok(VsockMuxerStub {
            inner,
            listener: waker,
            accept_thread: Some(accept_thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The server behind the stub.
    pub fn server(&self) -> &GuestUpcallServer {
        &self.inner.server
    }

    /// Whether the guest "listens" on the port: when false, the stub closes every new stream
    /// after reading `CONNECT`, as a real muxer does before the guest's server is up.
    pub fn set_guest_listening(&self, listening: bool) {
        self.inner
            .guest_listening
            .store(listening, Ordering::SeqCst);
    }

    /// How many streams were accepted (answered `OK`).
    pub fn accepted_connections(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Stops listening, removes the socket file and shuts down open connections.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.accept_thread.take() else {
            return;
        };
        self.inner.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept (it fails with EINVAL on a shut-down listener), whether or
        // not the socket file still exists; the loop then sees the stop flag.
        // SAFETY: shutdown(2) on a descriptor this struct owns; no memory is involved.
        let rc = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if rc != 0 {
            // Fall back to a connection through the path.
            let _ = UnixStream::connect(&self.inner.path);
        }
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.inner.path);
        self.inner.server.release_stalled();
        for (stream, _thread) in lock(&self.inner.conns).drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        info!(self.inner.logger, "vsock stub stopped");
    }
}

impl Drop for VsockMuxerStub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(inner: &Arc<MuxInner>, listener: UnixListener) {
    for stream in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(inner.logger, "accept failed"; "error" => %e);
                // Do not spin on a persistent error (e.g. out of descriptors).
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let control = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn!(inner.logger, "cannot keep a handle on the stream"; "error" => %e);
                continue;
            }
        };
        let conn_inner = Arc::clone(inner);
        let spawned = std::thread::Builder::new()
            .name("vsock-stub-conn".into())
            .spawn(move || serve_connection(&conn_inner, stream));
        match spawned {
            Ok(handle) => {
                let mut conns = lock(&inner.conns);
                conns.retain(|(_, h)| !h.is_finished());
                conns.push((control, handle));
            }
            Err(e) => warn!(inner.logger, "cannot start a connection thread"; "error" => %e),
        }
    }
}

/// Parses `CONNECT <port>`.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}

/// Serves one accepted stream, then closes the connection itself: the stub keeps another
/// handle on every stream, so dropping this one would not hang up.
fn serve_connection(inner: &MuxInner, stream: UnixStream) {
    let closer = stream.try_clone();
    handshake_and_serve(inner, stream);
    if let Ok(closer) = closer {
        let _ = closer.shutdown(std::net::Shutdown::Both);
    }
}

fn handshake_and_serve(inner: &MuxInner, mut stream: UnixStream) {
    let log = &inner.logger;
    if stream.set_read_timeout(Some(CONNECT_LINE_TIMEOUT)).is_err() {
        return;
    }
    let line = match read_line_bounded(&mut stream) {
        Ok(line) => line,
        Err(LineError::Eof(_)) => return,
        Err(e) => {
            warn!(log, "bad CONNECT line, closing"; "error" => ?e);
            return;
        }
    };
    let port = parse_connect(line.as_bytes());
    if port != Some(inner.guest_port) {
        info!(log, "CONNECT to a port nobody listens on, closing"; "line" => ?line);
        return;
    }
    if !inner.guest_listening.load(Ordering::SeqCst) {
        info!(log, "guest not listening yet, closing");
        return;
    }
    let host_port = inner.next_host_port.fetch_add(1, Ordering::SeqCst);
    if stream
        .write_all(format!("OK {host_port}\n").as_bytes())
        .is_err()
    {
        return;
    }
    inner.accepted.fetch_add(1, Ordering::SeqCst);
    debug!(log, "connection accepted"; "host_port" => host_port);
    if let Err(e) = inner.server.serve(stream) {
        info!(log, "connection ended"; "error" => %e);
    }
}
