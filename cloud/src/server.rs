//! The ingest server: a QUIC endpoint for gateways and the core loop that drives core's
//! `sync::Ingest` (cloud role) over the [`CloudStore`].
//!
//! Threads: the tokio runtime runs the accept loop and one task per connection (bytes in, bytes
//! out); one dedicated thread, the *core loop*, owns the store and every session (the store's
//! PostgreSQL client is synchronous, so it must not run on the async workers). Each round the core
//! loop takes every message waiting (frames from all gateways: a group commit across
//! connections), hands frames to the sessions, appends what they emit, commits once, and only then
//! calls `handle_durable`, so a commit ack is never sent for an event a crash could lose. Desired
//! state written through the HTTP API enters the same loop: the shadow changes in the store, is
//! persisted, and every live session hears `handle_shadow_changed`.
//!
//! Security at ingest: with a device key registry every session verifies (`Ingest::verifying`);
//! a task re-reads the registry when the file changes and the core loop hands the new keys to
//! every live session (a bad file keeps the old keys). A refused batch becomes a security event:
//! logged, counted by kind for `/metrics`, and stored (`security_events`) with its gateway,
//! device and seqs. Token buckets per device and per gateway (`tidesync_core::rate`) bound what
//! is admitted; over the limit the session answers `Backpressure { RateLimited }` and the gateway
//! keeps the events for later, so nothing is lost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidesync_core::auth::{DeviceKeys, RegistryError, Violation};
use tidesync_core::event::{DeviceId, GatewayId, Millis, Seq};
use tidesync_core::net::pki::{self, Identity};
use tidesync_core::net::quic::{
    CloseCode, FrameReceiver, FrameSender, Link, NetError, Pending, Server, TransportLimits,
};
use tidesync_core::net::tls::Credentials;
use tidesync_core::rate::{RateLimit, TokenBucket};
use tidesync_core::shadow::Section;
use tidesync_core::sync::{Ingest, SessionConfig, SessionEvent, Store as _};
use tidesync_core::value::Value;
use tidesync_core::wire::{BackpressureReason, ErrorFrame, Frame, GoodbyeReason};
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{Backend, CloudStore, HeadWatch, IngestMeta, SecurityEvent, StoreError};

/// Messages waiting for the core loop, at most.
const INBOX_MESSAGES_MAX: usize = 4_096;
/// Messages handled per group commit, at most.
const GROUP_MESSAGES_MAX: usize = 4_096;
/// How long a gateway has to open its session stream after the handshake.
const STREAM_OPEN_TIMEOUT_MS: u64 = 10_000;
/// How long shutdown waits for connections to deliver their goodbyes.
const SHUTDOWN_DRAIN_MS: u64 = 3_000;
/// How long a gateway is told to wait after a failed group commit.
const RETRY_AFTER_FAILED_COMMIT_MS: u32 = 1_000;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The QUIC endpoint.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The certificate is not the cloud's.
    #[error("the certificate names {found}, but the cloud needs a cloud certificate")]
    WrongIdentity {
        /// What it names.
        found: String,
    },
    /// The certificate does not parse.
    #[error("cloud certificate: {0}")]
    Pki(#[from] pki::PkiError),
    /// The core thread could not start, or stopped abnormally.
    #[error("core loop: {0}")]
    CoreThread(#[source] std::io::Error),
    /// The device key registry could not be loaded at start.
    #[error(transparent)]
    Keys(#[from] KeysError),
}

/// Why the device key registry could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// The file could not be read.
    #[error("cannot read device keys {path}: {source}")]
    Read {
        /// The registry file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid registry.
    #[error("device keys {path}: {source}")]
    Parse {
        /// The registry file.
        path: PathBuf,
        /// Why.
        #[source]
        source: RegistryError,
    },
}

/// Reads and parses the device key registry at `path`.
pub fn load_keys(path: &std::path::Path) -> Result<DeviceKeys, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: path.to_path_buf(), source })?;
    DeviceKeys::parse(&text).map_err(|source| KeysError::Parse { path: path.to_path_buf(), source })
}

/// Wall clock in ms since the Unix epoch.
pub fn wall_now() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64))
}

