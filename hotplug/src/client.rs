//! The VMM-side upcall client: connection state machine, one request at a time.

use std::io::{self, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use slog::{debug, info, o, warn, Logger};

use crate::connector::{Unsolicited, UpcallConnector, UpcallStream};
use crate::error::{io_error, HotplugError, Operation, Phase};
use crate::protocol::{
    decode_cpu_reply, decode_greeting, encode_cpu_request, validate_apic_ids, CpuDevReply,
    CpuDevRequest, CpuOp, MessageReader, MsgBuf, ReadProgress, DEV_MGR_SERVICE_BYTE, MSG_SIZE,
};

/// The `apic_ver` sent with `DEL_CPU` (the guest ignores it; Dragonball sends this).
const DEL_CPU_APIC_VERSION: u8 = crate::protocol::DEFAULT_APIC_VERSION;

/// The shortest timeout or delay the client uses (a zero would mean "block" to the OS).
const MIN_DURATION: Duration = Duration::from_millis(1);

/// Timeouts and the reconnect policy of an [`UpcallClient`].
///
/// Fields missing from a serialized configuration take their default values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UpcallConfig {
    /// How long the guest has to answer a request (default 5 s). On expiry the request fails
    /// with [`HotplugError::Timeout`] and the connection is dropped.
    pub reply_timeout: Duration,
    /// How long writing one request (or the service byte) may take (default 5 s). A guest that
    /// stops reading its socket fills it, and a write then blocks: on expiry the request fails
    /// with [`HotplugError::Timeout`] during [`Phase::Request`], the connection is dropped and
    /// the next request reconnects.
    pub write_timeout: Duration,
    /// How long the guest has to send its greeting after the service byte (default 5 s).
    pub greeting_timeout: Duration,
    /// The delay before the first reconnect attempt (default 10 ms, as Dragonball).
    pub connect_retry_delay: Duration,
    /// The delay doubles after each failed attempt up to this (default 10 ms: a fixed delay,
    /// as Dragonball; raise it for exponential backoff).
    pub connect_retry_max_delay: Duration,
    /// Connection attempts per connect, including the first (default 500, as Dragonball; 0 is
    /// taken as 1). When all fail: [`HotplugError::ConnectBudgetExhausted`].
    pub connect_retry_budget: u32,
}

impl Default for UpcallConfig {
    fn default() -> Self {
        UpcallConfig {
            reply_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            greeting_timeout: Duration::from_secs(5),
            connect_retry_delay: Duration::from_millis(10),
            connect_retry_max_delay: Duration::from_millis(10),
            connect_retry_budget: 500,
        }
    }
}

/// How far a one-APIC-ID-per-request operation got
/// ([`UpcallClient::add_cpus_one_by_one`], [`UpcallClient::del_cpus_one_by_one`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "{op} one CPU per request stopped {}after confirming {} of {} APIC IDs ({done:?}): {source}",
    match failed { Some(id) => format!("at APIC ID {id} "), None => String::new() },
    done.len(),
    done.len() + usize::from(failed.is_some()) + not_sent.len()
)]
pub struct StepwiseError {
    /// The operation.
    pub op: CpuOp,
    /// The APIC IDs the guest confirmed, in order: online after `ADD_CPU`, offline after
    /// `DEL_CPU`.
    pub done: Vec<u8>,
    /// The APIC ID whose request failed; `None` when nothing was sent (an invalid list, or the
    /// client was busy).
    pub failed: Option<u8>,
    /// The APIC IDs after the failed one, never sent.
    pub not_sent: Vec<u8>,
    /// Why the request for `failed` failed.
    #[source]
    pub source: HotplugError,
}

impl StepwiseError {
    /// Whether the state of the `failed` CPU is known: the guest answered (it refused, and a
    /// refused one-CPU request changes nothing) or the request was never sent. False when the
    /// answer was lost ([`HotplugError::outcome_unknown`]).
    pub fn failed_state_known(&self) -> bool {
        !self.source.outcome_unknown()
    }
}

