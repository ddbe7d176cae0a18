//! The guest-side server's injected faults, seen through the client over real Unix sockets,
//! and its per-connection reply buffer.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use hotplug::guest::{CpuAction, GuestFault, GuestUpcallServer, EINVAL, EIO};
use hotplug::protocol::MSG_SIZE;
use hotplug::{CpuOp, HotplugError, Phase};

#[macro_use]
mod common;
use common::*;

fn set(ids: &[u8]) -> BTreeSet<u8> {
    ids.iter().copied().collect()
}

/// Waits until the server has used `n` faults (idle-time faults act on their own schedule).
fn wait_faults_used(server: &GuestUpcallServer, n: u64) {
    let start = Instant::now();
    while server.faults_used() < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "fault never acted"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn partial_add_onlines_the_first_k_and_says_only_the_errno() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    // A DEL_CPU fault does not touch ADD_CPU requests.
    s.server.inject_fault(GuestFault::FailCpu {
        op: CpuOp::Del,
        index: 0,
        errno: EIO,
    });
    s.server.inject_fault("partial-add:2".parse().unwrap());
    let err = client.add_cpus(&[1, 2, 3, 4], 0x14).unwrap_err();
    assert_eq!(err.guest_errno(), Some(EIO), "{err:?}");
    assert!(
        err.to_string().contains("the progress is unknown"),
        "the error says progress is unknown: {err}"
    );
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1, 2]));
    assert_eq!(
        *s.actions.lock().unwrap(),
        vec![CpuAction::Online(1), CpuAction::Online(2)],
        "the failing CPU was never asked to come online"
    );
    assert_eq!(s.server.faults_pending(), 1, "the DEL_CPU fault waits");
}

#[test]
fn partial_remove_offlines_the_first_k() {
    let s = setup(&[0, 1, 2, 3, 4]);
    let client = client_for(&s.socket, fast_config());
    s.server.inject_fault("partial-remove:1".parse().unwrap());
    let err = client.del_cpus(&[4, 3, 2]).unwrap_err();
    assert_eq!(err.guest_errno(), Some(EIO), "{err:?}");
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1, 2, 3]));
    assert_eq!(*s.actions.lock().unwrap(), vec![CpuAction::Offline(4)]);
}

#[test]
fn a_stray_reply_is_never_taken_for_the_refusal_that_follows() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    client.connect().unwrap();
    s.server.inject_fault("stray-reply".parse().unwrap());
    wait_faults_used(&s.server, 1);
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_eq!(err.guest_errno(), Some(EINVAL), "{err:?}");
    assert_eq!(s.server.online_apic_ids(), set(&[0]));
    assert_eq!(s.muxer().accepted_connections(), 2);
    // The next request is answered normally.
    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1]));
}

#[test]
fn a_guest_that_stops_reading_costs_one_timeout() {
    let mut s = setup(&[0]);
    let client = client_for(&s.socket, reply_within(200));
    client.connect().unwrap();
    s.server.inject_fault(GuestFault::NeverRead);
    wait_faults_used(&s.server, 1);
    let err = client.add_cpus(&[1], 0x14).unwrap_err();
    assert_timeout(&err, Phase::Reply);
    assert_eq!(
        s.server.online_apic_ids(),
        set(&[0]),
        "never read, never acted"
    );
    client.add_cpus(&[1], 0x14).unwrap();
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1]));
    // Dropping the muxer releases the stalled connection (the test would hang otherwise).
    drop(s.muxer.take());
}

#[test]
fn answer_twice_and_answer_late_do_not_shift_answers() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, reply_within(150));
    s.server.inject_fault(GuestFault::AnswerTwice);
    client.add_cpus(&[1], 0x14).unwrap();
    thread::sleep(Duration::from_millis(20));
    // The duplicate would be a success of the right type and count: it must not be taken.
    s.server.inject_fault(GuestFault::Refuse { errno: EINVAL });
    let err = client.add_cpus(&[2], 0x14).unwrap_err();
    assert_eq!(err.guest_errno(), Some(EINVAL), "{err:?}");

    s.server.inject_fault("late-reply:400".parse().unwrap());
    let err = client.add_cpus(&[2], 0x14).unwrap_err();
    assert!(err.outcome_unknown(), "{err:?}");
    // The guest did act: only its own view says so.
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1, 2]));
    thread::sleep(Duration::from_millis(400));
    s.server.inject_fault(GuestFault::Refuse { errno: EINVAL });
    let err = client.add_cpus(&[3], 0x14).unwrap_err();
    assert_eq!(
        err.guest_errno(),
        Some(EINVAL),
        "the late success is not this answer"
    );
}

