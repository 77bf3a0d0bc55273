//! Golden fixtures: committed bytes of every frame type (and of the firmware's reading record)
//! that must keep decoding to the same values. An encoding change that breaks old bytes fails
//! here; see "Wire compatibility" in ARCHITECTURE.md for what may change and how.
//!
//! To add a fixture for a new frame type, add it to `golden_frames` and run once with
//! `TIDESYNC_BLESS=1 cargo test -p tidesync-core --test fixtures`, then review and commit the file.
//! Existing fixtures are never re-blessed: a new protocol version gets a new directory.

mod common;

use std::path::PathBuf;

use common::*;
use tidesync_core::event::{
    AppPayload, Event, EventId, Gap, GapReason, GatewayId, Hlc, LogLevel, LogLine, Millis, Payload, Seq,
    ShadowReported, UnknownPayload,
};
use tidesync_core::record::ReadingRecord;
use tidesync_core::value::Value;
use tidesync_core::wire::{
    Ack, Backpressure, BackpressureReason, DecodeError, ErrorCode, ErrorFrame, EventBatch, Frame, FrameDecoder,
    Goodbye, GoodbyeReason, Hello, KeepAlive, Peer, ShadowSync, Welcome,
};

const ALL_FRAME_TYPES: [&str; 10] = [
    "hello",
    "welcome",
    "events",
    "custody",
    "commit",
    "backpressure",
    "shadow_sync",
    "error",
    "keep_alive",
    "goodbye",
];

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn mixed_batch() -> EventBatch {
    let device = device("pump-7");
    let event = |seq: u64, wall_ms: u64, payload: Payload| Event {
        id: EventId { device, seq: Seq(seq) },
        hlc: Hlc { wall_ms, logical: (seq % 3) as u32 },
        event_time: Millis(wall_ms - 20),
        payload,
    };
    let mut reported = std::collections::BTreeMap::new();
    reported.insert("fw".to_string(), Value::Text("1.4.2".into()));
    reported.insert("rate_s".to_string(), Value::Int(10));
    reported.insert("limits".to_string(), Value::Map([("max".to_string(), Value::Float(80.5))].into()));
    let events = vec![
        event(12, 1_763_900_000_000, reading("sht31.temperature", 21.37, "Cel")),
        event(13, 1_763_900_001_000, reading("sht31.temperature", 21.38, "Cel")),
        event(14, 1_763_900_001_000, reading("sht31.humidity", 48.5, "%")),
        event(15, 1_763_900_002_000, reading("bmp280.pressure", 1013.25, "hPa")),
        event(16, 1_763_900_002_500, reading("adc.raw", std::f64::consts::PI, "")),
        event(17, 1_763_900_003_000, Payload::ShadowReported(ShadowReported { reported: Value::Map(reported) })),
        event(18, 1_763_900_004_000, Payload::Log(LogLine { level: LogLevel::Warn, message: "fan stalled".into() })),
        event(19, 1_763_900_005_000, Payload::Gap(Gap { first: Seq(7), last: Seq(9), reason: GapReason::StorageFull })),
        event(
            20,
            1_763_900_006_000,
            Payload::App(AppPayload { content_type: "application/cbor".into(), data: vec![0xa1, 0x61, 0x78, 0x01] }),
        ),
        event(
            21,
            1_763_900_007_000,
            Payload::Unknown(UnknownPayload { kind: 4242, schema_version: 3, body: vec![1, 2, 3] }),
        ),
    ];
    // Seqs 10 and 11 were dropped by the device: the batch declares the hole.
    EventBatch::new(device, Seq(10), events).expect("valid batch")
}

fn golden_frames() -> Vec<(&'static str, Frame)> {
    let device = device("pump-7");
    let gateway = GatewayId::new("site-1.gw").expect("valid");
    let vv = [(device, Seq(41)), (self::device("fridge.3"), Seq(7))].into_iter().collect();
    vec![
        (
            "hello_device",
            Frame::Hello(Hello {
                protocol_min: 1,
                protocol_max: 1,
                peer: Peer::Device(device),
                vv,
                wall: Millis(1_763_900_000_000),
            }),
        ),
        (
            "hello_gateway",
            Frame::Hello(Hello {
                protocol_min: 1,
                protocol_max: 1,
                peer: Peer::Gateway(gateway),
                vv: Default::default(),
                wall: Millis(5),
            }),
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                protocol: 1,
                vv: [(device, Seq(40))].into_iter().collect(),
                wall: Millis(1_763_900_000_123),
            }),
        ),
        ("events", Frame::Events(mixed_batch())),
        ("events_one_hz", Frame::Events(EventBatch::new(device, Seq(1), one_hz_readings(50)).expect("valid"))),
        ("custody", Frame::Custody(Ack { device, up_to: Seq(41) })),
        ("commit", Frame::Commit(Ack { device, up_to: Seq(40) })),
        (
            "backpressure",
            Frame::Backpressure(Backpressure {
                device,
                up_to: Seq(40),
                retry_after_ms: 5_000,
                reason: BackpressureReason::StoreFull,
            }),
        ),
        ("shadow_sync", Frame::ShadowSync(ShadowSync { device, message: vec![0x42, 0, 1, 2, 3] })),
        (
            "error",
            Frame::Error(ErrorFrame {
                code: ErrorCode::Unauthorized,
                message: "device pump-7 sent a frame for device victim".into(),
            }),
        ),
        ("keep_alive", Frame::KeepAlive(KeepAlive { backlog_events: 1234 })),
        ("goodbye", Frame::Goodbye(Goodbye { reason: GoodbyeReason::Roaming })),
    ]
}

