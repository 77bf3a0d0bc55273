//! Unit tests of the shadow: sections, delta, bounds, persistence and automerge compatibility.

use super::*;
use automerge::ReadDoc;

fn text(value: &str) -> Value {
    Value::Text(value.into())
}

#[test]
fn delta_lists_desired_values_that_reported_does_not_match() {
    let mut shadow = Shadow::new("cloud", ShadowLimits::default());
    shadow.set(Section::Desired, "rate_s", &Value::Int(10)).unwrap();
    shadow.set(Section::Desired, "mode", &text("eco")).unwrap();
    shadow.set(Section::Reported, "mode", &text("eco")).unwrap();
    shadow.set(Section::Reported, "fw", &text("1.2")).unwrap();
    let delta = shadow.delta();
    assert_eq!(delta.to_json(), serde_json::json!({ "rate_s": 10 }));
    shadow.set(Section::Reported, "rate_s", &Value::Int(10)).unwrap();
    assert_eq!(shadow.delta(), Value::empty_map());
}

#[test]
fn delta_recurses_into_maps() {
    let mut shadow = Shadow::new("cloud", ShadowLimits::default());
    let wanted = Value::from_json(&serde_json::json!({ "max": 80, "min": 10 })).unwrap();
    let have = Value::from_json(&serde_json::json!({ "max": 80, "min": 5 })).unwrap();
    shadow.set(Section::Desired, "limits", &wanted).unwrap();
    shadow.set(Section::Reported, "limits", &have).unwrap();
    assert_eq!(shadow.to_json()["delta"], serde_json::json!({ "limits": { "min": 10 } }));
}

#[test]
fn an_edit_beyond_the_size_bound_is_refused_and_changes_nothing() {
    let mut shadow = Shadow::new("device:d", ShadowLimits { bytes_max: 2_048 });
    shadow.set(Section::Reported, "small", &Value::Int(1)).unwrap();
    let before = shadow.to_json();
    let error = shadow.set(Section::Reported, "blob", &text(&"x".repeat(4_096))).unwrap_err();
    assert!(matches!(error, ShadowError::TooLarge { max_bytes: 2_048, .. }), "{error}");
    assert_eq!(shadow.to_json(), before);
}

#[test]
fn a_sync_message_that_would_exceed_the_bound_is_refused() {
    let mut big = Shadow::new("cloud", ShadowLimits::default());
    big.set(Section::Desired, "blob", &text(&"y".repeat(8_000))).unwrap();
    let mut small = Shadow::new("device:d", ShadowLimits { bytes_max: 4_096 });
    let (mut big_peer, mut small_peer) = (PeerSync::new(), PeerSync::new());
    let mut refused = false;
    for _ in 0..10 {
        if let Some(message) = big.generate_sync_message(&mut big_peer) {
            match small.receive_sync_message(&mut small_peer, &message) {
                Err(ShadowError::TooLarge { .. }) => refused = true,
                Err(other) => panic!("unexpected {other}"),
                Ok(_) => {}
            }
        }
        if let Some(message) = small.generate_sync_message(&mut small_peer) {
            big.receive_sync_message(&mut big_peer, &message).unwrap();
        }
    }
    assert!(refused);
    assert_eq!(small.desired(), Value::empty_map());
}

#[test]
fn incremental_saves_replay_onto_the_last_full_save() {
    let mut shadow = Shadow::new("device:d", ShadowLimits::default());
    let full = shadow.save();
    shadow.set(Section::Reported, "a", &Value::Int(1)).unwrap();
    let first = shadow.save_incremental();
    shadow.set(Section::Reported, "b", &Value::Bool(true)).unwrap();
    let second = shadow.save_incremental();
    assert!(!first.is_empty() && !second.is_empty());
    assert!(shadow.save_incremental().is_empty(), "nothing new since the last save");

    let mut restored = Shadow::load(&full, "device:d", ShadowLimits::default()).unwrap();
    restored.load_incremental(&first).unwrap();
    restored.load_incremental(&second).unwrap();
    assert_eq!(restored.to_json(), shadow.to_json());
}

