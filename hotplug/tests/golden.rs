//! Golden bytes: messages encoded by hand from the documented layout
//! (the repository's `docs/upcall-protocol.md`), compared with what the crate encodes and decodes.

use hotplug::protocol::{RawCpuPayload, MSG_SIZE};
use hotplug::{
    decode_cpu_reply, decode_cpu_request, decode_greeting, encode_cpu_request, encode_greeting,
    CpuDevReply, CpuDevRequest, CpuOp, HotplugError, MsgType, Phase,
};

/// A message: `prefix` written by hand, then zero padding up to 1024 bytes.
fn message(prefix: &[u8]) -> [u8; MSG_SIZE] {
    let mut buf = [0u8; MSG_SIZE];
    buf[..prefix.len()].copy_from_slice(prefix);
    buf
}

/// The success reply to an `ADD_CPU` of 3 CPUs, as the guest writes it.
#[rustfmt::skip]
const OK_ADD_3: [u8; 24] = [
    0x00, 0x01, 0x4D, 0x44,
    0x04, 0x00, 0x00, 0x00, // msg_size 4
    0x01, 0x00, 0x00, 0x00, // ADD_CPU
    0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, // 16: result 0
    0x03, 0x00, 0x00, 0x00, // 20: apic_index 3
];

#[test]
fn add_cpu_request_matches_hand_written_bytes() {
    let request = CpuDevRequest::new(&[2, 4, 9], 0x14).unwrap();
    let encoded = encode_cpu_request(CpuOp::Add, &request).unwrap();
    #[rustfmt::skip]
    let expected = message(&[
        0x00, 0x01, 0x4D, 0x44, // 0: magic_version 0x444D0100, little-endian
        0x02, 0x01, 0x00, 0x00, // 4: msg_size 258 = 0x102
        0x01, 0x00, 0x00, 0x00, // 8: msg_type ADD_CPU = 1
        0x00, 0x00, 0x00, 0x00, // 12: msg_flags 0
        0x03,                   // 16: count
        0x14,                   // 17: apic_ver
        0x02, 0x04, 0x09,       // 18..: apic_ids, the rest of the 256 slots 0
    ]);
    assert_eq!(encoded.len(), 1024);
    assert_eq!(encoded[..], expected[..]);
}

#[test]
fn del_cpu_request_matches_hand_written_bytes() {
    // Sparse APIC IDs of a 2 sockets x 3 cores x 2 threads topology.
    let ids = [0x19, 0x18, 0x11, 0x10];
    let request = CpuDevRequest::new(&ids, 0x14).unwrap();
    let encoded = encode_cpu_request(CpuOp::Del, &request).unwrap();
    #[rustfmt::skip]
    let expected = message(&[
        0x00, 0x01, 0x4D, 0x44,
        0x02, 0x01, 0x00, 0x00,
        0x02, 0x00, 0x00, 0x00, // msg_type DEL_CPU = 2
        0x00, 0x00, 0x00, 0x00,
        0x04,
        0x14,
        0x19, 0x18, 0x11, 0x10,
    ]);
    assert_eq!(encoded[..], expected[..]);
}

#[test]
fn full_request_of_255_ids_fills_the_slots_and_leaves_the_last_zero() {
    let ids: Vec<u8> = (0..255).collect();
    let encoded = encode_cpu_request(CpuOp::Add, &CpuDevRequest::new(&ids, 0x14).unwrap()).unwrap();
    assert_eq!(encoded[16], 255);
    assert_eq!(&encoded[18..18 + 255], &ids[..]);
    assert_eq!(encoded[18 + 255], 0, "slot 255 unused");
    assert!(
        encoded[18 + 256..].iter().all(|&b| b == 0),
        "padding is zero"
    );
    let (op, decoded) = decode_cpu_request(&encoded).unwrap();
    assert_eq!(op, CpuOp::Add);
    assert_eq!(decoded.apic_ids, ids);
}

