//! The client against the guest-side server over real Unix sockets, through the stand-in
//! hybrid-vsock muxer.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use hotplug::guest::{
    CpuAction, CpuCallback, GuestFault, GuestServerOptions, GuestUpcallServer, VsockMuxerStub,
};
use hotplug::protocol::{encode_greeting, MsgHeader, MsgType, MSG_SIZE};
use hotplug::{
    BrokenReason, CpuOp, HotplugError, HybridVsockConnector, Operation, Phase, UpcallClient,
    UpcallConfig, UpcallState, UPCALL_GUEST_PORT,
};
use tempfile::TempDir;

/// A generous limit that only turns a hang into a failure.
const HANG_LIMIT: Duration = Duration::from_secs(20);

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// Records every action the guest is asked to take.
fn recording_callback() -> (CpuCallback, Arc<Mutex<Vec<CpuAction>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    let callback: CpuCallback = Box::new(move |action| {
        sink.lock().unwrap().push(action);
        Ok(())
    });
    (callback, log)
}

/// Fields drop in order: the stub before the directory holding its socket.
struct Setup {
    muxer: Option<VsockMuxerStub>,
    server: GuestUpcallServer,
    actions: Arc<Mutex<Vec<CpuAction>>>,
    socket: PathBuf,
    _dir: TempDir,
}

fn setup(boot: &[u8]) -> Setup {
    let (callback, actions) = recording_callback();
    setup_with(boot, callback, actions)
}

fn setup_with(boot: &[u8], callback: CpuCallback, actions: Arc<Mutex<Vec<CpuAction>>>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock");
    let server = GuestUpcallServer::new(boot, callback, GuestServerOptions::default()).unwrap();
    let muxer =
        VsockMuxerStub::start(&socket, UPCALL_GUEST_PORT, server.clone(), logger()).unwrap();
    Setup {
        _dir: dir,
        socket,
        server,
        muxer: Some(muxer),
        actions,
    }
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

fn client_for(socket: &Path, config: UpcallConfig) -> UpcallClient {
    let connector = HybridVsockConnector::new(socket, UPCALL_GUEST_PORT)
        .with_handshake_timeout(Duration::from_secs(10));
    UpcallClient::new(Box::new(connector), config, logger())
}

#[test]
fn connect_add_and_remove() {
    let s = setup(&[0, 1]);
    let client = client_for(&s.socket, fast_config());
    assert_eq!(client.state(), UpcallState::Disconnected);
    client.connect().unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
    // Connecting again is a no-op.
    client.connect().unwrap();
    assert_eq!(s.muxer.as_ref().unwrap().accepted_connections(), 1);

    let reply = client.add_cpus(&[8, 2, 9], 0x14).unwrap();
    assert_eq!((reply.op, reply.apic_index), (CpuOp::Add, 3));
    assert_eq!(client.state(), UpcallState::Ready);
    assert_eq!(s.server.present_apic_ids(), vec![0, 1, 8, 2, 9]);

    let reply = client.del_cpus(&[9, 1]).unwrap();
    assert_eq!((reply.op, reply.apic_index), (CpuOp::Del, 2));
    assert_eq!(s.server.present_apic_ids(), vec![0, 8, 2]);

    assert_eq!(
        *s.actions.lock().unwrap(),
        vec![
            CpuAction::Online(8),
            CpuAction::Online(2),
            CpuAction::Online(9),
            CpuAction::Offline(9),
            CpuAction::Offline(1),
        ],
        "the guest acts on exactly the requested APIC IDs, in order"
    );
    assert_eq!(s.muxer.as_ref().unwrap().accepted_connections(), 1);

    client.disconnect().unwrap();
    assert_eq!(client.state(), UpcallState::Disconnected);
}

#[test]
fn a_request_connects_by_itself() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
}

#[test]
fn guest_refusals_surface_the_errno_and_keep_the_connection() {
    let s = setup(&[0, 1]);
    let client = client_for(&s.socket, fast_config());
    client.connect().unwrap();

    // ADD with an APIC ID already present: -22, nothing changes (not even the new ones).
    let err = client.add_cpus(&[5, 1], 0x14).unwrap_err();
    assert!(
        matches!(err, HotplugError::GuestError { errno: 22 }),
        "{err:?}"
    );
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
    // The boot CPU, an unknown CPU, or all CPUs cannot be removed.
    for ids in [&[0u8][..], &[7], &[1, 0]] {
        let err = client.del_cpus(ids).unwrap_err();
        assert_eq!(err.guest_errno(), Some(22), "DEL {ids:?}: {err:?}");
    }
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
    assert!(
        s.actions.lock().unwrap().is_empty(),
        "refusals act on no CPU"
    );
    // A refusal is an answer: the connection stays up and usable.
    assert_eq!(client.state(), UpcallState::Ready);
    client.add_cpus(&[5], 0x14).unwrap();
    assert_eq!(s.muxer.as_ref().unwrap().accepted_connections(), 1);
}

