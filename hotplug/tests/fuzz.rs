//! Property tests of everything that reads guest bytes: the reply and greeting decoders over
//! arbitrary bytes, and message reassembly over arbitrary split reads. No panic, typed errors,
//! never more than one message consumed.

use std::io::{self, Read};

use hotplug::connector::{read_line_bounded, LineError};
use hotplug::protocol::{read_message, MessageReader, ReadProgress, MSG_SIZE};
use hotplug::{
    decode_cpu_reply, decode_greeting, CpuOp, HotplugError, Phase, HANDSHAKE_LINE_LIMIT,
    MSG_MAGIC_VERSION,
};
use proptest::prelude::*;

/// Serves `data` in reads of the given sizes (cycled; 0 means an `Interrupted` error).
struct ChunkedReader {
    data: Vec<u8>,
    pos: usize,
    chunks: Vec<usize>,
    next: usize,
}

impl ChunkedReader {
    fn new(data: Vec<u8>, chunks: Vec<usize>) -> Self {
        ChunkedReader {
            data,
            pos: 0,
            chunks,
            next: 0,
        }
    }
}

impl Read for ChunkedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let chunk = self.chunks[self.next % self.chunks.len()];
        self.next += 1;
        if chunk == 0 {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = chunk.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn buf_of(bytes: &[u8]) -> [u8; MSG_SIZE] {
    let mut buf = [0u8; MSG_SIZE];
    let n = bytes.len().min(MSG_SIZE);
    buf[..n].copy_from_slice(&bytes[..n]);
    buf
}

/// Replies that are often nearly valid, to reach every branch of the decoder.
fn reply_strategy() -> impl Strategy<Value = [u8; MSG_SIZE]> {
    (
        prop_oneof![Just(MSG_MAGIC_VERSION), any::<u32>()],
        prop_oneof![Just(0u32), Just(4u32), any::<u32>()],
        prop_oneof![0u32..10, any::<u32>()],
        any::<u32>(),
        prop_oneof![
            Just(0i32),
            Just(-22i32),
            Just(-1i32),
            Just(i32::MIN),
            any::<i32>()
        ],
        prop_oneof![0u32..256, any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(magic, size, kind, flags, result, index, tail)| {
            let mut buf = [0u8; MSG_SIZE];
            buf[0..4].copy_from_slice(&magic.to_le_bytes());
            buf[4..8].copy_from_slice(&size.to_le_bytes());
            buf[8..12].copy_from_slice(&kind.to_le_bytes());
            buf[12..16].copy_from_slice(&flags.to_le_bytes());
            buf[16..20].copy_from_slice(&result.to_le_bytes());
            buf[20..24].copy_from_slice(&index.to_le_bytes());
            buf[24..24 + tail.len()].copy_from_slice(&tail);
            buf
        })
}

fn op_strategy() -> impl Strategy<Value = CpuOp> {
    prop_oneof![Just(CpuOp::Add), Just(CpuOp::Del)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn reply_decoder_is_total_and_strict(
        buf in prop_oneof![reply_strategy(), proptest::collection::vec(any::<u8>(), MSG_SIZE)
            .prop_map(|v| buf_of(&v))],
        op in op_strategy(),
        count in any::<u8>(),
    ) {
        let magic = u32::from_le_bytes(buf[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(buf[4..8].try_into().unwrap());
        let kind = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        let result = i32::from_le_bytes(buf[16..20].try_into().unwrap());
        let index = u32::from_le_bytes(buf[20..24].try_into().unwrap());
        match decode_cpu_reply(&buf, op, count) {
            Ok(reply) => {
                prop_assert_eq!(magic, MSG_MAGIC_VERSION);
                prop_assert_eq!(kind, op.msg_type().raw());
                prop_assert_eq!(result, 0);
                prop_assert_eq!(size, 4);
                prop_assert_eq!(index, u32::from(count));
                prop_assert_eq!(reply.apic_index, u32::from(count));
                prop_assert_eq!(reply.op, op);
            }
            Err(HotplugError::BadMagic { during: Phase::Reply, found }) => {
                prop_assert_ne!(magic, MSG_MAGIC_VERSION);
                prop_assert_eq!(found, magic);
            }
            Err(HotplugError::UnexpectedMsgType { found, .. }) => {
                prop_assert_ne!(found, op.msg_type().raw());
            }
            Err(HotplugError::GuestError { errno }) => {
                prop_assert!(errno > 0);
                prop_assert_eq!(result, -errno);
            }
            Err(HotplugError::InvalidResult { result: r, .. }) => {
                prop_assert_eq!(r, result);
                prop_assert!(r > 0 || r == i32::MIN);
            }
            Err(HotplugError::UnexpectedMsgSize { found, .. }) => {
                prop_assert_eq!(result, 0);
                prop_assert_eq!(found, size);
                prop_assert_ne!(size, 4);
            }
            Err(HotplugError::ApicIndexMismatch { found, expected, .. }) => {
                prop_assert_eq!(found, index);
                prop_assert_eq!(expected, u32::from(count));
                prop_assert_ne!(found, expected);
            }
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }

    #[test]
    fn greeting_decoder_is_total_and_strict(buf in reply_strategy()) {
        let ok = buf[0..4] == MSG_MAGIC_VERSION.to_le_bytes() && buf[4..16].iter().all(|&b| b == 0);
        match decode_greeting(&buf) {
            Ok(()) => prop_assert!(ok),
            Err(HotplugError::BadMagic { during: Phase::Greeting, .. })
            | Err(HotplugError::BadGreeting { .. }) => prop_assert!(!ok),
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }

    #[test]
    fn split_reads_reassemble_exactly_one_message(
        data in proptest::collection::vec(any::<u8>(), 0..2600),
        chunks in proptest::collection::vec(0usize..1500, 1..12),
    ) {
        // At least one non-zero chunk, or the reader would only ever be interrupted.
        let mut chunks = chunks;
        chunks.push(1);
        let mut reader = ChunkedReader::new(data.clone(), chunks);
        let mut msg = MessageReader::new();
        let progress = loop {
            match msg.read_from(&mut reader).unwrap() {
                ReadProgress::Partial(filled) => prop_assert!(filled < MSG_SIZE),
                done => break done,
            }
        };
        if data.len() >= MSG_SIZE {
            prop_assert_eq!(progress, ReadProgress::Complete);
            prop_assert_eq!(&msg.message().unwrap()[..], &data[..MSG_SIZE]);
            // Nothing of the next message was consumed.
            prop_assert_eq!(reader.pos, MSG_SIZE);
            // Decoding the reassembled bytes equals decoding them in one piece.
            let whole = buf_of(&data);
            prop_assert_eq!(
                format!("{:?}", decode_cpu_reply(msg.message().unwrap(), CpuOp::Add, 1)),
                format!("{:?}", decode_cpu_reply(&whole, CpuOp::Add, 1))
            );
        } else {
            prop_assert_eq!(progress, ReadProgress::Eof(data.len()));
            prop_assert!(msg.message().is_none());
        }
    }

    #[test]
    fn short_streams_are_connection_resets(
        data in proptest::collection::vec(any::<u8>(), 0..MSG_SIZE),
        chunks in proptest::collection::vec(1usize..700, 1..6),
    ) {
        let mut reader = ChunkedReader::new(data.clone(), chunks);
        match read_message(&mut reader, Phase::Reply) {
            Err(HotplugError::ConnectionReset { during: Phase::Reply, bytes }) => {
                prop_assert_eq!(bytes, data.len());
            }
            other => prop_assert!(false, "expected ConnectionReset, got {other:?}"),
        }
    }

    #[test]
    fn handshake_line_reader_is_bounded(
        data in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut reader = ChunkedReader::new(data.clone(), vec![1, 3, 64]);
        let newline = data.iter().position(|&b| b == b'\n');
        match read_line_bounded(&mut reader) {
            Ok(line) => {
                let n = newline.unwrap();
                prop_assert!(n <= HANDSHAKE_LINE_LIMIT);
                prop_assert_eq!(line.as_bytes(), &data[..n]);
                prop_assert_eq!(reader.pos, n + 1, "nothing after the newline is consumed");
            }
            Err(LineError::TooLong) => {
                prop_assert!(newline.is_none_or(|n| n > HANDSHAKE_LINE_LIMIT));
                prop_assert_eq!(reader.pos, HANDSHAKE_LINE_LIMIT + 1);
            }
            Err(LineError::Eof(partial)) => {
                prop_assert!(newline.is_none());
                prop_assert!(data.len() <= HANDSHAKE_LINE_LIMIT);
                prop_assert_eq!(partial.as_bytes(), &data[..]);
            }
            Err(LineError::Io(e)) => prop_assert!(false, "no I/O error expected: {e}"),
        }
    }
}

/// A reader that claims to have read more than it was given must not make the reassembly
/// index past its one buffer.
#[test]
fn lying_reader_cannot_overflow_the_buffer() {
    struct Liar;
    impl Read for Liar {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            Ok(buf.len() + 4096)
        }
    }
    let mut msg = MessageReader::new();
    assert_eq!(msg.read_from(&mut Liar).unwrap(), ReadProgress::Complete);
    assert_eq!(msg.filled(), MSG_SIZE);
}

/// A read timeout on the stream is a typed timeout, with the bytes so far kept.
#[test]
fn read_timeout_is_typed() {
    struct Slow(usize);
    impl Read for Slow {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            let n = self.0.min(buf.len());
            self.0 -= n;
            buf[..n].fill(0xAB);
            Ok(n)
        }
    }
    assert!(matches!(
        read_message(&mut Slow(100), Phase::Reply),
        Err(HotplugError::Timeout {
            during: Phase::Reply,
            ..
        })
    ));
}