/// What the server needs to run.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where gateways connect.
    pub listen: SocketAddr,
    /// The store.
    pub backend: Backend,
    /// Fleet CA, the cloud's certificate and key.
    pub credentials: Credentials,
    /// QUIC bounds.
    pub transport: TransportLimits,
    /// Session timers and bounds.
    pub session: SessionConfig,
    /// Signature verification and rate limits.
    pub security: SecurityOptions,
}

/// Signature verification and rate limits at ingest.
#[derive(Clone, Debug)]
pub struct SecurityOptions {
    /// The device key registry; `None`: events are taken unsigned.
    pub device_keys: Option<PathBuf>,
    /// How often the registry is checked for changes.
    pub keys_reload_ms: u64,
    /// Admitted per device.
    pub device_limit: RateLimit,
    /// Admitted per gateway (all its devices together).
    pub gateway_limit: RateLimit,
}

impl Default for SecurityOptions {
    fn default() -> Self {
        let gateway_rate = crate::config::GATEWAY_EVENTS_PER_S_DEFAULT;
        Self {
            device_keys: None,
            keys_reload_ms: 5_000,
            device_limit: RateLimit::DEVICE_DEFAULT,
            gateway_limit: RateLimit { events_per_s: gateway_rate, burst_events: gateway_rate },
        }
    }
}

/// Counters of the ingest side, for `/metrics`.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// New events stored.
    pub events_stored_total: AtomicU64,
    /// Events received that the store had already (acknowledged, not stored).
    pub events_duplicate_total: AtomicU64,
    /// Group commits made.
    pub group_commits_total: AtomicU64,
    /// Group commits that failed (their events were refused with backpressure).
    pub group_commit_failures_total: AtomicU64,
    /// Sum of group commit durations, for the mean.
    pub group_commit_us_total: AtomicU64,
    /// Gateway connections accepted.
    pub connections_total: AtomicU64,
    /// Handshakes or identities refused.
    pub refused_total: AtomicU64,
    /// Shadow changes received from gateways.
    pub shadow_changes_total: AtomicU64,
    /// Batches refused because their device or gateway was over its rate limit.
    pub rate_limited_total: AtomicU64,
    /// Events in those batches (the gateway keeps them and offers them again).
    pub rate_limited_events_total: AtomicU64,
    /// Device key registry reloads that took effect.
    pub keys_reloads_total: AtomicU64,
    /// Device key registry reloads that failed (the previous keys stayed).
    pub keys_reload_failures_total: AtomicU64,
}

/// A connected gateway, as the HTTP API shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GatewayStatus {
    /// Its name.
    pub gateway: String,
    /// Events it reported holding unacknowledged (its last keep-alive).
    pub backlog_events: u64,
    /// When it connected (ms since the epoch).
    pub connected_ms: u64,
}

/// State the core loop shares with the HTTP API.
#[derive(Debug, Default)]
pub struct Live {
    /// Ingest counters.
    pub metrics: IngestMetrics,
    /// Connected gateways by connection.
    pub gateways: Mutex<BTreeMap<u64, GatewayStatus>>,
    /// Whether batches are verified against device keys.
    pub verifying: AtomicBool,
    /// Devices with a key in the registry in use.
    pub keyed_devices: AtomicU64,
    /// Security events (refused batches) by `Violation::kind()`, since start.
    pub violations: Mutex<BTreeMap<&'static str, u64>>,
}

// Nearly every message is a frame (mostly event batches), so boxing the large variant would cost
// an allocation per frame to shrink the rare control messages.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Inbox {
    Up {
        conn: u64,
        gateway: GatewayId,
        out: mpsc::UnboundedSender<Out>,
    },
    Frame {
        conn: u64,
        frame: Frame,
    },
    Down {
        conn: u64,
    },
    SetDesired {
        device: DeviceId,
        entries: BTreeMap<String, Option<Value>>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A reloaded device key registry.
    Keys(Arc<DeviceKeys>),
    Shutdown,
}

// Nearly every message is a frame, so boxing the large variant would cost an allocation per frame
// to shrink the rare `Close`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Out {
    Frame(Frame),
    Close(CloseCode),
}

