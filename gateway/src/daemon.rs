//! The daemon: a QUIC server for devices, the cloud uplink, and the core loop that drives core's
//! sessions over the spool.
//!
//! Threads: the tokio runtime runs the accept loop, one task per connection (bytes in, bytes
//! out) and the metrics endpoint; one dedicated thread, the *core loop*, owns the [`Spool`] and
//! every session. Connection tasks send it frames through a bounded inbox; it hands frames to
//! sessions (`handle_frame`), stores what they emit, ends each round with one group commit, and
//! only then tells the sessions which events are durable (`handle_durable`), so a custody ack is
//! never sent for an event a crash could lose. The loop makes no protocol decision itself: every
//! `if` about the protocol is in `tidesync_core::sync`.
//!
//! Rate limits: each device has a `tidesync_core::rate::TokenBucket` (configured in `[limits]`),
//! kept across its connections. A batch from a device over its rate is not appended: the device's
//! session answers it with backpressure (`RateLimited`, with how long to wait) and the device
//! keeps the events and sends them again after the wait, so nothing is lost.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidesync_core::event::{DeviceId, GatewayId, Millis, Seq};
use tidesync_core::ledger::{Ledger, LedgerError};
use tidesync_core::net::pki::{self, Identity};
use tidesync_core::net::quic::{
    Client, CloseCode, FrameReceiver, FrameSender, Link, NetError, Pending, Server, TransportLimits,
};
use tidesync_core::rate::TokenBucket;
use tidesync_core::sync::{CloseReason, Ingest, SessionConfig, SessionEvent, Uplink};
use tidesync_core::wire::{BackpressureReason, ErrorFrame, EventBatch, Frame, GoodbyeReason};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, ConfigError, Limits};
use crate::metrics::Metrics;
use crate::spool::{Spool, SpoolError};

/// Messages waiting for the core loop, at most.
const INBOX_MESSAGES_MAX: usize = 4_096;
/// How long a client has to open its session stream after the handshake.
const STREAM_OPEN_TIMEOUT_MS: u64 = 10_000;
/// How long shutdown waits for connections to deliver their goodbyes.
const SHUTDOWN_DRAIN_MS: u64 = 3_000;
/// How long connecting to the cloud may take.
const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// The reconnect wait grows to at most this many times the configured one.
const RECONNECT_BACKOFF_MAX: u64 = 16;

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration or a credential file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The spool.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A QUIC endpoint.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The gateway's certificate names someone else.
    #[error("the certificate names {found}, but this is gateway {expected}")]
    WrongIdentity {
        /// From the config.
        expected: GatewayId,
        /// From the certificate.
        found: String,
    },
    /// The certificate does not parse.
    #[error("gateway certificate: {0}")]
    Pki(#[from] pki::PkiError),
    /// The metrics endpoint could not bind.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The core thread could not start or failed.
    #[error("core loop: {0}")]
    CoreThread(#[source] std::io::Error),
    /// The spool failed during a group commit.
    #[error("spool write failed: {0}")]
    Ledger(#[from] LedgerError),
}

fn wall_now() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64))
}

#[derive(Debug)]
enum Inbox {
    DeviceUp { conn: u64, device: DeviceId, out: mpsc::UnboundedSender<Out> },
    DeviceFrame { conn: u64, frame: Frame, received: Instant },
    DeviceDown { conn: u64 },
    CloudUp { out: mpsc::UnboundedSender<Out> },
    CloudFrame { frame: Frame },
    CloudDown,
    Shutdown,
}

/// What the core loop asks a connection task to do.
// Nearly every message is a frame: boxing it would cost an allocation per frame to save
// bytes only on the rare close.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Out {
    Frame(Frame),
    /// Deliver what was sent, then close the connection.
    Close(CloseCode),
}

struct DeviceConn {
    device: DeviceId,
    ingest: Ingest,
    out: mpsc::UnboundedSender<Out>,
    close_sent: bool,
    /// Oldest receive time of events not yet acknowledged, for the custody latency.
    received: Option<Instant>,
}

struct CloudConn {
    uplink: Uplink,
    out: mpsc::UnboundedSender<Out>,
    close_sent: bool,
}

