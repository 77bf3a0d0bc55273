//! The device uplink: drives core's `sync::Uplink` session over QUIC to one of a list of
//! gateways, with the agent's store as the session's `Store`.
//!
//! Every protocol decision is core's; this module moves frames, runs the session on the agent's
//! writer thread (so it sees exactly what is durable), and does what the session's events ask:
//! custody and commit acks become watermarks (commits prune), received shadow changes are
//! persisted and reach the desired-state watchers. A session that ends for any reason is followed
//! by a new one after a jittered exponential backoff; a gateway that cannot be reached or fails is
//! left for the next one in the list (roaming). A new session resumes from the version vectors,
//! so nothing is lost or sent twice across gateways.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use serde::Serialize;
use tidesync_core::event::Millis;
use tidesync_core::ledger::Ledger;
use tidesync_core::net::pki::{Identity, GATEWAY_SERVER_NAME};
use tidesync_core::net::quic::{Client, CloseCode, FrameSender, Link, NetError, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::sync::{CloseReason, SessionConfig, SessionEvent, Uplink};
use tidesync_core::wire::{Frame, GoodbyeReason};
use tokio::sync::{mpsc, watch};

use crate::agent::{wall_now, Agent};
use crate::error::StoreError;
use crate::signing::SigningKey;
use crate::store::DeviceStore;

/// Frames read ahead of the session, per connection.
const INBOX_FRAMES_MAX: usize = 64;
/// How often a running uplink logs its counters.
const PROGRESS_LOG_MS: u64 = 10_000;

/// What the uplink needs besides the agent.
#[derive(Clone, Debug)]
pub struct UplinkOptions {
    /// Gateways to try, in order; the uplink moves to the next when one fails.
    pub gateways: Vec<SocketAddr>,
    /// Fleet CA, device certificate and key, revocation list.
    pub credentials: Credentials,
    /// Session timers and bounds.
    pub session: SessionConfig,
    /// QUIC timers and bounds.
    pub transport: TransportLimits,
    /// Give up a connection attempt after this long.
    pub connect_timeout_ms: u64,
    /// First retry delay after a failure.
    pub backoff_initial_ms: u64,
    /// Longest retry delay.
    pub backoff_max_ms: u64,
}

/// Why the uplink could not run at all (failures of single sessions are retried, not returned).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// No gateway is configured.
    #[error("no gateways configured: add `gateways = [\"HOST:PORT\"]` under [uplink]")]
    NoGateways,
    /// The QUIC endpoint could not be set up (bad credentials, no socket).
    #[error("cannot set up the QUIC endpoint: {0}")]
    Endpoint(#[from] NetError),
    /// The agent stopped.
    #[error("agent: {0}")]
    Store(#[from] StoreError),
}

/// Counters of a running uplink, readable while it runs.
#[derive(Debug, Default)]
pub struct UplinkCounters {
    /// Sessions established.
    pub sessions: AtomicU64,
    /// Connection attempts that failed.
    pub connect_failures: AtomicU64,
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Event frames sent (batches, including resends).
    pub batches_out: AtomicU64,
    /// Highest seq a gateway took custody of.
    pub custody_seq: AtomicU64,
    /// Highest seq the cloud committed.
    pub committed_seq: AtomicU64,
    /// Events not yet acknowledged by the current gateway, as last seen.
    pub backlog_events: AtomicU64,
    /// Stalls and resend loops the session reported.
    pub stalls: AtomicU64,
    /// Batches sent without a seal although a signing key is configured (the ledger did not know
    /// the chain before them).
    pub unsigned_batches: AtomicU64,
}

/// A snapshot of [`UplinkCounters`] for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UplinkSnapshot {
    /// Sessions established.
    pub sessions: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Event batches sent.
    pub batches_out: u64,
    /// Highest custody-acked seq.
    pub custody_seq: u64,
    /// Highest committed seq.
    pub committed_seq: u64,
    /// Unacknowledged events.
    pub backlog_events: u64,
    /// Stalls and resend loops.
    pub stalls: u64,
    /// Batches sent unsealed although a key is configured.
    pub unsigned_batches: u64,
}

impl UplinkCounters {
    /// The counters now.
    pub fn snapshot(&self) -> UplinkSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        UplinkSnapshot {
            sessions: get(&self.sessions),
            connect_failures: get(&self.connect_failures),
            frames_out: get(&self.frames_out),
            frames_in: get(&self.frames_in),
            batches_out: get(&self.batches_out),
            custody_seq: get(&self.custody_seq),
            committed_seq: get(&self.committed_seq),
            backlog_events: get(&self.backlog_events),
            stalls: get(&self.stalls),
            unsigned_batches: get(&self.unsigned_batches),
        }
    }
}