#[test]
fn decode_request_of_hand_written_bytes() {
    #[rustfmt::skip]
    let buf = message(&[
        0x00, 0x01, 0x4D, 0x44, 0x02, 0x01, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0, 0, 0, 0,
        0x02, 0x11, 0x07, 0x05,
    ]);
    let (op, request) = decode_cpu_request(&buf).unwrap();
    assert_eq!(op, CpuOp::Del);
    assert_eq!(request.apic_ids, vec![7, 5]);
    assert_eq!(request.apic_ver, 0x11);
    let raw = RawCpuPayload::read_from(&buf);
    assert_eq!(
        (raw.count, raw.apic_ver, raw.apic_ids),
        (2, 0x11, &[7u8, 5][..])
    );
}

#[test]
fn invalid_requests_are_typed_errors_and_encode_nothing() {
    assert!(matches!(
        CpuDevRequest::new(&[], 0x14),
        Err(HotplugError::NoApicIds)
    ));
    assert!(matches!(
        CpuDevRequest::new(&[1, 255], 0x14),
        Err(HotplugError::InvalidApicId { apic_id: 255 })
    ));
    assert!(matches!(
        CpuDevRequest::new(&[3, 1, 3], 0x14),
        Err(HotplugError::DuplicateApicId { apic_id: 3 })
    ));
    let too_many = vec![1u8; 256];
    assert!(matches!(
        CpuDevRequest::new(&too_many, 0x14),
        Err(HotplugError::TooManyApicIds { count: 256 })
    ));
    // Public fields: encoding validates again.
    let forged = CpuDevRequest {
        apic_ids: vec![],
        apic_ver: 0x14,
    };
    assert!(matches!(
        encode_cpu_request(CpuOp::Add, &forged),
        Err(HotplugError::NoApicIds)
    ));
}

#[test]
fn greeting_matches_hand_written_bytes() {
    let expected = message(&[0x00, 0x01, 0x4D, 0x44]);
    assert_eq!(encode_greeting()[..], expected[..]);
    decode_greeting(&expected).unwrap();

    let bad_magic = message(&[0x00, 0x01, 0x4D, 0x45]);
    assert!(matches!(
        decode_greeting(&bad_magic),
        Err(HotplugError::BadMagic {
            during: Phase::Greeting,
            found: 0x454D_0100
        })
    ));
    // A greeting sets only the magic: each other header field is refused by name.
    let cases: [(&[u8], &str, u32); 3] = [
        (&[0x00, 0x01, 0x4D, 0x44, 0, 0, 0, 0, 0x01], "msg_type", 1),
        (&[0x00, 0x01, 0x4D, 0x44, 0x04], "msg_size", 4),
        (
            &[0x00, 0x01, 0x4D, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0x80],
            "msg_flags",
            0x80,
        ),
    ];
    for (bytes, field, value) in cases {
        let result = decode_greeting(&message(bytes));
        assert!(
            matches!(
                result,
                Err(HotplugError::BadGreeting { field: f, value: v }) if f == field && v == value
            ),
            "{field}: {result:?}"
        );
    }
}

#[test]
fn success_reply_of_hand_written_bytes() {
    let reply = message(&OK_ADD_3);
    assert_eq!(
        decode_cpu_reply(&reply, CpuOp::Add, 3).unwrap(),
        CpuDevReply {
            op: CpuOp::Add,
            apic_index: 3
        }
    );
}