/// The core loop's state: the spool and every session.
struct Core {
    gateway: GatewayId,
    spool: Spool,
    session: SessionConfig,
    limits: Limits,
    metrics: Arc<Metrics>,
    devices: BTreeMap<u64, DeviceConn>,
    cloud: Option<CloudConn>,
    /// Appended in the open transaction: (connection, device, high, received).
    pending_durable: Vec<(u64, DeviceId, Seq, Instant)>,
    /// Per device, (high, when spooled), for the commit latency.
    spooled_at: BTreeMap<DeviceId, VecDeque<(Seq, Instant)>>,
    /// Per device, its rate limit's state. One entry per device that ever sent events: bounded by
    /// the fleet, whose certificates name the devices.
    buckets: BTreeMap<DeviceId, TokenBucket>,
    shutting_down: bool,
}

impl Core {
    fn handle(&mut self, now: Millis, message: Inbox) {
        match message {
            Inbox::DeviceUp { conn, device, out } => {
                tracing::info!(conn, %device, "device connected");
                let ingest = Ingest::for_gateway(device, self.session.clone(), now);
                self.devices.insert(conn, DeviceConn { device, ingest, out, close_sent: false, received: None });
                self.metrics.connected_devices.store(self.devices.len() as u64, Ordering::Relaxed);
            }
            Inbox::DeviceFrame { conn, frame, received } => {
                let Some(device_conn) = self.devices.get_mut(&conn) else { return };
                device_conn.received.get_or_insert(received);
                if let Err(error) = device_conn.ingest.handle_frame(now, frame, &mut self.spool) {
                    tracing::info!(conn, device = %device_conn.device, %error, "device session failed");
                }
            }
            Inbox::DeviceDown { conn } => {
                if let Some(device_conn) = self.devices.remove(&conn) {
                    tracing::info!(conn, device = %device_conn.device, "device disconnected");
                }
                self.metrics.connected_devices.store(self.devices.len() as u64, Ordering::Relaxed);
            }
            Inbox::CloudUp { out } => {
                tracing::info!("cloud connected");
                let uplink = Uplink::for_gateway(self.gateway, self.session.clone(), now);
                self.cloud = Some(CloudConn { uplink, out, close_sent: false });
                self.metrics.upstream_connected.store(1, Ordering::Relaxed);
            }
            Inbox::CloudFrame { frame } => {
                let Some(cloud) = &mut self.cloud else { return };
                if let Err(error) = cloud.uplink.handle_frame(now, frame, &mut self.spool) {
                    tracing::warn!(%error, "cloud session failed");
                }
            }
            Inbox::CloudDown => {
                if self.cloud.take().is_some() {
                    tracing::info!("cloud disconnected");
                }
                self.metrics.upstream_connected.store(0, Ordering::Relaxed);
            }
            Inbox::Shutdown => {
                tracing::info!("shutting down: finishing the group commit and saying goodbye");
                self.shutting_down = true;
            }
        }
    }

    fn handle_timeouts(&mut self, now: Millis) {
        for device_conn in self.devices.values_mut() {
            if device_conn.ingest.poll_timeout().is_some_and(|at| at <= now) {
                device_conn.ingest.handle_timeout(now);
            }
        }
        if let Some(cloud) = &mut self.cloud {
            if cloud.uplink.poll_timeout().is_some_and(|at| at <= now) {
                cloud.uplink.handle_timeout(now);
            }
        }
    }

    fn next_timeout(&self) -> Option<Millis> {
        let devices = self.devices.values().filter_map(|device_conn| device_conn.ingest.poll_timeout());
        let cloud = self.cloud.as_ref().and_then(|cloud| cloud.uplink.poll_timeout());
        devices.chain(cloud).min()
    }

    /// Moves everything the sessions have to say until they are quiet, with one group commit.
    fn pump(&mut self, now: Millis) -> Result<(), LedgerError> {
        loop {
            let mut n_events = self.drain_device_events(now);
            n_events += self.drain_cloud_events(now);
            if self.spool.in_transaction() {
                self.group_commit(now)?;
                n_events += 1;
            }
            let n_frames = self.transmit(now);
            if n_events == 0 && n_frames == 0 {
                break;
            }
        }
        let stats = self.spool.stats();
        self.metrics.spool_events.store(stats.n_events, Ordering::Relaxed);
        self.metrics.spool_bytes.store(stats.used_bytes, Ordering::Relaxed);
        Ok(())
    }

