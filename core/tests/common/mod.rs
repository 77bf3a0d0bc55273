//! Helpers shared by core's integration tests: sample events and frames, and strategies.

#![allow(dead_code)]

use proptest::prelude::*;
use tidesync_core::event::{
    AppPayload, DeviceId, Event, EventId, Gap, GapReason, GatewayId, Hlc, LogLevel, LogLine, Millis, Payload,
    SensorReading, Seq, ShadowReported, UnknownPayload,
};
use tidesync_core::value::Value;
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{
    Ack, Backpressure, BackpressureReason, ErrorCode, ErrorFrame, EventBatch, Frame, Goodbye, GoodbyeReason, Hello,
    KeepAlive, Peer, ShadowSync, Welcome,
};

pub(crate) fn device(name: &str) -> DeviceId {
    DeviceId::new(name).expect("test names are valid")
}

pub(crate) fn reading(sensor: &str, value: f64, unit: &str) -> Payload {
    Payload::Reading(SensorReading { sensor: sensor.into(), value, unit: unit.into() })
}

/// `n` readings of one sensor at 1 Hz, as a device records them: slowly varying, 0.01 resolution.
pub(crate) fn one_hz_readings(n: usize) -> Vec<Event> {
    let device = device("pump-7");
    (0..n)
        .map(|index| {
            let wall_ms = 1_763_900_000_000 + index as u64 * 1_000;
            // A slow wave around 21 °C in hundredths, as an SHT3x reports it.
            let hundredths = 2_100 + ((index as f64 / 60.0).sin() * 150.0) as i64 + (index % 3) as i64;
            Event {
                id: EventId { device, seq: Seq(index as u64 + 1) },
                hlc: Hlc { wall_ms, logical: 0 },
                event_time: Millis(wall_ms),
                payload: reading("sht31.temperature", hundredths as f64 / 100.0, "Cel"),
            }
        })
        .collect()
}

pub(crate) fn arb_device() -> impl Strategy<Value = DeviceId> {
    "[a-z][a-z0-9._-]{0,10}".prop_map(|name| device(&name))
}

pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (-1e9f64..1e9).prop_map(Value::Float),
        "[a-z ]{0,12}".prop_map(Value::Text),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4).prop_map(Value::Map),
        ]
    })
}

/// Finite values, mostly at a decimal resolution as sensors report them, some arbitrary.
pub(crate) fn arb_reading_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        (any::<i32>(), 0u32..6).prop_map(|(int, scale)| f64::from(int) / 10f64.powi(scale as i32)),
        any::<f64>().prop_filter("finite", |value| value.is_finite()),
        Just(-0.0),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
    ]
}

pub(crate) fn arb_payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        4 => ("[a-z.]{1,12}", arb_reading_value(), prop_oneof![Just("Cel"), Just("%"), Just("hPa"), Just("")])
            .prop_map(|(sensor, value, unit)| reading(&sensor, value, unit)),
        1 => prop::collection::btree_map("[a-z]{1,6}", arb_value(), 0..4)
            .prop_map(|map| Payload::ShadowReported(ShadowReported { reported: Value::Map(map) })),
        1 => ("[ -~]{0,40}", prop_oneof![Just(LogLevel::Error), Just(LogLevel::Warn), Just(LogLevel::Info), Just(LogLevel::Debug)])
            .prop_map(|(message, level)| Payload::Log(LogLine { level, message })),
        1 => (1u64..1000, 0u64..1000, prop_oneof![Just(GapReason::StorageFull), Just(GapReason::FirmwareLogFull)])
            .prop_map(|(first, len, reason)| Payload::Gap(Gap { first: Seq(first), last: Seq(first + len), reason })),
        1 => ("[a-z]{1,10}/[a-z]{1,10}", prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(content_type, data)| Payload::App(AppPayload { content_type, data })),
        1 => (100u16..2000, 1u16..5, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(kind, schema_version, body)| Payload::Unknown(UnknownPayload { kind, schema_version, body })),
    ]
}

pub(crate) fn arb_batch() -> impl Strategy<Value = EventBatch> {
    (
        arb_device(),
        1u64..1_000_000,
        0u64..5,
        prop::collection::vec((any::<u64>(), any::<u32>(), any::<u64>(), arb_payload()), 1..40),
    )
        .prop_map(|(device, from, hole, rows)| {
            let first = from + hole;
            let events = rows
                .into_iter()
                .enumerate()
                .map(|(index, (wall_ms, logical, event_time, payload))| Event {
                    id: EventId { device, seq: Seq(first + index as u64) },
                    hlc: Hlc { wall_ms, logical },
                    event_time: Millis(event_time),
                    payload,
                })
                .collect();
            EventBatch::new(device, Seq(from), events).expect("strategy builds valid batches")
        })
}

pub(crate) fn arb_vv() -> impl Strategy<Value = VersionVector> {
    prop::collection::btree_map(arb_device(), 0u64..1_000, 0..5)
        .prop_map(|entries| entries.into_iter().map(|(device, seq)| (device, Seq(seq))).collect())
}

pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
    let peer = prop_oneof![
        arb_device().prop_map(Peer::Device),
        "[a-z]{1,8}".prop_map(|name| Peer::Gateway(GatewayId::new(&name).expect("valid"))),
    ];
    let ack = || (arb_device(), any::<u64>()).prop_map(|(device, up_to)| Ack { device, up_to: Seq(up_to) });
    prop_oneof![
        (any::<u16>(), any::<u16>(), peer, arb_vv(), any::<u64>()).prop_map(
            |(protocol_min, protocol_max, peer, vv, wall)| {
                Frame::Hello(Hello { protocol_min, protocol_max, peer, vv, wall: Millis(wall) })
            }
        ),
        (any::<u16>(), arb_vv(), any::<u64>()).prop_map(|(protocol, vv, wall)| Frame::Welcome(Welcome {
            protocol,
            vv,
            wall: Millis(wall)
        })),
        arb_batch().prop_map(Frame::Events),
        ack().prop_map(Frame::Custody),
        ack().prop_map(Frame::Commit),
        (arb_device(), any::<u64>(), any::<u32>()).prop_map(|(device, up_to, retry_after_ms)| {
            Frame::Backpressure(Backpressure {
                device,
                up_to: Seq(up_to),
                retry_after_ms,
                reason: BackpressureReason::StoreFull,
            })
        }),
        (arb_device(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(device, message)| Frame::ShadowSync(ShadowSync { device, message })),
        (any::<u16>(), "[ -~]{0,30}")
            .prop_map(|(code, message)| Frame::Error(ErrorFrame { code: ErrorCode::from(code), message })),
        any::<u64>().prop_map(|backlog_events| Frame::KeepAlive(KeepAlive { backlog_events })),
        prop_oneof![Just(GoodbyeReason::Shutdown), Just(GoodbyeReason::Idle), Just(GoodbyeReason::Roaming)]
            .prop_map(|reason| Frame::Goodbye(Goodbye { reason })),
    ]
}
