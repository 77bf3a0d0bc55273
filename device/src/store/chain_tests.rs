//! Tests of the hash chain the ledger keeps: stored chains equal a fresh fold of the events across
//! reopen, pruning and drop-oldest; `read` from any seq says where the chain stood before its
//! events; a batch that starts with a hole signs and verifies, its proof starting at the chain
//! kept for the commit watermark (also across reopen, and without it in older files); schema-1
//! files are migrated.

use tempfile::TempDir;
use tidesync_core::auth::{verify_batch, DeviceKeys, DeviceSigner};
use tidesync_core::event::SensorReading;

use super::*;

fn device() -> DeviceId {
    DeviceId::new("pump-7").unwrap()
}

fn reading(value: f64) -> NewEvent {
    let payload = Payload::Reading(SensorReading { sensor: "temp".into(), value, unit: "Cel".into() });
    NewEvent::new(Millis(1_700_000_000_000), &payload).unwrap()
}

fn path(dir: &TempDir) -> PathBuf {
    dir.path().join("ledger.sqlite3")
}

fn reopen(dir: &TempDir, store: DeviceStore) -> DeviceStore {
    let config = store.config().clone();
    drop(store);
    DeviceStore::open(&path(dir), Some(device()), config).unwrap()
}

/// Every event the ledger ever held, kept by the test as they are recorded.
#[derive(Default)]
struct History {
    events: BTreeMap<Seq, Event>,
}

impl History {
    fn take(&mut self, store: &DeviceStore) {
        for event in store.events_from(Seq::FIRST, 1 << 20).unwrap() {
            self.events.entry(event.id.seq).or_insert(event);
        }
    }

    /// The chain after `seq`, folded from genesis over every event up to it.
    fn chain(&self, seq: Seq) -> ChainHash {
        ChainHash::genesis(&device()).over(self.events.range(..=seq).map(|(_, event)| event))
    }
}

/// The stored chains, `read`'s `prev` from every seq and `chain_head` all equal the fold.
fn check_chains(store: &DeviceStore, history: &History) {
    let chains = store.chains_from(Seq::FIRST, 1 << 20).unwrap();
    for (seq, chain) in &chains {
        assert_eq!(*chain, Some(history.chain(*seq)), "stored chain of seq {seq}");
    }
    let high = store.high(&device());
    assert_eq!(store.chain_head(&device()), Some(history.chain(high)));
    for from in 1..=high.0 {
        let batch = store.read(&device(), Seq(from), 7).unwrap().unwrap();
        let before_first = Seq(batch.first_seq().0 - 1);
        let proof = batch.proof.as_ref().unwrap_or_else(|| panic!("read from {from} has no proof"));
        assert_eq!(proof.prev, history.chain(before_first), "prev of a read from {from}");
        assert!(proof.seals.is_empty() && proof.hole.is_none());
    }
}

/// Seals a batch as the device's uplink does: a seal at its end, a hole proof if it starts with
/// a hole.
fn seal(batch: &mut EventBatch, signer: &DeviceSigner, store: &DeviceStore) {
    let (from, first, last) = (batch.from, batch.first_seq(), batch.last_seq());
    let proof = batch.proof.as_mut().unwrap();
    let head = proof.prev.over(&batch.events);
    proof.seals = vec![signer.seal(last, &head)];
    if first > from {
        let (known, before) = store.chain_before(&device(), from);
        proof.hole = Some(signer.hole(known.next(), Seq(first.0 - 1), before, proof.prev));
    }
}

#[test]
fn chains_equal_a_fresh_fold_across_reopen_and_pruning() {
    let dir = TempDir::new().unwrap();
    let mut store = DeviceStore::create(&path(&dir), device(), LedgerConfig::default()).unwrap();
    assert_eq!(store.chain_head(&device()), Some(ChainHash::genesis(&device())));
    assert!(store.read(&device(), Seq(1), 10).unwrap().is_none());
    let mut history = History::default();
    for round in 0..4 {
        let group: Vec<NewEvent> = (0..5).map(|i| reading(f64::from(round * 10 + i))).collect();
        store.record(Millis(1_000 + u64::from(round as u32)), &group).unwrap();
        store.report(Millis(2_000), "round", &Value::Int(i64::from(round))).unwrap();
        history.take(&store);
        check_chains(&store, &history);
        store = reopen(&dir, store);
        check_chains(&store, &history);
    }
    // Pruning keeps the floor: reads after the pruned run still know their `prev`, also after a
    // reopen, and new events continue the chain.
    store.mark_committed_seq(Seq(13)).unwrap();
    store.prune_all().unwrap();
    assert_eq!(store.status().unwrap().first_held_seq, 14);
    check_chains(&store, &history);
    let mut store = reopen(&dir, store);
    check_chains(&store, &history);
    store.mark_committed_seq(store.high(&device())).unwrap();
    store.prune_all().unwrap();
    let mut store = reopen(&dir, store);
    store.record(Millis(9_000), &[reading(99.0)]).unwrap();
    history.take(&store);
    check_chains(&store, &history);
}

