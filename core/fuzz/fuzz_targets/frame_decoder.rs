//! Fuzz target: every decoder of bytes from outside that core owns (frames, stream splitting,
//! event batches, firmware records, shadow sync messages) must return an error, never panic, on
//! any input. Crashes found here are committed to `core/tests/fuzz-crashers/` and replayed by
//! `core/tests/fuzz_crashers.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidesync_core::record::ReadingRecord;
use tidesync_core::shadow::{PeerSync, Shadow, ShadowLimits};
use tidesync_core::wire::{EventBatch, Frame, FrameDecoder};

fuzz_target!(|bytes: &[u8]| {
    if let Ok((frame, _)) = Frame::decode(bytes) {
        // Whatever decodes re-encodes to bytes that decode to the same frame.
        let again = Frame::decode(&frame.to_bytes()).expect("re-encoded frame decodes").0;
        assert_eq!(again.to_bytes(), frame.to_bytes());
    }
    let mut decoder = FrameDecoder::new();
    for chunk in bytes.chunks(7) {
        decoder.push(chunk);
        while let Ok(Some(_)) = decoder.next_frame() {}
    }
    let _ = EventBatch::decode(bytes);
    let _ = ReadingRecord::decode(bytes);
    if bytes.first() == Some(&0x42) || bytes.first() == Some(&0x43) {
        let mut shadow = Shadow::new("fuzz", ShadowLimits::default());
        let _ = shadow.receive_sync_message(&mut PeerSync::new(), bytes);
    }
});
