//! Projections: read models folded from the log (CQRS).
//!
//! A [`Projection`] is a pure fold: given its rows and the next event (in position order) it
//! updates rows. The [`Runner`] reads events past each projection's checkpoint, folds them, and
//! writes the changed rows *and the new checkpoint in one transaction*, so each event takes effect
//! exactly once even across crashes. Folding from position 0 gives identical rows, which is what
//! [`Runner::rebuild`] does. An event a projection cannot apply goes to the dead-letter table with
//! its reason (its partial changes are discarded) and the fold goes on.
//!
//! Rows are changed in place ([`Rows::get_mut`]): a fold step that rewrote a whole JSON row per
//! event spent most of its time building and dropping maps. So that nothing needs copying to be
//! undone, a projection should reject an event before it changes a row; one that rejects after a
//! change is still handled (the batch is folded again without that event), only slower.
//!
//! Invariant: a projection's rows depend only on the log up to its checkpoint (no clock, no
//! randomness, no order but position order), so rebuild = incremental fold.

pub mod builtin;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::store::{Backend, DeadLetter, EventReader, EventWriter, HeadWatch, Position, StoreError, StoredEvent};

pub use builtin::{builtin, AlertRule};

/// Events folded per transaction, at most.
pub const BATCH_EVENTS_MAX: usize = 2_000;
/// Events folded per transaction, at most, by the live runner on PostgreSQL. Its steps take a lock
/// of their own (never ingest's), and each step costs round trips whatever its size (checkpoints,
/// row reads, writes, commit), so larger steps fold faster: at 50,000 events/s offered, 10,000 per
/// step folded 51,000 events/s against 12,900 with 2,000 (BENCHMARKS.md). SQLite shares one write
/// lock with ingest, where 10,000 per step stalled appends, so it keeps [`BATCH_EVENTS_MAX`].
pub const POSTGRES_BATCH_EVENTS_MAX: usize = 10_000;

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The event does not fit the projection (it goes to the dead-letter table).
    #[error("rejected: {0}")]
    Rejected(String),
    /// The store failed (the batch is rolled back and retried).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A projection's rows as seen during a fold: reads fall through to the store once per key and
/// batch, writes stay in memory until the runner writes them with the checkpoint.
pub struct Rows<'a> {
    writer: &'a mut dyn EventWriter,
    projection: &'a str,
    /// Every row read or written in this batch: its value (`None`: absent or deleted) and whether
    /// the batch changed it.
    cache: BTreeMap<String, CachedRow>,
    /// Whether the event being applied changed a row (a rejection after a change costs a refold).
    event_changed: bool,
}

struct CachedRow {
    value: Option<serde_json::Value>,
    changed: bool,
}

impl<'a> Rows<'a> {
    fn new(writer: &'a mut dyn EventWriter, projection: &'a str) -> Self {
        Self { writer, projection, cache: BTreeMap::new(), event_changed: false }
    }

    fn cached(&mut self, key: &str) -> Result<&mut CachedRow, StoreError> {
        if !self.cache.contains_key(key) {
            let value = self.writer.row(self.projection, key)?;
            self.cache.insert(key.to_string(), CachedRow { value, changed: false });
        }
        self.cache.get_mut(key).ok_or(StoreError::Corrupt { what: "projection cache", detail: key.to_string() })
    }

    /// The row at `key`.
    pub fn get(&mut self, key: &str) -> Result<Option<&serde_json::Value>, StoreError> {
        Ok(self.cached(key)?.value.as_ref())
    }

    /// The row at `key`, to change in place (it counts as changed). Change nothing in an event
    /// that is then rejected (see the module documentation).
    pub fn get_mut(&mut self, key: &str) -> Result<Option<&mut serde_json::Value>, StoreError> {
        let row = self.cached(key)?;
        if row.value.is_none() {
            return Ok(None);
        }
        row.changed = true;
        self.event_changed = true;
        Ok(self.cache.get_mut(key).and_then(|row| row.value.as_mut()))
    }

    /// Sets the row at `key`.
    pub fn put(&mut self, key: String, value: serde_json::Value) {
        self.set(key, Some(value));
    }

    /// Deletes the row at `key`.
    pub fn delete(&mut self, key: String) {
        self.set(key, None);
    }

    fn set(&mut self, key: String, value: Option<serde_json::Value>) {
        self.event_changed = true;
        self.cache.insert(key, CachedRow { value, changed: true });
    }

    /// The rows this batch changed, in key order.
    fn into_changes(self) -> Vec<(String, Option<serde_json::Value>)> {
        self.cache.into_iter().filter(|(_, row)| row.changed).map(|(key, row)| (key, row.value)).collect()
    }
}

/// What folding one batch into one projection gave: its changed rows and its dead letters.
struct Folded {
    changes: Vec<(String, Option<serde_json::Value>)>,
    letters: Vec<DeadLetter>,
}

