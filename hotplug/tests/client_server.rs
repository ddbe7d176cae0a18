//! The client against the guest-side server over real Unix sockets, through the stand-in
//! hybrid-vsock muxer.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};
use hotplug::guest::{CpuAction, CpuCallback, GuestFault, GuestServerOptions, VsockMuxerStub};
use hotplug::protocol::{encode_greeting, MsgHeader, MsgType, MSG_SIZE};
use hotplug::{
    BrokenReason, CpuOp, HotplugError, HybridVsockConnector, Operation, Phase, UpcallClient,
    UpcallConfig, UpcallState, UPCALL_GUEST_PORT,
};
use tempfile::TempDir;

#[macro_use]
mod common;
use common::*;

#[test]
fn connect_add_and_remove() {
    let s = setup(&[0, 1]);
    let client = client_for(&s.socket, fast_config());
    assert_eq!(client.state(), UpcallState::Disconnected);
    client.connect().unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
    // Connecting again is a no-op.
    client.connect().unwrap();
    assert_eq!(s.muxer().accepted_connections(), 1);

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
    assert_eq!(s.muxer().accepted_connections(), 1);

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
    assert_matches!(err, HotplugError::GuestError { errno: 22 });
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
    assert_eq!(s.muxer().accepted_connections(), 1);
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
    assert_matches!(err, HotplugError::GuestError { errno: 5 });
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
    assert_matches!(client.add_cpus(&[], 0x14), Err(HotplugError::NoApicIds));
    assert_matches!(
        client.add_cpus(&[3, 255], 0x14),
        Err(HotplugError::InvalidApicId { apic_id: 255 })
    );
    assert_matches!(
        client.del_cpus(&[3, 3]),
        Err(HotplugError::DuplicateApicId { apic_id: 3 })
    );
    assert_eq!(client.state(), UpcallState::Disconnected);
    assert_eq!(s.muxer().accepted_connections(), 0);
    assert_eq!(s.server.requests_handled(), 0);
}

#[test]
fn silent_guest_times_out_and_the_next_request_reconnects() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, reply_within(200));
    client.connect().unwrap();
    s.server.inject_fault(GuestFault::Silent);
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_lost_answer(&client, &err, Phase::Reply, Duration::from_millis(200));
    assert_eq!(
        s.server.present_apic_ids(),
        vec![0],
        "the silent guest did nothing"
    );

    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(client.state(), UpcallState::Ready);
    assert_eq!(s.muxer().accepted_connections(), 2);
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
}

/// Asserts that `err` is the guest closing the stream after `bytes` bytes of the reply.
#[track_caller]
fn assert_reset_during_reply(err: &HotplugError, bytes: usize) {
    assert_matches!(
        *err,
        HotplugError::ConnectionReset { during: Phase::Reply, bytes: b } if b == bytes
    );
}

#[test]
fn hang_up_mid_request_is_a_reset_not_a_success() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    client.connect().unwrap();

    s.server.inject_fault(GuestFault::HangUp);
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_reset_during_reply(&err, 0);
    assert!(err.outcome_unknown());
    assert_eq!(
        client.state(),
        UpcallState::Broken(BrokenReason::ConnectionReset)
    );

    // The guest acted but the reply was cut short: still not a success.
    s.server
        .inject_fault(GuestFault::TruncatedReply { bytes: 100 });
    let err = client.add_cpus(&[2], 0x14).unwrap_err();
    assert_reset_during_reply(&err, 100);
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
    assert_matches!(
        err,
        HotplugError::UnexpectedMsgType {
            expected: MsgType::AddCpu,
            found: 2
        }
    );
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));

    // Garbage.
    s.server
        .inject_fault(GuestFault::RawReply(Box::new([0x5A; MSG_SIZE])));
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_matches!(
        err,
        HotplugError::BadMagic {
            during: Phase::Reply,
            found: 0x5A5A_5A5A
        }
    );
    // The guest did not act on either; a clean request works after reconnecting.
    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(s.server.present_apic_ids(), vec![0, 1]);
    assert_eq!(s.muxer().accepted_connections(), 3);
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
        assert_matches!(
            second,
            Err(HotplugError::Busy {
                in_flight: Operation::Cpu(CpuOp::Add)
            })
        );
    }
    assert_matches!(client.connect(), Err(HotplugError::Busy { .. }));
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
    assert_matches!(**last, HotplugError::Connect { .. });
    assert_eq!(client.state(), UpcallState::Failed { attempts: 3 });
    // A request tries again with a fresh budget.
    assert_matches!(
        client.del_cpus(&[1]),
        Err(HotplugError::ConnectBudgetExhausted { attempts: 3, .. })
    );
}

