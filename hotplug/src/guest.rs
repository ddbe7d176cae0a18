//! A guest-side upcall server that behaves like the patched guest kernel, and a stand-in for
//! a hybrid-vsock muxer (feature `guest-server`; for tests and demos).
//!
//! [`GuestUpcallServer`] reproduces the kernel's answers, quirks included:
//!
//! - `ADD_CPU`: if any listed APIC ID is already present it replies -22 (`-EINVAL`) and
//!   changes nothing. Otherwise, for each ID in order, it registers the CPU and calls the
//!   callback with [`CpuAction::Online`]; a failure part-way (an ID repeated within the
//!   request, ID 255, or the callback's errno) leaves the earlier CPUs online, drops the failing
//!   one and replies the error.
//! - `DEL_CPU`: refuses (-22) if `count` is not below the number of present CPUs, if an ID is
//!   unknown, or for the boot CPU. Otherwise, for each ID in order, calls the callback with
//!   [`CpuAction::Offline`] and unregisters it; a failure part-way keeps the failing CPU.
//! - Success: `result` 0, `msg_size` 4, `apic_index` = `count`. Failure: `result` = -errno,
//!   `msg_size` 0, `apic_index` untouched.
//! - Any other message type: `result` = -1 (this stand-in has no memory, MMIO or PCI devices).
//! - Bad magic: the reply only echoes the type; every other field keeps its previous value.
//! - One reply buffer, never cleared: fields a reply does not set hold stale values.
//! - The service byte must be `d` and arrive within 10 s, or the connection is closed.
//!
//! [`VsockMuxerStub`] listens on a Unix socket, answers `CONNECT <port>\n` with
//! `OK <host_port>\n` (closing the stream for other ports or while the guest is "not
//! listening") and serves each accepted stream on its own thread.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use slog::{debug, info, o, warn, Logger};

use crate::connector::{read_line_bounded, LineError, UpcallStream};
use crate::error::{io_error, HotplugError, Phase};
use crate::protocol::{
    encode_greeting, validate_apic_ids, write_reply_apic_index, write_reply_result, MessageReader,
    MsgBuf, MsgHeader, MsgType, RawCpuPayload, ReadProgress, BROADCAST_APIC_ID,
    CPU_REPLY_FAILURE_SIZE, CPU_REPLY_SUCCESS_SIZE, DEV_MGR_SERVICE_BYTE, MSG_MAGIC_VERSION,
    MSG_SIZE,
};