#[test]
fn a_cpu_failing_part_way_leaves_earlier_ones_online() {
    let actions = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&actions);
    let callback: CpuCallback = Box::new(move |action| {
        sink.lock().unwrap().push(action);
        if action == CpuAction::Online(4) {
            Err(5) // EIO: the CPU never reported in
        } else {
            Ok(())
        }
    });
    let s = setup_with(&[0], callback, actions);
    let client = client_for(&s.socket, fast_config());
    let err = client.add_cpus(&[2, 4, 6], 0x14).unwrap_err();
    assert!(
        matches!(err, HotplugError::GuestError { errno: 5 }),
        "{err:?}"
    );
    assert_eq!(s.server.present_apic_ids(), vec![0, 2]);
    assert_eq!(
        *s.actions.lock().unwrap(),
        vec![CpuAction::Online(2), CpuAction::Online(4)]
    );
    assert_eq!(client.state(), UpcallState::Ready);
}

#[test]
fn invalid_requests_are_rejected_before_anything_is_sent() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    assert!(matches!(
        client.add_cpus(&[], 0x14),
        Err(HotplugError::NoApicIds)
    ));
    assert!(matches!(
        client.add_cpus(&[3, 255], 0x14),
        Err(HotplugError::InvalidApicId { apic_id: 255 })
    ));
    assert!(matches!(
        client.del_cpus(&[3, 3]),
        Err(HotplugError::DuplicateApicId { apic_id: 3 })
    ));
    assert_eq!(client.state(), UpcallState::Disconnected);
    assert_eq!(s.muxer.as_ref().unwrap().accepted_connections(), 0);
    assert_eq!(s.server.requests_handled(), 0);
}

#[test]
fn silent_guest_times_out_and_the_next_request_reconnects() {
    let s = setup(&[0]);
    let config = UpcallConfig {
        reply_timeout: Duration::from_millis(200),
        ..fast_config()
    };
    let client = client_for(&s.socket, config);
    client.connect().unwrap();
    s.server.inject_fault(GuestFault::Silent);
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::Timeout {
                during: Phase::Reply,
                timeout
            } if timeout == Duration::from_millis(200)
        ),
        "{err:?}"
    );
    assert!(err.outcome_unknown());
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Timeout));
    assert_eq!(
        s.server.present_apic_ids(),
        vec![0],
        "the silent guest did nothing"
    );

    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
    assert_eq!(s.muxer.as_ref().unwrap().accepted_connections(), 2);
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
}

#[test]
fn hang_up_mid_request_is_a_reset_not_a_success() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    client.connect().unwrap();

    s.server.inject_fault(GuestFault::HangUp);
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::ConnectionReset {
                during: Phase::Reply,
                bytes: 0
            }
        ),
        "{err:?}"
    );
    assert!(err.outcome_unknown());
    assert_eq!(
        client.state(),
        UpcallState::Broken(BrokenReason::ConnectionReset)
    );

    // The guest acted but the reply was cut short: still not a success.
    s.server
        .inject_fault(GuestFault::TruncatedReply { bytes: 100 });
    let err = client.add_cpus(&[2], 0x14).unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::ConnectionReset {
                during: Phase::Reply,
                bytes: 100
            }
        ),
        "{err:?}"
    );
    assert_eq!(s.server.present_apic_ids(), vec![0, 2]);
}

#[test]
fn replies_that_do_not_answer_the_request_break_the_connection() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    client.connect().unwrap();

    // A DEL_CPU success in answer to ADD_CPU.
    let mut wrong_type = [0u8; MSG_SIZE];
    MsgHeader::new(MsgType::DelCpu, 4).write_to(&mut wrong_type);
    wrong_type[20] = 1;
    s.server
        .inject_fault(GuestFault::RawReply(Box::new(wrong_type)));
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::UnexpectedMsgType {
                expected: MsgType::AddCpu,
                found: 2
            }
        ),
        "{err:?}"
    );
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));

    // Garbage.
    s.server
        .inject_fault(GuestFault::RawReply(Box::new([0x5A; MSG_SIZE])));
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::BadMagic {
                during: Phase::Reply,
                found: 0x5A5A_5A5A
            }
        ),
        "{err:?}"
    );
    // The guest did not act on either; a clean request works after reconnecting.
    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
    assert_eq!(s.muxer.as_ref().unwrap().accepted_connections(), 3);
}