/// Session time: the wall clock at start plus a monotonic elapsed time, so a wall clock that
/// jumps cannot fire or starve the session's timers.
#[derive(Clone, Copy, Debug)]
struct SessionClock {
    wall_at_start: Millis,
    start: Instant,
}

impl SessionClock {
    fn new() -> Self {
        Self { wall_at_start: wall_now(), start: Instant::now() }
    }

    fn now(&self) -> Millis {
        self.wall_at_start.plus_ms(self.start.elapsed().as_millis() as u64)
    }

    fn until(&self, deadline: Millis) -> Duration {
        Duration::from_millis(deadline.0.saturating_sub(self.now().0))
    }
}

/// How a session ended, for the choice of the next gateway.
#[derive(Debug)]
enum SessionEnd {
    /// We are shutting down.
    Shutdown,
    /// The session closed cleanly (goodbye); the same gateway may be tried again.
    Clean,
    /// The gateway or the link failed: try the next gateway.
    Failed,
}

/// Runs the uplink until `shutdown` turns true, sending events unsigned. `rng` draws the backoff
/// jitter. See [`run_with_key`].
pub async fn run(
    agent: Arc<Agent>,
    options: UplinkOptions,
    counters: Arc<UplinkCounters>,
    rng: impl RngCore + Send,
    shutdown: watch::Receiver<bool>,
) -> Result<(), UplinkError> {
    run_with_key(agent, options, None, counters, rng, shutdown).await
}

/// Runs the uplink until `shutdown` turns true; every batch sent is sealed with `signing` (if
/// given). `rng` draws the backoff jitter.
pub async fn run_with_key(
    agent: Arc<Agent>,
    options: UplinkOptions,
    signing: Option<SigningKey>,
    counters: Arc<UplinkCounters>,
    mut rng: impl RngCore + Send,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), UplinkError> {
    if options.gateways.is_empty() {
        return Err(UplinkError::NoGateways);
    }
    let bind: SocketAddr = if options.gateways.iter().all(SocketAddr::is_ipv4) {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let client = Client::bind(bind, &options.credentials, &options.transport)?;
    let device = agent.device();
    match &signing {
        Some(key) => tracing::info!(%device, public_key = %key.public_hex(), "events are signed"),
        None => tracing::warn!(
            %device,
            "no signing key configured (`[uplink] signing_key`): events are sent unsigned, and a verifying cloud refuses them"
        ),
    }
    let mut gateway_index = 0;
    let mut failures_in_a_row: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let addr = options.gateways[gateway_index % options.gateways.len()];
        let end = match connect(&client, addr, &options, &mut shutdown).await {
            Ok(Some(link)) => {
                counters.sessions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%device, gateway = %addr, peer = %link.peer(), "connected");
                let end = session(&agent, link, &options, signing.as_ref(), &counters, &mut shutdown).await;
                tracing::info!(%device, gateway = %addr, ?end, "session ended");
                end
            }
            Ok(None) => SessionEnd::Shutdown,
            Err(error) => {
                counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%device, gateway = %addr, %error, "cannot reach gateway");
                SessionEnd::Failed
            }
        };
        let delay_ms = match end {
            SessionEnd::Shutdown => break,
            SessionEnd::Clean => {
                failures_in_a_row = 0;
                options.backoff_initial_ms
            }
            SessionEnd::Failed => {
                gateway_index += 1;
                failures_in_a_row = failures_in_a_row.saturating_add(1);
                // Full jitter over an exponentially growing window: a fleet that lost its gateway
                // at once does not come back at once.
                let window = options
                    .backoff_initial_ms
                    .saturating_mul(1u64 << failures_in_a_row.min(20))
                    .min(options.backoff_max_ms)
                    .max(1);
                rng.random_range(window / 2..=window)
            }
        };
        tracing::debug!(delay_ms, "next attempt");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
            _ = shutdown.changed() => {}
        }
    }
    client.shutdown(CloseCode::ShuttingDown, 1_000).await;
    Ok(())
}

