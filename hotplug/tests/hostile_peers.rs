//! The client against hostile guests over real Unix sockets: peers that never read, answer
//! twice, answer late, send replies nobody asked for, flood, or greet slowly. Each test is
//! written so that the defect it guards against turns into a failure, never into a hang.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hotplug::connector::Unsolicited;
use hotplug::protocol::{
    encode_greeting, write_reply_apic_index, write_reply_result, MsgBuf, MsgHeader, MSG_SIZE,
};
use hotplug::{
    BrokenReason, CpuOp, HotplugError, HybridVsockConnector, Phase, UpcallClient, UpcallConfig,
    UpcallConnector, UpcallState, UpcallStream, UPCALL_GUEST_PORT,
};

#[macro_use]
mod common;
use common::*;

/// A success reply to `op` with this `apic_index`, as the guest kernel writes it.
fn success(op: CpuOp, apic_index: u32) -> MsgBuf {
    let mut buf = [0u8; MSG_SIZE];
    MsgHeader::new(op.msg_type(), 4).write_to(&mut buf);
    write_reply_apic_index(&mut buf, apic_index);
    buf
}

/// A failure reply to `op` with this errno, as the guest kernel writes it (`msg_size` 0).
fn refusal(op: CpuOp, errno: i32) -> MsgBuf {
    let mut buf = [0u8; MSG_SIZE];
    MsgHeader::new(op.msg_type(), 0).write_to(&mut buf);
    write_reply_result(&mut buf, -errno);
    buf
}

/// Reads requests and answers each with `reply` until the client closes.
fn answer_each_with(stream: &mut UnixStream, reply: &MsgBuf) {
    let mut request = [0u8; MSG_SIZE];
    while stream.read_exact(&mut request).is_ok() {
        if stream.write_all(reply).is_err() {
            return;
        }
    }
}

/// A hostile guest behind a fake hybrid-vsock muxer: every accepted connection gets the
/// `OK` line and the greeting, then `behaviour(stream, connection_number)` on its own thread.
struct HostilePeer {
    socket: PathBuf,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

/// What a [`HostilePeer`] does before handing a connection to its behaviour.
#[derive(Clone, Default)]
struct Prelude {
    /// Sleep this long before the greeting.
    greeting_delay: Duration,
    /// Bytes sent in the same write as the greeting, on the connections numbered here.
    after_greeting: Vec<u8>,
    /// The connection numbers (from 1) that get `after_greeting`; empty: all.
    on_connections: Vec<usize>,
}

impl HostilePeer {
    fn start<F>(behaviour: F) -> Self
    where
        F: Fn(UnixStream, usize) + Send + Sync + 'static,
    {
        Self::start_with(Prelude::default(), behaviour)
    }

    fn start_with<F>(prelude: Prelude, behaviour: F) -> Self
    where
        F: Fn(UnixStream, usize) + Send + Sync + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("hostile.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let behaviour = Arc::new(behaviour);
        {
            let connections = Arc::clone(&connections);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut stream) = stream else { return };
                    let n = connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let behaviour = Arc::clone(&behaviour);
                    let prelude = prelude.clone();
                    thread::spawn(move || {
                        let mut line = [0u8; 12];
                        if stream.read_exact(&mut line).is_err() || &line != b"CONNECT 219\n" {
                            return;
                        }
                        let mut service = [0u8; 1];
                        if stream.write_all(b"OK 1024\n").is_err()
                            || stream.read_exact(&mut service).is_err()
                        {
                            return;
                        }
                        thread::sleep(prelude.greeting_delay);
                        let mut greeting = encode_greeting().to_vec();
                        if prelude.on_connections.is_empty() || prelude.on_connections.contains(&n)
                        {
                            greeting.extend_from_slice(&prelude.after_greeting);
                        }
                        if stream.write_all(&greeting).is_err() {
                            return;
                        }
                        behaviour(stream, n);
                    });
                }
            });
        }
        HostilePeer {
            socket,
            connections,
            stop,
            _dir: dir,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HostilePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
    }
}

/// Bytes queued in a socket's receive buffer, without reading them.
fn queued_bytes(stream: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the valid pointer; the fd is open.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD");
    usize::try_from(n).unwrap()
}

/// Runs `f` on a thread and fails the test if it does not finish within [`HANG_LIMIT`].
fn within_limit<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_LIMIT)
        .unwrap_or_else(|_| panic!("{what}: still blocked after {HANG_LIMIT:?}"))
}