struct Conn {
    gateway: GatewayId,
    ingest: Ingest,
    out: mpsc::UnboundedSender<Out>,
    close_sent: bool,
}

struct Core {
    store: CloudStore,
    session: SessionConfig,
    live: Arc<Live>,
    conns: BTreeMap<u64, Conn>,
    /// Appended in the open transaction: (connection, device, high).
    pending_durable: Vec<(u64, DeviceId, Seq)>,
    shutting_down: bool,
    /// The device keys every session verifies against; `None`: unsigned ingest.
    keys: Option<Arc<DeviceKeys>>,
    device_limit: RateLimit,
    gateway_limit: RateLimit,
    /// Rate state per device and per gateway (across a gateway's connections).
    device_buckets: BTreeMap<DeviceId, TokenBucket>,
    gateway_buckets: BTreeMap<GatewayId, TokenBucket>,
}

impl Core {
    fn handle(&mut self, now: Millis, message: Inbox) {
        match message {
            Inbox::Up { conn, gateway, out } => {
                tracing::info!(conn, %gateway, "gateway connected");
                let mut ingest = Ingest::for_cloud(gateway, self.session.clone(), now);
                if let Some(keys) = &self.keys {
                    ingest = ingest.verifying(Arc::clone(keys));
                }
                self.conns.insert(conn, Conn { gateway, ingest, out, close_sent: false });
                self.live.gateways.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(
                    conn,
                    GatewayStatus { gateway: gateway.to_string(), backlog_events: 0, connected_ms: now.0 },
                );
            }
            Inbox::Frame { conn, frame } => {
                let Some(gateway_conn) = self.conns.get_mut(&conn) else { return };
                // A refused batch is reported while its frame is handled: drain this session's
                // events now, so a security event names the seqs of the batch that caused it.
                let batch_seqs = match &frame {
                    Frame::Events(batch) => Some((batch.from, batch.last_seq())),
                    _ => None,
                };
                if let Err(error) = gateway_conn.ingest.handle_frame(now, frame, &mut self.store) {
                    tracing::warn!(conn, gateway = %gateway_conn.gateway, %error, "gateway session failed");
                }
                self.drain_conn(now, conn, batch_seqs);
            }
            Inbox::Keys(keys) => {
                tracing::info!(n_devices = keys.len(), n_sessions = self.conns.len(), "device keys replaced");
                for conn in self.conns.values_mut() {
                    conn.ingest.set_keys(Arc::clone(&keys));
                }
                self.live.keyed_devices.store(keys.len() as u64, Ordering::Relaxed);
                self.keys = Some(keys);
            }
            Inbox::Down { conn } => {
                if let Some(gateway_conn) = self.conns.remove(&conn) {
                    tracing::info!(conn, gateway = %gateway_conn.gateway, "gateway disconnected");
                }
                self.live.gateways.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&conn);
            }
            Inbox::SetDesired { device, entries, reply } => {
                let result = self.set_desired(now, device, &entries);
                let _ = reply.send(result);
            }
            Inbox::Shutdown => {
                tracing::info!("shutting down: finishing the group commit and saying goodbye");
                self.shutting_down = true;
            }
        }
    }

    /// Edits the desired section of `device`'s shadow, persists it with its own commit, and tells
    /// every live session (the gateways relay it to the device, now or when it next connects).
    fn set_desired(
        &mut self,
        now: Millis,
        device: DeviceId,
        entries: &BTreeMap<String, Option<Value>>,
    ) -> Result<(), String> {
        let shadow = match self.store.shadow_mut(&device) {
            Ok(Some(shadow)) => shadow,
            Ok(None) => return Err(format!("no shadow for {device}")),
            Err(error) => return Err(error.to_string()),
        };
        let mut trial = shadow.clone();
        for (key, value) in entries {
            let edited = match value {
                Some(value) => trial.set(Section::Desired, key, value),
                None => trial.remove(Section::Desired, key),
            };
            edited.map_err(|error| error.to_string())?;
        }
        *shadow = trial;
        self.store.persist_shadow(device, now).map_err(|error| error.to_string())?;
        if let Err(error) = self.group_commit(now) {
            return Err(error.to_string());
        }
        for conn in self.conns.values_mut() {
            conn.ingest.handle_shadow_changed(device);
        }
        tracing::info!(%device, n_entries = entries.len(), "desired state changed");
        Ok(())
    }

    fn handle_timeouts(&mut self, now: Millis) {
        for conn in self.conns.values_mut() {
            if conn.ingest.poll_timeout().is_some_and(|at| at <= now) {
                conn.ingest.handle_timeout(now);
            }
        }
    }

    fn next_timeout(&self) -> Option<Millis> {
        self.conns.values().filter_map(|conn| conn.ingest.poll_timeout()).min()
    }

    /// Moves everything the sessions have to say until they are quiet, with one group commit per
    /// pass.
    fn pump(&mut self, now: Millis) {
        loop {
            let n_events = self.drain_events(now);
            if self.store.in_transaction() {
                if let Err(error) = self.group_commit(now) {
                    tracing::error!(%error, "group commit failed");
                }
            }
            let n_frames = self.transmit(now);
            if n_events == 0 && n_frames == 0 {
                break;
            }
        }
    }

    fn drain_events(&mut self, now: Millis) -> usize {
        let conns: Vec<u64> = self.conns.keys().copied().collect();
        conns.into_iter().map(|conn| self.drain_conn(now, conn, None)).sum()
    }

    /// Handles what one session has to say; `batch_seqs` is the batch whose frame it just took.
    fn drain_conn(&mut self, now: Millis, conn: u64, batch_seqs: Option<(Seq, Seq)>) -> usize {
        let mut n_events = 0;
        let next = |conns: &mut BTreeMap<u64, Conn>| {
            let gateway_conn = conns.get_mut(&conn)?;
            Some((gateway_conn.gateway, gateway_conn.ingest.poll_event()?))
        };
        while let Some((gateway, event)) = next(&mut self.conns) {
            n_events += 1;
            self.on_event(now, conn, gateway, event, batch_seqs);
        }
        n_events
    }

    /// Takes `batch`'s events from its device's and its gateway's token buckets, or returns how
    /// long the gateway should wait (both buckets are left as they were).
    fn admit(&mut self, now: Millis, gateway: GatewayId, device: DeviceId, n_events: u64) -> Result<(), u32> {
        let device_limit = self.device_limit;
        let mut device_bucket =
            *self.device_buckets.entry(device).or_insert_with(|| TokenBucket::new(device_limit, now));
        device_bucket.take(now, n_events)?;
        let gateway_limit = self.gateway_limit;
        let gateway_bucket =
            self.gateway_buckets.entry(gateway).or_insert_with(|| TokenBucket::new(gateway_limit, now));
        gateway_bucket.take(now, n_events)?;
        self.device_buckets.insert(device, device_bucket);
        Ok(())
    }

    /// A batch failed verification: log it, count it, store it as a security event.
    fn on_violation(
        &mut self,
        now: Millis,
        gateway: GatewayId,
        device: DeviceId,
        violation: &Violation,
        batch_seqs: Option<(Seq, Seq)>,
    ) {
        let kind = violation.kind();
        let (from_seq, last_seq) = batch_seqs.unwrap_or_else(|| seqs_named(violation));
        tracing::warn!(
            %gateway, %device, kind, %violation, from_seq = from_seq.0, last_seq = last_seq.0,
            "security event: batch refused, the gateway keeps it"
        );
        *self.live.violations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(kind).or_default() += 1;
        let event = SecurityEvent {
            id: 0,
            first_ms: now,
            last_ms: now,
            gateway,
            device,
            kind: kind.to_string(),
            detail: violation.to_string(),
            from_seq,
            last_seq,
            count: 1,
        };
        if let Err(error) = self.store.record_security_event(&event) {
            tracing::error!(%gateway, %device, %error, "cannot store the security event");
        }
    }

    fn on_event(
        &mut self,
        now: Millis,
        conn: u64,
        gateway: GatewayId,
        event: SessionEvent,
        batch_seqs: Option<(Seq, Seq)>,
    ) {
        match event {
            SessionEvent::EventsReceived(batch) => {
                if let Err(retry_after_ms) = self.admit(now, gateway, batch.device, batch.events.len() as u64) {
                    let metrics = &self.live.metrics;
                    metrics.rate_limited_total.fetch_add(1, Ordering::Relaxed);
                    metrics.rate_limited_events_total.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
                    tracing::debug!(%gateway, device = %batch.device, retry_after_ms, "over the rate limit: held back");
                    if let Some(gateway_conn) = self.conns.get_mut(&conn) {
                        gateway_conn.ingest.handle_refused(
                            now,
                            batch.device,
                            BackpressureReason::RateLimited,
                            retry_after_ms,
                        );
                    }
                    return;
                }
                let meta = IngestMeta { gateway, ingest_time: now };
                match self.store.append_from(&batch, &meta) {
                    Ok(appended) => {
                        let metrics = &self.live.metrics;
                        metrics.events_stored_total.fetch_add(appended.n_new as u64, Ordering::Relaxed);
                        let n_duplicate = batch.events.len().saturating_sub(appended.n_new) as u64;
                        metrics.events_duplicate_total.fetch_add(n_duplicate, Ordering::Relaxed);
                        self.pending_durable.push((conn, batch.device, appended.high));
                    }
                    Err(error) => {
                        tracing::error!(%gateway, device = %batch.device, %error, "append failed: not committing");
                        if let Some(gateway_conn) = self.conns.get_mut(&conn) {
                            gateway_conn.ingest.handle_refused(
                                now,
                                batch.device,
                                BackpressureReason::Busy,
                                RETRY_AFTER_FAILED_COMMIT_MS,
                            );
                        }
                    }
                }
            }
            SessionEvent::ShadowChanged { device } => {
                self.live.metrics.shadow_changes_total.fetch_add(1, Ordering::Relaxed);
                if let Err(error) = self.store.persist_shadow(device, now) {
                    tracing::error!(%device, %error, "cannot persist shadow");
                }
                for (other, gateway_conn) in &mut self.conns {
                    if *other != conn {
                        gateway_conn.ingest.handle_shadow_changed(device);
                    }
                }
            }
            SessionEvent::PeerBacklog { backlog_events } => {
                let mut gateways = self.live.gateways.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(status) = gateways.get_mut(&conn) {
                    status.backlog_events = backlog_events;
                }
            }
            SessionEvent::Unauthorized { reason } => {
                self.live.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(conn, %gateway, %reason, "unauthorized frame from gateway: closing its session");
            }
            SessionEvent::Violation { device, violation, .. } => {
                self.on_violation(now, gateway, device, &violation, batch_seqs);
            }
            SessionEvent::Closed(reason) => tracing::info!(conn, %gateway, ?reason, "session closed"),
            other => tracing::debug!(conn, %gateway, ?other, "session event"),
        }
    }

    fn group_commit(&mut self, now: Millis) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let pending = std::mem::take(&mut self.pending_durable);
        let metrics = &self.live.metrics;
        match self.store.commit() {
            Ok(_) => {
                metrics.group_commits_total.fetch_add(1, Ordering::Relaxed);
                metrics.group_commit_us_total.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                for (conn, device, high) in pending {
                    if let Some(gateway_conn) = self.conns.get_mut(&conn) {
                        gateway_conn.ingest.handle_durable(now, device, high);
                    }
                }
                Ok(())
            }
            Err(error) => {
                metrics.group_commit_failures_total.fetch_add(1, Ordering::Relaxed);
                // Nothing of this group is durable: every gateway keeps its events and retries.
                for (conn, device, _) in pending {
                    if let Some(gateway_conn) = self.conns.get_mut(&conn) {
                        gateway_conn.ingest.handle_refused(
                            now,
                            device,
                            BackpressureReason::Busy,
                            RETRY_AFTER_FAILED_COMMIT_MS,
                        );
                    }
                }
                Err(error)
            }
        }
    }

    fn transmit(&mut self, now: Millis) -> usize {
        let mut n_frames = 0;
        for conn in self.conns.values_mut() {
            while let Some(frame) = conn.ingest.poll_transmit(now, &mut self.store) {
                n_frames += 1;
                let _ = conn.out.send(Out::Frame(frame));
            }
            if conn.ingest.is_closed() && !conn.close_sent {
                conn.close_sent = true;
                let _ = conn.out.send(Out::Close(CloseCode::Done));
            }
        }
        n_frames
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Inbox>) -> Result<(), ServerError> {
        loop {
            let now = wall_now();
            let first = match self.next_timeout() {
                Some(at) if at <= now => None,
                Some(at) => tokio::select! {
                    message = inbox.recv() => Some(message),
                    () = tokio::time::sleep(Duration::from_millis(at.since(now))) => None,
                },
                None => Some(inbox.recv().await),
            };
            let now = wall_now();
            let mut n_messages = 0;
            match first {
                Some(Some(message)) => {
                    self.handle(now, message);
                    n_messages += 1;
                }
                Some(None) => self.shutting_down = true,
                None => {}
            }
            // Everything that arrived meanwhile, from every gateway, joins this group commit.
            while n_messages < GROUP_MESSAGES_MAX {
                let Ok(message) = inbox.try_recv() else { break };
                self.handle(now, message);
                n_messages += 1;
            }
            self.handle_timeouts(now);
            self.pump(now);
            if self.shutting_down {
                for conn in self.conns.values_mut() {
                    conn.ingest.close(GoodbyeReason::Shutdown);
                }
                self.pump(wall_now());
                for conn in self.conns.values() {
                    let _ = conn.out.send(Out::Close(CloseCode::ShuttingDown));
                }
                tracing::info!("core loop stopped");
                return Ok(());
            }
        }
    }
}