#[test]
fn retries_until_the_guest_listens() {
    let s = setup(&[0]);
    let muxer = s.muxer();
    muxer.set_guest_listening(false);
    let client = client_for(&s.socket, fast_config());
    let err = client.connect().unwrap_err();
    let HotplugError::ConnectBudgetExhausted { attempts: 3, last } = &err else {
        panic!("expected ConnectBudgetExhausted, got {err:?}");
    };
    assert_matches!(**last, HotplugError::HandshakeClosed { port: 219 });
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
    assert_matches!(**last, HotplugError::HandshakeClosed { port: 1234 });
}

/// A fake muxer that answers each connection with `script` (after reading the CONNECT line)
/// and then holds the stream until the client closes it.
struct ScriptedMuxer {
    socket: PathBuf,
    handle: thread::JoinHandle<usize>,
    _dir: TempDir,
}

impl ScriptedMuxer {
    fn start(script: Vec<u8>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let handle = thread::spawn(move || {
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
        });
        ScriptedMuxer {
            socket,
            handle,
            _dir: dir,
        }
    }

    /// A client of this muxer's socket whose `connect` fails.
    fn failed_connect(&self, config: UpcallConfig) -> (UpcallClient, HotplugError) {
        let client = client_for(&self.socket, config);
        let err = client.connect().unwrap_err();
        (client, err)
    }

    /// Stops the muxer; returns how many connections the client made.
    fn stop(self) -> usize {
        drop(UnixStream::connect(&self.socket).unwrap());
        self.handle.join().unwrap() - 1
    }
}

#[test]
fn handshake_refusal_is_retried_and_typed() {
    let fake = ScriptedMuxer::start(b"NO such port\n".to_vec());
    let (client, err) = fake.failed_connect(fast_config());
    let HotplugError::ConnectBudgetExhausted { attempts: 3, last } = &err else {
        panic!("expected ConnectBudgetExhausted, got {err:?}");
    };
    assert_matches!(
        &**last,
        HotplugError::HandshakeRejected { port: 219, reply } if reply == "NO such port"
    );
    assert_eq!(client.state(), UpcallState::Failed { attempts: 3 });
    assert_eq!(fake.stop(), 3);
}

#[test]
fn endless_handshake_line_is_bounded_and_not_retried() {
    let fake = ScriptedMuxer::start(vec![b'A'; 100_000]);
    let (client, err) = fake.failed_connect(fast_config());
    assert_matches!(err, HotplugError::HandshakeLineTooLong { limit: 64 });
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));
    assert_eq!(fake.stop(), 1);
}

#[test]
fn bad_greeting_fails_fast() {
    let mut greeting = encode_greeting();
    greeting[8] = 1; // msg_type ADD_CPU
    let mut script = b"OK 1024\n".to_vec();
    script.extend_from_slice(&greeting);
    let fake = ScriptedMuxer::start(script);
    let (client, err) = fake.failed_connect(fast_config());
    assert_matches!(
        err,
        HotplugError::BadGreeting {
            field: "msg_type",
            value: 1
        }
    );
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Protocol));
    assert_eq!(fake.stop(), 1, "protocol errors are not retried");
}

#[test]
fn missing_greeting_times_out() {
    let fake = ScriptedMuxer::start(b"OK 1024\n".to_vec());
    let (client, err) = fake.failed_connect(greeting_within(100));
    assert_timeout(&err, Phase::Greeting);
    assert_eq!(client.state(), UpcallState::Broken(BrokenReason::Timeout));
    fake.stop();
}

#[test]
fn guest_closes_on_a_foreign_service_byte() {
    let s = setup(&[0]);
    let stream = raw_session(&s.socket, Some(b'x'));
    assert_closed(stream, "closed without a greeting");
}

#[test]
fn guest_closes_when_no_service_byte_comes() {
    let (callback, actions) = recording_callback();
    let options = GuestServerOptions {
        service_byte_timeout: Duration::from_millis(100),
        ..GuestServerOptions::default()
    };
    let s = setup_with_options(&[0], callback, actions, options);
    let stream = raw_session(&s.socket, None);
    assert_closed(stream, "closed after the service-byte timeout");
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
