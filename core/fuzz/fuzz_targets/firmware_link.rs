//! Fuzz target `firmware_link`: the serial hand-off link between firmware and device agent.
//! The input is a byte stream from the serial line. It goes through the link's COBS + CRC-32
//! `FrameDecoder` as the device agent's serial ingest (`device/src/serial.rs`) runs it, and every
//! record that comes out is turned into an event payload, validated and encoded as the agent's
//! `NewEvent::new` does, then read back as the ledger does. The same stream goes to the
//! firmware's own receiving side (`Link::handle_rx`, acks into a ring log on simulated flash), and
//! the whole input to `ReadingRecord::decode`. Checks: no panic; records and acks re-encode to
//! frames that decode to the same message; the log never counts as acknowledged a seq it has not
//! written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidesync_core::event::{Hlc, Millis, Payload, Seq};
use tidesync_core::record::{ReadingRecord, READING_RECORD_BYTES_MAX};
use tidesync_firmware::link::{encode_frame, FrameDecoder, Link, Message};
use tidesync_firmware::log::RingLog;
use tidesync_firmware::sim_flash::SimFlash;

type Flash = SimFlash<2048, 512, 4>;

/// Encodes `message` as a frame, decodes it again and hands the result to `check`.
fn round_trip(message: &Message<'_>, mut check: impl FnMut(&Message<'_>)) {
    let Ok(frame) = encode_frame(message) else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    let mut seen = 0;
    decoder.feed(frame.as_bytes(), |decoded| {
        seen += 1;
        check(&decoded.expect("re-encoded frame decodes"));
    });
    assert_eq!(seen, 1, "one frame in, one frame out");
}

/// What the device agent does with a record: `NewEvent::new` (validate, encode the body), then
/// what its ledger does when it reads the row back.
fn agent_side(record: &ReadingRecord<'_>) {
    let payload = record.to_payload();
    if payload.validate().is_err() {
        return;
    }
    let mut body = Vec::new();
    payload.encode_body(&mut body);
    let back = Payload::decode_body(payload.kind(), payload.schema_version(), &body).expect("stored body decodes");
    let mut again = Vec::new();
    back.encode_body(&mut again);
    assert_eq!(body, again, "a stored reading reads back as written");
}

fn record_bytes(record: &ReadingRecord<'_>) -> Vec<u8> {
    let mut buffer = [0u8; READING_RECORD_BYTES_MAX];
    record.encode(&mut buffer).map(|used| used.to_vec()).unwrap_or_default()
}

fuzz_target!(|bytes: &[u8]| {
    // The agent's side: frames from the firmware.
    let mut decoder = FrameDecoder::new();
    decoder.feed(bytes, |frame| match frame {
        Ok(Message::Record(record)) => {
            agent_side(&record);
            let expected = record_bytes(&record);
            round_trip(&Message::Record(record), |decoded| match decoded {
                Message::Record(again) => assert_eq!(record_bytes(again), expected),
                other => panic!("record came back as {other:?}"),
            });
        }
        Ok(Message::Ack { up_to }) => round_trip(&Message::Ack { up_to }, |decoded| {
            assert!(matches!(decoded, Message::Ack { up_to: again } if *again == up_to));
        }),
        Ok(_) | Err(_) => {}
    });
    if let Ok(record) = ReadingRecord::decode(bytes) {
        agent_side(&record);
    }
    // The firmware's side: acks from the agent, applied to a log holding three records.
    let Ok(mut log) = RingLog::<Flash, 4>::open(Flash::new()) else {
        return;
    };
    for index in 0..3u64 {
        let record = ReadingRecord {
            seq: Seq::ZERO,
            hlc: Hlc { wall_ms: 1_000 + index, logical: 0 },
            event_time: Millis(1_000 + index),
            sensor: "sht3x.temperature",
            value: index as f64,
            unit: "Cel",
        };
        if log.append_reading(record).is_err() {
            return;
        }
    }
    let mut link = Link::new(log.acked(), 0, 4, 1_000);
    let _ = link.handle_rx(1, bytes, &mut log);
    assert!(log.acked() < log.next_seq(), "acked {:?} but next is {:?}", log.acked(), log.next_seq());
});
