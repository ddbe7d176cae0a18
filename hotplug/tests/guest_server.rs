//! The guest-side server's answers, message by message, against the documented behaviour of
//! the patched guest kernel (quirks included). Requests and expectations are raw bytes.

use std::sync::{Arc, Mutex};

use hotplug::guest::{CpuAction, CpuCallback, GuestServerOptions, GuestUpcallServer};
use hotplug::protocol::{reply_apic_index, reply_result, MsgBuf, MsgHeader, MSG_SIZE};
use hotplug::HotplugError;

/// A raw request: header fields and CPU payload as given (no validation).
fn request(magic: u32, msg_type: u32, ids: &[u8]) -> MsgBuf {
    let mut buf = [0u8; MSG_SIZE];
    MsgHeader {
        magic_version: magic,
        msg_size: 258,
        msg_type,
        msg_flags: 0,
    }
    .write_to(&mut buf);
    buf[16] = u8::try_from(ids.len()).expect("at most 255 IDs");
    buf[17] = 0x14;
    buf[18..18 + ids.len()].copy_from_slice(ids);
    buf
}

const MAGIC: u32 = 0x444D_0100;
const ADD: u32 = 1;
const DEL: u32 = 2;

/// (msg_size, msg_type, result, apic_index) of a reply.
fn fields(reply: &MsgBuf) -> (u32, u32, i32, u32) {
    let h = MsgHeader::read_from(reply);
    assert_eq!(h.magic_version, MAGIC);
    (
        h.msg_size,
        h.msg_type,
        reply_result(reply),
        reply_apic_index(reply),
    )
}

fn server(
    boot: &[u8],
    fail_on: Option<CpuAction>,
) -> (GuestUpcallServer, Arc<Mutex<Vec<CpuAction>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&log);
    let callback: CpuCallback = Box::new(move |action| {
        sink.lock().unwrap().push(action);
        if Some(action) == fail_on {
            Err(16) // EBUSY
        } else {
            Ok(())
        }
    });
    let server = GuestUpcallServer::new(boot, callback, GuestServerOptions::default()).unwrap();
    (server, log)
}

#[test]
fn add_then_del_success_replies() {
    let (s, log) = server(&[0], None);
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, ADD, &[4, 2]))),
        (4, ADD, 0, 2)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 4, 2]);
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[2]))),
        (4, DEL, 0, 1)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 4]);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            CpuAction::Online(4),
            CpuAction::Online(2),
            CpuAction::Offline(2)
        ]
    );
}

#[test]
fn add_with_a_present_id_changes_nothing_and_keeps_stale_apic_index() {
    let (s, log) = server(&[0], None);
    s.handle_message(&request(MAGIC, ADD, &[1, 2, 3]));
    log.lock().unwrap().clear();
    // 9 is new but 2 is present: nothing is added; apic_index still says 3 from before.
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, ADD, &[9, 2]))),
        (0, ADD, -22, 3)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 1, 2, 3]);
    assert!(log.lock().unwrap().is_empty());
}

#[test]
fn add_failing_part_way_keeps_the_earlier_cpus() {
    let (s, _log) = server(&[0], Some(CpuAction::Online(6)));
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, ADD, &[5, 6, 7]))),
        (0, ADD, -16, 0)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 5]);
    // A repeat inside one request passes the up-front check and fails when reached.
    let (s, _log) = server(&[0], None);
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, ADD, &[5, 8, 5]))),
        (0, ADD, -22, 0)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 5, 8]);
}

#[test]
fn del_refusals() {
    let (s, log) = server(&[0, 1, 2], None);
    // count not below the number of online CPUs.
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[1, 2, 3]))).2,
        -22
    );
    // Unknown APIC ID.
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[1, 7]))).2,
        -22
    );
    // The boot CPU.
    assert_eq!(fields(&s.handle_message(&request(MAGIC, DEL, &[0]))).2, -22);
    assert_eq!(s.present_apic_ids(), vec![0, 1, 2]);
    assert!(log.lock().unwrap().is_empty());
}

#[test]
fn del_failing_part_way_keeps_the_failing_cpu() {
    let (s, _log) = server(&[0, 1, 2, 3], Some(CpuAction::Offline(2)));
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[3, 2, 1]))).2,
        -16
    );
    assert_eq!(s.present_apic_ids(), vec![0, 1, 2]);
}