/// Folds `events` past `checkpoint` into `projection`. An event rejected after it changed a row
/// cannot be taken back from the rows in place, so the batch is folded again from the stored rows
/// without it (once for each such event; the built-ins never do this).
fn fold(
    writer: &mut dyn EventWriter,
    projection: &dyn Projection,
    events: &[StoredEvent],
    checkpoint: Position,
) -> Result<Folded, StoreError> {
    let name = projection.name();
    // Events rejected after a change, with their reasons: skipped by the folds after.
    let mut skipped: BTreeMap<Position, String> = BTreeMap::new();
    'fold: loop {
        let mut letters = Vec::new();
        let mut rows = Rows::new(&mut *writer, name);
        for event in events.iter().filter(|event| event.position > checkpoint) {
            let outcome = match skipped.get(&event.position) {
                Some(reason) => Err(ApplyError::Rejected(reason.clone())),
                None => {
                    rows.event_changed = false;
                    let outcome = projection.apply(&mut rows, event);
                    if let (Err(ApplyError::Rejected(reason)), true) = (&outcome, rows.event_changed) {
                        tracing::debug!(projection = %name, id = %event.event.id, "rejected after a change: folding the batch again without it");
                        skipped.insert(event.position, reason.clone());
                        continue 'fold;
                    }
                    outcome
                }
            };
            match outcome {
                Ok(()) => {}
                Err(ApplyError::Rejected(reason)) => {
                    tracing::warn!(projection = %name, id = %event.event.id, %reason, "dead letter");
                    letters.push(DeadLetter {
                        projection: name.to_string(),
                        position: event.position,
                        id: event.event.id,
                        reason,
                    });
                }
                Err(ApplyError::Store(error)) => return Err(error),
            }
        }
        return Ok(Folded { changes: rows.into_changes(), letters });
    }
}

/// A fold of the log into rows.
pub trait Projection: Send {
    /// Its stable name (also its table namespace and the name `rebuild` takes).
    fn name(&self) -> &str;

    /// Folds one event into the rows. Reject an event ([`ApplyError::Rejected`]) before changing
    /// a row: a rejection after a change is undone by folding the batch again without the event.
    fn apply(&self, rows: &mut Rows<'_>, event: &StoredEvent) -> Result<(), ApplyError>;
}

/// A projection's progress.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// Its name.
    pub name: String,
    /// The last position folded.
    pub checkpoint: u64,
    /// The log's head.
    pub head: u64,
    /// Events not folded yet.
    pub lag_events: u64,
    /// Events it could not apply, so far.
    pub dead_letters: u64,
}

/// Folds the log into projections. Owns a writer of its own, beside the ingest writer.
pub struct Runner {
    writer: Box<dyn EventWriter>,
    projections: Vec<Box<dyn Projection>>,
    batch_events_max: usize,
    /// Where the runner publishes the position every projection has folded up to, after each
    /// commit (for lag measurements and waiters in this process).
    progress: Option<Arc<HeadWatch>>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.projections.iter().map(|projection| projection.name()).collect();
        f.debug_struct("Runner").field("projections", &names).finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner of `projections` over `writer`.
    pub fn new(writer: Box<dyn EventWriter>, projections: Vec<Box<dyn Projection>>) -> Self {
        Self { writer, projections, batch_events_max: BATCH_EVENTS_MAX, progress: None }
    }

