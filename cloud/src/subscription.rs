//! Subscriptions: read the log from a checkpoint (catch-up), then follow live appends, woken by
//! the writer's in-process [`HeadWatch`] instead of polling the database.

use std::sync::Arc;
use std::time::Duration;

use crate::store::{EventReader, HeadWatch, Position, StoreError, StoredEvent};

/// A reader of the log past a checkpoint. Each call returns the next events in position order;
/// the subscription remembers where it is (the caller persists it where it needs to).
pub struct Subscription {
    reader: Box<dyn EventReader>,
    checkpoint: Position,
    head: Arc<HeadWatch>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("checkpoint", &self.checkpoint).finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription that starts after `checkpoint`.
    pub fn new(reader: Box<dyn EventReader>, checkpoint: Position, head: Arc<HeadWatch>) -> Self {
        Self { reader, checkpoint, head }
    }

    /// The position of the last event returned (or the starting checkpoint).
    pub fn checkpoint(&self) -> Position {
        self.checkpoint
    }

    /// Up to `max_events` events after the checkpoint. When there are none, waits up to `wait`
    /// for the writer to publish new ones; returns an empty vector if none came.
    pub fn next_batch(&mut self, max_events: usize, wait: Duration) -> Result<Vec<StoredEvent>, StoreError> {
        let mut events = self.reader.read_from(self.checkpoint, max_events)?;
        if events.is_empty() {
            if self.head.wait_past(self.checkpoint, wait) <= self.checkpoint {
                return Ok(events);
            }
            events = self.reader.read_from(self.checkpoint, max_events)?;
        }
        if let Some(last) = events.last() {
            self.checkpoint = last.position;
        }
        Ok(events)
    }
}