#[test]
fn after_drop_oldest_the_hole_batch_signs_and_verifies() {
    let dir = TempDir::new().unwrap();
    let cost = reading(0.0).cost_bytes();
    let config =
        LedgerConfig { budget_bytes: 12 * cost, full_policy: FullPolicy::DropOldest, ..LedgerConfig::default() };
    let mut store = DeviceStore::create(&path(&dir), device(), config).unwrap();
    let signer = DeviceSigner::from_seed(device(), [7; 32]);
    let mut keys = DeviceKeys::new();
    keys.insert(device(), signer.public_key()).unwrap();
    let mut history = History::default();
    for i in 0..60 {
        store.record(Millis(1_000 + i), &[reading(i as f64)]).unwrap();
        history.take(&store);
    }
    let first_held = store.status().unwrap().first_held_seq;
    assert!(first_held > 1, "events were dropped");
    check_chains(&store, &history);
    let store = reopen(&dir, store);
    check_chains(&store, &history);
    // A batch from seq 1 starts with the hole; the device proves it and the cloud accepts it,
    // and what the cloud then holds is the device's chain head.
    for from in [1, first_held - 1, first_held, first_held + 3] {
        let mut batch = store.read(&device(), Seq(from), 1000).unwrap().unwrap();
        seal(&mut batch, &signer, &store);
        let verified = verify_batch(&keys, &batch, None).unwrap_or_else(|violation| panic!("from {from}: {violation}"));
        assert_eq!(Some(verified.head), store.chain_head(&device()));
        // The same batch with its first held event changed does not verify.
        let mut forged = batch.clone();
        forged.events[0].hlc.logical += 1;
        assert!(verify_batch(&keys, &forged, None).is_err());
    }
}

/// Turns a fresh ledger file into what schema 1 wrote: no chain column, no floor.
fn downgrade_to_schema_1(dir: &TempDir) {
    let db = Connection::open(path(dir)).unwrap();
    db.execute_batch(
        "ALTER TABLE events DROP COLUMN chain; DELETE FROM meta WHERE key = 'floor_chain'; PRAGMA user_version = 1;",
    )
    .unwrap();
}