/// The seqs a violation names, for a security event whose batch is not known.
fn seqs_named(violation: &Violation) -> (Seq, Seq) {
    match violation {
        Violation::NotSealed { from, last } => (*from, *last),
        Violation::BadHole { first, last } => (*first, *last),
        Violation::BadSeal { seq } | Violation::Equivocation { seq } => (*seq, *seq),
        Violation::Replay { last } => (*last, *last),
        _ => (Seq::ZERO, Seq::ZERO),
    }
}

/// A file's modification time and length: when either changes, the registry is read again.
fn file_stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Checks the registry every `every_ms` and sends the core loop the keys of each changed file
/// that parses; a file that does not parse is logged once and the previous keys stay.
async fn watch_keys(
    path: PathBuf,
    every_ms: u64,
    mut stamp: Option<(SystemTime, u64)>,
    inbox: mpsc::Sender<Inbox>,
    live: Arc<Live>,
) {
    let mut ticks = tokio::time::interval(Duration::from_millis(every_ms.max(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let file = path.clone();
        let Ok((now_stamp, loaded)) = tokio::task::spawn_blocking(move || {
            let now_stamp = file_stamp(&file);
            (now_stamp, (now_stamp != stamp).then(|| load_keys(&file)))
        })
        .await
        else {
            continue;
        };
        stamp = now_stamp;
        match loaded {
            None => {}
            Some(Ok(keys)) => {
                live.metrics.keys_reloads_total.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %path.display(), n_devices = keys.len(), "device keys reloaded");
                if inbox.send(Inbox::Keys(Arc::new(keys))).await.is_err() {
                    return;
                }
            }
            Some(Err(error)) => {
                live.metrics.keys_reload_failures_total.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "device keys not reloaded: keeping the previous keys");
            }
        }
    }
}

