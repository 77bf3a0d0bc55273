//! Decoding allocates in proportion to the input, never to a length the input merely claims.
//! A counting global allocator measures the peak heap growth of decoding random and corrupted
//! inputs, and of inputs that lie about their sizes: wire frames and batches, event bodies as the
//! stores read them back, firmware records, and shadow documents and sync messages. Counters are
//! per thread, so the tests may run in parallel.
#![allow(unsafe_code)] // A GlobalAlloc implementation is unsafe by definition; it only counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tidesync_core::event::{EventKind, Payload, Seq};
use tidesync_core::record::ReadingRecord;
use tidesync_core::shadow::{PeerSync, Section, Shadow, ShadowLimits};
use tidesync_core::value::Value;
use tidesync_core::wire::{EventBatch, Frame, FrameDecoder};

struct Counting;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator unchanged and only keeps counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = CURRENT.try_with(|current| {
            let now = current.get() + layout.size();
            current.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // A block freed on another thread than the one that allocated it may take a counter
        // below zero: saturate (decoders free on the thread that allocated).
        let _ = CURRENT.try_with(|current| current.set(current.get().saturating_sub(layout.size())));
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most heap bytes decoding may use per input byte, plus a constant. An event in memory is about
/// a hundred bytes and the smallest encoded row is four, so 64 is the honest ceiling.
const HEAP_BYTES_PER_INPUT_BYTE_MAX: usize = 64;
const HEAP_BYTES_BASE_MAX: usize = 64 * 1024;

fn peak_while(work: impl FnOnce()) -> usize {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    work();
    PEAK.with(Cell::get) - base
}

fn bound(len: usize) -> usize {
    HEAP_BYTES_PER_INPUT_BYTE_MAX * len + HEAP_BYTES_BASE_MAX
}

fn check(bytes: &[u8]) {
    let peak = peak_while(|| {
        let _ = Frame::decode(bytes);
        let _ = EventBatch::decode(bytes.get(2..).unwrap_or_default());
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        while let Ok(Some(_)) = decoder.next_frame() {}
    });
    let bound = HEAP_BYTES_PER_INPUT_BYTE_MAX * bytes.len() + HEAP_BYTES_BASE_MAX;
    assert!(peak <= bound, "decoding {} bytes allocated {peak} bytes (bound {bound})", bytes.len());
}

#[test]
fn decoding_allocation_is_bounded_by_the_input() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Random bytes, and random bytes behind a plausible events-frame header.
    for round in 0..2_000 {
        let len = (rng.next_u32() % 4096) as usize;
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        if round % 2 == 0 && len > 8 {
            bytes[0] = 0xff;
            bytes[1] = 0x7f;
            bytes[2] = 3;
        }
        check(&bytes);
    }
    // Valid frames with bytes flipped.
    let frame = Frame::Events(
        EventBatch::new(common::device("pump-7"), tidesync_core::event::Seq(1), common::one_hz_readings(500))
            .expect("valid"),
    );
    let valid = frame.to_bytes();
    for _ in 0..500 {
        let mut bytes = valid.clone();
        for _ in 0..4 {
            let at = (rng.next_u32() as usize) % bytes.len();
            bytes[at] ^= rng.next_u32() as u8;
        }
        check(&bytes);
    }
    // Inputs that claim huge counts.
    for dir_entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-crashers")).expect("dir") {
        check(&std::fs::read(dir_entry.expect("entry").path()).expect("read"));
    }
}

/// A varint as postcard writes it (LEB128), for inputs that claim lengths.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

#[test]
fn stored_bodies_allocate_in_proportion_and_records_not_at_all() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let kinds = [EventKind::Reading, EventKind::ShadowReported, EventKind::Log, EventKind::Gap, EventKind::App];
    let check_body = |kind: EventKind, body: &[u8]| {
        let peak = peak_while(|| {
            let _ = Payload::decode_body(kind, 1, body);
        });
        assert!(peak <= bound(body.len()), "{kind:?} body of {} bytes allocated {peak} bytes", body.len());
    };
    // Random bodies for every kind.
    for round in 0..2_000 {
        let len = (rng.next_u32() % 512) as usize;
        let mut body = vec![0u8; len];
        rng.fill_bytes(&mut body);
        check_body(kinds[round % kinds.len()], &body);
    }
    // Bodies that claim a million bytes or items and hold a few.
    let million = varint(1_000_000);
    let lies: Vec<(EventKind, Vec<u8>)> = vec![
        (EventKind::App, [&[3, b'a', b'/', b'b'][..], &million, &[1, 2, 3]].concat()),
        (EventKind::App, [&million[..], b"text/plain"].concat()),
        (EventKind::Log, [&[1][..], &million, b"fan"].concat()),
        (EventKind::Reading, [&million[..], b"sht31"].concat()),
        // ShadowReported: the Map variant (6) with a million entries, then a List variant (5).
        (EventKind::ShadowReported, [&[6][..], &million, &[1, b'k', 5], &million, &[0]].concat()),
    ];
    for (kind, body) in &lies {
        check_body(*kind, body);
        assert!(Payload::decode_body(*kind, 1, body).is_err(), "{kind:?}: a lie about the length is refused");
    }
    // Firmware records borrow their text from the input: decoding allocates nothing at all.
    for _ in 0..2_000 {
        let len = (rng.next_u32() % 200) as usize;
        let mut bytes = vec![0u8; len];
        rng.fill_bytes(&mut bytes);
        let peak = peak_while(|| {
            let _ = ReadingRecord::decode(&bytes);
        });
        assert_eq!(peak, 0, "record decoding allocated {peak} bytes");
    }
    let record = ReadingRecord {
        seq: Seq(1),
        hlc: tidesync_core::event::Hlc { wall_ms: 1, logical: 0 },
        event_time: tidesync_core::event::Millis(1),
        sensor: "sht31.temperature",
        value: 21.5,
        unit: "Cel",
    };
    let mut buffer = [0u8; 160];
    let encoded = record.encode(&mut buffer).expect("encodes").to_vec();
    let peak = peak_while(|| assert_eq!(ReadingRecord::decode(&encoded).expect("decodes"), record));
    assert_eq!(peak, 0, "record decoding allocated {peak} bytes");
}