/// `EINVAL`, the errno the guest patches use for refused requests.
pub const EINVAL: i32 = 22;
/// `EIO`, used when a callback reports failure with errno 0.
pub const EIO: i32 = 5;
/// The result for a message type the guest has no handler for.
pub const UNKNOWN_TYPE_RESULT: i32 = -1;
/// How long the guest waits for the service byte (the patches: 10 s).
pub const DEFAULT_SERVICE_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A misbehaviour for the next request the server receives (each is used once).
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The request handler state, held while a request is handled (like the kernel's one
/// device-manager thread).
struct Handler {
    reply: MsgBuf,
    callback: CpuCallback,
}

struct ServerInner {
    boot_apic_id: u8,
    present: Mutex<Vec<u8>>,
    handler: Mutex<Handler>,
    faults: Mutex<VecDeque<GuestFault>>,
    requests: AtomicU64,
    options: GuestServerOptions,
    logger: Logger,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A guest-side upcall device-manager server that answers like the patched guest kernel.
///
/// Cloning gives another handle to the same server (same CPUs, same reply buffer).
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
    pub fn new(
        boot_apic_ids: &[u8],
        callback: CpuCallback,
        options: GuestServerOptions,
    ) -> Result<Self, HotplugError> {
        validate_apic_ids(boot_apic_ids)?;
        let boot_apic_id = boot_apic_ids[0];
        let mut reply = [0u8; MSG_SIZE];
        // The kernel fills the magic once; every reply reuses this buffer.
        MsgHeader::new(MsgType::Connect, 0).write_to(&mut reply);
        let logger = options.logger.new(o!("upcall" => "guest-server"));
        Ok(GuestUpcallServer {
            inner: Arc::new(ServerInner {
                boot_apic_id,
                present: Mutex::new(boot_apic_ids.to_vec()),
                handler: Mutex::new(Handler { reply, callback }),
                faults: Mutex::new(VecDeque::new()),
                requests: AtomicU64::new(0),
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

    /// How many requests (of any type, bad ones included) reached the handler.
    pub fn requests_handled(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Queues a misbehaviour for a coming request (first queued, first used).
    pub fn inject_fault(&self, fault: GuestFault) {
        lock(&self.inner.faults).push_back(fault);
    }

    /// Handles one request message as the guest kernel does and returns the reply (a copy of
    /// the server's one reply buffer, stale fields included).
    pub fn handle_message(&self, request: &MsgBuf) -> MsgBuf {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let header = MsgHeader::read_from(request);
        let mut handler = lock(&self.inner.handler);
        let Handler { reply, callback } = &mut *handler;
        // The type is echoed whatever happens.
        let mut reply_header = MsgHeader::read_from(reply);
        reply_header.msg_type = header.msg_type;
        reply_header.magic_version = MSG_MAGIC_VERSION;
        if header.magic_version != MSG_MAGIC_VERSION {
            warn!(self.inner.logger, "request with bad magic, answering with the stale result";
                "magic" => format!("{:#010x}", header.magic_version));
            reply_header.write_to(reply);
            return *reply;
        }
        let outcome = match header.kind() {
            Some(MsgType::AddCpu) => {
                Some(self.add_cpus(RawCpuPayload::read_from(request), callback))
            }
            Some(MsgType::DelCpu) => {
                Some(self.del_cpus(RawCpuPayload::read_from(request), callback))
            }
            _ => None,
        };
        match outcome {
            Some(Ok(count)) => {
                reply_header.msg_size = CPU_REPLY_SUCCESS_SIZE;
                write_reply_result(reply, 0);
                write_reply_apic_index(reply, u32::from(count));
            }
            Some(Err(errno)) => {
                reply_header.msg_size = CPU_REPLY_FAILURE_SIZE;
                write_reply_result(reply, -errno);
            }
            None => {
                debug!(self.inner.logger, "no handler for message type"; "type" => header.msg_type);
                write_reply_result(reply, UNKNOWN_TYPE_RESULT);
            }
        }
        reply_header.write_to(reply);
        *reply
    }

    /// `ADD_CPU`: `Ok(count)` or `Err(positive errno)`.
    fn add_cpus(&self, payload: RawCpuPayload<'_>, callback: &mut CpuCallback) -> Result<u8, i32> {
        let log = &self.inner.logger;
        {
            let present = lock(&self.inner.present);
            if let Some(id) = payload.apic_ids.iter().find(|id| present.contains(id)) {
                info!(log, "ADD_CPU refused: APIC ID already present"; "apic_id" => id);
                return Err(EINVAL);
            }
        }
        for &apic_id in payload.apic_ids {
            {
                let mut present = lock(&self.inner.present);
                if apic_id == BROADCAST_APIC_ID || present.contains(&apic_id) {
                    info!(log, "ADD_CPU failed part-way: cannot register"; "apic_id" => apic_id);
                    return Err(EINVAL);
                }
                present.push(apic_id);
            }
            if let Err(errno) = callback(CpuAction::Online(apic_id)) {
                lock(&self.inner.present).retain(|&id| id != apic_id);
                info!(log, "ADD_CPU failed part-way: CPU did not come online";
                    "apic_id" => apic_id, "errno" => errno);
                return Err(positive_errno(errno));
            }
            debug!(log, "CPU online"; "apic_id" => apic_id);
        }
        Ok(payload.count)
    }

    /// `DEL_CPU`: `Ok(count)` or `Err(positive errno)`.
    fn del_cpus(&self, payload: RawCpuPayload<'_>, callback: &mut CpuCallback) -> Result<u8, i32> {
        let log = &self.inner.logger;
        {
            let present = lock(&self.inner.present);
            if usize::from(payload.count) >= present.len() {
                info!(log, "DEL_CPU refused: would leave no CPU";
                    "count" => payload.count, "online" => present.len());
                return Err(EINVAL);
            }
            for id in payload.apic_ids {
                if !present.contains(id) || *id == self.inner.boot_apic_id {
                    info!(log, "DEL_CPU refused: unknown APIC ID or the boot CPU"; "apic_id" => id);
                    return Err(EINVAL);
                }
            }
        }
        for &apic_id in payload.apic_ids {
            if !lock(&self.inner.present).contains(&apic_id) {
                info!(log, "DEL_CPU failed part-way: already removed"; "apic_id" => apic_id);
                return Err(EINVAL);
            }
            if let Err(errno) = callback(CpuAction::Offline(apic_id)) {
                info!(log, "DEL_CPU failed part-way: CPU did not go offline";
                    "apic_id" => apic_id, "errno" => errno);
                return Err(positive_errno(errno));
            }
            lock(&self.inner.present).retain(|&id| id != apic_id);
            debug!(log, "CPU offline"; "apic_id" => apic_id);
        }
        Ok(payload.count)
    }

    /// Serves one connection until the client closes it: service byte, greeting, then
    /// request/reply pairs. Returns `Ok` when the client closed between messages.
    pub fn serve<S: UpcallStream>(&self, mut stream: S) -> Result<(), HotplugError> {
        let log = &self.inner.logger;
        let timeout = self.inner.options.service_byte_timeout;
        stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|source| HotplugError::Io {
                during: Phase::ServiceByte,
                source,
            })?;
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
        write_message(&mut stream, &encode_greeting(), MSG_SIZE, Phase::Greeting)?;
        stream
            .set_read_timeout(None)
            .map_err(|source| HotplugError::Io {
                during: Phase::Request,
                source,
            })?;
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
                    Err(e) => return Err(io_error(Phase::Request, reader.filled(), timeout, e)),
                }
            };
            let fault = lock(&self.inner.faults).pop_front();
            match fault {
                None => {
                    let reply = self.handle_message(&request);
                    write_message(&mut stream, &reply, MSG_SIZE, Phase::Reply)?;
                }
                Some(GuestFault::Silent) => {
                    info!(log, "fault: staying silent");
                    drain_until_closed(&mut stream);
                    return Ok(());
                }
                Some(GuestFault::HangUp) => {
                    info!(log, "fault: hanging up mid-request");
                    return Ok(());
                }
                Some(GuestFault::TruncatedReply { bytes }) => {
                    info!(log, "fault: truncated reply"; "bytes" => bytes);
                    let reply = self.handle_message(&request);
                    write_message(&mut stream, &reply, bytes.min(MSG_SIZE), Phase::Reply)?;
                    return Ok(());
                }
                Some(GuestFault::RawReply(reply)) => {
                    info!(log, "fault: raw reply");
                    write_message(&mut stream, &reply, MSG_SIZE, Phase::Reply)?;
                }
            }
        }
    }
}

/// A callback's errno as the positive errno of the reply (0 becomes `EIO`).
fn positive_errno(errno: i32) -> i32 {
    match errno.checked_abs() {
        Some(0) | None => EIO,
        Some(e) => e,
    }
}

fn write_message<W: Write>(
    stream: &mut W,
    msg: &MsgBuf,
    len: usize,
    during: Phase,
) -> Result<(), HotplugError> {
    stream
        .write_all(&msg[..len])
        .and_then(|()| stream.flush())
        .map_err(|e| io_error(during, 0, Duration::ZERO, e))
}

/// Reads and discards until the peer closes (bounded buffer).
fn drain_until_closed<R: Read>(stream: &mut R) {
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