/// A handle to ask the core loop for desired-state changes.
#[derive(Clone, Debug)]
pub struct Control {
    inbox: mpsc::Sender<Inbox>,
}

impl Control {
    /// Sets (`Some`) or removes (`None`) keys of `device`'s desired state; returns once the
    /// change is durable and every live gateway session was told.
    pub async fn set_desired(&self, device: DeviceId, entries: BTreeMap<String, Option<Value>>) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.inbox
            .send(Inbox::SetDesired { device, entries, reply })
            .await
            .map_err(|_| "the cloud is shutting down".to_string())?;
        answer.await.map_err(|_| "the cloud is shutting down".to_string())?
    }
}

/// A running ingest server.
#[derive(Debug)]
pub struct Running {
    quic_addr: SocketAddr,
    live: Arc<Live>,
    head: Arc<HeadWatch>,
    control: Control,
    stop: watch::Sender<bool>,
    core: std::thread::JoinHandle<Result<(), ServerError>>,
    server: Arc<Server>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Where gateways connect.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Counters and connected gateways.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The store's head watch (for subscriptions and projections in this process).
    pub fn head_watch(&self) -> &Arc<HeadWatch> {
        &self.head
    }

    /// A handle for desired-state writes.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Graceful shutdown: finish the group commit, say goodbye on every session, let the
    /// connections deliver it, close the endpoint.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.control.inbox.send(Inbox::Shutdown).await;
        let core = self.core;
        let result = tokio::task::spawn_blocking(move || core.join())
            .await
            .map_err(|error| ServerError::CoreThread(std::io::Error::other(error.to_string())))?
            .map_err(|_| ServerError::CoreThread(std::io::Error::other("core loop panicked")))?;
        let _ = self.stop.send(true);
        let deadline = std::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
        while self.server.n_open() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.server.close(CloseCode::ShuttingDown);
        self.server.wait_idle(1_000).await;
        for task in self.tasks {
            task.abort();
        }
        tracing::info!("ingest server stopped");
        result
    }
}

