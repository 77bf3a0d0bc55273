//! Property tests of core's laws: version vectors, the hybrid logical clock and the wire codec.

mod common;

use common::*;
use proptest::prelude::*;
use std::cmp::Ordering;
use tidesync_core::event::{Hlc, HlcClock, Millis, Seq};
use tidesync_core::wire::{DecodeError, EventBatch, Frame, FrameDecoder, FRAME_BYTES_MAX};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Senders check the frame limit with the cheap bound and encode only when it cannot decide:
    /// the bound must never be below the real size.
    #[test]
    fn a_batch_never_encodes_larger_than_its_bound(batch in arb_batch()) {
        let len = batch.encoded_len();
        let mut bytes = Vec::new();
        batch.encode(&mut bytes);
        prop_assert_eq!(len, bytes.len());
        prop_assert!(batch.encoded_len_bound() >= len, "bound {} < {}", batch.encoded_len_bound(), len);
    }

    #[test]
    fn vv_join_is_commutative(a in arb_vv(), b in arb_vv()) {
        prop_assert_eq!(a.join(&b), b.join(&a));
    }

    #[test]
    fn vv_join_is_associative(a in arb_vv(), b in arb_vv(), c in arb_vv()) {
        prop_assert_eq!(a.join(&b).join(&c), a.join(&b.join(&c)));
    }

    #[test]
    fn vv_join_is_idempotent(a in arb_vv(), b in arb_vv()) {
        prop_assert_eq!(a.join(&a), a.clone());
        let joined = a.join(&b);
        prop_assert_eq!(joined.join(&b), joined.clone());
    }

    #[test]
    fn vv_join_is_the_least_upper_bound(a in arb_vv(), b in arb_vv()) {
        let joined = a.join(&b);
        prop_assert!(joined.dominates(&a) && joined.dominates(&b));
        for (device, seq) in joined.iter() {
            prop_assert_eq!(seq, a.get(device).max(b.get(device)));
        }
    }

    #[test]
    fn vv_compare_agrees_with_dominance(a in arb_vv(), b in arb_vv()) {
        let expected = match (a.dominates(&b), b.dominates(&a)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        };
        prop_assert_eq!(a.compare(&b), expected);
        prop_assert_eq!(b.compare(&a), expected.map(Ordering::reverse));
        prop_assert_eq!(a.is_concurrent(&b), expected.is_none());
    }

    #[test]
    fn vv_missing_ranges_are_exactly_what_the_other_lacks(a in arb_vv(), b in arb_vv()) {
        let missing = a.missing_from(&b);
        let mut patched = b.clone();
        for range in &missing {
            prop_assert_eq!(range.first, b.get(&range.device).next(), "a range starts right after what b holds");
            prop_assert_eq!(range.last, a.get(&range.device));
            prop_assert!(!range.is_empty());
            patched.advance(range.device, range.last);
        }
        prop_assert_eq!(patched, a.join(&b), "sending the missing ranges brings b up to a join b");
        prop_assert_eq!(missing.is_empty(), b.dominates(&a));
    }

    #[test]
    fn hlc_is_strictly_monotonic_whatever_the_wall_clock_does(
        steps in prop::collection::vec((any::<bool>(), 0u64..5_000, 0u64..5_000, 0u32..3), 1..200)
    ) {
        let mut clock = HlcClock::new();
        let mut previous: Option<Hlc> = None;
        for (is_observe, wall, remote_wall, remote_logical) in steps {
            let stamp = if is_observe {
                let remote = Hlc { wall_ms: remote_wall, logical: remote_logical };
                let stamp = clock.observe(Millis(wall), remote);
                prop_assert!(stamp > remote, "an observed stamp orders after the remote one");
                stamp
            } else {
                clock.now(Millis(wall))
            };
            prop_assert!(stamp.wall_ms >= wall, "the physical part never lags the wall clock");
            if let Some(previous) = previous {
                prop_assert!(stamp > previous, "{:?} after {:?}", stamp, previous);
            }
            previous = Some(stamp);
        }
    }

    #[test]
    fn frames_round_trip(frame in arb_frame()) {
        let bytes = frame.to_bytes();
        let (decoded, used) = Frame::decode(&bytes).expect("own encoding decodes");
        prop_assert_eq!(used, bytes.len());
        // Floats such as -0.0 survive bit for bit, so the re-encoding is identical too.
        prop_assert_eq!(decoded.to_bytes(), bytes.clone());
        prop_assert_eq!(decoded, frame);
    }

    #[test]
    fn a_stream_of_frames_splits_back_whatever_the_chunking(
        frames in prop::collection::vec(arb_frame(), 1..6),
        chunk in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for frame in &frames {
            frame.encode(&mut stream);
        }
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        for piece in stream.chunks(chunk) {
            decoder.push(piece);
            while let Some(frame) = decoder.next_frame().expect("valid stream") {
                decoded.push(frame);
            }
        }
        prop_assert_eq!(decoder.buffered_bytes(), 0);
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Frame::decode(&bytes);
        let _ = EventBatch::decode(&bytes);
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        while let Ok(Some(_)) = decoder.next_frame() {}
    }

    #[test]
    fn corrupted_frames_never_panic(frame in arb_frame(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = frame.to_bytes();
        for (index, xor) in flips {
            let at = index.index(bytes.len());
            bytes[at] ^= xor;
        }
        // Whatever decodes is a valid frame: batches keep their invariants.
        if let Ok((Frame::Events(batch), _)) = Frame::decode(&bytes) {
            prop_assert!(batch.validate().is_ok());
        }
    }
}

#[test]
fn an_oversized_length_is_refused_before_the_body_arrives() {
    let mut decoder = FrameDecoder::new();
    // A prefix declaring FRAME_BYTES_MAX + 1 bytes, and no body.
    let mut prefix = Vec::new();
    let mut len = FRAME_BYTES_MAX as u64 + 1;
    while len >= 0x80 {
        prefix.push((len as u8) | 0x80);
        len >>= 7;
    }
    prefix.push(len as u8);
    decoder.push(&prefix);
    assert!(matches!(decoder.next_frame(), Err(DecodeError::FrameTooLarge { .. })));
    assert!(decoder.buffered_bytes() < 16, "nothing was reserved for the body");
}

#[test]
fn a_truncated_frame_waits_for_more_bytes() {
    let frame = Frame::Events(
        EventBatch::new(
            device("a"),
            Seq(1),
            one_hz_readings(3)
                .into_iter()
                .map(|mut event| {
                    event.id.device = device("a");
                    event
                })
                .collect(),
        )
        .unwrap(),
    );
    let bytes = frame.to_bytes();
    let mut decoder = FrameDecoder::new();
    decoder.push(&bytes[..bytes.len() - 1]);
    assert_eq!(decoder.next_frame().unwrap(), None);
    decoder.push(&bytes[bytes.len() - 1..]);
    assert_eq!(decoder.next_frame().unwrap(), Some(frame));
}

#[test]
fn a_batch_of_one_hz_readings_is_small() {
    let events = one_hz_readings(1_000);
    let batch = EventBatch::new(events[0].id.device, Seq(1), events).unwrap();
    let bytes = Frame::Events(batch).to_bytes();
    let per_event = bytes.len() as f64 / 1_000.0;
    assert!(per_event <= 16.0, "{per_event} bytes per event");
}
