//! Serving connections: the service byte, the greeting, request/reply pairs and the injected
//! faults that act on a connection.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use slog::{info, o, warn, Logger};

use super::fault::Moment;
use super::kernel::InjectedFailure;
use super::{lock, CpuCallback, GuestFault, GuestServerOptions};
use crate::connector::UpcallStream;
use crate::error::{io_error, HotplugError, Phase};
use crate::protocol::{
    encode_greeting, validate_apic_ids, write_reply_apic_index, CpuOp, MessageReader, MsgBuf,
    MsgHeader, ReadProgress, CPU_REPLY_SUCCESS_SIZE, DEV_MGR_SERVICE_BYTE, MSG_SIZE,
};

/// How often an idle connection looks for faults to act on between requests.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// The state all handles of one [`GuestUpcallServer`] share.
pub(super) struct ServerInner {
    pub(super) boot_apic_id: u8,
    /// The guest's CPUs, boot CPUs first, then in the order added.
    pub(super) present: Mutex<Vec<u8>>,
    /// Acting on CPUs, one request at a time (like the kernel's hotplug locks).
    pub(super) callback: Mutex<CpuCallback>,
    /// The reply buffer of [`GuestUpcallServer::handle_message`] (one long-lived connection).
    pub(super) reply: Mutex<MsgBuf>,
    faults: Mutex<VecDeque<GuestFault>>,
    faults_used: AtomicU64,
    pub(super) requests: AtomicU64,
    /// Bumped to release connections stalled by [`GuestFault::NeverRead`].
    release: (Mutex<u64>, Condvar),
    options: GuestServerOptions,
    pub(super) logger: Logger,
}

/// A fresh connection's reply buffer: zeroed, with the greeting's header.
fn greeting_buffer() -> MsgBuf {
    encode_greeting()
}

/// A guest-side upcall device-manager server that answers like the patched guest kernel (see
/// the [module documentation](super)).
///
/// Cloning gives another handle to the same server (same CPUs, same faults).
#[derive(Clone)]
pub struct GuestUpcallServer {
    pub(super) inner: Arc<ServerInner>,
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
                self.refuse(request, reply, errno);
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
