//! The sync sessions: sans-IO state machines for both ends of a link.
//!
//! [`Uplink`] is the client end: a device sending its events to a gateway, or a gateway sending
//! its spool to the cloud. [`Ingest`] is the server end: a gateway taking a device's events (and
//! acknowledging custody), or the cloud taking a gateway's (and acknowledging commit). Both also
//! carry automerge sync messages for shadows, keep-alives and clean goodbyes.
//!
//! The shape, as in `quinn-proto`: inputs are `handle_*(now, ...)`, outputs are `poll_*`:
//! `poll_transmit` (a frame to send), `poll_event` (something the host must act on) and
//! `poll_timeout` (when to call `handle_timeout`). A session never blocks, reads a clock, or
//! touches a socket; it reads and writes storage only through the [`Store`] it is handed.
//!
//! Protocol in brief: the client sends `Hello` with its version vector; the server answers
//! `Welcome` with what it covers; the client sends, per device, batches after that point, at most
//! `batches_in_flight_max` unacknowledged at once; the server hands each new batch to its host
//! ([`SessionEvent::EventsReceived`]), and acknowledges only after the host reports it durable
//! ([`Ingest::handle_durable`]). A batch that arrives out of order (a frame was lost) is dropped;
//! the client resends everything after the last acknowledgement when its retransmit timer fires
//! (go-back-N). Duplicates are trimmed by seq. So after any disconnect a new session, via any
//! gateway, transfers exactly what the other side lacks.

mod ingest;
mod uplink;

use std::collections::BTreeMap;

use crate::event::{DeviceId, Millis, Seq};
use crate::ledger::{Ledger, LedgerError, MemLedger};
use crate::shadow::{PeerSync, Shadow, ShadowError, ShadowLimits};
use crate::vv::VersionVector;
use crate::wire::{
    BackpressureReason, ErrorCode, ErrorFrame, Frame, GoodbyeReason, ShadowSync, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};

pub use ingest::Ingest;
pub use uplink::Uplink;

pub use crate::wire::batch;

/// Storage as a session sees it: a ledger plus the shadows this replica keeps.
pub trait Store: Ledger {
    /// The shadow of `device` if this replica keeps it, created empty when it may keep it and has
    /// none yet. `None` if this replica does not keep that device's shadow.
    fn shadow_mut(&mut self, device: &DeviceId) -> Result<Option<&mut Shadow>, ShadowError>;

    /// The devices whose shadows this replica keeps now.
    fn shadow_devices(&self) -> Vec<DeviceId>;
}

/// Timers and bounds of a session. Every queue in a session is bounded by one of these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Most events in one batch (at most [`crate::wire::BATCH_EVENTS_MAX`]).
    pub batch_events_max: usize,
    /// Most batches sent and not yet acknowledged, per device.
    pub batches_in_flight_max: usize,
    /// Most events the server has handed to its host and not yet seen durable, per device; past
    /// it the server answers with backpressure.
    pub pending_events_max: usize,
    /// Resend everything unacknowledged after this long without an acknowledgement.
    pub retransmit_ms: u64,
    /// Send a keep-alive after this long without sending anything.
    pub keepalive_ms: u64,
    /// Close the session after this long without receiving anything.
    pub idle_timeout_ms: u64,
    /// Close the session when the handshake (`Hello`, `Welcome`) is not done this long after it
    /// started: keep-alives would otherwise hold a session whose hello was lost open forever.
    pub handshake_timeout_ms: u64,
    /// Report a stall when there is a backlog and no acknowledgement for this long.
    pub stall_ms: u64,
    /// Report a resend loop when the same events were resent this many times.
    pub resends_max: u32,
    /// Bounds of shadows the session creates.
    pub shadow_limits: ShadowLimits,
    /// How long a client holds a device's events after a batch of it failed verification
    /// before it offers them again.
    pub refused_retry_ms: u64,
    /// How long a client lets new events wait so that they leave together (0: send each at once).
    /// Every batch costs a frame, an acknowledgement and a signature, so a sensor reading once a
    /// minute and sending every 15 minutes spends a fifteenth of the radio time and CPU. A backlog
    /// found at the handshake, resends and a full batch (`batch_events_max`) never wait.
    pub linger_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            batch_events_max: 512,
            batches_in_flight_max: 4,
            pending_events_max: 4 * 512,
            retransmit_ms: 5_000,
            keepalive_ms: 10_000,
            idle_timeout_ms: 45_000,
            handshake_timeout_ms: 20_000,
            stall_ms: 60_000,
            resends_max: 5,
            shadow_limits: ShadowLimits::default(),
            refused_retry_ms: 10 * 60_000,
            linger_ms: 0,
        }
    }
}