fn golden_record() -> ReadingRecord<'static> {
    ReadingRecord {
        seq: Seq(77),
        hlc: Hlc { wall_ms: 1_763_900_000_000, logical: 2 },
        event_time: Millis(1_763_900_000_000),
        sensor: "sht31.temperature",
        value: 21.37,
        unit: "Cel",
    }
}

fn read_fixture(name: &str, fresh: Option<&[u8]>) -> Vec<u8> {
    let path = fixture_dir().join(format!("{name}.bin"));
    if let Some(fresh) = fresh.filter(|_| std::env::var_os("TIDESYNC_BLESS").is_some() && !path.exists()) {
        std::fs::create_dir_all(fixture_dir()).expect("create fixture dir");
        std::fs::write(&path, fresh).expect("write fixture");
    }
    std::fs::read(&path).unwrap_or_else(|error| {
        panic!("fixture {} is missing ({error}); add it with TIDESYNC_BLESS=1 after review", path.display())
    })
}

#[test]
fn every_committed_fixture_decodes_to_its_frame_and_encodes_back() {
    for (name, frame) in golden_frames() {
        let bytes = read_fixture(name, Some(&frame.to_bytes()));
        let (decoded, used) =
            Frame::decode(&bytes).unwrap_or_else(|error| panic!("fixture {name} no longer decodes: {error}"));
        assert_eq!(used, bytes.len(), "fixture {name}");
        assert_eq!(decoded, frame, "fixture {name} decodes to a different frame");
        assert_eq!(frame.to_bytes(), bytes, "fixture {name}: the encoding changed; old readers would break");
    }
}

#[test]
fn every_frame_type_has_a_fixture() {
    let mut covered: Vec<&str> = Vec::new();
    for entry in std::fs::read_dir(fixture_dir()).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "bin") && !path.ends_with("reading_record.bin") {
            let bytes = std::fs::read(&path).expect("read");
            let (frame, _) = Frame::decode(&bytes).expect("decodes");
            covered.push(frame.name());
        }
    }
    for name in ALL_FRAME_TYPES {
        assert!(covered.contains(&name), "no fixture of frame type {name}");
    }
}

#[test]
fn the_firmware_reading_record_fixture_decodes() {
    let record = golden_record();
    let mut buffer = [0u8; 160];
    let fresh = record.encode(&mut buffer).expect("fits").to_vec();
    let bytes = read_fixture("reading_record", Some(&fresh));
    assert_eq!(ReadingRecord::decode(&bytes).expect("decodes"), record);
    assert_eq!(fresh, bytes, "the record encoding changed; firmware in the field would break");
}

#[test]
fn a_batch_in_the_one_hz_fixture_takes_under_sixteen_bytes_per_event() {
    let bytes = read_fixture("events_one_hz", None);
    assert!(bytes.len() <= 50 * 16, "{} bytes for 50 events", bytes.len());
}

#[test]
fn an_unknown_frame_type_is_skipped_and_the_stream_goes_on() {
    let mut stream = vec![4, 200, 9, 9, 9]; // length 4: type 200 and three body bytes
    let keep_alive = Frame::KeepAlive(KeepAlive { backlog_events: 3 });
    keep_alive.encode(&mut stream);
    let mut decoder = FrameDecoder::new();
    decoder.push(&stream);
    assert_eq!(decoder.next_frame(), Err(DecodeError::UnknownFrameType { tag: 200 }));
    assert_eq!(decoder.next_frame(), Ok(Some(keep_alive)));
}

#[test]
fn trailing_fields_from_a_newer_writer_are_ignored() {
    // A newer minor writer appended a field to the welcome body; this reader ignores it.
    let frame = Frame::Welcome(Welcome { protocol: 1, vv: Default::default(), wall: Millis(9) });
    let bytes = frame.to_bytes();
    let mut body = bytes[1..].to_vec();
    body.extend_from_slice(&[0x05, 0x77]);
    let mut newer = vec![body.len() as u8];
    newer.extend_from_slice(&body);
    assert_eq!(Frame::decode(&newer).expect("decodes").0, frame);
}

#[test]
fn events_of_unknown_kinds_are_relayed_byte_for_byte() {
    let bytes = read_fixture("events", None);
    let (frame, _) = Frame::decode(&bytes).expect("decodes");
    let Frame::Events(batch) = &frame else { panic!("events fixture holds events") };
    let unknown = batch.events.last().expect("non-empty");
    assert_eq!(
        unknown.payload,
        Payload::Unknown(UnknownPayload { kind: 4242, schema_version: 3, body: vec![1, 2, 3] })
    );
    assert_eq!(frame.to_bytes(), bytes, "a relay re-encodes exactly what it received");
    assert_eq!(batch.dropped(), Some((Seq(10), Seq(11))));
}
