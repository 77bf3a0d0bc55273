//! Fuzz target `frame_decoder`: the sync protocol's wire frames as they arrive on a QUIC stream.
//! `Frame::decode` on the input, and `FrameDecoder` (stream splitting) fed the input whole and in
//! chunks of a size taken from the input. Checks: no panic; what decodes re-encodes to bytes that
//! decode to the same frame; splitting does not depend on how the bytes were chunked.
//! Crashes found here are committed to `core/tests/fuzz-crashers/` and replayed by
//! `core/tests/fuzz_crashers.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidesync_core::wire::{DecodeError, Frame, FrameDecoder};

/// What a decoder returned for one step, comparable across runs (frames by their bytes, so a NaN
/// reading compares equal to itself).
#[derive(Debug, PartialEq)]
enum Step {
    Frame(Vec<u8>),
    Error(String),
}

/// Feeds `chunks` to a fresh decoder and takes frames as a session would: an unknown frame type
/// is skipped, any other error ends the stream.
fn split<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<Step> {
    let mut decoder = FrameDecoder::new();
    let mut steps = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => steps.push(Step::Frame(frame.to_bytes())),
                Ok(None) => break,
                Err(error @ DecodeError::UnknownFrameType { .. }) => steps.push(Step::Error(format!("{error:?}"))),
                // A prefix over the frame bound is refused as soon as enough of it has arrived,
                // so which of these two errors reports it depends on how the bytes came in (five
                // continuation bytes at once: `LengthPrefix`; four first: `FrameTooLarge`). Both
                // close the stream; the session's behaviour is the same.
                Err(DecodeError::LengthPrefix | DecodeError::FrameTooLarge { .. }) => {
                    steps.push(Step::Error("bad length prefix".to_string()));
                    return steps;
                }
                Err(error) => {
                    steps.push(Step::Error(format!("{error:?}")));
                    return steps;
                }
            }
        }
    }
    steps
}

fuzz_target!(|bytes: &[u8]| {
    if let Ok((frame, used)) = Frame::decode(bytes) {
        assert!(used <= bytes.len());
        let encoded = frame.to_bytes();
        // `encoded_len` counts type and body, not the length prefix (1 to 5 bytes).
        let prefix_bytes = encoded.len() - frame.encoded_len();
        assert!((1..=5).contains(&prefix_bytes), "{prefix_bytes}-byte length prefix");
        let (again, again_used) = Frame::decode(&encoded).expect("re-encoded frame decodes");
        assert_eq!(again_used, encoded.len());
        assert_eq!(again.to_bytes(), encoded, "decode(encode(frame)) is the frame");
    }
    let whole = split(std::iter::once(bytes));
    let chunk = usize::from(bytes.last().copied().unwrap_or(0) % 13) + 1;
    let chunked = split(bytes.chunks(chunk));
    assert_eq!(whole, chunked, "frames do not depend on chunking ({chunk}-byte chunks)");
});