/// Something the host must act on.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The handshake is done.
    Established {
        /// The negotiated protocol version.
        protocol: u16,
        /// The peer's wall clock at the handshake (lets a device whose RTC reset learn the time).
        peer_wall: Millis,
    },
    /// (Server) New events: store them durably, then call [`Ingest::handle_durable`] (or
    /// [`Ingest::handle_refused`] if the store cannot take them).
    EventsReceived(batch::EventBatch),
    /// (Client) The gateway holds the device's events up to `up_to` durably.
    Custody {
        /// The device.
        device: DeviceId,
        /// Highest seq in custody.
        up_to: Seq,
    },
    /// (Client) The cloud store holds the device's events up to `up_to`: call
    /// [`Ledger::mark_committed`] so they can be pruned.
    Committed {
        /// The device.
        device: DeviceId,
        /// Highest committed seq.
        up_to: Seq,
    },
    /// (Client) The server refuses the device's events for now; they stay in the ledger.
    Throttled {
        /// The device.
        device: DeviceId,
        /// Why.
        reason: BackpressureReason,
        /// When the session will try again.
        retry_after_ms: u32,
    },
    /// A received sync message changed this device's shadow: persist it, tell the application,
    /// and call `handle_shadow_changed` on the replica's other sessions.
    ShadowChanged {
        /// The device.
        device: DeviceId,
    },
    /// (Server) A batch failed verification and was refused (see [`crate::auth`]): record a
    /// security event naming the device and the gateway that relayed it.
    Violation {
        /// The device the batch claims to be from.
        device: DeviceId,
        /// The gateway that sent it (the cloud's sessions), if any.
        gateway: Option<crate::event::GatewayId>,
        /// What is wrong.
        violation: crate::auth::Violation,
    },
    /// (Server) The client reported its backlog in a keep-alive.
    PeerBacklog {
        /// Events the client holds that are not acknowledged.
        backlog_events: u64,
    },
    /// (Client) There is a backlog and nothing was acknowledged for `stall_ms`.
    Stalled {
        /// Since when nothing progressed.
        since: Millis,
        /// The backlog.
        backlog_events: u64,
    },
    /// (Client) The same events were resent `resends_max` times without progress.
    ResendLoop {
        /// The device.
        device: DeviceId,
        /// First seq of the resent run.
        from: Seq,
        /// How many resends.
        n_resends: u32,
    },
    /// (Server) The peer is not allowed to do what it tried; the session is closed.
    Unauthorized {
        /// What happened, for the log.
        reason: String,
    },
    /// The session ended; send what is left in `poll_transmit`, then close the connection.
    Closed(CloseReason),
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer said goodbye.
    Goodbye(GoodbyeReason),
    /// We said goodbye.
    LocalGoodbye(GoodbyeReason),
    /// The peer sent a fatal error.
    PeerError {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// We found a fatal error and told the peer.
    LocalError {
        /// The code sent.
        code: ErrorCode,
        /// The message sent.
        message: String,
    },
    /// Nothing was received for `idle_timeout_ms`.
    IdleTimeout,
    /// The handshake was not done within `handshake_timeout_ms`.
    HandshakeTimeout,
}

/// Why a frame could not be handled. The session has already queued an error frame for the peer
/// and moved to closed; the host sends what is queued and closes the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No protocol version in common.
    #[error("peer speaks protocol {peer_min}..={peer_max}, we speak {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}")]
    ProtocolVersion {
        /// Peer's oldest.
        peer_min: u16,
        /// Peer's newest.
        peer_max: u16,
    },
    /// The peer tried something it may not do.
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// What it tried.
        reason: String,
    },
    /// A frame the session's state does not allow.
    #[error("unexpected {frame} frame while {state}")]
    UnexpectedFrame {
        /// The frame's type.
        frame: &'static str,
        /// The session's state.
        state: &'static str,
    },
    /// A shadow sync message was refused.
    #[error("shadow of {device}: {source}")]
    Shadow {
        /// Whose shadow.
        device: DeviceId,
        /// Why (boxed: automerge's errors are large and this path is cold).
        #[source]
        source: Box<ShadowError>,
    },
    /// The store failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The session is closed.
    #[error("session is closed")]
    Closed,
}

