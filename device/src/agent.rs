//! `Agent`: the application API over a [`DeviceStore`] owned by one writer thread that turns
//! concurrent producers' requests into group commits.
//!
//! Each request carries its own reply channel; the writer takes every request already queued
//! (up to [`GROUP_EVENTS_MAX`] events), runs them in one SQLite transaction, commits (one fsync
//! under `synchronous=FULL`), and only then answers each producer. So a producer's
//! acknowledgement means its events are durable, and the cost of an fsync is shared by everyone
//! who arrived while the previous one ran. Between requests the writer prunes committed events
//! in small batches.

use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::time::{SystemTime, UNIX_EPOCH};

use tidesync_core::event::{DeviceId, EventId, Millis, Payload};
use tidesync_core::value::Value;
use tidesync_core::vv::SeqRange;
use tokio::sync::Notify;

use crate::error::StoreError;
use crate::store::{DesiredWatch, DeviceStore, NewEvent, RecordRequest, Status};

/// Most requests waiting for the writer; producers beyond it block (backpressure).
pub const QUEUE_REQUESTS_MAX: usize = 1024;
/// Most events in one group commit, so one commit stays short and acknowledgements timely.
pub const GROUP_EVENTS_MAX: usize = 8192;
/// Longest wait for more producers before a group commit (only when the previous group had
/// several): far below an fsync, so a lone producer never waits and a crowd shares fsyncs.
pub const GROUP_LINGER: Duration = Duration::from_micros(200);

type Job = Box<dyn FnOnce(&mut DeviceStore) + Send>;

enum Request {
    Record { events: Vec<NewEvent>, source: Option<(String, u64)>, reply: SyncSender<Result<SeqRange, StoreError>> },
    Run(Job),
}

/// An acknowledgement to come: [`Pending::wait`] returns once the events are durable.
#[derive(Debug)]
pub struct Pending {
    reply: Receiver<Result<SeqRange, StoreError>>,
}

impl Pending {
    /// Waits for the commit that holds the events; returns their seqs.
    pub fn wait(self) -> Result<SeqRange, StoreError> {
        self.reply.recv().unwrap_or(Err(StoreError::AgentStopped))
    }
}

/// The device agent's handle. Cheap to share by reference across threads (`Sync`).
#[derive(Debug)]
pub struct Agent {
    /// Poked after every group commit and local shadow edit, so the uplink sends without polling.
    changed: Arc<Notify>,
    requests: Option<SyncSender<Request>>,
    writer: Option<JoinHandle<DeviceStore>>,
    device: DeviceId,
}

/// The wall clock, in ms since the Unix epoch (0 if the clock reads before 1970: the HLC then
/// keeps order by its logical part).
pub fn wall_now() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64))
}

impl Agent {
    /// Starts the writer thread over `store`.
    pub fn start(store: DeviceStore) -> Result<Agent, StoreError> {
        let device = store.device();
        let (requests, queue) = mpsc::sync_channel(QUEUE_REQUESTS_MAX);
        let changed = Arc::new(Notify::new());
        let writer_changed = Arc::clone(&changed);
        let writer = std::thread::Builder::new()
            .name("tidesync-writer".to_string())
            .spawn(move || writer_loop(store, queue, &writer_changed))
            .map_err(|source| StoreError::Io { path: "tidesync-writer thread".into(), source })?;
        Ok(Agent { changed, requests: Some(requests), writer: Some(writer), device })
    }

    /// Notified after new events are durable or the shadow was edited locally.
    pub fn changed(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }

