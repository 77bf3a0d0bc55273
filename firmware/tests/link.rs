//! The hand-off link: frame codec round trips, corruption and resynchronisation properties, and
//! the firmware's sender against the ring log (window, acks, resend after a lost ack).

use proptest::prelude::*;
use tidesync_core::event::{Hlc, Millis, Seq};
use tidesync_core::record::ReadingRecord;
use tidesync_firmware::link::{encode_frame, FrameDecoder, FrameError, Link, Message, DELIMITER, FRAME_BYTES_MAX};
use tidesync_firmware::log::RingLog;
use tidesync_firmware::sim_flash::SimFlash;

type Flash = SimFlash<2048, 512, 4>;

/// An `embedded_io` serial port that collects what is written.
#[derive(Default)]
struct Wire {
    bytes: Vec<u8>,
}

impl embedded_io::ErrorType for Wire {
    type Error = core::convert::Infallible;
}

impl embedded_io::Write for Wire {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Owned copy of a decoded message.
#[derive(Debug, Clone, PartialEq)]
enum OwnedMessage {
    Record { seq: u64, hlc: Hlc, event_time: Millis, sensor: String, value: f64, unit: String },
    Ack(u64),
}

fn own(message: &Message<'_>) -> OwnedMessage {
    match message {
        Message::Record(record) => OwnedMessage::Record {
            seq: record.seq.0,
            hlc: record.hlc,
            event_time: record.event_time,
            sensor: record.sensor.to_string(),
            value: record.value,
            unit: record.unit.to_string(),
        },
        Message::Ack { up_to } => OwnedMessage::Ack(up_to.0),
        _ => panic!("unknown message"),
    }
}

fn decode_all(decoder: &mut FrameDecoder, bytes: &[u8]) -> Vec<Result<OwnedMessage, FrameError>> {
    let mut out = Vec::new();
    decoder.feed(bytes, |frame| out.push(frame.map(|message| own(&message))));
    out
}

fn message_strategy() -> impl Strategy<Value = OwnedMessage> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>(), "[a-z0-9._]{0,64}", any::<f64>(), "[A-Za-z%]{0,16}")
            .prop_map(|(seq, wall_ms, logical, event_time, sensor, value, unit)| OwnedMessage::Record {
                seq,
                hlc: Hlc { wall_ms, logical },
                event_time: Millis(event_time),
                sensor,
                value,
                unit
            }),
        any::<u64>().prop_map(OwnedMessage::Ack),
    ]
}

fn encode_owned(message: &OwnedMessage) -> Vec<u8> {
    let frame = match message {
        OwnedMessage::Record { seq, hlc, event_time, sensor, value, unit } => {
            encode_frame(&Message::Record(ReadingRecord {
                seq: Seq(*seq),
                hlc: *hlc,
                event_time: *event_time,
                sensor,
                value: *value,
                unit,
            }))
        }
        OwnedMessage::Ack(up_to) => encode_frame(&Message::Ack { up_to: Seq(*up_to) }),
    };
    frame.expect("encodes").as_bytes().to_vec()
}

fn same(left: &OwnedMessage, right: &OwnedMessage) -> bool {
    // NaN != NaN: compare values by bits.
    match (left, right) {
        (
            OwnedMessage::Record { value: left_value, seq: ls, hlc: lh, event_time: le, sensor: lsn, unit: lu },
            OwnedMessage::Record { value: right_value, seq: rs, hlc: rh, event_time: re, sensor: rsn, unit: ru },
        ) => left_value.to_bits() == right_value.to_bits() && (ls, lh, le, lsn, lu) == (rs, rh, re, rsn, ru),
        _ => left == right,
    }
}