impl SessionError {
    fn code(&self) -> ErrorCode {
        match self {
            SessionError::ProtocolVersion { .. } => ErrorCode::ProtocolVersion,
            SessionError::Unauthorized { .. } => ErrorCode::Unauthorized,
            SessionError::UnexpectedFrame { .. } | SessionError::Closed => ErrorCode::UnexpectedFrame,
            SessionError::Shadow { .. } => ErrorCode::ShadowRejected,
            SessionError::Ledger(_) => ErrorCode::Internal,
        }
    }
}

/// Picks the newest protocol version both sides speak.
fn negotiate(peer_min: u16, peer_max: u16) -> Result<u16, SessionError> {
    let version = peer_max.min(PROTOCOL_VERSION);
    if version < peer_min.max(PROTOCOL_VERSION_MIN) {
        return Err(SessionError::ProtocolVersion { peer_min, peer_max });
    }
    Ok(version)
}

/// State shared by both ends: queues, timers and per-device shadow sync.
#[derive(Debug)]
struct Common {
    config: SessionConfig,
    transmit: std::collections::VecDeque<Frame>,
    events: std::collections::VecDeque<SessionEvent>,
    last_received: Millis,
    last_sent: Millis,
    closed: bool,
    shadows: BTreeMap<DeviceId, ShadowPeer>,
    /// Shadows that may have something to say, in the order they became so; each is in here
    /// once, exactly when its `dirty` flag is set. A queue, so draining k of them is O(k) and a
    /// session that once synced the whole fleet does not walk it on every poll.
    dirty_queue: std::collections::VecDeque<DeviceId>,
}

#[derive(Debug, Default)]
struct ShadowPeer {
    sync: PeerSync,
    /// Whether we may have something to tell the peer about this shadow.
    dirty: bool,
}

impl Common {
    fn new(config: SessionConfig, now: Millis) -> Self {
        Self {
            config,
            transmit: Default::default(),
            events: Default::default(),
            last_received: now,
            last_sent: now,
            closed: false,
            shadows: BTreeMap::new(),
            dirty_queue: Default::default(),
        }
    }

    fn send(&mut self, frame: Frame) {
        self.transmit.push_back(frame);
    }

    fn emit(&mut self, event: SessionEvent) {
        self.events.push_back(event);
    }

    /// Queues an error frame and closes; returns the error for the host.
    fn fail(&mut self, error: SessionError) -> SessionError {
        if !self.closed {
            let message = error.to_string();
            #[cfg(feature = "std")]
            tracing::warn!(code = ?error.code(), %message, "closing session");
            self.send(Frame::Error(ErrorFrame { code: error.code(), message: message.clone() }));
            self.closed = true;
            self.emit(SessionEvent::Closed(CloseReason::LocalError { code: error.code(), message }));
        }
        error
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.closed = true;
            self.emit(SessionEvent::Closed(reason));
        }
    }

    fn mark_shadow_dirty(&mut self, device: DeviceId) {
        let peer = self.shadows.entry(device).or_default();
        if !peer.dirty {
            peer.dirty = true;
            self.dirty_queue.push_back(device);
        }
    }

    /// Applies a peer's shadow sync message to the store's shadow.
    fn receive_shadow<S: Store + ?Sized>(&mut self, sync: ShadowSync, store: &mut S) -> Result<(), SessionError> {
        let device = sync.device;
        let shadow = store
            .shadow_mut(&device)
            .map_err(|source| SessionError::Shadow { device, source: Box::new(source) })?
            .ok_or_else(|| SessionError::Unauthorized {
                reason: format!("this replica keeps no shadow of {device}"),
            })?;
        let peer = self.shadows.entry(device).or_default();
        let changed = shadow
            .receive_sync_message(&mut peer.sync, &sync.message)
            .map_err(|source| SessionError::Shadow { device, source: Box::new(source) })?;
        self.mark_shadow_dirty(device);
        if changed {
            self.emit(SessionEvent::ShadowChanged { device });
        }
        Ok(())
    }

    /// The next shadow sync message for a dirty shadow, if any.
    fn next_shadow_frame<S: Store + ?Sized>(&mut self, store: &mut S) -> Option<Frame> {
        while let Some(device) = self.dirty_queue.pop_front() {
            let Some(peer) = self.shadows.get_mut(&device) else {
                continue;
            };
            peer.dirty = false;
            let Ok(Some(shadow)) = store.shadow_mut(&device) else {
                continue;
            };
            if let Some(message) = shadow.generate_sync_message(&mut peer.sync) {
                // The sync protocol may have more to say after this message; stay dirty until it
                // returns nothing (at the back, so other shadows take turns).
                peer.dirty = true;
                self.dirty_queue.push_back(device);
                return Some(Frame::ShadowSync(ShadowSync { device, message }));
            }
        }
        None
    }

    fn poll_transmit_queued(&mut self, now: Millis) -> Option<Frame> {
        let frame = self.transmit.pop_front()?;
        self.last_sent = now;
        Some(frame)
    }

    /// Keep-alive and idle handling shared by both ends. Returns whether the session is open.
    fn handle_timeout_common(&mut self, now: Millis, backlog_events: u64) -> bool {
        if self.closed {
            return false;
        }
        if now.since(self.last_received) >= self.config.idle_timeout_ms {
            self.send(Frame::Error(ErrorFrame {
                code: ErrorCode::IdleTimeout,
                message: format!("nothing received for {} ms", now.since(self.last_received)),
            }));
            self.close(CloseReason::IdleTimeout);
            return false;
        }
        if now.since(self.last_sent) >= self.config.keepalive_ms && self.transmit.is_empty() {
            self.send(Frame::KeepAlive(crate::wire::KeepAlive { backlog_events }));
        }
        true
    }

    /// Closes the session if the handshake started at `started` is overdue. Returns whether it
    /// did.
    fn handshake_overdue(&mut self, now: Millis, started: Millis) -> bool {
        if self.closed || now.since(started) < self.config.handshake_timeout_ms {
            return false;
        }
        self.send(Frame::Error(ErrorFrame {
            code: ErrorCode::IdleTimeout,
            message: format!("handshake not done after {} ms", now.since(started)),
        }));
        self.close(CloseReason::HandshakeTimeout);
        true
    }

    fn common_timeout(&self) -> Option<Millis> {
        if self.closed {
            return None;
        }
        Some(
            self.last_received
                .plus_ms(self.config.idle_timeout_ms)
                .min(self.last_sent.plus_ms(self.config.keepalive_ms)),
        )
    }
}