#[test]
fn batch_decoding_allocation_is_bounded_by_the_input() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let batch = EventBatch::new(common::device("pump-7"), Seq(1), common::one_hz_readings(300)).expect("valid");
    let mut valid = Vec::new();
    batch.encode(&mut valid);
    let check_batch = |bytes: &[u8]| {
        let peak = peak_while(|| {
            let _ = EventBatch::decode(bytes);
        });
        assert!(peak <= bound(bytes.len()), "batch of {} bytes allocated {peak} bytes", bytes.len());
    };
    check_batch(&valid);
    for _ in 0..1_000 {
        let mut bytes = valid.clone();
        let cut = (rng.next_u32() as usize) % bytes.len();
        if rng.next_u32() % 2 == 0 {
            bytes.truncate(cut.max(1));
        }
        for _ in 0..3 {
            let at = (rng.next_u32() as usize) % bytes.len();
            bytes[at] ^= rng.next_u32() as u8;
        }
        check_batch(&bytes);
    }
}

/// Shadows are automerge documents: every op costs a few hundred bytes in automerge's op set, and
/// a received message is applied to a clone that is saved once for the size check, so the honest
/// ceiling for them is higher than for the hand-written codecs.
const SHADOW_HEAP_BYTES_PER_INPUT_BYTE_MAX: usize = 256;
const SHADOW_HEAP_BYTES_BASE_MAX: usize = 256 * 1024;

fn shadow_bound(len: usize) -> usize {
    SHADOW_HEAP_BYTES_PER_INPUT_BYTE_MAX * len + SHADOW_HEAP_BYTES_BASE_MAX
}

#[test]
fn shadow_decoding_allocation_is_bounded_for_incompressible_content() {
    // Shadows as devices fill them: many keys with varied values. (Values that compress well are
    // bounded by the inflation limit instead: the next test.)
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut device = Shadow::new("device:pump-7", ShadowLimits::default());
    for index in 0..60 {
        let text: String = (0..24).map(|_| char::from(b'!' + (rng.next_u32() % 90) as u8)).collect();
        device.set(Section::Reported, &format!("key-{index}"), &Value::Text(text)).expect("set");
        device.set(Section::Reported, &format!("n-{index}"), &Value::Int(i64::from(rng.next_u32()))).expect("set");
    }
    let doc = device.save();
    let peak = peak_while(|| {
        Shadow::load(&doc, "cloud", ShadowLimits::default()).expect("loads");
    });
    assert!(peak <= shadow_bound(doc.len()), "loading {} bytes allocated {peak} bytes", doc.len());
    // Every message of a full sync to a fresh replica, each received by a fresh shadow.
    let mut cloud = Shadow::new("cloud", ShadowLimits::default());
    let (mut to_cloud, mut to_device) = (PeerSync::new(), PeerSync::new());
    let mut checked = 0;
    for _ in 0..8 {
        if let Some(message) = device.generate_sync_message(&mut to_cloud) {
            let peak = peak_while(|| {
                let _ = Shadow::new("gateway:site-1", ShadowLimits::default())
                    .receive_sync_message(&mut PeerSync::new(), &message);
            });
            assert!(peak <= shadow_bound(message.len()), "a {}-byte message allocated {peak} bytes", message.len());
            cloud.receive_sync_message(&mut to_device, &message).expect("valid message");
            checked += 1;
        }
        if let Some(reply) = cloud.generate_sync_message(&mut to_device) {
            device.receive_sync_message(&mut to_cloud, &reply).expect("valid reply");
        }
    }
    assert!(checked >= 2, "the exchange sent the changes ({checked} messages)");
    assert_eq!(cloud.reported(), device.reported(), "the sync completed");
}

#[test]
fn shadow_decompression_bombs_allocate_in_proportion_to_their_input() {
    // About 8 KB each that automerge alone would inflate to 8 MiB before any check of ours: a
    // saved document and the sync message carrying it (core/tests/fuzz-crashers). Refused with at
    // most the inflation limit's worth of work, and no allocation in proportion to it.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-crashers/");
    for name in ["shadow_doc_inflate_bomb.bin", "shadow_sync_inflate_bomb.bin"] {
        let bytes = std::fs::read(format!("{dir}{name}")).expect("read");
        let mut shadow = Shadow::new("cloud", ShadowLimits::default());
        // Every entry point on both (fuzz_crashers.rs checks which refuses what).
        let peak = peak_while(|| {
            let _ = Shadow::load(&bytes, "cloud", ShadowLimits::default());
            let _ = shadow.load_incremental(&bytes);
            let _ = shadow.receive_sync_message(&mut PeerSync::new(), &bytes);
        });
        assert!(peak <= shadow_bound(bytes.len()), "{name}: {} bytes allocated {peak} bytes", bytes.len());
    }
}