proptest! {
    /// Any sequence of messages survives encoding, concatenation and decoding, in order.
    #[test]
    fn frames_round_trip(messages in proptest::collection::vec(message_strategy(), 1..20)) {
        let mut stream = Vec::new();
        for message in &messages {
            let frame = encode_owned(message);
            prop_assert!(frame.len() <= FRAME_BYTES_MAX + 1);
            prop_assert_eq!(frame.iter().filter(|byte| **byte == DELIMITER).count(), 1, "only the delimiter is zero");
            prop_assert_eq!(frame.last().copied(), Some(DELIMITER));
            stream.extend(frame);
        }
        let decoded = decode_all(&mut FrameDecoder::new(), &stream);
        prop_assert_eq!(decoded.len(), messages.len());
        for (decoded, message) in decoded.iter().zip(&messages) {
            let decoded = decoded.as_ref().expect("valid frame");
            prop_assert!(same(decoded, message), "{:?} != {:?}", decoded, message);
        }
    }

    /// Corrupting one byte of a frame (not its delimiter) loses at most that frame (reported as
    /// an error, never a wrong message), and the frame after it decodes.
    #[test]
    fn corruption_is_detected_and_the_next_frame_survives(
        first in message_strategy(), second in message_strategy(), byte_idx in any::<prop::sample::Index>(), flip in 1u8..=255
    ) {
        let mut frame = encode_owned(&first);
        let idx = byte_idx.index(frame.len() - 1);
        frame[idx] ^= flip;
        frame.extend(encode_owned(&second));
        let decoded = decode_all(&mut FrameDecoder::new(), &frame);
        let last = decoded.last().expect("at least the second frame").as_ref().expect("second frame intact");
        prop_assert!(same(last, &second));
        // A corrupted frame may split in two (a zero was introduced) but never decodes wrongly.
        for message in decoded[..decoded.len() - 1].iter().flatten() {
            prop_assert!(same(message, &first), "corruption produced {:?}", message);
        }
    }

    /// Arbitrary garbage never panics the decoder, and a frame after a delimiter decodes.
    #[test]
    fn garbage_then_resync(garbage in proptest::collection::vec(any::<u8>(), 0..600), message in message_strategy()) {
        let mut stream = garbage;
        stream.push(DELIMITER);
        stream.extend(encode_owned(&message));
        let decoded = decode_all(&mut FrameDecoder::new(), &stream);
        let last = decoded.last().expect("frame").as_ref().expect("valid");
        prop_assert!(same(last, &message));
    }

    /// A corrupted delimiter merges two frames into one that is rejected: no wrong message.
    #[test]
    fn merged_frames_are_rejected(first in message_strategy(), second in message_strategy(), noise in 1u8..=255) {
        let mut stream = encode_owned(&first);
        let delimiter_idx = stream.len() - 1;
        stream[delimiter_idx] = noise;
        stream.extend(encode_owned(&second));
        let decoded = decode_all(&mut FrameDecoder::new(), &stream);
        prop_assert_eq!(decoded.len(), 1);
        prop_assert!(decoded[0].is_err());
    }
}

#[test]
fn typed_errors_for_bad_frames() {
    let mut decoder = FrameDecoder::new();
    // Oversized: more bytes than any frame, then the stream recovers.
    let mut stream = vec![0x01u8; FRAME_BYTES_MAX + 10];
    stream.push(DELIMITER);
    stream.extend(encode_owned(&OwnedMessage::Ack(7)));
    let decoded = decode_all(&mut decoder, &stream);
    assert_eq!(decoded[0], Err(FrameError::Oversized { len_bytes: FRAME_BYTES_MAX + 10, max_bytes: FRAME_BYTES_MAX }));
    assert_eq!(decoded[1], Ok(OwnedMessage::Ack(7)));
    // Short: a frame with fewer bytes than a type byte and a CRC.
    assert_eq!(decode_all(&mut decoder, &[0x03, 0x01, 0x02, DELIMITER]), vec![Err(FrameError::Short { len_bytes: 2 })]);
    // Bad COBS: a code byte pointing past the end.
    assert_eq!(decode_all(&mut decoder, &[0x09, 0x01, DELIMITER]), vec![Err(FrameError::Cobs)]);
    // Bad CRC.
    let mut frame = encode_owned(&OwnedMessage::Ack(9));
    let crc_byte = frame.len() - 2;
    frame[crc_byte] ^= 0x40;
    assert!(matches!(decode_all(&mut decoder, &frame)[..], [Err(FrameError::Crc { .. })]));
    // Empty frames are idle line, not errors.
    assert!(decode_all(&mut decoder, &[DELIMITER, DELIMITER]).is_empty());
    assert_eq!(FrameError::Cobs.code(), 2);
}