#[test]
fn a_slow_greeting_is_a_greeting_timeout() {
    let s = setup(&[0]);
    s.server.inject_fault("slow-greeting:300".parse().unwrap());
    let client = client_for(&s.socket, greeting_within(100));
    let err = client.connect().unwrap_err();
    assert_timeout(&err, Phase::Greeting);
    client.connect().unwrap();
}

#[test]
fn fault_names_parse() {
    let parsed: GuestFault = "partial-remove:3".parse().unwrap();
    assert_eq!(
        parsed,
        GuestFault::FailCpu {
            op: CpuOp::Del,
            index: 3,
            errno: EIO
        }
    );
    for name in [
        "silent",
        "hang-up",
        "never-read",
        "stray-reply",
        "answer-twice",
    ] {
        assert!(name.parse::<GuestFault>().is_ok(), "{name}");
    }
    for bad in ["partial-add", "partial-add:x", "silent:1", "loud"] {
        let err = bad.parse::<GuestFault>().unwrap_err();
        assert!(err.to_string().contains("partial-add:K"), "{err}");
    }
}

#[test]
fn each_connection_has_its_own_zeroed_reply_buffer() {
    let s = setup(&[0]);
    let mut first = greeted_session(&s.socket);
    first.write_all(&add_request(6)).unwrap();
    let mut reply = [0u8; MSG_SIZE];
    first.read_exact(&mut reply).unwrap();
    assert_eq!(reply[20..24], [1, 0, 0, 0], "apic_index 1");
    // Refused on the same connection: apic_index keeps the 1.
    first.write_all(&add_request(6)).unwrap();
    first.read_exact(&mut reply).unwrap();
    assert_eq!(reply[16..24], [0xEA, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0]);
    drop(first);
    // Refused on a new connection: its buffer started zeroed.
    let mut second = greeted_session(&s.socket);
    second.write_all(&add_request(6)).unwrap();
    second.read_exact(&mut reply).unwrap();
    assert_eq!(reply[16..24], [0xEA, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]);
}

#[test]
fn one_apic_id_per_request_says_exactly_what_the_guest_did() {
    let s = setup(&[0]);
    let client = client_for(&s.socket, fast_config());
    // 0 is present: its request is refused, and nothing after it is sent.
    let err = client.add_cpus_one_by_one(&[1, 2, 0, 5], 0x14).unwrap_err();
    assert_eq!(err.op, CpuOp::Add);
    assert_eq!(err.done, vec![1, 2]);
    assert_eq!(err.failed, Some(0));
    assert_eq!(err.not_sent, vec![5]);
    assert_eq!(err.source.guest_errno(), Some(EINVAL));
    assert!(err.failed_state_known());
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1, 2]));
    assert!(err.to_string().contains("confirming 2 of 4"), "{err}");

    client.add_cpus_one_by_one(&[5, 6], 0x14).unwrap();
    // The boot CPU in the middle: exactly the CPU before it is offline.
    let err = client.del_cpus_one_by_one(&[6, 0, 5]).unwrap_err();
    assert_eq!(
        (err.done, err.failed, err.not_sent),
        (vec![6], Some(0), vec![5])
    );
    assert_eq!(s.server.online_apic_ids(), set(&[0, 1, 2, 5]));

    // A lost answer: the failed CPU's state is not known.
    let impatient = client_for(&s.socket, reply_within(100));
    s.server.inject_fault(GuestFault::Silent);
    let err = impatient.add_cpus_one_by_one(&[7, 8], 0x14).unwrap_err();
    assert_eq!((err.failed, &err.not_sent[..]), (Some(7), &[8u8][..]));
    assert!(!err.failed_state_known());

    // An invalid list sends nothing.
    let err = client.add_cpus_one_by_one(&[9, 9], 0x14).unwrap_err();
    assert_eq!(err.failed, None);
    assert!(err.done.is_empty());
    assert_matches!(err.source, HotplugError::DuplicateApicId { apic_id: 9 });
}