    fn drain_device_events(&mut self, now: Millis) -> usize {
        let mut n_events = 0;
        let conns: Vec<u64> = self.devices.keys().copied().collect();
        for conn in conns {
            let next = |devices: &mut BTreeMap<u64, DeviceConn>| {
                let device_conn = devices.get_mut(&conn)?;
                Some((device_conn.device, device_conn.ingest.poll_event()?))
            };
            while let Some((device, event)) = next(&mut self.devices) {
                n_events += 1;
                self.on_device_event(now, conn, device, event);
            }
        }
        n_events
    }

    fn on_device_event(&mut self, now: Millis, conn: u64, device: DeviceId, event: SessionEvent) {
        match event {
            SessionEvent::Established { .. } => {
                // A device that reconnects learns what the cloud committed while it was away.
                let committed = self.spool.committed(&device);
                if let Some(device_conn) = self.devices.get_mut(&conn) {
                    device_conn.ingest.handle_committed(now, device, committed);
                }
            }
            SessionEvent::EventsReceived(batch) => {
                if !self.admit(now, conn, &batch) {
                    return;
                }
                let received =
                    self.devices.get(&conn).and_then(|device_conn| device_conn.received).unwrap_or_else(Instant::now);
                match self.spool.append(&batch) {
                    Ok(appended) => {
                        self.metrics.events_in_total.fetch_add(appended.n_new as u64, Ordering::Relaxed);
                        self.pending_durable.push((conn, batch.device, appended.high, received));
                    }
                    Err(error) => {
                        let reason = match error {
                            LedgerError::Full { .. } => BackpressureReason::StoreFull,
                            _ => BackpressureReason::Busy,
                        };
                        if matches!(error, LedgerError::Full { .. }) {
                            tracing::debug!(%device, %error, "spool full: not granting custody");
                        } else {
                            tracing::error!(%device, %error, "spool append failed: not granting custody");
                        }
                        self.metrics.custody_refused_total.fetch_add(1, Ordering::Relaxed);
                        if let Some(device_conn) = self.devices.get_mut(&conn) {
                            device_conn.ingest.handle_refused(
                                now,
                                batch.device,
                                reason,
                                self.limits.full_retry_after_ms,
                            );
                            device_conn.received = None;
                        }
                    }
                }
            }
            SessionEvent::ShadowChanged { device: changed } => {
                if let Err(error) = self.spool.persist_shadow(changed) {
                    tracing::error!(device = %changed, %error, "cannot persist shadow");
                }
                if let Some(cloud) = &mut self.cloud {
                    cloud.uplink.handle_shadow_changed(changed);
                }
                for (other_conn, device_conn) in &mut self.devices {
                    if *other_conn != conn && device_conn.device == changed {
                        device_conn.ingest.handle_shadow_changed(changed);
                    }
                }
            }
            SessionEvent::Unauthorized { reason } => {
                self.metrics.auth_failures_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(conn, %device, %reason, "unauthorized frame from device: closing its connection");
            }
            SessionEvent::Closed(reason) => {
                self.log_closed("device", Some(device), &reason);
            }
            SessionEvent::PeerBacklog { backlog_events } => {
                tracing::trace!(%device, backlog_events, "device backlog");
            }
            other => tracing::debug!(%device, ?other, "device session event"),
        }
    }

    /// Takes the batch's events from the device's token bucket; if the device is over its rate,
    /// tells it to wait (it keeps the events) and returns `false`.
    fn admit(&mut self, now: Millis, conn: u64, batch: &EventBatch) -> bool {
        let rate = self.limits.device_rate();
        if rate.is_unlimited() {
            return true;
        }
        let n_events = batch.events.len() as u64;
        let bucket = self.buckets.entry(batch.device).or_insert_with(|| TokenBucket::new(rate, now));
        let Err(retry_after_ms) = bucket.take(now, n_events) else { return true };
        self.metrics.throttled_batches_total.fetch_add(1, Ordering::Relaxed);
        self.metrics.throttled_events_total.fetch_add(n_events, Ordering::Relaxed);
        tracing::debug!(device = %batch.device, n_events, retry_after_ms, "device over its rate limit: backpressure");
        if let Some(device_conn) = self.devices.get_mut(&conn) {
            device_conn.ingest.handle_refused(now, batch.device, BackpressureReason::RateLimited, retry_after_ms);
            device_conn.received = None;
        }
        false
    }