#[test]
fn a_second_request_while_one_is_in_flight_is_busy() {
    let (entered_tx, entered_rx): (Sender<u8>, Receiver<u8>) = bounded(1);
    let (release_tx, release_rx): (Sender<()>, Receiver<()>) = bounded(1);
    let actions = Arc::new(Mutex::new(Vec::new()));
    let callback: CpuCallback = Box::new(move |action| {
        entered_tx.send(action.apic_id()).map_err(|_| 5)?;
        release_rx.recv_timeout(HANG_LIMIT).map_err(|_| 5)
    });
    let s = setup_with(&[0], callback, actions);
    let client = Arc::new(client_for(&s.socket, fast_config()));
    client.connect().unwrap();

    let first = {
        let client = Arc::clone(&client);
        thread::spawn(move || client.add_cpus(&[3], 0x14))
    };
    // The guest is now handling the first request.
    assert_eq!(entered_rx.recv_timeout(HANG_LIMIT).unwrap(), 3);
    assert_eq!(client.state(), UpcallState::Busy(CpuOp::Add));
    for second in [client.del_cpus(&[3]), client.add_cpus(&[4], 0x14)] {
        assert!(
            matches!(
                second,
                Err(HotplugError::Busy {
                    in_flight: Operation::Cpu(CpuOp::Add)
                })
            ),
            "{second:?}"
        );
    }
    assert!(matches!(client.connect(), Err(HotplugError::Busy { .. })));
    release_tx.send(()).unwrap();
    let reply = first.join().unwrap().unwrap();
    assert_eq!(reply.apic_index, 1);
    assert_eq!(client.state(), UpcallState::Ready);
    assert_eq!(s.server.present_apic_ids(), vec![0, 3]);
    assert_eq!(
        s.server.requests_handled(),
        1,
        "the busy requests never reached the guest"
    );
}

#[test]
fn reconnects_after_the_guest_side_restarts() {
    let mut s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    client.add_cpus(&[1], 0x14).unwrap();

    // The muxer (and the guest's server behind it) go away, then come back.
    s.muxer.take().unwrap().shutdown();
    let muxer =
        VsockMuxerStub::start(&s.socket, UPCALL_GUEST_PORT, s.server.clone(), logger()).unwrap();
    // The old stream is dead; the request was never delivered on it, so it goes out once on a
    // fresh connection.
    client.add_cpus(&[2], 0x14).unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
    assert_eq!(muxer.accepted_connections(), 1);
    assert_eq!(s.server.present_apic_ids(), vec![0, 1, 2]);
}

#[test]
fn budget_is_exhausted_when_nobody_listens() {
    let dir = tempfile::tempdir().unwrap();
    let client = client_for(&dir.path().join("nobody.sock"), fast_config());
    let err = client.connect().unwrap_err();
    let HotplugError::ConnectBudgetExhausted { attempts, last } = &err else {
        panic!("expected ConnectBudgetExhausted, got {err:?}");
    };
    assert_eq!(*attempts, 3);
    assert!(matches!(**last, HotplugError::Connect { .. }), "{last:?}");
    assert_eq!(client.state(), UpcallState::Failed { attempts: 3 });
    // A request tries again with a fresh budget.
    assert!(matches!(
        client.del_cpus(&[1]),
        Err(HotplugError::ConnectBudgetExhausted { attempts: 3, .. })
    ));
}

#[test]
fn retries_until_the_guest_listens() {
    let s = setup(&[0]);
    let muxer = s.muxer.as_ref().unwrap();
    muxer.set_guest_listening(false);
    let client = client_for(&s.socket, fast_config());
    let err = client.connect().unwrap_err();
    let HotplugError::ConnectBudgetExhausted { attempts: 3, last } = &err else {
        panic!("expected ConnectBudgetExhausted, got {err:?}");
    };
    assert!(
        matches!(**last, HotplugError::HandshakeClosed { port: 219 }),
        "{last:?}"
    );
    muxer.set_guest_listening(true);
    client.connect().unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
}

#[test]
fn stub_rejects_other_ports() {
    let s = setup(&[0]);
    let connector = HybridVsockConnector::new(&s.socket, 1234);
    let client = UpcallClient::new(Box::new(connector), fast_config(), logger());
    let err = client.connect().unwrap_err();
    let HotplugError::ConnectBudgetExhausted { last, .. } = &err else {
        panic!("expected ConnectBudgetExhausted, got {err:?}");
    };
    assert!(
        matches!(**last, HotplugError::HandshakeClosed { port: 1234 }),
        "{last:?}"
    );
}

/// A fake muxer that answers each connection with `script` (after reading the CONNECT line)
/// and then holds the stream until the client closes it. Returns the number of connections.
fn scripted_muxer(socket: &Path, script: Vec<u8>) -> thread::JoinHandle<usize> {
    let listener = UnixListener::bind(socket).unwrap();
    thread::spawn(move || {
        let mut count = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            count += 1;
            let mut line = [0u8; 12];
            if stream.read_exact(&mut line).is_err() || &line != b"CONNECT 219\n" {
                break; // the test's "stop" connection
            }
            let _ = stream.write_all(&script);
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        }
        count
    })
}