    /// This agent's device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        self.requests.as_ref().ok_or(StoreError::AgentStopped)?.send(request).map_err(|_| StoreError::AgentStopped)
    }

    /// Queues `events` as one all-or-nothing unit without waiting for the commit.
    pub fn submit(&self, events: Vec<NewEvent>) -> Result<Pending, StoreError> {
        let (reply, pending) = mpsc::sync_channel(1);
        self.send(Request::Record { events, source: None, reply })?;
        Ok(Pending { reply: pending })
    }

    /// Queues `events` that bring the ledger up to record `source_high` of an outside `source`
    /// (the firmware's log); the events and the source's watermark commit together. A request at
    /// or below the watermark fails with [`StoreError::AlreadyRecorded`] and writes nothing.
    pub fn submit_from_source(
        &self,
        source: String,
        source_high: u64,
        events: Vec<NewEvent>,
    ) -> Result<Pending, StoreError> {
        let (reply, pending) = mpsc::sync_channel(1);
        self.send(Request::Record { events, source: Some((source, source_high)), reply })?;
        Ok(Pending { reply: pending })
    }

    /// The highest record of `source` the ledger holds (0 if none).
    pub fn source_high(&self, source: &str) -> Result<u64, StoreError> {
        let source = source.to_string();
        self.with_store(move |store| store.source_high(&source))?
    }

    /// Records one event and returns once it is durable.
    pub fn record(&self, event_time: Millis, payload: &Payload) -> Result<EventId, StoreError> {
        let recorded = self.submit(vec![NewEvent::new(event_time, payload)?])?.wait()?;
        Ok(EventId { device: self.device, seq: recorded.first })
    }

    /// Records a batch as one all-or-nothing unit and returns once it is durable. Every payload
    /// is validated first; one invalid payload records nothing.
    pub fn record_batch(&self, items: &[(Millis, Payload)]) -> Result<SeqRange, StoreError> {
        let events =
            items.iter().map(|(event_time, payload)| NewEvent::new(*event_time, payload)).collect::<Result<_, _>>()?;
        self.submit(events)?.wait()
    }

    /// Runs `job` on the writer thread with the store, between group commits, and returns its
    /// result. The uplink driver uses this to run core's sessions on the store.
    pub fn with_store<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut DeviceStore) -> R + Send + 'static,
    ) -> Result<R, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Request::Run(Box::new(move |store| {
            let _ = reply.send(job(store));
        })))?;
        answer.recv().map_err(|_| StoreError::AgentStopped)
    }

    /// Sets `key` of the reported shadow and records the `shadow_reported` event, atomically.
    pub fn report(&self, key: &str, value: Value) -> Result<EventId, StoreError> {
        let key = key.to_string();
        let id = self.with_store(move |store| store.report(wall_now(), &key, &value))??;
        self.changed.notify_one();
        Ok(id)
    }

    /// The desired section of the shadow.
    pub fn desired(&self) -> Result<Value, StoreError> {
        self.with_store(|store| store.shadow().desired())
    }

    /// The whole shadow as JSON: reported, desired and delta.
    pub fn shadow_json(&self) -> Result<serde_json::Value, StoreError> {
        self.with_store(|store| store.shadow().to_json())
    }

    /// A watch on desired-state changes.
    pub fn watch_desired(&self) -> Result<DesiredWatch, StoreError> {
        self.with_store(DeviceStore::watch_desired)
    }

    /// Next seq, backlog, watermarks, database size.
    pub fn status(&self) -> Result<Status, StoreError> {
        self.with_store(|store| store.status())?
    }

    /// Stops the writer after the queued requests and hands the store back.
    pub fn close(mut self) -> Result<DeviceStore, StoreError> {
        self.requests = None;
        let writer = self.writer.take().ok_or(StoreError::AgentStopped)?;
        writer.join().map_err(|_| StoreError::AgentStopped)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn writer_loop(mut store: DeviceStore, queue: Receiver<Request>, changed: &Notify) -> DeviceStore {
    let mut held_back: Option<Request> = None;
    let mut last_group_requests = 1;
    // After a pruning failure, wait for the next request instead of retrying in a busy loop.
    let mut prune_ok = true;
    loop {
        let request = match held_back.take() {
            Some(request) => request,
            None if prune_ok && store.prune_pending() => match queue.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Empty) => {
                    if let Err(error) = store.prune_step() {
                        tracing::warn!(%error, "pruning committed events failed");
                        prune_ok = false;
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            },
            None => match queue.recv() {
                Ok(request) => request,
                Err(_) => break,
            },
        };
        prune_ok = true;
        match request {
            Request::Run(job) => job(&mut store),
            Request::Record { events, source, reply } => {
                let mut n_events = events.len();
                let mut group = vec![(events, source, reply)];
                // When the last group had several producers, they are likely re-submitting right
                // now: linger briefly for them, so one fsync serves all of them again.
                let linger_until = (last_group_requests > 1).then(|| Instant::now() + GROUP_LINGER);
                while n_events < GROUP_EVENTS_MAX {
                    let next = match queue.try_recv() {
                        Err(TryRecvError::Empty) if group.len() < last_group_requests => match linger_until {
                            Some(until) => {
                                let left = until.saturating_duration_since(Instant::now());
                                queue.recv_timeout(left).map_err(|_| TryRecvError::Empty)
                            }
                            None => Err(TryRecvError::Empty),
                        },
                        other => other,
                    };
                    match next {
                        Ok(Request::Record { events, source, reply }) => {
                            n_events += events.len();
                            group.push((events, source, reply));
                        }
                        Ok(other) => {
                            held_back = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                last_group_requests = group.len();
                let requests: Vec<RecordRequest<'_>> = group
                    .iter()
                    .map(|(events, source, _)| RecordRequest {
                        events,
                        source: source.as_ref().map(|(name, high)| (name.as_str(), *high)),
                    })
                    .collect();
                let results = store.record_group(wall_now(), &requests);
                if results.iter().any(Result::is_ok) {
                    changed.notify_one();
                }
                for ((_, _, reply), result) in group.into_iter().zip(results) {
                    // A producer that stopped waiting has nothing to be told.
                    let _ = reply.send(result);
                }
            }
        }
    }
    store
}

#[cfg(test)]
mod tests;