/// An in-memory [`Store`]: a [`MemLedger`] and the shadows this replica keeps.
#[derive(Debug, Clone)]
pub struct MemStore {
    /// The events.
    pub ledger: MemLedger,
    /// The shadows, by device.
    pub shadows: BTreeMap<DeviceId, Shadow>,
    replica: String,
    keeps: ShadowKeeping,
    limits: ShadowLimits,
}

/// Which shadows a replica keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowKeeping {
    /// Only this device's (a device agent).
    Only(DeviceId),
    /// Every device's it hears of (a gateway or the cloud).
    All,
}

impl MemStore {
    /// A store for the replica named `replica` (the shadows' actor), with `ledger`.
    pub fn new(replica: &str, ledger: MemLedger, keeps: ShadowKeeping, limits: ShadowLimits) -> Self {
        Self { ledger, shadows: BTreeMap::new(), replica: replica.to_string(), keeps, limits }
    }
}

impl Ledger for MemStore {
    fn high(&self, device: &DeviceId) -> Seq {
        self.ledger.high(device)
    }
    fn version_vector(&self) -> VersionVector {
        self.ledger.version_vector()
    }
    fn read(&self, device: &DeviceId, from: Seq, max_events: usize) -> Result<Option<batch::EventBatch>, LedgerError> {
        self.ledger.read(device, from, max_events)
    }
    fn append(&mut self, batch: &batch::EventBatch) -> Result<crate::ledger::Appended, LedgerError> {
        self.ledger.append(batch)
    }
    fn mark_committed(&mut self, device: DeviceId, up_to: Seq) -> Result<(), LedgerError> {
        self.ledger.mark_committed(device, up_to)
    }
    fn chain_head(&self, device: &DeviceId) -> Option<crate::auth::ChainHash> {
        self.ledger.chain_head(device)
    }
    fn chain_before(&self, device: &DeviceId, from: Seq) -> (Seq, crate::auth::ChainHash) {
        self.ledger.chain_before(device, from)
    }
}

impl Store for MemStore {
    fn shadow_mut(&mut self, device: &DeviceId) -> Result<Option<&mut Shadow>, ShadowError> {
        if let ShadowKeeping::Only(own) = self.keeps {
            if own != *device {
                return Ok(None);
            }
        }
        let (replica, limits) = (&self.replica, self.limits);
        Ok(Some(self.shadows.entry(*device).or_insert_with(|| Shadow::new(replica, limits))))
    }

    fn shadow_devices(&self) -> Vec<DeviceId> {
        match self.keeps {
            ShadowKeeping::Only(own) => vec![own],
            ShadowKeeping::All => self.shadows.keys().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests;