#[test]
fn unknown_type_is_minus_one_with_the_type_echoed() {
    let (s, _log) = server(&[0], None);
    s.handle_message(&request(MAGIC, ADD, &[1]));
    for t in [0, 3, 5, 8, 77] {
        let (size, msg_type, result, index) = fields(&s.handle_message(&request(MAGIC, t, &[2])));
        assert_eq!((msg_type, result), (t, -1), "type {t}");
        // The handler-less path rewrites the header (msg_size 0, as every failure in
        // `db_devmgr_process`) but not the payload: apic_index is stale from the ADD_CPU.
        // (Corrected against the guest patches: this used to expect a stale msg_size 4.)
        assert_eq!((size, index), (0, 1), "type {t}");
    }
    assert_eq!(s.present_apic_ids(), vec![0, 1]);
}

#[test]
fn bad_magic_echoes_the_type_and_keeps_the_previous_result() {
    let (s, _log) = server(&[0], None);
    s.handle_message(&request(MAGIC, ADD, &[1]));
    // An unknown APIC ID is one of `del_cpu_dev`'s up-front refusals, which write apic_index
    // 0. (Corrected against the guest patches: this used to expect a stale apic_index 1.)
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[5]))),
        (0, DEL, -22, 0)
    );
    // Bad magic on an ADD: type echoed, the -22 of the DEL above stays.
    let reply = s.handle_message(&request(0x1234_5678, ADD, &[9]));
    assert_eq!(fields(&reply), (0, ADD, -22, 0));
    assert_eq!(s.present_apic_ids(), vec![0, 1], "nothing acted on");
    assert_eq!(s.requests_handled(), 3);
}

#[test]
fn boot_ids_are_validated() {
    let callback: CpuCallback = Box::new(|_| Ok(()));
    assert!(matches!(
        GuestUpcallServer::new(&[], callback, GuestServerOptions::default()),
        Err(HotplugError::NoApicIds)
    ));
    let callback: CpuCallback = Box::new(|_| Ok(()));
    assert!(matches!(
        GuestUpcallServer::new(&[0, 0], callback, GuestServerOptions::default()),
        Err(HotplugError::DuplicateApicId { apic_id: 0 })
    ));
}

// What follows checks the server against the guest patches' `db_devmgr_process`,
// `add_cpu_dev` and `del_cpu_dev` (see the module documentation of `hotplug::guest`).

#[test]
fn del_reaching_the_boot_cpu_keeps_the_cpus_removed_before_it() {
    // The boot CPU is refused only when the loop reaches it: 3 is already offline by then.
    let (s, log) = server(&[0, 1, 2, 3], None);
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[3, 0, 2]))).2,
        -22
    );
    assert_eq!(s.present_apic_ids(), vec![0, 1, 2]);
    assert_eq!(*log.lock().unwrap(), vec![CpuAction::Offline(3)]);
}

#[test]
fn a_failed_request_carries_the_previous_apic_index() {
    let (s, _log) = server(&[0], Some(CpuAction::Online(4)));
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, ADD, &[1, 2]))),
        (4, ADD, 0, 2)
    );
    // 3 comes online, 4 fails: the reply says nothing of the progress (apic_index is the 2
    // of the request before, msg_size 0).
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, ADD, &[3, 4, 5]))),
        (0, ADD, -16, 2)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 1, 2, 3]);
    assert_eq!(
        s.online_apic_ids().into_iter().collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
}

#[test]
fn del_checks_before_the_loop_write_apic_index_zero() {
    // `del_cpu_dev` reports its two up-front refusals through the notification helper with
    // index 0, so these failures (unlike all others) do overwrite apic_index.
    let (s, _log) = server(&[0, 1], None);
    s.handle_message(&request(MAGIC, ADD, &[2, 3]));
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[9]))),
        (0, DEL, -22, 0),
        "unknown APIC ID"
    );
    s.handle_message(&request(MAGIC, ADD, &[4]));
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, DEL, &[1, 2, 3, 4, 0]))),
        (0, DEL, -22, 0),
        "would remove every CPU"
    );
}

#[test]
fn every_failure_and_bad_magic_reply_has_msg_size_zero() {
    let (s, _log) = server(&[0], None);
    assert_eq!(fields(&s.handle_message(&request(MAGIC, ADD, &[1]))).0, 4);
    // Bad magic: the header is rewritten (size 0, type echoed); result and payload stay.
    assert_eq!(
        fields(&s.handle_message(&request(0xDEAD_BEEF, DEL, &[1]))),
        (0, DEL, 0, 1)
    );
    assert_eq!(s.present_apic_ids(), vec![0, 1]);
    assert_eq!(fields(&s.handle_message(&request(MAGIC, ADD, &[2]))).0, 4);
    // No handler for the type: result -1, size 0.
    assert_eq!(
        fields(&s.handle_message(&request(MAGIC, 6, &[1]))),
        (0, 6, -1, 1)
    );
}