#[test]
fn unknown_type_and_malformed_body() {
    // A frame with a valid CRC but an unknown type byte, built by hand.
    let mut decoder = FrameDecoder::new();
    let message = [0x7Fu8, 0x01];
    let crc = tidesync_firmware::checksum::crc32(&[&message]).to_le_bytes();
    let raw: Vec<u8> = message.iter().chain(crc.iter()).copied().collect();
    assert!(!raw.contains(&0), "test frame needs no stuffing");
    let mut frame = vec![raw.len() as u8 + 1];
    frame.extend(&raw);
    frame.push(DELIMITER);
    assert_eq!(decode_all(&mut decoder, &frame), vec![Err(FrameError::UnknownType { tag: 0x7F })]);
    // A record type whose body is a truncated record.
    let message = [tidesync_firmware::link::TAG_RECORD, 0x05];
    let crc = tidesync_firmware::checksum::crc32(&[&message]).to_le_bytes();
    let raw: Vec<u8> = message.iter().chain(crc.iter()).copied().collect();
    if !raw.contains(&0) {
        let mut frame = vec![raw.len() as u8 + 1];
        frame.extend(&raw);
        frame.push(DELIMITER);
        assert!(matches!(decode_all(&mut decoder, &frame)[..], [Err(FrameError::Body(_))]));
    }
}

fn log_with(readings: u64) -> RingLog<Flash, 4> {
    let mut log = RingLog::<Flash, 4>::open(Flash::new()).expect("open");
    for idx in 0..readings {
        let record = ReadingRecord {
            seq: Seq::ZERO,
            hlc: Hlc { wall_ms: 1000 + idx, logical: 0 },
            event_time: Millis(1000 + idx),
            sensor: "sht3x.temperature",
            value: idx as f64,
            unit: "Cel",
        };
        log.append_reading(record).expect("append");
    }
    log
}

fn sent_seqs(wire: &mut Wire) -> Vec<u64> {
    let bytes = std::mem::take(&mut wire.bytes);
    decode_all(&mut FrameDecoder::new(), &bytes)
        .into_iter()
        .map(|frame| match frame.expect("valid") {
            OwnedMessage::Record { seq, .. } => seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn sender_respects_window_applies_acks_and_resends_after_silence() {
    let mut log = log_with(10);
    let mut link = Link::new(log.acked(), 0, 4, 1000);
    let mut wire = Wire::default();
    assert_eq!(link.send_pending(0, &mut log, &mut wire).expect("send"), 4);
    assert_eq!(sent_seqs(&mut wire), vec![1, 2, 3, 4]);
    assert_eq!(link.send_pending(10, &mut log, &mut wire).expect("send"), 0, "window full");
    // The agent acks 3 (with line noise around the frame): the window moves on.
    let mut rx = vec![0x55, 0x13, DELIMITER];
    rx.extend(encode_owned(&OwnedMessage::Ack(3)));
    link.handle_rx(20, &rx, &mut log).expect("ack");
    assert_eq!(log.acked(), Seq(3));
    assert_eq!(link.stats().frames_rejected, 1);
    assert_eq!(link.send_pending(30, &mut log, &mut wire).expect("send"), 3);
    assert_eq!(sent_seqs(&mut wire), vec![5, 6, 7]);
    // No ack for a while (the ack was lost): go back to the watermark and send again.
    assert_eq!(link.send_pending(1500, &mut log, &mut wire).expect("resend"), 4);
    assert_eq!(sent_seqs(&mut wire), vec![4, 5, 6, 7]);
    assert_eq!(link.stats().rewinds, 1);
    // The ack survives a reboot of the firmware: a new link starts after it.
    let mut log = RingLog::<Flash, 4>::open(log.into_flash()).expect("reopen");
    let mut link = Link::new(log.acked(), 0, 100, 1000);
    link.send_pending(0, &mut log, &mut wire).expect("send");
    assert_eq!(sent_seqs(&mut wire), vec![4, 5, 6, 7, 8, 9, 10]);
}
