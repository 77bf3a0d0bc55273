//! Fuzz target `event_batch`: `EventBatch::decode`, the body of an events frame (the bytes a
//! device or gateway sends, relayed by gateways). Only the public decode is called, so the target
//! follows the encoding as it grows (e.g. the trailing proof section). A decoded batch then goes
//! through the cloud's verification (`auth::verify_batch`, with the seeds' device key registered)
//! as ingest runs it. Checks: no panic; a decoded batch is valid; re-encoding reaches a fixed point
//! (encode(decode(encode(b))) == encode(b)).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use tidesync_core::auth::{verify_batch, DeviceKeys};
use tidesync_core::event::Seq;
use tidesync_core::wire::EventBatch;
use tidesync_core_fuzz::device_keys;

fn keys() -> &'static DeviceKeys {
    static KEYS: OnceLock<DeviceKeys> = OnceLock::new();
    KEYS.get_or_init(device_keys)
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(batch) = EventBatch::decode(bytes) else {
        return;
    };
    if let Err(error) = batch.validate() {
        panic!("decoded batch is invalid: {error}");
    }
    assert!(batch.from <= batch.first_seq() && batch.first_seq() <= batch.last_seq());
    let mut encoded = Vec::new();
    batch.encode(&mut encoded);
    let again = EventBatch::decode(&encoded).expect("re-encoded batch decodes");
    let mut encoded_again = Vec::new();
    again.encode(&mut encoded_again);
    assert_eq!(encoded, encoded_again, "encoding is a fixed point");
    assert_eq!(again.events.len(), batch.events.len());
    let at = Seq(batch.first_seq().0 - 1);
    if let Ok(verified) = verify_batch(keys(), &batch, Some(at)) {
        assert_eq!(verified.at, batch.proof.as_ref().map(|proof| proof.prev), "the chain before the batch is prev");
    }
});
