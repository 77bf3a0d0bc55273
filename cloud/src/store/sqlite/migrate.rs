//! Schema setup of a SQLite store, and the migration of files written by earlier builds: their
//! events were one row each in an `events` table (`PRAGMA user_version` 0); they are copied into
//! segments, keeping every position, and the table is dropped, in the writer's open transaction.

use std::path::Path;
use std::time::Instant;

use rusqlite::{params, Connection};

use super::segment::{RawEvent, SegmentEncoder};
use super::{to_i64, to_u64, APPLICATION_ID, INSERT_SEGMENT_SQL, SCHEMA_SQL, SCHEMA_VERSION};
use crate::store::StoreError;

/// The event table of layout 0 (a row per event, two lookup indexes), verbatim: what
/// [`create_or_migrate`] reads from. Also the per-event baseline `append_bench` compares segments
/// with, and the old file the migration tests build.
pub const PER_EVENT_EVENTS_SQL: &str = "
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,
    device         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    hlc_wall_ms    INTEGER NOT NULL,
    hlc_logical    INTEGER NOT NULL,
    event_time_ms  INTEGER NOT NULL,
    kind           INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    body           BLOB    NOT NULL,
    gateway        TEXT    NOT NULL,
    ingest_ms      INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (device, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (device, event_time_ms, seq);
";

/// Creates the tables (a new file), migrates an old layout, or checks the layout is current.
/// Runs inside a write transaction the caller commits.
pub(super) fn create_or_migrate(db: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = db.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt {
            what: "store layout",
            detail: format!("{}: layout version {version} is newer than this build's {SCHEMA_VERSION}", path.display()),
        });
    }
    db.pragma_update(None, "application_id", APPLICATION_ID)?;
    db.execute_batch(SCHEMA_SQL)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    let legacy: i64 =
        db.query_row("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'", [], |row| {
            row.get(0)
        })?;
    if legacy > 0 {
        let started = Instant::now();
        let _span = tracing::info_span!("migrate_to_segments", path = %path.display()).entered();
        tracing::info!("store file in the per-event layout: migrating its events to segments");
        let (n_events, n_segments) = copy_events(db)?;
        db.execute_batch("DROP TABLE events")?;
        tracing::info!(
            n_events,
            n_segments,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "migrated the per-event layout to segments"
        );
    }
    db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// The run being gathered into one segment.
struct Run {
    first_position: i64,
    last_position: i64,
    device: String,
    first_seq: i64,
    last_seq: i64,
    gateway: String,
    ingest_ms: i64,
}

impl Run {
    /// Whether the next stored event continues this run.
    fn continues(&self, position: i64, device: &str, seq: i64, gateway: &str, ingest_ms: i64) -> bool {
        self.last_position.checked_add(1) == Some(position)
            && self.last_seq.checked_add(1) == Some(seq)
            && device == self.device
            && gateway == self.gateway
            && ingest_ms == self.ingest_ms
    }
}

/// Copies every row of `events`, in position order, into segments at the same positions.
/// Returns how many events and segments.
fn copy_events(db: &Connection) -> Result<(u64, u64), StoreError> {
    let mut select = db.prepare(
        "SELECT position, device, seq, hlc_wall_ms, hlc_logical, event_time_ms, kind, schema_version, body, gateway,
         ingest_ms FROM events ORDER BY position",
    )?;
    let mut insert = db.prepare(INSERT_SEGMENT_SQL)?;
    let mut encoder = SegmentEncoder::new();
    let mut run: Option<Run> = None;
    let (mut n_events, mut n_segments) = (0u64, 0u64);
    let mut flush = |run: &Run, encoder: &mut SegmentEncoder| -> Result<(), StoreError> {
        let (min_time, max_time) = encoder.time_range();
        insert.execute(params![
            run.first_position,
            run.last_position,
            run.device,
            run.first_seq,
            run.last_seq,
            to_i64(min_time),
            to_i64(max_time),
            run.gateway,
            run.ingest_ms,
            encoder.finish(),
        ])?;
        n_segments += 1;
        Ok(())
    };
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let position: i64 = row.get(0)?;
        let corrupt = |what: &'static str, error: &dyn std::fmt::Display| StoreError::Corrupt {
            what,
            detail: format!("event at position {position}: {error}"),
        };
        let device: &str = row.get_ref(1)?.as_str().map_err(|error| corrupt("device name", &error))?;
        let seq: i64 = row.get(2)?;
        let gateway: &str = row.get_ref(9)?.as_str().map_err(|error| corrupt("gateway name", &error))?;
        let ingest_ms: i64 = row.get(10)?;
        let field = |what: &'static str, error: std::num::TryFromIntError| corrupt(what, &error);
        let raw = RawEvent {
            hlc_wall_ms: to_u64(row.get(3)?),
            hlc_logical: u32::try_from(row.get::<_, i64>(4)?).map_err(|error| field("hlc", error))?,
            event_time_ms: to_u64(row.get(5)?),
            kind: u16::try_from(row.get::<_, i64>(6)?).map_err(|error| field("event kind", error))?,
            schema_version: u16::try_from(row.get::<_, i64>(7)?).map_err(|error| field("schema version", error))?,
            body: row.get_ref(8)?.as_blob().map_err(|error| corrupt("event body", &error))?,
        };
        let continues = run
            .as_ref()
            .is_some_and(|run| !encoder.is_full() && run.continues(position, device, seq, gateway, ingest_ms));
        if !continues {
            if let Some(done) = run.take() {
                flush(&done, &mut encoder)?;
            }
            encoder.clear();
            run = Some(Run {
                first_position: position,
                last_position: position.wrapping_sub(1),
                device: device.to_owned(),
                first_seq: seq,
                last_seq: seq.wrapping_sub(1),
                gateway: gateway.to_owned(),
                ingest_ms,
            });
        }
        if let Some(run) = run.as_mut() {
            run.last_position = position;
            run.last_seq = seq;
        }
        encoder.push(&raw);
        n_events += 1;
    }
    if let Some(done) = run.take() {
        flush(&done, &mut encoder)?;
    }
    Ok((n_events, n_segments))
}