/// The guest answers every request in time but never reads its socket: the client's requests
/// pile up until writing one blocks. The write must give up by its deadline, drop the
/// connection and leave the client usable; it must never stay blocked (and "busy") for good.
#[test]
fn a_guest_that_answers_but_never_reads_cannot_block_the_client() {
    let peer = HostilePeer::start(|mut stream, n| {
        if n > 1 {
            // A later connection is well-behaved (it reads and answers).
            let mut request = [0u8; MSG_SIZE];
            while stream.read_exact(&mut request).is_ok() {
                if stream.write_all(&success(CpuOp::Add, 1)).is_err() {
                    return;
                }
            }
            return;
        }
        let start = Instant::now();
        let mut answered = 0;
        while start.elapsed() < HANG_LIMIT {
            if queued_bytes(&stream) >= (answered + 1) * MSG_SIZE {
                if stream.write_all(&success(CpuOp::Add, 1)).is_err() {
                    return;
                }
                answered += 1;
            } else {
                thread::sleep(Duration::from_micros(200));
            }
        }
    });
    let config = UpcallConfig {
        write_timeout: Duration::from_millis(300),
        ..fast_config()
    };
    let client = Arc::new(client_for(&peer.socket, config));
    let worker = Arc::clone(&client);
    let (ok, err) = within_limit("a request against a guest that never reads", move || {
        let mut ok = 0usize;
        loop {
            match worker.add_cpus(&[1], 0x14) {
                Ok(_) => ok += 1,
                Err(e) => return (ok, e),
            }
            assert!(ok < 100_000, "the socket never filled up");
        }
    });
    assert!(ok > 10, "the first requests are answered ({ok})");
    assert_lost_answer(&client, &err, Phase::Request, Duration::from_millis(300));
    // Not left busy: the next request reconnects and works.
    let worker = Arc::clone(&client);
    within_limit("the request after the write timeout", move || {
        worker.add_cpus(&[1], 0x14)
    })
    .unwrap();
    assert_eq!(peer.connections(), 2);
}

/// The guest answers the first request twice (both copies in one write). The duplicate must
/// not be taken as the answer to the next request, which the guest refuses.
#[test]
fn an_answer_sent_twice_does_not_shift_later_answers() {
    let peer = HostilePeer::start(|mut stream, n| {
        let mut request = [0u8; MSG_SIZE];
        if n == 1 {
            if stream.read_exact(&mut request).is_err() {
                return;
            }
            let mut twice = success(CpuOp::Add, 1).to_vec();
            twice.extend_from_slice(&success(CpuOp::Add, 1));
            if stream.write_all(&twice).is_err() {
                return;
            }
        }
        answer_each_with(&mut stream, &refusal(CpuOp::Add, 22));
    });
    let client = client_for(&peer.socket, fast_config());
    assert_eq!(client.add_cpus(&[1], 0x14).unwrap().apic_index, 1);
    // Give the duplicate time to arrive whatever the scheduling.
    thread::sleep(Duration::from_millis(50));
    let err = client.add_cpus(&[3], 0x14).unwrap_err();
    assert_eq!(err.guest_errno(), Some(22), "{err:?}");
    let err = client.add_cpus(&[4], 0x14).unwrap_err();
    assert_eq!(err.guest_errno(), Some(22), "{err:?}");
    assert_eq!(
        peer.connections(),
        2,
        "the duplicate dropped the first connection"
    );
    assert_eq!(client.state(), UpcallState::Ready);
}

/// A guest that sends an ADD_CPU success right after the greeting on the connections
/// `on_connections` (empty: all) and refuses every request; the client connects, waits for
/// the stray bytes to arrive and sends one request, whose error is returned.
fn unsolicited_success_then_refusals(
    on_connections: Vec<usize>,
) -> (HostilePeer, UpcallClient, HotplugError) {
    let prelude = Prelude {
        after_greeting: success(CpuOp::Add, 1).to_vec(),
        on_connections,
        ..Prelude::default()
    };
    let peer = HostilePeer::start_with(prelude, |mut stream, _| {
        answer_each_with(&mut stream, &refusal(CpuOp::Add, 22));
    });
    let client = client_for(&peer.socket, fast_config());
    client.connect().unwrap();
    thread::sleep(Duration::from_millis(50));
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    (peer, client, err)
}

/// A success reply that arrives before any request was sent is never an answer.
#[test]
fn an_unsolicited_reply_before_the_request_is_never_an_answer() {
    let (peer, _client, err) = unsolicited_success_then_refusals(vec![1]);
    assert_eq!(err.guest_errno(), Some(22), "{err:?}");
    assert_eq!(peer.connections(), 2);
}

/// A guest that sends unsolicited bytes on every connection makes requests fail with a typed
/// protocol error (at most one reconnect per request), and nothing it sent is an answer.
#[test]
fn unsolicited_bytes_on_every_connection_are_a_protocol_error() {
    let (peer, client, err) = unsolicited_success_then_refusals(Vec::new());
    assert_matches!(err, HotplugError::UnsolicitedData { bytes } if bytes > 0);
    assert!(!err.outcome_unknown(), "nothing was sent");
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));
    assert_eq!(peer.connections(), 2);
}