/// Starts the ingest server: opens the store, binds QUIC, starts the core loop. Must be called
/// inside a multi-threaded tokio runtime.
pub async fn start(options: ServerOptions) -> Result<Running, ServerError> {
    let own = pki::identity_of(&pki::first_cert_der(&options.credentials.cert_pem)?)?;
    if own != Identity::Cloud {
        return Err(ServerError::WrongIdentity { found: own.to_string() });
    }
    let backend = options.backend.clone();
    let limits = options.session.shadow_limits;
    let store = tokio::task::spawn_blocking(move || CloudStore::open(backend.open_writer()?, limits))
        .await
        .map_err(|error| ServerError::CoreThread(std::io::Error::other(error.to_string())))??;
    let head = store.head_watch();
    let security = options.security.clone();
    let keys = match &security.device_keys {
        Some(path) => {
            let stamp = file_stamp(path);
            let keys = load_keys(path)?;
            tracing::info!(path = %path.display(), n_devices = keys.len(), "verifying device signatures");
            Some((Arc::new(keys), stamp))
        }
        None => {
            tracing::warn!(
                "NO DEVICE KEYS CONFIGURED: events are accepted without verifying device signatures; \
                 a compromised gateway could forge, alter or drop them undetected (set device_keys)"
            );
            None
        }
    };
    let server = Arc::new(Server::bind(options.listen, &options.credentials, options.transport.clone())?);
    let quic_addr = server.local_addr()?;
    let live = Arc::new(Live::default());
    live.verifying.store(keys.is_some(), Ordering::Relaxed);
    live.keyed_devices.store(keys.as_ref().map_or(0, |(keys, _)| keys.len() as u64), Ordering::Relaxed);
    let (stop, _stop_rx) = watch::channel(false);
    let (inbox, inbox_rx) = mpsc::channel(INBOX_MESSAGES_MAX);
    let core = Core {
        store,
        session: options.session.clone(),
        live: Arc::clone(&live),
        conns: BTreeMap::new(),
        pending_durable: Vec::new(),
        shutting_down: false,
        keys: keys.as_ref().map(|(keys, _)| Arc::clone(keys)),
        device_limit: security.device_limit,
        gateway_limit: security.gateway_limit,
        device_buckets: BTreeMap::new(),
        gateway_buckets: BTreeMap::new(),
    };
    let core = std::thread::Builder::new()
        .name("tidesync-cloud-core".into())
        .spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServerError::CoreThread)?;
            runtime.block_on(core.run(inbox_rx))
        })
        .map_err(ServerError::CoreThread)?;
    let accepting = Arc::clone(&server);
    let accept_inbox = inbox.clone();
    let accept_live = Arc::clone(&live);
    let transport = options.transport.clone();
    let accept_task = tokio::spawn(async move {
        let mut next_conn = 0u64;
        while let Some(pending) = accepting.accept().await {
            next_conn += 1;
            let conn = next_conn;
            tokio::spawn(serve_gateway(
                pending,
                conn,
                accept_inbox.clone(),
                Arc::clone(&accept_live),
                transport.clone(),
            ));
        }
    });
    let mut tasks = vec![accept_task];
    if let (Some(path), Some((_, stamp))) = (security.device_keys, keys) {
        tasks.push(tokio::spawn(watch_keys(path, security.keys_reload_ms, stamp, inbox.clone(), Arc::clone(&live))));
    }
    tracing::info!(
        %quic_addr, backend = options.backend.kind(), verifying = live.verifying.load(Ordering::Relaxed),
        device_limit = ?security.device_limit, gateway_limit = ?security.gateway_limit, "cloud ingest running"
    );
    Ok(Running { quic_addr, live, head, control: Control { inbox }, stop, core, server, tasks })
}