/// Why the last connection was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BrokenReason {
    /// No (complete) answer in time.
    Timeout,
    /// The peer closed or reset the connection.
    ConnectionReset,
    /// The peer sent something the protocol does not allow.
    Protocol,
    /// Another I/O or connector error.
    Io,
}

/// The client's observable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UpcallState {
    /// No connection (initially, and after [`UpcallClient::disconnect`]).
    Disconnected,
    /// Opening a connection; `attempt` counts from 1 within this connect.
    Connecting {
        /// The attempt in progress.
        attempt: u32,
    },
    /// The stream is open and the service byte sent; waiting for the greeting.
    WaitingGreeting,
    /// Connected, no request in flight.
    Ready,
    /// A request is in flight.
    Busy(CpuOp),
    /// The connection was dropped after an error; the next request reconnects.
    Broken(BrokenReason),
    /// The last connect used up its budget; the next request tries again with a fresh one.
    Failed {
        /// Attempts made.
        attempts: u32,
    },
}

impl std::fmt::Display for UpcallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpcallState::Disconnected => f.write_str("disconnected"),
            UpcallState::Connecting { attempt } => write!(f, "connecting (attempt {attempt})"),
            UpcallState::WaitingGreeting => f.write_str("waiting for the greeting"),
            UpcallState::Ready => f.write_str("ready"),
            UpcallState::Busy(op) => write!(f, "busy ({op} in flight)"),
            UpcallState::Broken(reason) => write!(f, "broken ({reason:?}), will reconnect"),
            UpcallState::Failed { attempts } => {
                write!(f, "failed to connect after {attempts} attempts")
            }
        }
    }
}

impl UpcallState {
    /// The state after an operation failed with `error` (the connection is dropped unless the
    /// guest simply refused).
    fn after_error(error: &HotplugError) -> Self {
        match error {
            HotplugError::GuestError { .. } => UpcallState::Ready,
            HotplugError::ConnectBudgetExhausted { attempts, .. } => UpcallState::Failed {
                attempts: *attempts,
            },
            HotplugError::Timeout { .. } => UpcallState::Broken(BrokenReason::Timeout),
            HotplugError::ConnectionReset { .. } => {
                UpcallState::Broken(BrokenReason::ConnectionReset)
            }
            HotplugError::BadMagic { .. }
            | HotplugError::BadGreeting { .. }
            | HotplugError::UnexpectedMsgType { .. }
            | HotplugError::UnexpectedMsgSize { .. }
            | HotplugError::ApicIndexMismatch { .. }
            | HotplugError::InvalidResult { .. }
            | HotplugError::UnsolicitedData { .. }
            | HotplugError::HandshakeLineTooLong { .. }
            | HotplugError::HandshakeRejected { .. } => UpcallState::Broken(BrokenReason::Protocol),
            _ => UpcallState::Broken(BrokenReason::Io),
        }
    }
}

struct Shared {
    state: UpcallState,
    in_flight: Option<Operation>,
}

struct Conn {
    connector: Box<dyn UpcallConnector>,
    stream: Option<Box<dyn UpcallStream>>,
}

/// Why sending a message failed.
enum SendFailure {
    /// Not one byte went out: the request was certainly not delivered.
    NothingSent(HotplugError),
    /// Part of the message may have gone out.
    Partial(HotplugError),
}

