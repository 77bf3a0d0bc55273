//! Fuzz target `sqlite_segment`: the decoder of the SQLite store's event segments
//! (`tidesync_cloud::store::sqlite::segment`), which reads blobs from the store's file on disk.
//! Input: two bytes (little-endian) of the event count the segment's row claims, then the blob.
//! Checks: no panic; what decodes holds exactly the claimed count, every body inside the input;
//! re-encoding what decoded decodes to the same events (the format has one meaning per input).
//! Version 2 blobs carry a checksum the fuzzer rarely matches; the version 1 layout (the same
//! without it, still read) keeps the event decoder reachable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidesync_cloud::store::sqlite::segment::{decode, SegmentEncoder, SEGMENT_FORMAT_V1};

fuzz_target!(|data: &[u8]| {
    let Some((count, blob)) = data.split_first_chunk::<2>() else { return };
    let n_events = u64::from(u16::from_le_bytes(*count));
    let Ok(events) = decode(blob, n_events) else { return };
    assert_eq!(events.len() as u64, n_events);
    assert!(events.iter().map(|event| event.body.len()).sum::<usize>() < blob.len());
    let mut encoder = SegmentEncoder::new();
    for event in &events {
        encoder.push(event);
    }
    let encoded = encoder.finish();
    assert_eq!(decode(encoded, n_events).as_deref(), Ok(&events[..]));
    // Minimal varints: the re-encoding is never longer than the input (plus the checksum that
    // a version 1 input lacks).
    let checksum_bytes = if blob.first() == Some(&SEGMENT_FORMAT_V1) { 4 } else { 0 };
    assert!(encoded.len() <= blob.len() + checksum_bytes);
});
