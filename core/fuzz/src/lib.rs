//! Shared pieces of the fuzz targets: how a target splits its input into the calls it makes, and
//! seed inputs built by encoding real values, so that every run starts deep inside the decoders
//! instead of spending its first minutes discovering the formats.
//!
//! The input layouts live here, next to the seeds that use them, so that the two cannot drift.

use std::collections::BTreeMap;

use tidesync_core::auth::{BatchProof, ChainHash, DeviceKeys, DeviceSigner};
use tidesync_core::event::{
    AppPayload, DeviceId, Event, EventId, Gap, GapReason, Hlc, LogLevel, LogLine, Millis, Payload, SensorReading, Seq,
    ShadowReported, UnknownPayload,
};
use tidesync_core::record::ReadingRecord;
use tidesync_core::shadow::{PeerSync, Section, Shadow, ShadowLimits};
use tidesync_core::value::Value;
use tidesync_core::wire::{EventBatch, Frame};
use tidesync_firmware::link::{encode_frame, Message, DELIMITER};

/// Replica names the targets load shadows as (the stores' own naming).
pub const DEVICE_REPLICA: &str = "device:pump-7";
/// The gateway spool's replica name in the targets.
pub const GATEWAY_REPLICA: &str = "gateway:site-1";
/// The cloud's replica name.
pub const CLOUD_REPLICA: &str = "cloud";

// ---------------------------------------------------------------------------------------------
// ledger_records: what the device ledger, the gateway spool and the cloud store read back.

/// One stored thing a store decodes when it reads its rows back.
#[derive(Debug)]
pub enum LedgerInput<'a> {
    /// An `events` row: `Payload::decode_body(EventKind::from_tag(kind), schema_version, body)`
    /// (device `events_from` and eviction, spool `read`, cloud stored events).
    Event {
        /// The `kind` column.
        kind: u16,
        /// The `schema_version` column.
        schema_version: u16,
        /// The `body` column.
        body: &'a [u8],
    },
    /// A whole saved shadow document (`shadows.doc` of the spool and the cloud): `Shadow::load`.
    ShadowDoc(&'a [u8]),
    /// The device's `shadow_saves` rows in id order: `(full, bytes)`, replayed as the device's
    /// `load_shadow` does (a full save, then increments).
    ShadowSaves(Vec<(bool, &'a [u8])>),
}

/// Splits `[selector][rest]`; see [`LedgerInput`] for what each selector means.
pub fn ledger_input(bytes: &[u8]) -> Option<LedgerInput<'_>> {
    let (&selector, rest) = bytes.split_first()?;
    Some(match selector % 3 {
        0 => {
            let kind = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]);
            let schema_version = u16::from_le_bytes([*rest.get(2)?, *rest.get(3)?]);
            LedgerInput::Event { kind, schema_version, body: rest.get(4..)? }
        }
        1 => LedgerInput::ShadowDoc(rest),
        _ => {
            let mut rows = Vec::new();
            let mut rest = rest;
            // Each row: [full: u8][len: u16 le][bytes]; a short tail is the last row's bytes.
            while let Some((&full, tail)) = rest.split_first() {
                let len = match tail {
                    [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
                    _ => 0,
                };
                let tail = tail.get(2..).unwrap_or_default();
                let (row, next) = tail.split_at(len.min(tail.len()));
                rows.push((full & 1 == 1, row));
                rest = next;
            }
            LedgerInput::ShadowSaves(rows)
        }
    })
}

/// Encodes an `events` row for [`ledger_input`].
pub fn ledger_event_row(payload: &Payload) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&payload.kind().tag().to_le_bytes());
    out.extend_from_slice(&payload.schema_version().to_le_bytes());
    payload.encode_body(&mut out);
    out
}