    fn log_closed(&self, side: &str, device: Option<DeviceId>, reason: &CloseReason) {
        match reason {
            CloseReason::Goodbye(_) | CloseReason::LocalGoodbye(_) => {
                tracing::info!(side, ?device, ?reason, "session closed")
            }
            _ => tracing::warn!(side, ?device, ?reason, "session closed"),
        }
    }

    fn drain_cloud_events(&mut self, now: Millis) -> usize {
        let mut n_events = 0;
        while let Some(event) = self.cloud.as_mut().and_then(|cloud| cloud.uplink.poll_event()) {
            n_events += 1;
            match event {
                SessionEvent::Committed { device, up_to } => self.on_committed(now, device, up_to),
                SessionEvent::ShadowChanged { device } => {
                    if let Err(error) = self.spool.persist_shadow(device) {
                        tracing::error!(%device, %error, "cannot persist shadow");
                    }
                    for device_conn in self.devices.values_mut().filter(|device_conn| device_conn.device == device) {
                        device_conn.ingest.handle_shadow_changed(device);
                    }
                }
                SessionEvent::Established { protocol, .. } => {
                    tracing::info!(protocol, "cloud session established");
                }
                SessionEvent::Closed(reason) => self.log_closed("cloud", None, &reason),
                SessionEvent::Stalled { .. } | SessionEvent::ResendLoop { .. } => {
                    tracing::warn!(?event, "cloud sync health");
                }
                other => tracing::debug!(?other, "cloud session event"),
            }
        }
        n_events
    }

    fn on_committed(&mut self, now: Millis, device: DeviceId, up_to: Seq) {
        let before = self.spool.committed(&device);
        if up_to <= before {
            return;
        }
        if let Err(error) = self.spool.mark_committed(device, up_to) {
            tracing::error!(%device, %error, "cannot record the cloud's commit");
            return;
        }
        let n_events = up_to.0 - before.0;
        self.metrics.events_out_total.fetch_add(n_events, Ordering::Relaxed);
        if let Some(spooled) = self.spooled_at.get_mut(&device) {
            while spooled.front().is_some_and(|(high, _)| *high <= up_to) {
                if let Some((_, at)) = spooled.pop_front() {
                    self.metrics.commit_latency.observe_ms(at.elapsed().as_millis() as u64);
                }
            }
        }
        for device_conn in self.devices.values_mut().filter(|device_conn| device_conn.device == device) {
            device_conn.ingest.handle_committed(now, device, up_to);
        }
    }

    fn group_commit(&mut self, now: Millis) -> Result<(), LedgerError> {
        let result = self.spool.commit();
        let pending = std::mem::take(&mut self.pending_durable);
        match result {
            Ok(()) => {
                self.metrics.group_commits_total.fetch_add(1, Ordering::Relaxed);
                for (conn, device, high, received) in pending {
                    if let Some(device_conn) = self.devices.get_mut(&conn) {
                        device_conn.ingest.handle_durable(now, device, high);
                        device_conn.received = None;
                    }
                    self.metrics.custody_latency.observe_ms(received.elapsed().as_millis() as u64);
                    self.spooled_at.entry(device).or_default().push_back((high, Instant::now()));
                    if let Some(cloud) = &mut self.cloud {
                        cloud.uplink.handle_appended(device);
                    }
                }
                Ok(())
            }
            Err(error) => {
                // Nothing of this group is durable: tell every device to keep its events.
                for (conn, device, _, _) in pending {
                    if let Some(device_conn) = self.devices.get_mut(&conn) {
                        device_conn.ingest.handle_refused(
                            now,
                            device,
                            BackpressureReason::Busy,
                            self.limits.full_retry_after_ms,
                        );
                    }
                }
                Err(error)
            }
        }
    }

