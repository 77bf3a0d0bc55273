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