/// Encodes device `shadow_saves` rows for [`ledger_input`].
pub fn ledger_shadow_saves(rows: &[(bool, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![2];
    for (full, bytes) in rows {
        out.push(u8::from(*full));
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// shadow_sync: automerge sync messages and saved documents from peers.

/// What the shadow_sync target does with its input.
#[derive(Debug)]
pub enum ShadowInput<'a> {
    /// One sync message to a fresh shadow.
    Fresh(&'a [u8]),
    /// One sync message to a populated shadow.
    Populated(&'a [u8]),
    /// A saved document: `Shadow::load`.
    Load(&'a [u8]),
    /// A session: messages `[len: u16 le][bytes]` received in turn by a populated shadow, which
    /// answers each one.
    Session(Vec<&'a [u8]>),
}

/// Splits `[selector][rest]` for the shadow_sync target.
pub fn shadow_input(bytes: &[u8]) -> Option<ShadowInput<'_>> {
    let (&selector, rest) = bytes.split_first()?;
    Some(match selector % 4 {
        0 => ShadowInput::Fresh(rest),
        1 => ShadowInput::Populated(rest),
        2 => ShadowInput::Load(rest),
        _ => {
            let mut messages = Vec::new();
            let mut rest = rest;
            while let [a, b, tail @ ..] = rest {
                let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
                let (message, next) = tail.split_at(len);
                messages.push(message);
                rest = next;
            }
            ShadowInput::Session(messages)
        }
    })
}

/// The populated shadow the targets start from: the cloud's replica with reported and desired
/// entries, and a desired key the device has not reported yet.
pub fn populated_shadow() -> Shadow {
    let mut shadow = Shadow::new(CLOUD_REPLICA, ShadowLimits::default());
    let edits = [
        (Section::Reported, "fw", Value::Text("1.4.2".into())),
        (Section::Reported, "rate_s", Value::Int(10)),
        (Section::Desired, "rate_s", Value::Int(5)),
        (Section::Desired, "limits", Value::Map([("max".to_string(), Value::Float(80.5))].into())),
        (Section::Desired, "tags", Value::List(vec![Value::Text("roof".into()), Value::Bool(true), Value::Null])),
    ];
    for (section, key, value) in edits {
        // Fixed small values on a fresh shadow: these edits are within every bound.
        let _ = shadow.set(section, key, &value);
    }
    shadow
}

/// A device-side shadow with edits of its own, to sync against [`populated_shadow`].
fn device_shadow() -> Shadow {
    let mut shadow = Shadow::new(DEVICE_REPLICA, ShadowLimits::default());
    let _ = shadow.set(Section::Reported, "rate_s", &Value::Int(5));
    let _ = shadow.set(Section::Reported, "battery", &Value::Float(3.71));
    let _ = shadow.set(
        Section::Reported,
        "nested",
        &Value::Map([("a".to_string(), Value::List(vec![Value::Int(1)]))].into()),
    );
    shadow
}

/// Every message `receiver` gets in a full sync exchange with `sender`.
fn sync_exchange(sender: &mut Shadow, receiver: &mut Shadow) -> Vec<Vec<u8>> {
    let (mut to_receiver, mut to_sender) = (PeerSync::new(), PeerSync::new());
    let mut received = Vec::new();
    for _ in 0..16 {
        let mut quiet = true;
        if let Some(message) = sender.generate_sync_message(&mut to_receiver) {
            let _ = receiver.receive_sync_message(&mut to_sender, &message);
            received.push(message);
            quiet = false;
        }
        if let Some(message) = receiver.generate_sync_message(&mut to_sender) {
            let _ = sender.receive_sync_message(&mut to_receiver, &message);
            quiet = false;
        }
        if quiet {
            break;
        }
    }
    received
}

// ---------------------------------------------------------------------------------------------
// Real values.

fn device() -> DeviceId {
    // A fixed valid name.
    DeviceId::new("pump-7").unwrap_or_else(|_| unreachable!("valid name"))
}

fn reading(sensor: &str, value: f64, unit: &str) -> Payload {
    Payload::Reading(SensorReading { sensor: sensor.into(), value, unit: unit.into() })
}

/// One payload of every kind, with realistic contents.
pub fn payloads() -> Vec<Payload> {
    let reported: BTreeMap<String, Value> = [
        ("fw".to_string(), Value::Text("1.4.2".into())),
        ("rate_s".to_string(), Value::Int(10)),
        ("limits".to_string(), Value::Map([("max".to_string(), Value::Float(80.5))].into())),
        ("tags".to_string(), Value::List(vec![Value::Bool(false), Value::Null])),
    ]
    .into();
    vec![
        reading("sht31.temperature", 21.37, "Cel"),
        reading("adc.raw", std::f64::consts::PI, ""),
        Payload::ShadowReported(ShadowReported { reported: Value::Map(reported) }),
        Payload::Log(LogLine { level: LogLevel::Warn, message: "fan slow".into() }),
        Payload::Gap(Gap { first: Seq(3), last: Seq(9), reason: GapReason::StorageFull }),
        Payload::Gap(Gap { first: Seq(1), last: Seq(1), reason: GapReason::FirmwareLogFull }),
        Payload::App(AppPayload { content_type: "application/cbor".into(), data: vec![0xa1, 0x61, 0x61, 0x01] }),
        Payload::Unknown(UnknownPayload { kind: 77, schema_version: 3, body: vec![1, 2, 3, 4] }),
    ]
}

/// Batches as devices send them: 1 Hz readings, every payload kind, a batch after a hole.
pub fn batches() -> Vec<EventBatch> {
    let device = device();
    let event = |seq: u64, wall_ms: u64, payload: Payload| Event {
        id: EventId { device, seq: Seq(seq) },
        hlc: Hlc { wall_ms, logical: (seq % 3) as u32 },
        event_time: Millis(wall_ms.saturating_sub(20)),
        payload,
    };
    let one_hz: Vec<Event> = (0..64u64)
        .map(|index| {
            let hundredths = 2_100 + ((index as f64 / 10.0).sin() * 150.0) as i64;
            event(
                index + 1,
                1_763_900_000_000 + index * 1_000,
                reading("sht31.temperature", hundredths as f64 / 100.0, "Cel"),
            )
        })
        .collect();
    let mixed: Vec<Event> = payloads()
        .into_iter()
        .enumerate()
        .map(|(index, payload)| event(12 + index as u64, 1_763_900_000_000 + index as u64 * 500, payload))
        .collect();
    let two_sensors: Vec<Event> = (0..16u64)
        .map(|index| {
            let payload = if index % 2 == 0 {
                reading("sht31.humidity", 48.5 + index as f64 / 10.0, "%")
            } else {
                reading("bmp280.pressure", 1013.25 - index as f64, "hPa")
            };
            event(100 + index, 1_763_900_000_000 + index * 250, payload)
        })
        .collect();
    let mut out = Vec::new();
    for (from, events) in [(Seq(1), one_hz), (Seq(12), mixed), (Seq(90), two_sensors)] {
        if let Ok(batch) = EventBatch::new(device, from, events) {
            out.push(batch.clone());
            out.push(signed(batch));
        }
    }
    out
}

/// The signing key of the seeds' device (a fixed test seed).
pub fn signer() -> DeviceSigner {
    DeviceSigner::from_seed(device(), [7; 32])
}

/// The cloud's key registry holding [`signer`]'s public key.
pub fn device_keys() -> DeviceKeys {
    let mut keys = DeviceKeys::new();
    // A key derived from a fixed seed is a valid, non-weak key.
    let _ = keys.insert(device(), signer().public_key());
    keys
}

/// `batch` with a proof as the device signs it: the chain before it, a seal on its last event,
/// and a hole proof when it starts with a declared hole.
fn signed(mut batch: EventBatch) -> EventBatch {
    let signer = signer();
    let prev = ChainHash::genesis(&batch.device);
    let head = prev.over(batch.events.iter());
    // The seeds' chains start at genesis, which is also the chain before a hole from seq 1.
    let hole = batch.dropped().map(|(first, last)| signer.hole(first, last, ChainHash::genesis(&batch.device), prev));
    batch.proof = Some(BatchProof { prev, seals: vec![signer.seal(batch.last_seq(), &head)], hole });
    batch
}

/// Firmware records as the sampler logs them.
pub fn records() -> Vec<ReadingRecord<'static>> {
    let record = |seq: u64, sensor: &'static str, value: f64, unit: &'static str| ReadingRecord {
        seq: Seq(seq),
        hlc: Hlc { wall_ms: 1_763_900_000_000 + seq * 1_000, logical: (seq % 2) as u32 },
        event_time: Millis(1_763_900_000_000 + seq * 1_000),
        sensor,
        value,
        unit,
    };
    vec![
        record(1, "sht3x.temperature", 21.37, "Cel"),
        record(2, "sht3x.humidity", 48.5, "%"),
        record(3, "bmp280.pressure", 1013.25, "hPa"),
        record(4, "adc.raw", -0.0, ""),
        record(5, "a-very-long-sensor-name.with.many.parts.to.reach.the.limit", 1e300, "kg.m2/s2"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Seeds per target.

/// Seeds of `frame_decoder`: every frame type (the committed fixtures are added by the seeds
/// example) and a stream of several frames.
pub fn seeds_frame_decoder() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = batches().into_iter().map(|batch| Frame::Events(batch).to_bytes()).collect();
    let stream: Vec<u8> = seeds.concat();
    seeds.push(stream);
    seeds
}

/// Seeds of `event_batch`: batch encodings (no frame header).
pub fn seeds_event_batch() -> Vec<Vec<u8>> {
    batches()
        .iter()
        .map(|batch| {
            let mut out = Vec::new();
            batch.encode(&mut out);
            out
        })
        .collect()
}

/// Seeds of `firmware_link`: record and ack frames, alone and as a stream with noise.
pub fn seeds_firmware_link() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = records()
        .into_iter()
        .filter_map(|record| encode_frame(&Message::Record(record)).ok())
        .map(|frame| frame.as_bytes().to_vec())
        .collect();
    for up_to in [0, 1, 3, 200, u64::MAX] {
        if let Ok(frame) = encode_frame(&Message::Ack { up_to: Seq(up_to) }) {
            frames.push(frame.as_bytes().to_vec());
        }
    }
    let mut stream = vec![DELIMITER];
    for (index, frame) in frames.iter().enumerate() {
        stream.extend_from_slice(frame);
        if index == 2 {
            // Line noise between frames.
            stream.extend_from_slice(&[0x13, 0x37, 0xff]);
        }
    }
    frames.push(stream);
    // A bare record body, for `ReadingRecord::decode` on the whole input.
    for record in records() {
        let mut buffer = [0u8; 160];
        if let Ok(body) = record.encode(&mut buffer) {
            frames.push(body.to_vec());
        }
    }
    frames
}

/// Seeds of `ledger_records`: events rows of every kind, saved shadow documents, and a device's
/// full save followed by increments.
pub fn seeds_ledger_records() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = payloads().iter().map(ledger_event_row).collect();
    let mut shadow = populated_shadow();
    let full = shadow.save();
    let mut doc = vec![1];
    doc.extend_from_slice(&full);
    seeds.push(doc);
    let mut rows = vec![(true, full)];
    for (key, value) in [("rate_s", Value::Int(7)), ("mode", Value::Text("eco".into()))] {
        let _ = shadow.set(Section::Desired, key, &value);
        rows.push((false, shadow.save_incremental()));
    }
    seeds.push(ledger_shadow_saves(&rows));
    seeds
}

/// Seeds of `shadow_sync`: the messages of a real exchange, singly and as a session, and a
/// saved document.
pub fn seeds_shadow_sync() -> Vec<Vec<u8>> {
    let mut device = device_shadow();
    let mut cloud = populated_shadow();
    let messages = sync_exchange(&mut device, &mut cloud);
    let mut seeds = Vec::new();
    for message in &messages {
        for selector in [0u8, 1] {
            let mut seed = vec![selector];
            seed.extend_from_slice(message);
            seeds.push(seed);
        }
    }
    let mut session = vec![3];
    for message in &messages {
        session.extend_from_slice(&(message.len() as u16).to_le_bytes());
        session.extend_from_slice(message);
    }
    seeds.push(session);
    let mut load = vec![2];
    load.extend_from_slice(&device.save());
    seeds.push(load);
    seeds
}

/// Every target's seeds, by target name.
pub fn all_seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    vec![
        ("frame_decoder", seeds_frame_decoder()),
        ("event_batch", seeds_event_batch()),
        ("firmware_link", seeds_firmware_link()),
        ("ledger_records", seeds_ledger_records()),
        ("shadow_sync", seeds_shadow_sync()),
    ]
}

/// Lets panics raised inside automerge (and its `hexane` column codec) unwind to the shadow's
/// `catch_unwind` guard, which turns them into `ShadowError::Malformed`, instead of libFuzzer's
/// panic hook aborting on them; any other panic still aborts and is reported. Call from a
/// target's `init`.
pub fn tolerate_automerge_panics() {
    let abort_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let file = info.location().map(|location| location.file()).unwrap_or_default();
        if file.contains("/automerge-") || file.contains("/hexane-") {
            return;
        }
        abort_hook(info);
    }));
}