    fn transmit(&mut self, now: Millis) -> usize {
        let mut n_frames = 0;
        for device_conn in self.devices.values_mut() {
            while let Some(frame) = device_conn.ingest.poll_transmit(now, &mut self.spool) {
                n_frames += 1;
                let _ = device_conn.out.send(Out::Frame(frame));
            }
            if device_conn.ingest.is_closed() && !device_conn.close_sent {
                device_conn.close_sent = true;
                let _ = device_conn.out.send(Out::Close(CloseCode::Done));
            }
        }
        if let Some(cloud) = &mut self.cloud {
            loop {
                match cloud.uplink.poll_transmit(now, &mut self.spool) {
                    Ok(Some(frame)) => {
                        n_frames += 1;
                        let _ = cloud.out.send(Out::Frame(frame));
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::error!(%error, "reading the spool for the cloud failed");
                        break;
                    }
                }
            }
            if cloud.uplink.is_closed() && !cloud.close_sent {
                cloud.close_sent = true;
                let _ = cloud.out.send(Out::Close(CloseCode::Done));
            }
        }
        n_frames
    }

    fn say_goodbye(&mut self, now: Millis) {
        for device_conn in self.devices.values_mut() {
            device_conn.ingest.close(GoodbyeReason::Shutdown);
        }
        if let Some(cloud) = &mut self.cloud {
            cloud.uplink.close(GoodbyeReason::Shutdown);
        }
        if let Err(error) = self.pump(now) {
            tracing::error!(%error, "last group commit failed");
        }
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Inbox>) -> Result<(), DaemonError> {
        loop {
            let now = wall_now();
            let first = match self.next_timeout() {
                Some(at) if at <= now => None,
                Some(at) => {
                    let wait = Duration::from_millis(at.since(now));
                    tokio::select! {
                        message = inbox.recv() => Some(message),
                        () = tokio::time::sleep(wait) => None,
                    }
                }
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
            // Everything that arrived meanwhile joins this round's group commit.
            while n_messages < self.limits.group_messages_max {
                let Ok(message) = inbox.try_recv() else { break };
                self.handle(now, message);
                n_messages += 1;
            }
            self.handle_timeouts(now);
            self.pump(now)?;
            if self.shutting_down {
                self.say_goodbye(wall_now());
                for device_conn in self.devices.values() {
                    let _ = device_conn.out.send(Out::Close(CloseCode::ShuttingDown));
                }
                if let Some(cloud) = &self.cloud {
                    let _ = cloud.out.send(Out::Close(CloseCode::ShuttingDown));
                }
                tracing::info!("core loop stopped");
                return Ok(());
            }
        }
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    quic_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    inbox: mpsc::Sender<Inbox>,
    stop: watch::Sender<bool>,
    core: std::thread::JoinHandle<Result<(), DaemonError>>,
    server: Arc<Server>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Where devices connect.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Where `/metrics` is served, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The live metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Graceful shutdown: finish the group commit, say goodbye on every session, let the
    /// connections deliver it, close the endpoints.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        let _ = self.inbox.send(Inbox::Shutdown).await;
        self.finish().await
    }

    async fn finish(self) -> Result<(), DaemonError> {
        let core = self.core;
        let result = tokio::task::spawn_blocking(move || core.join())
            .await
            .map_err(|error| DaemonError::CoreThread(std::io::Error::other(error.to_string())))?
            .map_err(|_| DaemonError::CoreThread(std::io::Error::other("core loop panicked")))?;
        let _ = self.stop.send(true);
        let deadline = Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
        while self.server.n_open() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.server.close(CloseCode::ShuttingDown);
        self.server.wait_idle(1_000).await;
        for task in self.tasks {
            task.abort();
        }
        tracing::info!("gateway stopped");
        result
    }
}

/// Starts a gateway: opens the spool, binds the QUIC server (and the metrics endpoint), starts
/// the core loop and the uplink to the cloud. Must be called inside a multi-threaded tokio runtime.
pub async fn start(config: Config) -> Result<Running, DaemonError> {
    let credentials = config.credentials()?;
    let own = pki::identity_of(&pki::first_cert_der(&credentials.cert_pem)?)?;
    if own != Identity::Gateway(config.gateway) {
        return Err(DaemonError::WrongIdentity { expected: config.gateway, found: own.to_string() });
    }
    let replica = format!("gateway:{}", config.gateway);
    let session = config.limits.session();
    let spool = Spool::open(&config.spool, &replica, config.spool_budget_bytes, session.shadow_limits)?;
    let transport = config.limits.transport();
    let server = Arc::new(Server::bind(config.listen, &credentials, transport.clone())?);
    let quic_addr = server.local_addr()?;
    let metrics = Arc::new(Metrics::default());
    metrics.spool_budget_bytes.store(config.spool_budget_bytes, Ordering::Relaxed);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| DaemonError::Metrics { addr, source })?;
            let bound = listener.local_addr().map_err(|source| DaemonError::Metrics { addr, source })?;
            let page_metrics = Arc::clone(&metrics);
            let router =
                axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let page_metrics = Arc::clone(&page_metrics);
                        async move {
                            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], page_metrics.render())
                        }
                    }),
                );
            let mut stop_metrics = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = stop_metrics.wait_for(|stopped| *stopped).await;
                });
                if let Err(error) = serve.await {
                    tracing::error!(%error, "metrics endpoint failed");
                }
            }));
            Some(bound)
        }
        None => None,
    };

    let (inbox, inbox_rx) = mpsc::channel(INBOX_MESSAGES_MAX);
    let core = Core {
        gateway: config.gateway,
        spool,
        session,
        limits: config.limits.clone(),
        metrics: Arc::clone(&metrics),
        devices: BTreeMap::new(),
        cloud: None,
        pending_durable: Vec::new(),
        spooled_at: BTreeMap::new(),
        buckets: BTreeMap::new(),
        shutting_down: false,
    };
    let core = std::thread::Builder::new()
        .name("tidesync-core-loop".into())
        .spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::CoreThread)?;
            runtime.block_on(core.run(inbox_rx))
        })
        .map_err(DaemonError::CoreThread)?;

    let accepting = Arc::clone(&server);
    let accept_inbox = inbox.clone();
    let accept_metrics = Arc::clone(&metrics);
    let accept_transport = transport.clone();
    tasks.push(tokio::spawn(async move {
        let mut next_conn = 0u64;
        while let Some(pending) = accepting.accept().await {
            next_conn += 1;
            let conn = next_conn;
            let inbox = accept_inbox.clone();
            let metrics = Arc::clone(&accept_metrics);
            let transport = accept_transport.clone();
            tokio::spawn(serve_device(pending, conn, inbox, metrics, transport));
        }
    }));

    if let Some(upstream) = config.upstream.clone() {
        let bind: SocketAddr = if upstream.addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let client = Client::bind(bind, &credentials, &transport)?;
        let upstream_task = run_upstream(
            client,
            upstream.addr,
            upstream.reconnect_ms,
            inbox.clone(),
            transport,
            Arc::clone(&metrics),
            stop_rx,
        );
        tasks.push(tokio::spawn(upstream_task));
    }
    tracing::info!(gateway = %config.gateway, %quic_addr, ?metrics_addr, spool = %config.spool.display(), "gateway running");
    Ok(Running { quic_addr, metrics_addr, metrics, inbox, stop, core, server, tasks })
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