#[test]
fn a_schema_1_ledger_is_migrated_with_chains_from_genesis_or_left_unknown() {
    // Still holding seq 1: every chain is computed.
    let dir = TempDir::new().unwrap();
    let mut store = DeviceStore::create(&path(&dir), device(), LedgerConfig::default()).unwrap();
    store.record(Millis(1), &(0..20).map(|i| reading(f64::from(i))).collect::<Vec<_>>()).unwrap();
    let mut history = History::default();
    history.take(&store);
    drop(store);
    downgrade_to_schema_1(&dir);
    let mut store = DeviceStore::open(&path(&dir), Some(device()), LedgerConfig::default()).unwrap();
    let version: i64 = store.connection().pragma_query_value(None, "user_version", |row| row.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    check_chains(&store, &history);
    store.record(Millis(2), &[reading(50.0)]).unwrap();
    history.take(&store);
    check_chains(&store, &history);
    check_chains(&reopen(&dir, store), &history);

    // Seq 1 already pruned: the chain before the held events is unknown, and stays so for what is
    // recorded after (such batches go out unsigned).
    let dir = TempDir::new().unwrap();
    let mut store = DeviceStore::create(&path(&dir), device(), LedgerConfig::default()).unwrap();
    store.record(Millis(1), &(0..20).map(|i| reading(f64::from(i))).collect::<Vec<_>>()).unwrap();
    store.mark_committed_seq(Seq(5)).unwrap();
    store.prune_all().unwrap();
    drop(store);
    downgrade_to_schema_1(&dir);
    let mut store = DeviceStore::open(&path(&dir), Some(device()), LedgerConfig::default()).unwrap();
    store.record(Millis(2), &[reading(50.0)]).unwrap();
    assert_eq!(store.chain_head(&device()), None);
    assert!(store.read(&device(), Seq(6), 100).unwrap().unwrap().proof.is_none());
    assert!(store.chains_from(Seq::FIRST, 100).unwrap().iter().all(|(_, chain)| chain.is_none()));
    let integrity: String = store.connection().query_row("PRAGMA integrity_check", [], |row| row.get(0)).unwrap();
    assert_eq!(integrity, "ok");
}

#[test]
fn a_damaged_chain_value_is_an_error_not_a_wrong_proof() {
    let dir = TempDir::new().unwrap();
    let mut store = DeviceStore::create(&path(&dir), device(), LedgerConfig::default()).unwrap();
    store.record(Millis(1), &(0..4).map(|i| reading(f64::from(i))).collect::<Vec<_>>()).unwrap();
    // The CHECK constraint refuses a chain of the wrong length...
    let refused = store.connection().execute("UPDATE events SET chain = x'00' WHERE seq = 2", []);
    assert!(refused.is_err());
    // ...and a damaged floor in meta is reported on open.
    store.connection().execute("UPDATE meta SET value = x'0102' WHERE key = 'floor_chain'", []).unwrap();
    drop(store);
    let error = DeviceStore::open(&path(&dir), Some(device()), LedgerConfig::default()).unwrap_err();
    assert!(matches!(error, StoreError::Meta { key: "floor_chain" }), "{error}");
}

/// A drop-oldest ledger of `12` events' budget that holds 1..=10, has 1..=6 committed (and
/// pruned), then records 12 more, so that it drops 7.. under pressure.
fn committed_then_dropped(dir: &TempDir) -> (DeviceStore, History) {
    let cost = reading(0.0).cost_bytes();
    let config =
        LedgerConfig { budget_bytes: 12 * cost, full_policy: FullPolicy::DropOldest, ..LedgerConfig::default() };
    let mut store = DeviceStore::create(&path(dir), device(), config).unwrap();
    let mut history = History::default();
    for i in 0..10 {
        store.record(Millis(1_000 + i), &[reading(i as f64)]).unwrap();
    }
    history.take(&store);
    store.mark_committed_seq(Seq(6)).unwrap();
    store.prune_all().unwrap();
    for i in 10..22 {
        store.record(Millis(1_000 + i), &[reading(i as f64)]).unwrap();
        history.take(&store);
    }
    assert!(store.status().unwrap().first_held_seq > 8, "7 and more were dropped");
    (store, history)
}

#[test]
fn a_hole_after_the_commit_watermark_is_proven_from_the_chain_at_it() {
    let dir = TempDir::new().unwrap();
    let (store, history) = committed_then_dropped(&dir);
    let signer = DeviceSigner::from_seed(device(), [8; 32]);
    let mut keys = DeviceKeys::new();
    keys.insert(device(), signer.public_key()).unwrap();
    let at_commit = (Seq(6), history.chain(Seq(6)));
    // The floor moved past the dropped events; the chain at the commit watermark is kept.
    assert_eq!(store.chain_before(&device(), Seq(7)), at_commit);
    let store = reopen(&dir, store);
    assert_eq!(store.chain_before(&device(), Seq(7)), at_commit);
    // What the uplink sends to a gateway that holds up to the commit: a hole 7.. whose proof
    // names the chain at 6, which is what the cloud holds there.
    let mut batch = store.read(&device(), Seq(7), 1000).unwrap().unwrap();
    seal(&mut batch, &signer, &store);
    let hole = batch.proof.as_ref().unwrap().hole.unwrap();
    assert_eq!((hole.first, hole.before), (Seq(7), at_commit.1));
    let verified = verify_batch(&keys, &batch, None).unwrap();
    assert_eq!(verified.before, Some(at_commit));
    assert_eq!(Some(verified.head), store.chain_head(&device()));
    // From further back the chain is known only at genesis: a wider hole, still proven.
    assert_eq!(store.chain_before(&device(), Seq(4)), (Seq(0), ChainHash::genesis(&device())));
    // From inside the held run, the chain right before is known exactly.
    let first_held = Seq(store.status().unwrap().first_held_seq);
    assert_eq!(
        store.chain_before(&device(), first_held),
        (Seq(first_held.0 - 1), history.chain(Seq(first_held.0 - 1)))
    );
}

#[test]
fn a_ledger_without_the_anchor_row_still_proves_its_holes_and_a_damaged_row_is_an_error() {
    // As the build before the anchor wrote it: no `anchor_chain` row. It opens, and a hole proof
    // starts at genesis (true, only wider).
    let dir = TempDir::new().unwrap();
    let (store, _) = committed_then_dropped(&dir);
    store.connection().execute("DELETE FROM meta WHERE key = 'anchor_chain'", []).unwrap();
    let mut store = reopen(&dir, store);
    assert_eq!(store.chain_before(&device(), Seq(7)), (Seq(0), ChainHash::genesis(&device())));
    let signer = DeviceSigner::from_seed(device(), [8; 32]);
    let mut keys = DeviceKeys::new();
    keys.insert(device(), signer.public_key()).unwrap();
    let mut batch = store.read(&device(), Seq(7), 1000).unwrap().unwrap();
    seal(&mut batch, &signer, &store);
    assert_eq!(verify_batch(&keys, &batch, None).unwrap().before, Some((Seq(0), ChainHash::genesis(&device()))));
    // The next commit whose chain is known writes the row again.
    let high = store.high(&device());
    store.mark_committed_seq(high).unwrap();
    let head = store.chain_head(&device()).unwrap();
    let store = reopen(&dir, store);
    assert_eq!(store.chain_before(&device(), high.next()), (high, head));

    store.connection().execute("UPDATE meta SET value = x'0102' WHERE key = 'anchor_chain'", []).unwrap();
    drop(store);
    let error = DeviceStore::open(&path(&dir), Some(device()), LedgerConfig::default()).unwrap_err();
    assert!(matches!(error, StoreError::Meta { key: "anchor_chain" }), "{error}");
}