async fn connect(
    client: &Client,
    addr: SocketAddr,
    options: &UplinkOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Link>, NetError> {
    tokio::select! {
        link = client.connect(addr, GATEWAY_SERVER_NAME, options.connect_timeout_ms) => link.map(Some),
        _ = shutdown.changed() => Ok(None),
    }
}

/// What one turn of the session on the writer thread produced.
struct Turn {
    uplink: Uplink,
    frames: Vec<Frame>,
    deadline: Option<Millis>,
    closed: Option<CloseReason>,
    shadow_edits_seen: u64,
}

/// What one turn of the session on the writer thread starts from.
struct TurnInput {
    uplink: Uplink,
    clock: SessionClock,
    inbox: Vec<Frame>,
    timeout_due: bool,
    gateway: String,
    shadow_edits_seen: u64,
    counters: Arc<UplinkCounters>,
}

/// One turn on the writer thread: feed received frames and a timeout, act on the session's
/// events, and collect what it wants to send.
fn turn(store: &mut DeviceStore, input: TurnInput) -> Turn {
    let TurnInput { mut uplink, clock, inbox, timeout_due, gateway, shadow_edits_seen, counters } = input;
    let gateway = gateway.as_str();
    let counters = counters.as_ref();
    let now = clock.now();
    let device = store.device();
    let unsigned_before = uplink.n_unsigned();
    for frame in inbox {
        if let Err(error) = uplink.handle_frame(now, frame, store) {
            tracing::warn!(%error, "the gateway broke the protocol");
        }
    }
    if timeout_due {
        uplink.handle_timeout(now);
    }
    let shadow_edits = store.local_shadow_edits();
    if shadow_edits != shadow_edits_seen {
        uplink.handle_shadow_changed(device);
    }
    let mut closed = None;
    let mut frames = Vec::new();
    loop {
        while let Some(event) = uplink.poll_event() {
            if let Some(reason) = act(store, event, gateway, counters) {
                closed = Some(reason);
            }
        }
        match uplink.poll_transmit(now, store) {
            Ok(Some(frame)) => {
                if matches!(frame, Frame::Events(_)) {
                    counters.batches_out.fetch_add(1, Ordering::Relaxed);
                }
                frames.push(frame);
            }
            Ok(None) => break,
            Err(error) => {
                tracing::error!(%error, "cannot read the ledger for the session");
                break;
            }
        }
    }
    while let Some(event) = uplink.poll_event() {
        if let Some(reason) = act(store, event, gateway, counters) {
            closed = Some(reason);
        }
    }
    counters.backlog_events.store(uplink.backlog_events(), Ordering::Relaxed);
    counters.unsigned_batches.fetch_add(uplink.n_unsigned() - unsigned_before, Ordering::Relaxed);
    let deadline = uplink.poll_timeout();
    if uplink.is_closed() && closed.is_none() {
        closed = Some(CloseReason::IdleTimeout);
    }
    Turn { uplink, frames, deadline, closed, shadow_edits_seen: shadow_edits }
}

/// Does what a session event asks of the host. Returns the close reason when the session ended.
fn act(store: &mut DeviceStore, event: SessionEvent, gateway: &str, counters: &UplinkCounters) -> Option<CloseReason> {
    match event {
        SessionEvent::Established { protocol, peer_wall } => {
            tracing::info!(protocol, peer_wall = peer_wall.0, "session established");
        }
        SessionEvent::Custody { up_to, .. } => {
            if let Err(error) = store.mark_custody(gateway, up_to) {
                tracing::warn!(%error, "cannot record the custody watermark");
            }
            counters.custody_seq.fetch_max(up_to.0, Ordering::Relaxed);
        }
        SessionEvent::Committed { device, up_to } => {
            // The commit watermark is written before anything is pruned; pruning continues in
            // small steps between group commits.
            if let Err(error) = store.mark_committed(device, up_to) {
                tracing::warn!(%error, "cannot record the commit watermark");
            }
            counters.committed_seq.fetch_max(up_to.0, Ordering::Relaxed);
        }
        SessionEvent::ShadowChanged { .. } => {
            if let Err(error) = store.persist_shadow() {
                tracing::error!(%error, "cannot persist the shadow after a sync");
            }
        }
        SessionEvent::Throttled { reason, retry_after_ms, .. } => {
            tracing::info!(?reason, retry_after_ms, "the gateway asks to wait; events stay in the ledger");
        }
        SessionEvent::Stalled { backlog_events, .. } => {
            counters.stalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backlog_events, "sync stalled: nothing acknowledged");
        }
        SessionEvent::ResendLoop { from, n_resends, .. } => {
            counters.stalls.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(from = from.0, n_resends, "sync resends the same events without progress");
        }
        SessionEvent::Closed(reason) => return Some(reason),
        other => tracing::debug!(?other, "session event"),
    }
    None
}

async fn send_all(sender: &mut FrameSender, frames: &[Frame], counters: &UplinkCounters) -> Result<(), NetError> {
    if frames.is_empty() {
        return Ok(());
    }
    for frame in frames {
        sender.queue(frame)?;
    }
    sender.flush().await?;
    counters.frames_out.fetch_add(frames.len() as u64, Ordering::Relaxed);
    Ok(())
}