/// Reads frames until the stream ends; a malformed frame gets an error frame and a close.
async fn read_in(
    mut receiver: FrameReceiver,
    out: &mpsc::UnboundedSender<Out>,
    metrics: &Metrics,
    mut deliver: impl FnMut(Frame) -> Option<Inbox>,
    inbox: &mpsc::Sender<Inbox>,
    peer: &str,
) {
    loop {
        match receiver.recv().await {
            Ok(Some(frame)) => {
                if let Some(message) = deliver(frame) {
                    if inbox.send(message).await.is_err() {
                        return;
                    }
                }
            }
            Ok(None) => return,
            Err(NetError::Decode(error)) => {
                metrics.malformed_frames_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer, %error, "malformed frame: closing the connection");
                let _ =
                    out.send(Out::Frame(Frame::Error(ErrorFrame { code: error.code(), message: error.to_string() })));
                let _ = out.send(Out::Close(CloseCode::ProtocolError));
                return;
            }
            Err(error) => {
                tracing::debug!(peer, %error, "connection ended");
                return;
            }
        }
    }
}

async fn serve_device(
    pending: Pending,
    conn: u64,
    inbox: mpsc::Sender<Inbox>,
    metrics: Arc<Metrics>,
    transport: TransportLimits,
) {
    let remote = pending.remote_addr();
    let link = match pending.establish().await {
        Ok(link) => Arc::new(link),
        Err(error) => {
            metrics.handshake_failures_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, %error, "device handshake failed");
            return;
        }
    };
    let Identity::Device(device) = link.peer() else {
        metrics.auth_failures_total.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%remote, peer = %link.peer(), "refusing connection: only devices connect to a gateway");
        link.close(CloseCode::Unauthorized);
        return;
    };
    let stream =
        match tokio::time::timeout(Duration::from_millis(STREAM_OPEN_TIMEOUT_MS), link.accept_stream(&transport)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%device, %error, "device left before opening its stream");
                return;
            }
            Err(_) => {
                tracing::warn!(%device, "device opened no stream: closing");
                link.close(CloseCode::ProtocolError);
                return;
            }
        };
    let (sender, receiver) = stream.split();
    let (out, out_rx) = mpsc::unbounded_channel();
    if inbox.send(Inbox::DeviceUp { conn, device, out: out.clone() }).await.is_err() {
        link.close(CloseCode::ShuttingDown);
        return;
    }
    let writer = tokio::spawn(write_out(sender, Arc::clone(&link), out_rx));
    let deliver = |frame| Some(Inbox::DeviceFrame { conn, frame, received: Instant::now() });
    read_in(receiver, &out, &metrics, deliver, &inbox, device.as_str()).await;
    let _ = inbox.send(Inbox::DeviceDown { conn }).await;
    drop(out);
    let _ = writer.await;
}