#[test]
fn failure_reply_with_stale_padding_is_the_guest_errno() {
    // The guest's reply buffer is never cleared: after an earlier success of 7 CPUs, a
    // refused DEL_CPU keeps apic_index 7 and leftovers beyond the fields.
    #[rustfmt::skip]
    let reply = message(&[
        0x00, 0x01, 0x4D, 0x44,
        0x00, 0x00, 0x00, 0x00, // msg_size 0 on failure
        0x02, 0x00, 0x00, 0x00, // DEL_CPU
        0x00, 0x00, 0x00, 0x00,
        0xEA, 0xFF, 0xFF, 0xFF, // result -22
        0x07, 0x00, 0x00, 0x00, // stale apic_index
        0xAA, 0xBB, 0xCC, 0xDD, 0x55, // stale bytes
    ]);
    let err = decode_cpu_reply(&reply, CpuOp::Del, 2).unwrap_err();
    assert!(
        matches!(err, HotplugError::GuestError { errno: 22 }),
        "{err:?}"
    );
    assert_eq!(err.guest_errno(), Some(22));
    assert!(!err.outcome_unknown());

    // Same with a stale msg_size of 4 (not what the guest promises to clear either).
    let mut stale_size = reply;
    stale_size[4] = 4;
    assert!(matches!(
        decode_cpu_reply(&stale_size, CpuOp::Del, 2),
        Err(HotplugError::GuestError { errno: 22 })
    ));

    // An unknown-type answer: result -1.
    #[rustfmt::skip]
    let eperm = message(&[
        0x00, 0x01, 0x4D, 0x44, 0x04, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0,
        0xFF, 0xFF, 0xFF, 0xFF, 0x09, 0, 0, 0,
    ]);
    assert!(matches!(
        decode_cpu_reply(&eperm, CpuOp::Add, 9),
        Err(HotplugError::GuestError { errno: 1 })
    ));
}

#[test]
fn replies_that_do_not_match_the_request_are_typed_errors() {
    let ok_add_3 = message(&OK_ADD_3);
    // The reply of an ADD is not the answer to a DEL.
    assert!(matches!(
        decode_cpu_reply(&ok_add_3, CpuOp::Del, 3),
        Err(HotplugError::UnexpectedMsgType {
            expected: MsgType::DelCpu,
            found: 1
        })
    ));
    // A stale success: apic_index from an earlier request.
    let err = decode_cpu_reply(&ok_add_3, CpuOp::Add, 2).unwrap_err();
    assert!(matches!(
        err,
        HotplugError::ApicIndexMismatch {
            op: CpuOp::Add,
            expected: 2,
            found: 3
        }
    ));
    assert!(err.outcome_unknown());
    // Success must carry msg_size 4.
    let mut no_size = ok_add_3;
    no_size[4] = 0;
    assert!(matches!(
        decode_cpu_reply(&no_size, CpuOp::Add, 3),
        Err(HotplugError::UnexpectedMsgSize {
            expected: 4,
            found: 0,
            ..
        })
    ));
    // Magic.
    let mut bad_magic = ok_add_3;
    bad_magic[3] = 0;
    assert!(matches!(
        decode_cpu_reply(&bad_magic, CpuOp::Add, 3),
        Err(HotplugError::BadMagic {
            during: Phase::Reply,
            found: 0x004D_0100
        })
    ));
    // A positive result is no errno.
    let mut positive = ok_add_3;
    positive[16] = 5;
    assert!(matches!(
        decode_cpu_reply(&positive, CpuOp::Add, 3),
        Err(HotplugError::InvalidResult { result: 5, .. })
    ));
    let mut min = ok_add_3;
    min[16..20].copy_from_slice(&i32::MIN.to_le_bytes());
    assert!(matches!(
        decode_cpu_reply(&min, CpuOp::Add, 3),
        Err(HotplugError::InvalidResult {
            result: i32::MIN,
            ..
        })
    ));
}

#[test]
fn error_messages_name_the_offending_values() {
    let e = HotplugError::GuestError { errno: 22 };
    let text = e.to_string();
    assert!(
        text.contains("errno 22") && text.contains("Invalid argument"),
        "{text}"
    );
    let e = HotplugError::UnexpectedMsgType {
        expected: MsgType::AddCpu,
        found: 77,
    };
    assert!(e.to_string().contains("unknown (77)"), "{e}");
    let e = HotplugError::InvalidApicId { apic_id: 255 };
    assert!(e.to_string().contains("255"), "{e}");
}