    /// Publishes, after each commit, the position all projections have folded up to.
    pub fn with_progress(mut self, progress: Arc<HeadWatch>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Sets how many events one transaction folds (smaller: shorter writer-lock holds).
    pub fn with_batch_events_max(mut self, batch_events_max: usize) -> Self {
        self.batch_events_max = batch_events_max.max(1);
        self
    }

    /// The names of the projections.
    pub fn names(&self) -> Vec<String> {
        self.projections.iter().map(|projection| projection.name().to_string()).collect()
    }

    /// Folds one batch of events past the lowest checkpoint, in one transaction. Returns how
    /// many events were read (0: every projection is at the head).
    pub fn step(&mut self) -> Result<usize, StoreError> {
        self.step_only(None)
    }

    /// [`Runner::step`] for one projection (`Some(name)`) or all.
    fn step_only(&mut self, only: Option<&str>) -> Result<usize, StoreError> {
        let result = self.step_in_transaction(only);
        if result.is_err() {
            self.writer.rollback();
        }
        result
    }

    fn step_in_transaction(&mut self, only: Option<&str>) -> Result<usize, StoreError> {
        self.writer.begin_projections()?;
        // Checkpoints are read under the writer lock, so two runners never fold an event twice.
        let selected: Vec<&dyn Projection> = self
            .projections
            .iter()
            .map(|projection| &**projection)
            .filter(|projection| only.is_none_or(|name| projection.name() == name))
            .collect();
        let mut checkpoints = Vec::with_capacity(selected.len());
        for projection in &selected {
            checkpoints.push(self.writer.checkpoint(projection.name())?);
        }
        let Some(from) = checkpoints.iter().min().copied() else {
            self.writer.rollback();
            return Ok(0);
        };
        let events = self.writer.read_from(from, self.batch_events_max)?;
        let Some(last) = events.last().map(|event| event.position) else {
            self.writer.rollback();
            return Ok(0);
        };
        for (projection, checkpoint) in selected.into_iter().zip(checkpoints) {
            let name = projection.name();
            let Folded { changes, letters } = fold(&mut *self.writer, projection, &events, checkpoint)?;
            self.writer.put_rows(name, &changes)?;
            for letter in &letters {
                self.writer.add_dead_letter(letter)?;
            }
            if last > checkpoint {
                self.writer.set_checkpoint(name, last)?;
            }
        }
        self.writer.commit()?;
        if let (None, Some(progress)) = (only, &self.progress) {
            // Every projection is at `last` or beyond now.
            progress.publish(last);
        }
        Ok(events.len())
    }

    /// Folds until every projection is at the head; returns the events read.
    pub fn catch_up(&mut self) -> Result<u64, StoreError> {
        self.catch_up_only(None)
    }

    fn catch_up_only(&mut self, only: Option<&str>) -> Result<u64, StoreError> {
        let mut n_events = 0u64;
        loop {
            let n = self.step_only(only)?;
            if n == 0 {
                return Ok(n_events);
            }
            n_events += n as u64;
        }
    }

    /// Clears projection `name` (rows, checkpoint, dead letters) and folds it again from
    /// position 0. Returns `None` if there is no such projection.
    pub fn rebuild(&mut self, name: &str) -> Result<Option<u64>, StoreError> {
        if !self.projections.iter().any(|projection| projection.name() == name) {
            return Ok(None);
        }
        self.writer.begin_projections()?;
        self.writer.clear_projection(name)?;
        self.writer.commit()?;
        tracing::info!(projection = name, "rebuilding from position 0");
        self.catch_up_only(Some(name)).map(Some)
    }

    /// Runs until `stop` is set: folds what there is, then sleeps until the head moves.
    pub fn run(mut self, head: Arc<HeadWatch>, stop: Arc<AtomicBool>) {
        let mut failures_in_a_row = 0u32;
        while !stop.load(Ordering::Relaxed) {
            match self.step() {
                Ok(0) => {
                    failures_in_a_row = 0;
                    let seen = head.get();
                    // Woken by the next commit; the timeout only bounds the wait for `stop`.
                    head.wait_past(seen, Duration::from_millis(200));
                }
                Ok(_) => failures_in_a_row = 0,
                Err(error) => {
                    failures_in_a_row += 1;
                    tracing::error!(%error, failures_in_a_row, "projection step failed; retrying");
                    std::thread::sleep(Duration::from_millis(100 * u64::from(failures_in_a_row.min(20))));
                }
            }
        }
    }
}

/// Every projection's progress, read through `reader`.
pub fn status(reader: &mut dyn EventReader, names: &[String]) -> Result<Vec<Status>, StoreError> {
    let head = reader.head()?;
    names
        .iter()
        .map(|name| {
            let checkpoint = reader.checkpoint(name)?;
            let (_, dead_letters) = reader.dead_letters(Some(name), 0)?;
            Ok(Status {
                name: name.clone(),
                checkpoint: checkpoint.0,
                head: head.0,
                lag_events: head.0.saturating_sub(checkpoint.0),
                dead_letters,
            })
        })
        .collect()
}

/// Starts a runner of the built-in projections on a thread of its own.
pub fn spawn(
    backend: &Backend,
    rules: Vec<AlertRule>,
    head: Arc<HeadWatch>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    spawn_with_progress(backend, rules, head, stop, None)
}

/// [`spawn`], publishing the runner's progress to `progress` (see [`Runner::with_progress`]).
pub fn spawn_with_progress(
    backend: &Backend,
    rules: Vec<AlertRule>,
    head: Arc<HeadWatch>,
    stop: Arc<AtomicBool>,
    progress: Option<Arc<HeadWatch>>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let batch_events_max = match backend {
        Backend::Sqlite { .. } => BATCH_EVENTS_MAX,
        Backend::Postgres { .. } => POSTGRES_BATCH_EVENTS_MAX,
    };
    let mut runner = Runner::new(backend.open_writer()?, builtin(rules)).with_batch_events_max(batch_events_max);
    if let Some(progress) = progress {
        runner = runner.with_progress(progress);
    }
    std::thread::Builder::new()
        .name("tidesync-projections".into())
        .spawn(move || runner.run(head, stop))
        .map_err(StoreError::Thread)
}