async fn session(
    agent: &Arc<Agent>,
    link: Link,
    options: &UplinkOptions,
    signing: Option<&SigningKey>,
    counters: &Arc<UplinkCounters>,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let gateway = match link.peer() {
        Identity::Gateway(gateway) => gateway.to_string(),
        other => {
            tracing::error!(peer = %other, "the server is not a gateway");
            link.close(CloseCode::Unauthorized);
            return SessionEnd::Failed;
        }
    };
    let stream = match link.open_stream(&options.transport).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot open the session stream");
            return SessionEnd::Failed;
        }
    };
    let (mut sender, mut receiver) = stream.split();
    let (inbox_tx, mut inbox) = mpsc::channel::<Result<Option<Frame>, NetError>>(INBOX_FRAMES_MAX);
    let reader = tokio::spawn(async move {
        loop {
            let frame = receiver.recv().await;
            let done = !matches!(frame, Ok(Some(_)));
            if inbox_tx.send(frame).await.is_err() || done {
                break;
            }
        }
    });
    let changed = agent.changed();
    let clock = SessionClock::new();
    let device = agent.device();
    let mut session_uplink = Uplink::for_device(device, options.session.clone(), clock.now());
    if let Some(key) = signing {
        session_uplink = session_uplink.signing(key.signer(device));
    }
    let mut uplink = Some(session_uplink);
    let mut received = Vec::new();
    let mut timeout_due = false;
    let mut shadow_edits_seen = u64::MAX;
    let mut last_progress_log = Instant::now();
    let end = loop {
        let Some(current) = uplink.take() else { break SessionEnd::Failed };
        let input = TurnInput {
            uplink: current,
            clock,
            inbox: std::mem::take(&mut received),
            timeout_due,
            gateway: gateway.clone(),
            shadow_edits_seen,
            counters: Arc::clone(counters),
        };
        let result = run_on_writer(agent, move |store| turn(store, input)).await;
        let turn = match result {
            Ok(turn) => turn,
            Err(error) => {
                tracing::error!(%error, "the agent stopped");
                break SessionEnd::Shutdown;
            }
        };
        timeout_due = false;
        shadow_edits_seen = turn.shadow_edits_seen;
        if let Err(error) = send_all(&mut sender, &turn.frames, counters).await {
            tracing::warn!(%error, "sending to the gateway failed");
            break SessionEnd::Failed;
        }
        if let Some(reason) = turn.closed {
            let _ = sender.finish().await;
            break match reason {
                CloseReason::Goodbye(_) | CloseReason::LocalGoodbye(_) => SessionEnd::Clean,
                _ => SessionEnd::Failed,
            };
        }
        uplink = Some(turn.uplink);
        if last_progress_log.elapsed() >= Duration::from_millis(PROGRESS_LOG_MS) {
            last_progress_log = Instant::now();
            let snapshot = counters.snapshot();
            tracing::info!(
                backlog = snapshot.backlog_events,
                custody = snapshot.custody_seq,
                committed = snapshot.committed_seq,
                batches_out = snapshot.batches_out,
                "uplink progress"
            );
        }
        let sleep = turn.deadline.map(|deadline| clock.until(deadline)).unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            frame = inbox.recv() => match frame {
                Some(Ok(Some(frame))) => {
                    counters.frames_in.fetch_add(1, Ordering::Relaxed);
                    received.push(frame);
                    // Take whatever else already arrived, so one turn handles a burst of acks.
                    while let Ok(Ok(Some(frame))) = inbox.try_recv() {
                        counters.frames_in.fetch_add(1, Ordering::Relaxed);
                        received.push(frame);
                    }
                }
                Some(Ok(None)) | None => {
                    tracing::info!("the gateway ended the session stream");
                    break SessionEnd::Failed;
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "the session stream broke");
                    break SessionEnd::Failed;
                }
            },
            () = tokio::time::sleep(sleep) => timeout_due = true,
            () = changed.notified() => {}
            _ = shutdown.changed() => {
                if let Some(mut current) = uplink.take() {
                    current.close(GoodbyeReason::Shutdown);
                    let result = run_on_writer(agent, move |store| {
                        let mut frames = Vec::new();
                        while let Ok(Some(frame)) = current.poll_transmit(clock.now(), store) {
                            frames.push(frame);
                        }
                        frames
                    })
                    .await;
                    if let Ok(frames) = result {
                        let _ = send_all(&mut sender, &frames, counters).await;
                    }
                    let _ = sender.finish().await;
                }
                break SessionEnd::Shutdown;
            }
        }
    };
    reader.abort();
    link.close(CloseCode::Done);
    end
}

/// Runs `job` on the agent's writer thread without blocking the async runtime.
async fn run_on_writer<R: Send + 'static>(
    agent: &Arc<Agent>,
    job: impl FnOnce(&mut DeviceStore) -> R + Send + 'static,
) -> Result<R, StoreError> {
    let agent = Arc::clone(agent);
    tokio::task::spawn_blocking(move || agent.with_store(job)).await.map_err(|_| StoreError::AgentStopped)?
}