/// Marks one operation in flight; clears the mark (and a mid-way state) when dropped.
struct InFlight<'a> {
    client: &'a UpcallClient,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut shared = lock(&self.client.shared);
        shared.in_flight = None;
        if matches!(
            shared.state,
            UpcallState::Connecting { .. } | UpcallState::WaitingGreeting | UpcallState::Busy(_)
        ) {
            // Only reached if the operation unwound part-way.
            shared.state = UpcallState::Disconnected;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The VMM side of upcall: connects to the guest's device-manager service and sends
/// `ADD_CPU` / `DEL_CPU` requests, one at a time.
///
/// `Send + Sync`; every method takes `&self`. A caller that arrives while another operation is
/// in flight gets [`HotplugError::Busy`] at once (nothing is queued). Requests connect first
/// when there is no connection.
///
/// A reply is only ever taken as the answer to the request sent just before it, and it must
/// be of that request's type (and, on success, count exactly its CPUs):
/// - any error other than the guest's refusal drops the connection, so the late answer to a
///   timed-out request never reaches a later one;
/// - before sending, the client checks that nothing is waiting on the connection: bytes that
///   arrived between two requests (the guest answered twice, or sent a reply nobody asked
///   for) drop the connection, and the request goes out on a fresh one;
/// - every write has a deadline ([`UpcallConfig::write_timeout`]) and every reply one
///   ([`UpcallConfig::reply_timeout`]), so a guest that stops reading or answering costs one
///   timeout, never a blocked client.
pub struct UpcallClient {
    shared: Mutex<Shared>,
    conn: Mutex<Conn>,
    config: UpcallConfig,
    logger: Logger,
}

impl std::fmt::Debug for UpcallClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpcallClient")
            .field("state", &self.state())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl UpcallClient {
    /// A disconnected client; nothing happens until [`connect`](Self::connect) or a request.
    /// Zero durations in `config` are taken as 1 ms.
    pub fn new(connector: Box<dyn UpcallConnector>, config: UpcallConfig, logger: Logger) -> Self {
        let config = UpcallConfig {
            reply_timeout: config.reply_timeout.max(MIN_DURATION),
            write_timeout: config.write_timeout.max(MIN_DURATION),
            greeting_timeout: config.greeting_timeout.max(MIN_DURATION),
            connect_retry_delay: config.connect_retry_delay.max(MIN_DURATION),
            connect_retry_max_delay: config.connect_retry_max_delay.max(MIN_DURATION),
            connect_retry_budget: config.connect_retry_budget.max(1),
        };
        UpcallClient {
            shared: Mutex::new(Shared {
                state: UpcallState::Disconnected,
                in_flight: None,
            }),
            conn: Mutex::new(Conn {
                connector,
                stream: None,
            }),
            config,
            logger: logger.new(o!("upcall" => "client")),
        }
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> &UpcallConfig {
        &self.config
    }

    /// The current state (never blocks on a request in flight).
    pub fn state(&self) -> UpcallState {
        lock(&self.shared).state
    }

    /// Connects if not connected: stream from the connector, service byte `d`, greeting check.
    /// Retries retryable failures with backoff within the budget.
    ///
    /// # Errors
    ///
    /// [`HotplugError::Busy`] while another operation is in flight;
    /// [`HotplugError::ConnectBudgetExhausted`] when every attempt failed in a retryable way;
    /// the first non-retryable error otherwise (a greeting [`HotplugError::Timeout`],
    /// [`HotplugError::BadGreeting`], [`HotplugError::HandshakeLineTooLong`], ...).
    pub fn connect(&self) -> Result<(), HotplugError> {
        let _in_flight = self.begin(Operation::Connect)?;
        let mut conn = lock(&self.conn);
        if conn.stream.is_some() {
            return Ok(());
        }
        let result = self.connect_locked(&mut conn);
        self.finish(&mut conn, &result);
        result
    }

    /// Drops the connection (if any); the state becomes `Disconnected`.
    ///
    /// # Errors
    ///
    /// [`HotplugError::Busy`] while another operation is in flight (the connection stays).
    pub fn disconnect(&self) -> Result<(), HotplugError> {
        let _in_flight = self.begin(Operation::Connect)?;
        let mut conn = lock(&self.conn);
        if conn.stream.take().is_some() {
            info!(self.logger, "upcall connection closed on request");
        }
        self.set_state(UpcallState::Disconnected);
        Ok(())
    }

    /// Asks the guest to online the CPUs with these APIC IDs, in this order, in one request.
    ///
    /// The vCPUs must exist and wait for INIT/SIPI before this is called.
    ///
    /// # Errors
    ///
    /// - [`HotplugError::NoApicIds`], [`HotplugError::TooManyApicIds`],
    ///   [`HotplugError::InvalidApicId`], [`HotplugError::DuplicateApicId`]: the list cannot be
    ///   sent; nothing was.
    /// - [`HotplugError::Busy`]: another operation is in flight; nothing was sent.
    /// - [`HotplugError::GuestError`]: the guest refused or failed, with its errno. The guest
    ///   handles the CPUs in order and stops at the first it cannot bring up, leaving the ones
    ///   before it online, and its failure reply does not say how far it got: for more than
    ///   one APIC ID, which CPUs are online is unknown. Use
    ///   [`add_cpus_one_by_one`](Self::add_cpus_one_by_one) to know exactly.
    /// - [`HotplugError::Timeout`], [`HotplugError::ConnectionReset`], [`HotplugError::Io`] or a
    ///   protocol error ([`HotplugError::outcome_unknown`] is true): the answer was lost; the
    ///   guest may have acted on any part of the request. The connection was dropped.
    /// - Connection errors ([`HotplugError::ConnectBudgetExhausted`],
    ///   [`HotplugError::UnsolicitedData`], ...): no request was sent.
    pub fn add_cpus(&self, apic_ids: &[u8], apic_ver: u8) -> Result<CpuDevReply, HotplugError> {
        self.cpu_request(CpuOp::Add, apic_ids, apic_ver)
    }

    /// Asks the guest to offline the CPUs with these APIC IDs, in this order, in one request.
    /// Only after success may the VMM stop those vCPU threads.
    ///
    /// # Errors
    ///
    /// As [`add_cpus`](Self::add_cpus). On [`HotplugError::GuestError`] the CPUs before the
    /// failing one may be offline already (the guest does not bring them back), and the reply
    /// does not say which: use [`del_cpus_one_by_one`](Self::del_cpus_one_by_one) to know
    /// exactly.
    pub fn del_cpus(&self, apic_ids: &[u8]) -> Result<CpuDevReply, HotplugError> {
        self.cpu_request(CpuOp::Del, apic_ids, DEL_CPU_APIC_VERSION)
    }

    /// Onlines the CPUs with these APIC IDs one request per APIC ID, in this order, and stops
    /// at the first failure: the error says exactly which APIC IDs the guest confirmed.
    ///
    /// The outcome is exact because a failed one-CPU request changes nothing in the guest
    /// (the CPU that failed to come up is unregistered again). It costs one round trip per
    /// CPU instead of one per batch. The client stays claimed for the whole sequence.
    ///
    /// # Errors
    ///
    /// [`StepwiseError`], with the confirmed APIC IDs, the one that failed (whose state is
    /// known unless [`StepwiseError::failed_state_known`] is false) and those not sent.
    pub fn add_cpus_one_by_one(&self, apic_ids: &[u8], apic_ver: u8) -> Result<(), StepwiseError> {
        self.one_by_one(CpuOp::Add, apic_ids, apic_ver)
    }

    /// Offlines the CPUs with these APIC IDs one request per APIC ID, in this order, and
    /// stops at the first failure: the error says exactly which APIC IDs the guest confirmed
    /// offline (their vCPU threads may be stopped; the others may not).
    ///
    /// # Errors
    ///
    /// As [`add_cpus_one_by_one`](Self::add_cpus_one_by_one).
    pub fn del_cpus_one_by_one(&self, apic_ids: &[u8]) -> Result<(), StepwiseError> {
        self.one_by_one(CpuOp::Del, apic_ids, DEL_CPU_APIC_VERSION)
    }

    fn one_by_one(&self, op: CpuOp, apic_ids: &[u8], apic_ver: u8) -> Result<(), StepwiseError> {
        let stop = |done: usize, failed: Option<u8>, source: HotplugError| {
            let rest = if failed.is_some() { done + 1 } else { done };
            StepwiseError {
                op,
                done: apic_ids.get(..done).unwrap_or_default().to_vec(),
                failed,
                not_sent: apic_ids.get(rest..).unwrap_or_default().to_vec(),
                source,
            }
        };
        // The whole list is checked before anything is sent.
        validate_apic_ids(apic_ids).map_err(|e| stop(0, None, e))?;
        let _in_flight = self
            .begin(Operation::Cpu(op))
            .map_err(|e| stop(0, None, e))?;
        let mut conn = lock(&self.conn);
        for (done, &apic_id) in apic_ids.iter().enumerate() {
            if let Err(e) = self.claimed_request(&mut conn, op, &[apic_id], apic_ver) {
                return Err(stop(done, Some(apic_id), e));
            }
        }
        Ok(())
    }

    fn cpu_request(
        &self,
        op: CpuOp,
        apic_ids: &[u8],
        apic_ver: u8,
    ) -> Result<CpuDevReply, HotplugError> {
        // Validate before touching the connection: a bad request changes nothing.
        validate_apic_ids(apic_ids)?;
        let _in_flight = self.begin(Operation::Cpu(op))?;
        let mut conn = lock(&self.conn);
        self.claimed_request(&mut conn, op, apic_ids, apic_ver)
    }

    /// One request, the client already claimed for it.
    fn claimed_request(
        &self,
        conn: &mut Conn,
        op: CpuOp,
        apic_ids: &[u8],
        apic_ver: u8,
    ) -> Result<CpuDevReply, HotplugError> {
        let request = CpuDevRequest::new(apic_ids, apic_ver)?;
        let msg = encode_cpu_request(op, &request)?;
        debug!(self.logger, "sending upcall request"; "op" => %op, "apic_ids" => ?apic_ids);
        let result = self.exchange(conn, op, &msg, request.count());
        self.finish(conn, &result);
        match &result {
            Ok(reply) => info!(self.logger, "upcall request done";
                "op" => %op, "apic_ids" => ?apic_ids, "apic_index" => reply.apic_index),
            Err(e) => warn!(self.logger, "upcall request failed";
                "op" => %op, "apic_ids" => ?apic_ids, "error" => %e),
        }
        result
    }

    /// Claims the client for one operation, or says what is in flight.
    fn begin(&self, op: Operation) -> Result<InFlight<'_>, HotplugError> {
        let mut shared = lock(&self.shared);
        if let Some(in_flight) = shared.in_flight {
            return Err(HotplugError::Busy { in_flight });
        }
        shared.in_flight = Some(op);
        Ok(InFlight { client: self })
    }

    fn set_state(&self, state: UpcallState) {
        lock(&self.shared).state = state;
    }

    /// Sets the state after an operation; drops the connection on any error but a refusal.
    fn finish<T>(&self, conn: &mut Conn, result: &Result<T, HotplugError>) {
        match result {
            Ok(_) => self.set_state(UpcallState::Ready),
            Err(e) => {
                let state = UpcallState::after_error(e);
                if state != UpcallState::Ready && conn.stream.take().is_some() {
                    info!(self.logger, "upcall connection dropped"; "state" => %state);
                }
                self.set_state(state);
            }
        }
    }

    fn exchange(
        &self,
        conn: &mut Conn,
        op: CpuOp,
        msg: &MsgBuf,
        count: u8,
    ) -> Result<CpuDevReply, HotplugError> {
        self.idle_connection(conn)?;
        self.set_state(UpcallState::Busy(op));
        match self.send_request(conn, msg) {
            Ok(()) => {}
            Err(SendFailure::NothingSent(e)) => {
                // The stream died while idle (e.g. the guest or muxer restarted); the request
                // never left, so it is safe to reconnect and send it once more.
                info!(self.logger, "upcall connection found dead before sending, reconnecting";
                    "error" => %e);
                conn.stream = None;
                self.idle_connection(conn)?;
                self.set_state(UpcallState::Busy(op));
                self.send_request(conn, msg).map_err(|f| match f {
                    SendFailure::NothingSent(e) | SendFailure::Partial(e) => e,
                })?;
            }
            Err(SendFailure::Partial(e)) => return Err(e),
        }
        let stream = conn
            .stream
            .as_deref_mut()
            .ok_or(HotplugError::ConnectionReset {
                during: Phase::Reply,
                bytes: 0,
            })?;
        let reply = read_message_within(stream, Phase::Reply, self.config.reply_timeout)?;
        decode_cpu_reply(&reply, op, count)
    }

    /// Gives `conn` a connection on which nothing is waiting, connecting if there is none.
    ///
    /// Between two requests the guest has nothing to say: bytes waiting now are a duplicate,
    /// late or unsolicited reply, and taking them as the answer to the coming request would
    /// shift every later answer. Such a connection (or one the guest closed) is dropped and
    /// replaced, once; a fresh connection that already holds bytes fails the request with
    /// [`HotplugError::UnsolicitedData`]. Nothing of the request has been sent either way.
    fn idle_connection(&self, conn: &mut Conn) -> Result<(), HotplugError> {
        let mut fresh = false;
        loop {
            let stream = match conn.stream.as_deref_mut() {
                Some(stream) => stream,
                None => {
                    self.connect_locked(conn)?;
                    fresh = true;
                    continue;
                }
            };
            let during = Phase::Idle;
            let problem = match stream.poll_unsolicited() {
                Ok(Unsolicited::Nothing) => return Ok(()),
                Ok(Unsolicited::Data(bytes)) => HotplugError::UnsolicitedData { bytes },
                Ok(Unsolicited::Closed) => HotplugError::ConnectionReset { during, bytes: 0 },
                Err(source) => HotplugError::Io { during, source },
            };
            conn.stream = None;
            if fresh {
                warn!(self.logger, "fresh upcall connection is not idle"; "error" => %problem);
                return Err(problem);
            }
            warn!(self.logger, "upcall connection is not idle before a request, reconnecting";
                "error" => %problem);
        }
    }

    fn send_request(&self, conn: &mut Conn, msg: &MsgBuf) -> Result<(), SendFailure> {
        let during = Phase::Request;
        let Some(stream) = conn.stream.as_deref_mut() else {
            return Err(SendFailure::NothingSent(HotplugError::ConnectionReset {
                during,
                bytes: 0,
            }));
        };
        let timeout = self.config.write_timeout;
        // A timeout too large for the clock means "no deadline".
        let deadline = Instant::now().checked_add(timeout);
        let mut sent = 0;
        while sent < MSG_SIZE {
            let remaining = match remaining_until(deadline) {
                Some(Duration::ZERO) => {
                    return Err(SendFailure::Partial(HotplugError::Timeout {
                        during,
                        timeout,
                    }))
                }
                remaining => remaining,
            };
            if let Err(source) = stream.set_write_timeout(remaining) {
                return Err(SendFailure::Partial(HotplugError::Io { during, source }));
            }
            match stream.write(&msg[sent..]) {
                Ok(0) => {
                    let e = HotplugError::ConnectionReset {
                        during,
                        bytes: sent,
                    };
                    return Err(if sent == 0 {
                        SendFailure::NothingSent(e)
                    } else {
                        SendFailure::Partial(e)
                    });
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = io_error(during, sent, timeout, e);
                    let reset = matches!(e, HotplugError::ConnectionReset { .. });
                    return Err(if sent == 0 && reset {
                        SendFailure::NothingSent(e)
                    } else {
                        SendFailure::Partial(e)
                    });
                }
            }
        }
        stream
            .flush()
            .map_err(|e| SendFailure::Partial(io_error(during, sent, timeout, e)))
    }

    /// Connects with retries; on success the stream is in `conn` (state left to the caller).
    fn connect_locked(&self, conn: &mut Conn) -> Result<(), HotplugError> {
        let budget = self.config.connect_retry_budget;
        let mut delay = self.config.connect_retry_delay;
        let mut attempt = 1;
        loop {
            self.set_state(UpcallState::Connecting { attempt });
            match self.connect_once(conn) {
                Ok(stream) => {
                    conn.stream = Some(stream);
                    info!(self.logger, "upcall connected"; "attempt" => attempt);
                    return Ok(());
                }
                Err(e) if !e.is_retryable() => {
                    warn!(self.logger, "upcall connect failed"; "attempt" => attempt, "error" => %e);
                    return Err(e);
                }
                Err(e) if attempt >= budget => {
                    warn!(self.logger, "upcall connect budget exhausted";
                        "attempts" => attempt, "error" => %e);
                    return Err(HotplugError::ConnectBudgetExhausted {
                        attempts: attempt,
                        last: Box::new(e),
                    });
                }
                Err(e) => {
                    debug!(self.logger, "upcall connect attempt failed, will retry";
                        "attempt" => attempt, "delay" => ?delay, "error" => %e);
                    std::thread::sleep(delay);
                    delay = delay
                        .saturating_mul(2)
                        .min(self.config.connect_retry_max_delay)
                        .max(MIN_DURATION);
                    attempt += 1;
                }
            }
        }
    }

    /// One attempt: connector, service byte, greeting.
    fn connect_once(&self, conn: &mut Conn) -> Result<Box<dyn UpcallStream>, HotplugError> {
        let mut stream = conn.connector.connect()?;
        let write_timeout = self.config.write_timeout;
        stream
            .set_write_timeout(Some(write_timeout))
            .and_then(|()| stream.write_all(&[DEV_MGR_SERVICE_BYTE]))
            .and_then(|()| stream.flush())
            .map_err(|e| io_error(Phase::ServiceByte, 0, write_timeout, e))?;
        let timeout = self.config.greeting_timeout;
        self.set_state(UpcallState::WaitingGreeting);
        let greeting = read_message_within(stream.as_mut(), Phase::Greeting, timeout)?;
        decode_greeting(&greeting)?;
        Ok(stream)
    }
}

/// Reads exactly one message within `timeout` (one deadline for all the reads).
fn read_message_within(
    stream: &mut dyn UpcallStream,
    during: Phase,
    timeout: Duration,
) -> Result<MsgBuf, HotplugError> {
    // A timeout too large for the clock means "no deadline".
    let deadline = Instant::now().checked_add(timeout);
    let mut reader = MessageReader::new();
    loop {
        let remaining = match remaining_until(deadline) {
            Some(Duration::ZERO) => return Err(HotplugError::Timeout { during, timeout }),
            remaining => remaining,
        };
        stream
            .set_read_timeout(remaining)
            .map_err(|source| HotplugError::Io { during, source })?;
        match reader.read_from(stream) {
            Ok(ReadProgress::Complete) => {
                return reader
                    .message()
                    .copied()
                    .ok_or(HotplugError::ConnectionReset {
                        during,
                        bytes: reader.filled(),
                    })
            }
            Ok(ReadProgress::Partial(_)) => {}
            Ok(ReadProgress::Eof(bytes)) => {
                return Err(HotplugError::ConnectionReset { during, bytes })
            }
            Err(e) => return Err(io_error(during, reader.filled(), timeout, e)),
        }
    }
}

/// The time left until `deadline` (zero once passed), `None` for no deadline.
fn remaining_until(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}