#[test]
fn saved_shadows_are_plain_automerge_documents() {
    let mut shadow = Shadow::new("device:d", ShadowLimits::default());
    shadow.set(Section::Reported, "fw", &text("2.0")).unwrap();
    let bytes = shadow.save();
    // Another program using automerge directly can load it, edit it and merge it back.
    let mut other = automerge::AutoCommit::load(&bytes).unwrap();
    other.set_actor(automerge::ActorId::from(b"some-other-tool".as_slice()));
    let (_, desired) = other.get(automerge::ROOT, "desired").unwrap().unwrap();
    other.put(&desired, "rate_s", 30_i64).unwrap();
    let merged_bytes = other.save();
    shadow.load_incremental(&merged_bytes).unwrap();
    assert_eq!(shadow.get(Section::Desired, "rate_s"), Some(Value::Int(30)));
    assert_eq!(shadow.get(Section::Reported, "fw"), Some(text("2.0")));
}

#[test]
fn a_document_without_the_sections_is_not_a_shadow() {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "hello", "world").unwrap();
    let error = Shadow::load(&doc.save(), "device:d", ShadowLimits::default()).unwrap_err();
    assert!(matches!(error, ShadowError::NotAShadow { section: Section::Reported }));
    assert!(matches!(Shadow::load(b"garbage", "x", ShadowLimits::default()), Err(ShadowError::Automerge(_))));
}

#[test]
fn independent_replicas_share_one_genesis() {
    let mut device = Shadow::new("device:d", ShadowLimits::default());
    let mut cloud = Shadow::new("cloud", ShadowLimits::default());
    assert_eq!(device.heads(), cloud.heads(), "the genesis change is byte-identical everywhere");
    device.set(Section::Reported, "a", &Value::Int(1)).unwrap();
    cloud.set(Section::Desired, "b", &Value::Int(2)).unwrap();
    let (mut to_cloud, mut to_device) = (PeerSync::new(), PeerSync::new());
    for _ in 0..4 {
        if let Some(message) = device.generate_sync_message(&mut to_cloud) {
            cloud.receive_sync_message(&mut to_device, &message).unwrap();
        }
        if let Some(message) = cloud.generate_sync_message(&mut to_device) {
            device.receive_sync_message(&mut to_cloud, &message).unwrap();
        }
    }
    // Neither replica's section creation clobbered the other's edits.
    assert_eq!(device.to_json(), cloud.to_json());
    assert_eq!(device.get(Section::Reported, "a"), Some(Value::Int(1)));
    assert_eq!(device.get(Section::Desired, "b"), Some(Value::Int(2)));
}

#[test]
fn keys_may_not_be_empty_and_values_not_too_deep() {
    let mut shadow = Shadow::new("device:d", ShadowLimits::default());
    assert!(matches!(shadow.set(Section::Reported, "", &Value::Null), Err(ShadowError::EmptyKey)));
    let mut deep = Value::Int(1);
    for _ in 0..20 {
        deep = Value::List(vec![deep]);
    }
    assert!(matches!(shadow.set(Section::Reported, "deep", &deep), Err(ShadowError::TooDeep(_))));
}

/// A document as a hostile peer would build it on the shared genesis: one value of `len` bytes
/// that compresses about a thousand to one. Returns the saved document and the sync message that
/// carries it to a replica that has only the genesis.
fn compressed_bomb(len: usize) -> (Vec<u8>, Vec<u8>) {
    use automerge::sync::SyncDoc;
    let genesis = Shadow::new("device:evil", ShadowLimits::default()).doc;
    let mut doc = genesis.clone();
    let reported = section_id(&doc, Section::Reported).unwrap();
    doc.put(&reported, "blob", "a".repeat(len)).unwrap();
    doc.commit();
    let saved = doc.save();
    // One round trip so that the sender knows what the receiver lacks and sends the changes.
    let (mut state, mut peer_state, mut peer) = (automerge::sync::State::new(), automerge::sync::State::new(), genesis);
    let hello = doc.sync().generate_sync_message(&mut state).unwrap();
    peer.sync().receive_sync_message(&mut peer_state, hello).unwrap();
    let reply = peer.sync().generate_sync_message(&mut peer_state).unwrap();
    doc.sync().receive_sync_message(&mut state, reply).unwrap();
    let message = doc.sync().generate_sync_message(&mut state).unwrap().encode();
    (saved, message)
}