async fn run_upstream(
    client: Client,
    addr: SocketAddr,
    reconnect_ms: u64,
    inbox: mpsc::Sender<Inbox>,
    transport: TransportLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = 1;
    let mut n_failures = 0u64;
    while !*stop.borrow() {
        match connect_upstream(&client, addr, &transport).await {
            Ok((link, stream)) => {
                backoff = 1;
                n_failures = 0;
                let link = Arc::new(link);
                let (sender, receiver) = stream.split();
                let (out, out_rx) = mpsc::unbounded_channel();
                if inbox.send(Inbox::CloudUp { out: out.clone() }).await.is_err() {
                    return;
                }
                let writer = tokio::spawn(write_out(sender, Arc::clone(&link), out_rx));
                tokio::select! {
                    () = read_in(receiver, &out, &metrics, |frame| Some(Inbox::CloudFrame { frame }), &inbox, "cloud") => {}
                    _ = stop.wait_for(|stopped| *stopped) => {}
                }
                let _ = inbox.send(Inbox::CloudDown).await;
                drop(out);
                let _ = writer.await;
            }
            Err(error) => {
                n_failures += 1;
                // The first failure in a row is worth a warning; the retries are not.
                if n_failures == 1 {
                    tracing::warn!(%addr, %error, "cannot reach the cloud; spooling and retrying");
                } else {
                    tracing::debug!(%addr, %error, n_failures, "cannot reach the cloud");
                }
            }
        }
        let wait = Duration::from_millis(reconnect_ms.saturating_mul(backoff));
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

async fn connect_upstream(
    client: &Client,
    addr: SocketAddr,
    transport: &TransportLimits,
) -> Result<(Link, tidesync_core::net::quic::FrameStream), NetError> {
    let link = client.connect(addr, pki::CLOUD_SERVER_NAME, UPSTREAM_CONNECT_TIMEOUT_MS).await?;
    if link.peer() != Identity::Cloud {
        link.close(CloseCode::Unauthorized);
        return Err(NetError::Identity(pki::PkiError::NoIdentity));
    }
    let stream = link.open_stream(transport).await?;
    Ok((link, stream))
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run_until_signal(config: Config) -> Result<(), DaemonError> {
    let running = start(config).await?;
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(DaemonError::CoreThread)?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    running.shutdown().await
}
