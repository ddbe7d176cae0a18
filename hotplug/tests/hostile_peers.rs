//! The client against hostile guests over real Unix sockets: peers that never read, answer
//! twice, answer late, send replies nobody asked for, flood, or greet slowly. Each test is
//! written so that the defect it guards against turns into a failure, never into a hang.

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hotplug::protocol::{encode_greeting, write_reply_apic_index, MsgBuf, MsgHeader, MSG_SIZE};
use hotplug::{
    BrokenReason, CpuOp, HotplugError, HybridVsockConnector, Phase, UpcallClient, UpcallConfig,
    UpcallState, UPCALL_GUEST_PORT,
};

/// A generous limit that only turns a hang into a failure.
const HANG_LIMIT: Duration = Duration::from_secs(30);

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn client_for(socket: &Path, config: UpcallConfig) -> UpcallClient {
    let connector = HybridVsockConnector::new(socket, UPCALL_GUEST_PORT)
        .with_handshake_timeout(Duration::from_secs(10));
    UpcallClient::new(Box::new(connector), config, logger())
}

fn fast_config() -> UpcallConfig {
    UpcallConfig {
        reply_timeout: Duration::from_secs(10),
        greeting_timeout: Duration::from_secs(10),
        connect_retry_delay: Duration::from_millis(1),
        connect_retry_max_delay: Duration::from_millis(4),
        connect_retry_budget: 3,
        ..UpcallConfig::default()
    }
}

/// A success reply to `op` with this `apic_index`, as the guest kernel writes it.
fn success(op: CpuOp, apic_index: u32) -> MsgBuf {
    let mut buf = [0u8; MSG_SIZE];
    MsgHeader::new(op.msg_type(), 4).write_to(&mut buf);
    write_reply_apic_index(&mut buf, apic_index);
    buf
}

/// A hostile guest behind a fake hybrid-vsock muxer: every accepted connection gets the
/// `OK` line and the greeting, then `behaviour(stream, connection_number)` on its own thread.
struct HostilePeer {
    socket: PathBuf,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl HostilePeer {
    fn start<F>(behaviour: F) -> Self
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
                    thread::spawn(move || {
                        let mut line = [0u8; 12];
                        if stream.read_exact(&mut line).is_err() || &line != b"CONNECT 219\n" {
                            return;
                        }
                        let mut service = [0u8; 1];
                        if stream.write_all(b"OK 1024\n").is_err()
                            || stream.read_exact(&mut service).is_err()
                            || stream.write_all(&encode_greeting()).is_err()
                        {
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
    assert!(
        matches!(
            err,
            HotplugError::Timeout {
                during: Phase::Request,
                timeout,
            } if timeout == Duration::from_millis(300)
        ),
        "{err:?}"
    );
    assert!(err.outcome_unknown());
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Timeout));
    // Not left busy: the next request reconnects and works.
    let worker = Arc::clone(&client);
    within_limit("the request after the write timeout", move || {
        worker.add_cpus(&[1], 0x14)
    })
    .unwrap();
    assert_eq!(peer.connections(), 2);
}
