//! SQLite store files from before segments (one row per event in an `events` table, `PRAGMA
//! user_version` 0) open: the writer migrates their events into segments at open, keeping every
//! position, and every read returns what it returned before. Also: a file from a newer build is
//! refused, and corrupt segment bytes on disk are typed errors, never panics.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use tidesync_cloud::store::sqlite::{SqliteStore, PER_EVENT_EVENTS_SQL, SCHEMA_VERSION};
use tidesync_cloud::store::{Backend, CloudStore, EventReader, IngestMeta, Position, StoreError, StoredEvent};
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, LogLine, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::wire::EventBatch;

/// The other tables of the per-event layout, verbatim from the build before segments (its event
/// table is [`PER_EVENT_EVENTS_SQL`]).
const PER_EVENT_OTHER_TABLES: &str = "
CREATE TABLE IF NOT EXISTS streams (
    device TEXT PRIMARY KEY NOT NULL,
    high   INTEGER NOT NULL,
    holes  TEXT    NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS shadows (
    device     TEXT PRIMARY KEY NOT NULL,
    doc        BLOB    NOT NULL,
    view       TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS projection_rows (
    projection TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (projection, key)
) STRICT, WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    projection TEXT PRIMARY KEY NOT NULL,
    position   INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS dead_letters (
    id         INTEGER PRIMARY KEY,
    projection TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    device     TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    reason     TEXT    NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS chain_heads (
    device TEXT PRIMARY KEY NOT NULL,
    high   INTEGER NOT NULL,
    chain  BLOB    NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS security_events (
    id       INTEGER PRIMARY KEY,
    first_ms INTEGER NOT NULL,
    last_ms  INTEGER NOT NULL,
    gateway  TEXT    NOT NULL,
    device   TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    detail   TEXT    NOT NULL,
    from_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count    INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS security_events_by_batch ON security_events (device, gateway, from_seq, last_seq);
";

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn event(device: DeviceId, seq: u64, event_time: u64) -> Event {
    let payload = if seq % 5 == 0 {
        Payload::Log(LogLine { level: tidesync_core::event::LogLevel::Warn, message: format!("line {seq}") })
    } else {
        Payload::Reading(SensorReading { sensor: "temp".into(), value: seq as f64 * 0.25, unit: "Cel".into() })
    };
    Event {
        id: EventId { device, seq: Seq(seq) },
        hlc: Hlc { wall_ms: 1_700_000_000_000 + seq, logical: 1 },
        event_time: Millis(event_time),
        payload,
    }
}

/// Writes an old-layout file holding `log` (in position order) and the streams it covers.
fn write_old_file(path: &Path, log: &[StoredEvent], streams: &[(DeviceId, u64, &str)]) {
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "application_id", tidesync_cloud::store::sqlite::APPLICATION_ID).unwrap();
    db.execute_batch(PER_EVENT_EVENTS_SQL).unwrap();
    db.execute_batch(PER_EVENT_OTHER_TABLES).unwrap();
    let mut insert = db
        .prepare(
            "INSERT INTO events (position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version,
             body, gateway, ingest_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .unwrap();
    for stored in log {
        let event = &stored.event;
        let mut body = Vec::new();
        event.payload.encode_body(&mut body);
        insert
            .execute(rusqlite::params![
                stored.position.0 as i64,
                event.id.device.as_str(),
                event.id.seq.0 as i64,
                event.hlc.wall_ms as i64,
                i64::from(event.hlc.logical),
                event.event_time.0 as i64,
                i64::from(event.kind().tag()),
                i64::from(event.schema_version()),
                body,
                stored.meta.gateway.as_str(),
                stored.meta.ingest_time.0 as i64,
            ])
            .unwrap();
    }
    for (device, high, holes) in streams {
        db.execute(
            "INSERT INTO streams (device, high, holes) VALUES (?1, ?2, ?3)",
            rusqlite::params![device.as_str(), *high as i64, holes],
        )
        .unwrap();
    }
}

fn meta(gateway: &str, at: u64) -> IngestMeta {
    IngestMeta { gateway: GatewayId::new(gateway).unwrap(), ingest_time: Millis(at) }
}

/// A log as the per-event store wrote it: interleaved devices, a hole filled later, a gateway
/// change inside one device's run, times out of order, and a run longer than a segment.
fn old_log() -> Vec<StoredEvent> {
    let (a, b) = (device("pump-a"), device("pump-b"));
    let mut log = Vec::new();
    let mut push = |event: Event, meta: IngestMeta| {
        let position = Position(log.len() as u64 + 1);
        log.push(StoredEvent { position, event, meta });
    };
    for seq in 3..=10 {
        push(event(a, seq, 90_000 - seq * 1_000), meta("gw-1", 1));
    }
    for seq in 1..=1_100 {
        push(event(b, seq, seq * 10), meta("gw-1", 2));
    }
    for seq in 11..=14 {
        push(event(a, seq, seq * 1_000), meta(if seq < 13 { "gw-1" } else { "gw-2" }, 3));
    }
    // Seq 2 of `a` filled the declared hole 1..=2 later; seq 1 stays a hole.
    push(event(a, 2, 500), meta("gw-3", 4));
    log
}

#[test]
fn an_old_layout_file_is_migrated_at_open_and_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.sqlite3");
    let log = old_log();
    let (a, b) = (device("pump-a"), device("pump-b"));
    write_old_file(&path, &log, &[(a, 14, "[[1,1]]"), (b, 1_100, "[]")]);
    let backend = Backend::Sqlite { path: path.clone() };
    let mut store = CloudStore::open(backend.open_writer().unwrap(), ShadowLimits::default()).unwrap();
    assert_eq!(store.head(), Position(log.len() as u64));
    assert_eq!(store.high(&a), Seq(14));

    let mut reader = backend.open_reader().unwrap();
    assert_eq!(reader.read_from(Position(0), 100_000).unwrap(), log);
    assert_eq!(reader.read_from(Position(1_105), 3).unwrap(), log[1_105..1_108].to_vec());
    let a_events: Vec<StoredEvent> = {
        let mut events: Vec<StoredEvent> = log.iter().filter(|e| e.event.id.device == a).cloned().collect();
        events.sort_by_key(|e| e.event.id.seq);
        events
    };
    assert_eq!(reader.read_seqs(&a, Seq(1), Seq(100), 100).unwrap(), a_events);
    let b_window = reader.read_seqs(&b, Seq(1_020), Seq(1_030), 100).unwrap();
    assert_eq!(b_window, log[8 + 1_019..8 + 1_030].to_vec());
    let mut by_time = a_events.clone();
    by_time.sort_by_key(|e| (e.event.event_time, e.event.id.seq));
    assert_eq!(reader.read_times(&a, Millis(0), Millis(1_000_000), None, 100).unwrap(), by_time);
    let streams = reader.streams().unwrap();
    assert_eq!((streams[&a].high, streams[&a].n_events), (Seq(14), 13));

    // The file is in the new layout now: the per-event table is gone, the version is set, and a
    // reopen does not migrate again.
    let db = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = db.query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let tables: i64 =
        db.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'events'", [], |row| row.get(0)).unwrap();
    assert_eq!(tables, 0);
    let segments: i64 = db.query_row("SELECT COUNT(*) FROM segments", [], |row| row.get(0)).unwrap();
    // a 3..=10; b 1..=1024 and 1025..=1100; a 11..=12 (gw-1), 13..=14 (gw-2); a 2.
    assert_eq!(segments, 6);
    drop(db);

    // Appends continue after the migrated positions; duplicates of migrated events are skipped.
    let events: Vec<Event> = (1..=16).map(|seq| event(a, seq, seq)).collect();
    let appended = store.append_from(&EventBatch::new(a, Seq(1), events).unwrap(), &meta("gw-9", 9)).unwrap();
    assert_eq!(appended.n_new, 3, "seq 1 (the hole), 15 and 16");
    store.commit().unwrap();
    drop(store);
    let mut writer = SqliteStore::open(&path).unwrap();
    let head = writer.head().unwrap();
    assert_eq!(head, Position(log.len() as u64 + 3));
    let tail = reader.read_from(Position(log.len() as u64), 10).unwrap();
    let tail_seqs: Vec<u64> = tail.iter().map(|e| e.event.id.seq.0).collect();
    assert_eq!(tail_seqs, vec![1, 15, 16]);
}

#[test]
fn an_empty_old_layout_file_migrates_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.sqlite3");
    write_old_file(&path, &[], &[]);
    let mut writer = SqliteStore::open(&path).unwrap();
    assert_eq!(writer.head().unwrap(), Position(0));
    let mut reader = SqliteStore::open_reader(&path).unwrap();
    assert!(reader.read_from(Position(0), 10).unwrap().is_empty());
}

#[test]
fn a_reader_of_an_unmigrated_file_and_a_newer_layout_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.sqlite3");
    write_old_file(&path, &old_log(), &[]);
    let error = SqliteStore::open_reader(&path).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { what: "store layout", .. }), "{error}");
    drop(SqliteStore::open(&path).unwrap());
    let db = rusqlite::Connection::open(&path).unwrap();
    db.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(db);
    let error = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { what: "store layout", .. }), "{error}");
}

