//! Fuzz target `shadow_sync`: automerge sync messages from a peer (`Shadow::receive_sync_message`,
//! what every replica runs on the bytes of a shadow-sync frame) on a fresh and on a populated
//! shadow, a session of several messages answered in turn, and a saved document from bytes
//! (`Shadow::load`). Checks: no panic; a shadow that accepted a message is still a shadow within
//! its byte bound, saves and loads back to the same view, and a refused message leaves it as it
//! was.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tidesync_core::shadow::{PeerSync, Shadow, ShadowLimits};
use tidesync_core_fuzz::{populated_shadow, shadow_input, ShadowInput, CLOUD_REPLICA};

fn populated() -> Shadow {
    static SHADOW: OnceLock<Shadow> = OnceLock::new();
    SHADOW.get_or_init(populated_shadow).clone()
}

fn receive(shadow: &mut Shadow, peer: &mut PeerSync, message: &[u8]) {
    let before = shadow.to_json();
    match shadow.receive_sync_message(peer, message) {
        Ok(_) => check(shadow),
        Err(_) => assert_eq!(shadow.to_json(), before, "a refused message changes nothing"),
    }
}

fn check(shadow: &mut Shadow) {
    let view = shadow.to_json();
    let saved = shadow.save();
    assert!(saved.len() <= ShadowLimits::default().bytes_max * 2, "saved shadow of {} bytes", saved.len());
    let again = Shadow::load(&saved, CLOUD_REPLICA, ShadowLimits::default()).expect("a saved shadow loads");
    assert_eq!(again.to_json(), view, "save and load keep the shadow");
}

fuzz_target!(init: tidesync_core_fuzz::tolerate_automerge_panics(), |bytes: &[u8]| {
    match shadow_input(bytes) {
        Some(ShadowInput::Fresh(message)) => {
            let mut shadow = Shadow::new(CLOUD_REPLICA, ShadowLimits::default());
            receive(&mut shadow, &mut PeerSync::new(), message);
        }
        Some(ShadowInput::Populated(message)) => receive(&mut populated(), &mut PeerSync::new(), message),
        Some(ShadowInput::Load(doc)) => {
            if let Ok(mut shadow) = Shadow::load(doc, CLOUD_REPLICA, ShadowLimits::default()) {
                check(&mut shadow);
            }
        }
        Some(ShadowInput::Session(messages)) => {
            let mut shadow = populated();
            let mut peer = PeerSync::new();
            for message in messages {
                receive(&mut shadow, &mut peer, message);
                let _ = shadow.generate_sync_message(&mut peer);
            }
        }
        None => {}
    }
});