#[test]
fn a_decompression_bomb_is_refused_before_automerge_inflates_it() {
    let limits = ShadowLimits::default();
    let (saved, message) = compressed_bomb(1 << 20);
    assert!(saved.len() < 4_096 && message.len() < 4_096, "{} and {} bytes", saved.len(), message.len());
    let max_bytes = limits.inflated_max();
    let error = Shadow::load(&saved, "cloud", limits).unwrap_err();
    assert!(matches!(error, ShadowError::InflatesTooLarge { max_bytes: m } if m == max_bytes), "{error}");

    let mut shadow = Shadow::new("cloud", limits);
    shadow.set(Section::Desired, "rate_s", &Value::Int(5)).unwrap();
    let before = shadow.to_json();
    let mut peer = PeerSync::new();
    let error = shadow.receive_sync_message(&mut peer, &message).unwrap_err();
    assert!(matches!(error, ShadowError::InflatesTooLarge { .. }), "{error}");
    let error = shadow.load_incremental(&saved).unwrap_err();
    assert!(matches!(error, ShadowError::InflatesTooLarge { .. }), "{error}");
    assert_eq!(shadow.to_json(), before, "a refused bomb changes nothing");
    // The session goes on: a legitimate message from the same peer state is still taken.
    let mut honest = Shadow::new("device:d", limits);
    honest.set(Section::Reported, "fw", &text("1.0")).unwrap();
    let mut to_cloud = PeerSync::new();
    for _ in 0..4 {
        if let Some(message) = honest.generate_sync_message(&mut to_cloud) {
            shadow.receive_sync_message(&mut peer, &message).unwrap();
        }
        if let Some(message) = shadow.generate_sync_message(&mut peer) {
            honest.receive_sync_message(&mut to_cloud, &message).unwrap();
        }
    }
    assert_eq!(shadow.get(Section::Reported, "fw"), Some(text("1.0")));
}

#[test]
fn the_inflation_walk_sees_automerge_s_compressed_columns_and_changes() {
    // Just below the limit the same bomb is charged in full, so the walk finds automerge's
    // compressed data where automerge puts it (document columns and sync-message changes).
    let limits = ShadowLimits { bytes_max: 64 * 1024 };
    let (saved, message) = compressed_bomb(100_000);
    let mut budget = usize::MAX;
    inflate::charge(&saved, &mut budget).unwrap();
    let doc_charge = usize::MAX - budget;
    assert!((100_000..110_000).contains(&doc_charge), "document charged {doc_charge}");
    let decoded = automerge::sync::Message::decode(&message).unwrap();
    let mut budget = usize::MAX;
    for chunk in decoded.changes.iter() {
        inflate::charge(chunk, &mut budget).unwrap();
    }
    let message_charge = usize::MAX - budget;
    assert!((100_000..110_000).contains(&message_charge), "message charged {message_charge}");
    // Within the inflation limit, the bytes reach automerge and the size bound refuses them.
    let error = Shadow::new("cloud", limits).receive_sync_message(&mut PeerSync::new(), &message).unwrap_err();
    assert!(matches!(error, ShadowError::TooLarge { .. }), "{error}");
}

#[test]
fn shadows_near_their_bound_load_and_sync_within_the_inflation_limit() {
    // Compressible values (so automerge deflates columns) filling most of the bound, edited over
    // and over so that history counts too.
    let limits = ShadowLimits { bytes_max: 16 * 1024 };
    let mut device = Shadow::new("device:d", limits);
    let mut round = 0;
    'fill: loop {
        for key in 0..20 {
            let value = text(&format!("{round:04}-{}", "abcdefgh".repeat(8)));
            match device.set(Section::Reported, &format!("key-{key}"), &value) {
                Ok(()) => {}
                Err(ShadowError::TooLarge { .. }) => break 'fill,
                Err(other) => panic!("{other}"),
            }
        }
        round += 1;
    }
    let saved = device.save();
    let mut budget = usize::MAX;
    inflate::charge(&saved, &mut budget).unwrap();
    assert!(usize::MAX - budget > 0, "the saved document has compressed columns");
    let loaded = Shadow::load(&saved, "cloud", limits).unwrap();
    assert_eq!(loaded.to_json(), device.to_json());

    let mut cloud = Shadow::new("cloud", limits);
    let (mut to_cloud, mut to_device) = (PeerSync::new(), PeerSync::new());
    for _ in 0..8 {
        if let Some(message) = device.generate_sync_message(&mut to_cloud) {
            cloud.receive_sync_message(&mut to_device, &message).unwrap();
        }
        if let Some(message) = cloud.generate_sync_message(&mut to_device) {
            device.receive_sync_message(&mut to_cloud, &message).unwrap();
        }
    }
    assert_eq!(cloud.to_json(), device.to_json(), "a full sync of a shadow at its bound completes");
}
