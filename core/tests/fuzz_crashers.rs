//! Replays every input in `core/tests/fuzz-crashers/`: inputs that once crashed a decoder (or
//! were written by hand to attack one) must now give a typed error or a valid value, never a
//! panic, a stack overflow or an unbounded allocation.

use std::path::PathBuf;

use tidesync_core::record::ReadingRecord;
use tidesync_core::shadow::{PeerSync, Shadow, ShadowError, ShadowLimits};
use tidesync_core::wire::{BatchError, DecodeError, EventBatch, Frame, FrameDecoder};

fn crashers() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashers");
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("crasher dir")
        .map(|entry| {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("file").to_string_lossy().into_owned();
            (name, std::fs::read(&path).expect("read"))
        })
        .collect();
    inputs.sort();
    inputs
}

/// The same decoders the fuzz target drives.
fn decode_everything(bytes: &[u8]) -> Result<Frame, DecodeError> {
    let mut decoder = FrameDecoder::new();
    for chunk in bytes.chunks(7) {
        decoder.push(chunk);
        while let Ok(Some(_)) = decoder.next_frame() {}
    }
    let _ = EventBatch::decode(bytes);
    let _ = ReadingRecord::decode(bytes);
    let mut shadow = Shadow::new("replay", ShadowLimits::default());
    let _ = shadow.receive_sync_message(&mut PeerSync::new(), bytes);
    // As stored shadows: a whole document, and an increment on top of a shadow.
    let _ = Shadow::load(bytes, "replay", ShadowLimits::default());
    let _ = shadow.load_incremental(bytes);
    Frame::decode(bytes).map(|(frame, _)| frame)
}

#[test]
fn every_crasher_is_handled() {
    let inputs = crashers();
    assert!(inputs.len() >= 4, "the hand-written attacks are committed");
    for (name, bytes) in inputs {
        let result = decode_everything(&bytes);
        match name.as_str() {
            "oversized_length.bin" => {
                assert!(matches!(result, Err(DecodeError::FrameTooLarge { .. })), "{name}: {result:?}")
            }
            "deep_value.bin" => {
                assert!(matches!(result, Err(DecodeError::Batch(BatchError::Body { .. }))), "{name}: {result:?}")
            }
            "batch_count_lie.bin" => {
                assert!(matches!(result, Err(DecodeError::Batch(BatchError::Truncated { .. }))), "{name}: {result:?}")
            }
            "shadow_doc_rle_panic.bin" => {
                // automerge panics parsing it; the shadow reports it as malformed instead.
                let loaded = Shadow::load(&bytes, "replay", ShadowLimits::default());
                assert!(matches!(loaded, Err(ShadowError::Malformed)), "{name}: {loaded:?}");
                let mut shadow = Shadow::new("replay", ShadowLimits::default());
                let before = shadow.to_json();
                assert!(shadow.load_incremental(&bytes).is_err(), "{name}: refused as an increment");
                assert_eq!(shadow.to_json(), before, "{name}: the shadow is unchanged");
            }
            "shadow_doc_inflate_bomb.bin" | "shadow_sync_inflate_bomb.bin" => {
                // 8 KB that automerge would inflate to 8 MiB (one compressible value on the shared
                // genesis; the first is a saved document, the second the sync message carrying
                // it): refused before automerge inflates anything, in every entry point.
                let limits = ShadowLimits::default();
                let bomb = |result: Result<(), ShadowError>| {
                    assert!(matches!(result, Err(ShadowError::InflatesTooLarge { .. })), "{name}: {result:?}")
                };
                let mut shadow = Shadow::new("replay", limits);
                let before = shadow.to_json();
                if name.starts_with("shadow_doc") {
                    bomb(Shadow::load(&bytes, "replay", limits).map(drop));
                    bomb(shadow.load_incremental(&bytes).map(drop));
                } else {
                    bomb(shadow.receive_sync_message(&mut PeerSync::new(), &bytes).map(drop));
                }
                assert_eq!(shadow.to_json(), before, "{name}: the shadow is unchanged");
            }
            "seq_overflow.bin" => {
                assert!(matches!(result, Err(DecodeError::Batch(BatchError::SeqRange))), "{name}: {result:?}")
            }
            // Inputs found by the fuzzer: no panic is the requirement.
            _ => {}
        }
    }
}

/// Found by the `frame_decoder` target: an over-long length prefix was `LengthPrefix` when its
/// five bytes came in one read and `FrameTooLarge` when four came first. The error must not
/// depend on how the stream was split.
#[test]
fn a_length_prefix_error_does_not_depend_on_how_the_bytes_arrive() {
    let bytes =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashers/length_prefix_chunks.bin"))
            .expect("crasher");
    let first_error = |chunk: usize| {
        let mut decoder = FrameDecoder::new();
        for piece in bytes.chunks(chunk) {
            decoder.push(piece);
            loop {
                match decoder.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(error) => return Some(core::mem::discriminant(&error)),
                }
            }
        }
        None
    };
    let whole = first_error(bytes.len().max(1));
    assert!(whole.is_some());
    for chunk in 1..=13 {
        assert_eq!(first_error(chunk), whole, "chunks of {chunk}");
    }
}

/// Found by the `shadow_sync` target (session mode): a sync message whose bloom filter automerge
/// keeps in the peer's state and then panics on when it answers (`bloom.rs` `get_probes`, inside
/// `generate_sync_message`, which is not guarded). The message is now refused as malformed, and
/// answering never panics.
#[test]
fn a_message_with_a_bloom_filter_automerge_cannot_answer_is_refused() {
    use tidesync_core::shadow::Section;
    use tidesync_core::value::Value;
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashers/shadow_session_bloom_panic.bin"),
    )
    .expect("read");
    // The fuzz target's populated shadow and its session layout: [selector][len u16 le][message]...
    let mut shadow = Shadow::new("cloud", ShadowLimits::default());
    shadow.set(Section::Reported, "fw", &Value::Text("1.4.2".into())).expect("set");
    shadow.set(Section::Reported, "rate_s", &Value::Int(10)).expect("set");
    shadow.set(Section::Desired, "rate_s", &Value::Int(5)).expect("set");
    shadow.set(Section::Desired, "limits", &Value::Map([("max".to_string(), Value::Float(80.5))].into())).expect("set");
    shadow
        .set(Section::Desired, "tags", &Value::List(vec![Value::Text("roof".into()), Value::Bool(true), Value::Null]))
        .expect("set");
    let mut peer = PeerSync::new();
    let mut rest = bytes.get(1..).unwrap_or_default();
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let (message, next) = tail.split_at(len);
        let _ = shadow.receive_sync_message(&mut peer, message);
        let _ = shadow.generate_sync_message(&mut peer);
        rest = next;
    }
}