/// The guest answers after the client gave up: the late answer never reaches a later request.
#[test]
fn an_answer_after_the_timeout_is_not_taken_by_the_next_request() {
    let peer = HostilePeer::start(|mut stream, n| {
        if n == 1 {
            let mut request = [0u8; MSG_SIZE];
            if stream.read_exact(&mut request).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(400));
            let _ = stream.write_all(&success(CpuOp::Add, 1));
        }
        answer_each_with(&mut stream, &refusal(CpuOp::Add, 22));
    });
    let client = client_for(&peer.socket, reply_within(150));
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_timeout(&err, Phase::Reply);
    thread::sleep(Duration::from_millis(400));
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_eq!(err.guest_errno(), Some(22), "{err:?}");
    assert_eq!(peer.connections(), 2);
}

/// A greeting slower than the limit is a typed timeout; within the limit it is fine.
#[test]
fn a_slow_greeting_is_bounded() {
    let prelude = Prelude {
        greeting_delay: Duration::from_millis(300),
        ..Prelude::default()
    };
    let peer = HostilePeer::start_with(prelude, |mut stream, _| {
        answer_each_with(&mut stream, &success(CpuOp::Add, 1));
    });
    let client = client_for(&peer.socket, greeting_within(100));
    let err = client.connect().unwrap_err();
    assert_timeout(&err, Phase::Greeting);
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Timeout));
    let patient = client_for(&peer.socket, fast_config());
    patient.add_cpus(&[1], 0x14).unwrap();
}

/// A connector whose streams count the bytes the client reads.
struct Counting {
    inner: HybridVsockConnector,
    read: Arc<AtomicUsize>,
}

struct CountingStream {
    inner: Box<dyn UpcallStream>,
    read: Arc<AtomicUsize>,
}

impl Read for CountingStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n, Ordering::SeqCst);
        Ok(n)
    }
}

impl Write for CountingStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl UpcallStream for CountingStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.inner.set_write_timeout(timeout)
    }
    fn poll_unsolicited(&mut self) -> std::io::Result<Unsolicited> {
        let found = self.inner.poll_unsolicited()?;
        if let Unsolicited::Data(n) = found {
            self.read.fetch_add(n, Ordering::SeqCst);
        }
        Ok(found)
    }
}

impl UpcallConnector for Counting {
    fn connect(&mut self) -> Result<Box<dyn UpcallStream>, HotplugError> {
        Ok(Box::new(CountingStream {
            inner: self.inner.connect()?,
            read: Arc::clone(&self.read),
        }))
    }
}

/// A guest that answers every request correctly and then floods the socket with garbage: the
/// client reads a bounded amount per request (one reply, the probe, one greeting) whatever
/// the guest sends, so its memory cannot grow with the flood.
#[test]
fn a_flooding_guest_is_read_a_bounded_amount_per_request() {
    let peer = HostilePeer::start(|mut stream, _| {
        let mut request = [0u8; MSG_SIZE];
        if stream.read_exact(&mut request).is_err() {
            return;
        }
        // The reply and the start of the flood in one write, so the flood is there before
        // the next request whatever the scheduling.
        let mut reply = success(CpuOp::Add, 1).to_vec();
        reply.extend_from_slice(&[0xA5; 64]);
        if stream.write_all(&reply).is_err() {
            return;
        }
        let garbage = [0xA5u8; 64 * 1024];
        let start = Instant::now();
        while start.elapsed() < HANG_LIMIT && stream.write_all(&garbage).is_ok() {}
    });
    let read = Arc::new(AtomicUsize::new(0));
    let connector = Counting {
        inner: HybridVsockConnector::new(&peer.socket, UPCALL_GUEST_PORT),
        read: Arc::clone(&read),
    };
    let client = UpcallClient::new(Box::new(connector), fast_config(), logger());
    const REQUESTS: usize = 20;
    for i in 0..REQUESTS {
        // Each request finds the previous connection flooded, drops it, reconnects (one
        // greeting) and gets its own answer.
        client
            .add_cpus(&[1], 0x14)
            .unwrap_or_else(|e| panic!("request {i}: {e:?} ({} connections)", peer.connections()));
    }
    let per_request = read.load(Ordering::SeqCst) / REQUESTS;
    assert!(
        per_request <= 2 * MSG_SIZE + hotplug::connector::UNSOLICITED_PROBE,
        "{per_request} bytes read per request"
    );
    assert_eq!(peer.connections(), REQUESTS);
}