/// Writes what the core loop sends to one connection; ends the stream and closes on `Close`.
async fn write_out(mut sender: FrameSender, link: Arc<Link>, mut out: mpsc::UnboundedReceiver<Out>) {
    while let Some(message) = out.recv().await {
        let mut close = None;
        let mut next = Some(message);
        while let Some(message) = next.take() {
            match message {
                Out::Frame(frame) => {
                    if let Err(error) = sender.queue(&frame) {
                        tracing::error!(%error, "cannot encode frame");
                    }
                }
                Out::Close(code) => {
                    close = Some(code);
                    break;
                }
            }
            next = out.try_recv().ok();
        }
        if let Err(error) = sender.flush().await {
            tracing::debug!(%error, "connection write failed");
            return;
        }
        if let Some(code) = close {
            if let Err(error) = sender.finish().await {
                tracing::debug!(%error, "peer did not read the last frames");
            }
            link.close(code);
            return;
        }
    }
}

async fn read_in(
    mut receiver: FrameReceiver,
    conn: u64,
    out: &mpsc::UnboundedSender<Out>,
    inbox: &mpsc::Sender<Inbox>,
) {
    loop {
        match receiver.recv().await {
            Ok(Some(frame)) => {
                if inbox.send(Inbox::Frame { conn, frame }).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(NetError::Decode(error)) => {
                tracing::warn!(conn, %error, "malformed frame: closing the connection");
                let _ =
                    out.send(Out::Frame(Frame::Error(ErrorFrame { code: error.code(), message: error.to_string() })));
                let _ = out.send(Out::Close(CloseCode::ProtocolError));
                return;
            }
            Err(error) => {
                tracing::debug!(conn, %error, "connection ended");
                return;
            }
        }
    }
}

async fn serve_gateway(
    pending: Pending,
    conn: u64,
    inbox: mpsc::Sender<Inbox>,
    live: Arc<Live>,
    transport: TransportLimits,
) {
    let remote = pending.remote_addr();
    let link = match pending.establish().await {
        Ok(link) => Arc::new(link),
        Err(error) => {
            live.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, %error, "gateway handshake failed");
            return;
        }
    };
    let Identity::Gateway(gateway) = link.peer() else {
        live.metrics.refused_total.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%remote, peer = %link.peer(), "refusing connection: only gateways connect to the cloud");
        link.close(CloseCode::Unauthorized);
        return;
    };
    live.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    let stream =
        match tokio::time::timeout(Duration::from_millis(STREAM_OPEN_TIMEOUT_MS), link.accept_stream(&transport)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%gateway, %error, "gateway left before opening its stream");
                return;
            }
            Err(_) => {
                tracing::warn!(%gateway, "gateway opened no stream: closing");
                link.close(CloseCode::ProtocolError);
                return;
            }
        };
    let (sender, receiver) = stream.split();
    let (out, out_rx) = mpsc::unbounded_channel();
    if inbox.send(Inbox::Up { conn, gateway, out: out.clone() }).await.is_err() {
        link.close(CloseCode::ShuttingDown);
        return;
    }
    let writer = tokio::spawn(write_out(sender, Arc::clone(&link), out_rx));
    read_in(receiver, conn, &out, &inbox).await;
    let _ = inbox.send(Inbox::Down { conn }).await;
    drop(out);
    let _ = writer.await;
}
