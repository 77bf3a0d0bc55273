//! Fuzz target `ledger_records`: the bytes the stores read back from their files. A SQLite file
//! on a device, gateway or cloud disk can be damaged or tampered with; reading it must give an
//! error, never a panic. The input is one stored thing (see `tidesync_core_fuzz::LedgerInput`):
//! an `events` row body (`Payload::decode_body`, as `device/src/store.rs` `events_from` and
//! eviction, `gateway/src/spool.rs` `read` and the cloud store call it), a saved shadow document
//! (`Shadow::load`, the spool's and the cloud's `shadows.doc`), or the device's `shadow_saves`
//! rows replayed as its `load_shadow` does. Checks: no panic; a decoded body re-encodes to a body
//! that decodes to the same payload; a loaded shadow saves and loads back to the same view.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidesync_core::event::{EventKind, Payload};
use tidesync_core::shadow::{Shadow, ShadowLimits};
use tidesync_core_fuzz::{ledger_input, LedgerInput, DEVICE_REPLICA, GATEWAY_REPLICA};

fn check_shadow(mut shadow: Shadow, replica: &str) {
    let view = shadow.to_json();
    let saved = shadow.save();
    let again = Shadow::load(&saved, replica, ShadowLimits::default()).expect("a saved shadow loads");
    assert_eq!(again.to_json(), view, "save and load keep the shadow");
}

fuzz_target!(init: tidesync_core_fuzz::tolerate_automerge_panics(), |bytes: &[u8]| {
    match ledger_input(bytes) {
        Some(LedgerInput::Event { kind, schema_version, body }) => {
            let kind = EventKind::from_tag(kind);
            // The device's eviction reads gap bodies whatever the row's kind says.
            let _ = Payload::decode_body(EventKind::Gap, schema_version, body);
            let Ok(payload) = Payload::decode_body(kind, schema_version, body) else {
                return;
            };
            // A known kind at an unknown version comes back as an unknown payload of that tag.
            assert_eq!(payload.kind().tag(), kind.tag());
            assert_eq!(payload.schema_version(), schema_version);
            let mut encoded = Vec::new();
            payload.encode_body(&mut encoded);
            assert_eq!(encoded.len(), payload.encoded_body_len());
            let again = Payload::decode_body(kind, schema_version, &encoded).expect("re-encoded body decodes");
            let mut encoded_again = Vec::new();
            again.encode_body(&mut encoded_again);
            assert_eq!(encoded, encoded_again, "body encoding is a fixed point");
        }
        Some(LedgerInput::ShadowDoc(doc)) => {
            if let Ok(shadow) = Shadow::load(doc, GATEWAY_REPLICA, ShadowLimits::default()) {
                check_shadow(shadow, GATEWAY_REPLICA);
            }
        }
        Some(LedgerInput::ShadowSaves(rows)) => {
            let mut shadow: Option<Shadow> = None;
            for (full, row) in rows {
                match shadow.as_mut() {
                    None if full => match Shadow::load(row, DEVICE_REPLICA, ShadowLimits::default()) {
                        Ok(loaded) => shadow = Some(loaded),
                        Err(_) => return,
                    },
                    None => return,
                    Some(loaded) => {
                        if loaded.load_incremental(row).is_err() {
                            return;
                        }
                    }
                }
            }
            if let Some(shadow) = shadow {
                check_shadow(shadow, DEVICE_REPLICA);
            }
        }
        None => {}
    }
});