fn stop_scripted(socket: &Path, handle: thread::JoinHandle<usize>) -> usize {
    drop(UnixStream::connect(socket).unwrap());
    handle.join().unwrap() - 1
}

#[test]
fn handshake_refusal_is_retried_and_typed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let fake = scripted_muxer(&socket, b"NO such port\n".to_vec());
    let client = client_for(&socket, fast_config());
    let err = client.connect().unwrap_err();
    let HotplugError::ConnectBudgetExhausted { attempts: 3, last } = &err else {
        panic!("expected ConnectBudgetExhausted, got {err:?}");
    };
    assert!(
        matches!(&**last, HotplugError::HandshakeRejected { port: 219, reply } if reply == "NO such port"),
        "{last:?}"
    );
    assert_eq!(client.state(), UpcallState::Failed { attempts: 3 });
    assert_eq!(stop_scripted(&socket, fake), 3);
}

#[test]
fn endless_handshake_line_is_bounded_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let fake = scripted_muxer(&socket, vec![b'A'; 100_000]);
    let client = client_for(&socket, fast_config());
    let err = client.connect().unwrap_err();
    assert!(
        matches!(err, HotplugError::HandshakeLineTooLong { limit: 64 }),
        "{err:?}"
    );
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));
    assert_eq!(stop_scripted(&socket, fake), 1);
}

#[test]
fn bad_greeting_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let mut greeting = encode_greeting();
    greeting[8] = 1; // msg_type ADD_CPU
    let mut script = b"OK 1024\n".to_vec();
    script.extend_from_slice(&greeting);
    let fake = scripted_muxer(&socket, script);
    let client = client_for(&socket, fast_config());
    let err = client.connect().unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::BadGreeting {
                field: "msg_type",
                value: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));
    assert_eq!(
        stop_scripted(&socket, fake),
        1,
        "protocol errors are not retried"
    );
}

#[test]
fn missing_greeting_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let fake = scripted_muxer(&socket, b"OK 1024\n".to_vec());
    let config = UpcallConfig {
        greeting_timeout: Duration::from_millis(100),
        ..fast_config()
    };
    let client = client_for(&socket, config);
    let err = client.connect().unwrap_err();
    assert!(
        matches!(
            err,
            HotplugError::Timeout {
                during: Phase::Greeting,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Timeout));
    stop_scripted(&socket, fake);
}

/// Speaks to the stub by hand: handshake, then `service`.
fn raw_session(socket: &Path, service: Option<u8>) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(HANG_LIMIT)).unwrap();
    stream.write_all(b"CONNECT 219\n").unwrap();
    let mut ok = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        ok.push(byte[0]);
    }
    assert!(ok.starts_with(b"OK "), "{ok:?}");
    if let Some(service) = service {
        stream.write_all(&[service]).unwrap();
    }
    stream
}

#[test]
fn guest_closes_on_a_foreign_service_byte() {
    let s = setup(&[0]);
    let mut stream = raw_session(&s.socket, Some(b'x'));
    let mut buf = [0u8; 16];
    assert_eq!(
        stream.read(&mut buf).unwrap(),
        0,
        "closed without a greeting"
    );
}

#[test]
fn guest_closes_when_no_service_byte_comes() {
    let (callback, _actions) = recording_callback();
    let options = GuestServerOptions {
        service_byte_timeout: Duration::from_millis(100),
        ..GuestServerOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vsock.sock");
    let server = GuestUpcallServer::new(&[0], callback, options).unwrap();
    let _muxer = VsockMuxerStub::start(&socket, UPCALL_GUEST_PORT, server, logger()).unwrap();
    let mut stream = raw_session(&socket, None);
    let mut buf = [0u8; 16];
    assert_eq!(
        stream.read(&mut buf).unwrap(),
        0,
        "closed after the service-byte timeout"
    );
}

#[test]
fn guest_greets_and_answers_byte_for_byte() {
    let s = setup(&[0]);
    let mut stream = raw_session(&s.socket, Some(b'd'));
    let mut greeting = [0u8; MSG_SIZE];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting[..], encode_greeting()[..]);
    // A hand-written ADD_CPU of APIC ID 6.
    let mut request = [0u8; MSG_SIZE];
    request[..19].copy_from_slice(&[
        0x00, 0x01, 0x4D, 0x44, 0x02, 0x01, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x14, 0x06,
    ]);
    stream.write_all(&request).unwrap();
    let mut reply = [0u8; MSG_SIZE];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(
        reply[..24],
        [
            0x00, 0x01, 0x4D, 0x44, 0x04, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0,
            0, 0
        ]
    );
    assert_eq!(s.server.present_apic_ids(), vec![0, 6]);
}