#[test]
fn corrupt_segments_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.sqlite3");
    let d = device("pump-a");
    let mut writer = SqliteStore::open(&path).unwrap();
    use tidesync_cloud::store::EventWriter;
    let events: Vec<Event> = (1..=20).map(|seq| event(d, seq, seq * 1_000)).collect();
    writer.insert_events(&events, &meta("gw", 1)).unwrap();
    writer.commit().unwrap();
    let db = rusqlite::Connection::open(&path).unwrap();
    let blob: Vec<u8> = db.query_row("SELECT events FROM segments", [], |row| row.get(0)).unwrap();
    let mut corruptions: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("unknown version".into(), [&[9u8][..], &blob[1..]].concat()),
        ("truncated".into(), blob[..blob.len() / 2].to_vec()),
        ("trailing bytes".into(), [&blob[..], &[0u8; 7][..]].concat()),
    ];
    // Every single-byte flip past the version byte: the checksum refuses it.
    for at in (1..blob.len()).step_by(7) {
        let mut flipped = blob.clone();
        flipped[at] ^= 0xa5;
        corruptions.push((format!("flip at {at}"), flipped));
    }
    let mut n_errors = 0;
    for (what, bytes) in corruptions {
        db.execute("UPDATE segments SET events = ?1", rusqlite::params![bytes]).unwrap();
        let mut reader = SqliteStore::open_reader(&path).unwrap();
        let reads = [
            reader.read_from(Position(0), 100).map(|events| events.len()),
            reader.read_seqs(&d, Seq(1), Seq(20), 100).map(|events| events.len()),
            reader.read_times(&d, Millis(0), Millis(100_000), None, 100).map(|events| events.len()),
        ];
        for read in reads {
            match read {
                Ok(n) => panic!("{what}: a corrupt segment read as {n} events"),
                Err(StoreError::Corrupt { .. }) => n_errors += 1,
                Err(other) => panic!("{what}: {other}"),
            }
        }
    }
    assert!(n_errors >= 12, "every corruption fails every read ({n_errors} errors)");
    // Columns that disagree with each other are refused too.
    db.execute("UPDATE segments SET events = ?1, last_seq = 25", rusqlite::params![blob]).unwrap();
    let error = SqliteStore::open_reader(&path).unwrap().read_from(Position(0), 100).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
}
