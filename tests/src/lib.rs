//! tidesync-tests: cross-crate end-to-end tests (real QUIC on loopback, kill -9, TLS).
//!
//! The tests live in `tests/it/`; this library holds what they share: a fleet PKI in a temp
//! directory ([`Fleet`]), a test cloud built from core's `Ingest::for_cloud` over a `MemStore`
//! ([`TestCloud`], until the cloud crate replaces it), a device driven by core's
//! `Uplink::for_device` over a `MemStore` ([`sync_device`]; the device agent's own uplink is
//! tested in `tests/it/roaming.rs`), gateway configs, and [`load`]: many devices against one
//! gateway, and the JSON-over-TCP ingest baseline.

pub mod load;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::net::pki::{self, FleetCa, Identity};
use tidesync_core::net::quic::{Client, CloseCode, Server, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::rate::RateLimit;
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::{Ingest, MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};
use tidesync_core::wire::Frame;

const DAY_MS: u64 = 86_400_000;

/// Wall-clock now as core's `Millis` (the tests are a host: they may read clocks).
pub fn wall_now() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64))
}

/// Session timers short enough for tests.
pub fn test_session_config() -> SessionConfig {
    SessionConfig { retransmit_ms: 1_000, keepalive_ms: 2_000, idle_timeout_ms: 20_000, ..SessionConfig::default() }
}

/// A fleet CA with files in a temp directory.
#[derive(Debug)]
pub struct Fleet {
    /// The CA.
    pub ca: FleetCa,
    /// Where files go.
    pub dir: PathBuf,
    next_serial: u64,
}

impl Fleet {
    /// A new fleet CA writing its files under `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let now = wall_now().0;
        let ca = FleetCa::create("test", Millis(now - DAY_MS), Millis(now + 30 * DAY_MS))?;
        std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
        Ok(Self { ca, dir: dir.to_path_buf(), next_serial: 1 })
    }

    /// Credentials for `identity`, valid now.
    pub fn credentials(&mut self, identity: Identity) -> anyhow::Result<Credentials> {
        let now = wall_now().0;
        Ok(self.credentials_valid(identity, Millis(now - DAY_MS), Millis(now + DAY_MS))?.0)
    }

    /// Writes a gateway.toml for `gateway` (with its certificate files) into the fleet's
    /// directory and returns its path.
    pub fn gateway_config(&mut self, gateway: GatewayId, settings: &GatewaySettings) -> anyhow::Result<PathBuf> {
        let dir = self.dir.clone();
        self.gateway_config_in(&dir, gateway, settings)
    }

    /// Writes a gateway.toml for `gateway` with its certificate files and spool into `dir` (one
    /// directory per gateway when a test runs several) and returns its path.
    pub fn gateway_config_in(
        &mut self,
        dir: &Path,
        gateway: GatewayId,
        settings: &GatewaySettings,
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let credentials = self.credentials(Identity::Gateway(gateway))?;
        std::fs::write(dir.join("ca.pem"), self.ca.cert_pem())?;
        std::fs::write(dir.join("gateway.pem"), &credentials.cert_pem)?;
        std::fs::write(dir.join("gateway.key"), &credentials.key_pem)?;
        let upstream = match settings.upstream {
            Some(addr) => format!("[upstream]\naddr = \"{addr}\"\nreconnect_ms = 100\n"),
            None => String::new(),
        };
        let metrics = match settings.metrics_listen {
            Some(addr) => format!("metrics_listen = \"{addr}\"\n"),
            None => String::new(),
        };
        let crl = match &settings.crl_pem {
            Some(crl_pem) => {
                std::fs::write(dir.join("crl.pem"), crl_pem)?;
                "crl = \"crl.pem\"\n"
            }
            None => "",
        };
        let text = format!(
            "gateway = \"{gateway}\"\nlisten = \"{listen}\"\n{metrics}spool = \"spool.db\"\nspool_budget_bytes = {budget}\n\
             [tls]\nca = \"ca.pem\"\ncert = \"gateway.pem\"\nkey = \"gateway.key\"\n{crl}\
             [limits]\nretransmit_ms = 1000\nfull_retry_after_ms = 200\n\
             device_events_per_s = {rate}\ndevice_burst_events = {burst}\n{upstream}",
            listen = settings.listen,
            budget = settings.spool_budget_bytes,
            rate = settings.device_rate.events_per_s,
            burst = settings.device_rate.burst_events,
        );
        let path = dir.join("gateway.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// A revocation list of the fleet CA naming `revoked_serials`, valid for a day.
    pub fn revocation_list(&self, revoked_serials: &[u64]) -> anyhow::Result<String> {
        let now = wall_now().0;
        Ok(self.ca.revocation_list(1, revoked_serials, Millis(now - 60_000), Millis(now + DAY_MS))?)
    }

    /// Credentials for `identity` valid from `not_before` to `not_after` (wall ms), with their
    /// serial number: for expired and not-yet-valid certificates.
    pub fn credentials_valid(
        &mut self,
        identity: Identity,
        not_before: Millis,
        not_after: Millis,
    ) -> anyhow::Result<(Credentials, u64)> {
        let serial = self.next_serial;
        self.next_serial += 1;
        let issued = self.ca.issue(identity, serial, not_before, not_after)?;
        let credentials = Credentials {
            ca_pem: self.ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            crl_pem: None,
        };
        Ok((credentials, serial))
    }
}

/// What a test gateway is configured with.
#[derive(Clone, Debug)]
pub struct GatewaySettings {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// The cloud.
    pub upstream: Option<SocketAddr>,
    /// Spool budget.
    pub spool_budget_bytes: u64,
    /// The fleet revocation list the gateway loads (none: no list).
    pub crl_pem: Option<String>,
    /// Each device's rate limit at the gateway. Tests of the data path send thousands of events
    /// in seconds, so they run without one (`RateLimit::UNLIMITED`, written out as
    /// `device_events_per_s = 0`); the rate-limit tests set theirs.
    pub device_rate: RateLimit,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: loopback_any(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            upstream: None,
            spool_budget_bytes: 1 << 30,
            crl_pem: None,
            device_rate: RateLimit::UNLIMITED,
        }
    }
}

/// `127.0.0.1:0`.
pub fn loopback_any() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A loopback UDP port free right now (for a server started later at a known address).
pub fn free_udp_port() -> anyhow::Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind(loopback_any())?;
    Ok(socket.local_addr()?)
}

/// A loopback TCP port free right now.
pub fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(loopback_any())?;
    Ok(listener.local_addr()?)
}

/// What the test cloud holds and counts.
#[derive(Debug)]
pub struct CloudState {
    /// Everything committed (a non-pruning ledger, every shadow).
    pub store: MemStore,
    /// Per device, how many new events were stored (the effects).
    pub n_new: BTreeMap<DeviceId, u64>,
    /// Events received in batches, duplicates included.
    pub n_received: u64,
    /// Batches refused because their proof did not verify (a verifying cloud only).
    pub violations: Vec<(DeviceId, Option<GatewayId>, tidesync_core::auth::Violation)>,
}

/// A cloud peer for tests: core's `Ingest::for_cloud` over a `MemStore`, acknowledging commit as
/// soon as events are in memory.
#[derive(Debug)]
pub struct TestCloud {
    /// Shared state.
    pub state: Arc<Mutex<CloudState>>,
    server: Arc<Server>,
    addr: SocketAddr,
}

/// The device keys a test cloud verifies batches with (none: it takes them unverified).
type Keys = Option<Arc<tidesync_core::auth::DeviceKeys>>;

impl TestCloud {
    /// Starts a cloud at `addr` with fresh state.
    pub fn start(fleet: &mut Fleet, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(fleet, addr, Self::fresh_state())
    }

    /// Starts a cloud at `addr` with fresh state that verifies every batch against `keys`
    /// (core's `Ingest::verifying`): batches that fail are refused and recorded in
    /// [`CloudState::violations`], and the gateway is told to hold them.
    pub fn start_verifying(
        fleet: &mut Fleet,
        addr: SocketAddr,
        keys: Arc<tidesync_core::auth::DeviceKeys>,
    ) -> anyhow::Result<Self> {
        Self::start_inner(fleet, addr, Self::fresh_state(), Some(keys))
    }

    fn fresh_state() -> Arc<Mutex<CloudState>> {
        let store = MemStore::new("cloud", MemLedger::new(), ShadowKeeping::All, ShadowLimits::default());
        Arc::new(Mutex::new(CloudState { store, n_new: BTreeMap::new(), n_received: 0, violations: Vec::new() }))
    }

    /// Starts a cloud at `addr` over existing state (a cloud that comes back).
    pub fn start_with(fleet: &mut Fleet, addr: SocketAddr, state: Arc<Mutex<CloudState>>) -> anyhow::Result<Self> {
        Self::start_inner(fleet, addr, state, None)
    }

    fn start_inner(
        fleet: &mut Fleet,
        addr: SocketAddr,
        state: Arc<Mutex<CloudState>>,
        keys: Keys,
    ) -> anyhow::Result<Self> {
        let credentials = fleet.credentials(Identity::Cloud)?;
        let server = Arc::new(Server::bind(addr, &credentials, TransportLimits::default())?);
        let addr = server.local_addr()?;
        let accepting = Arc::clone(&server);
        let serving = Arc::clone(&state);
        tokio::spawn(async move {
            while let Some(pending) = accepting.accept().await {
                tokio::spawn(serve_gateway(pending, Arc::clone(&serving), keys.clone()));
            }
        });
        Ok(Self { state, server, addr })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops it (connections are closed; the state stays readable).
    pub fn stop(&self) {
        self.server.close(CloseCode::ShuttingDown);
    }

    /// Events stored for `device`.
    pub fn n_events(&self, device: &DeviceId) -> usize {
        self.lock().store.ledger.events(device).count()
    }

    /// The state, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, CloudState> {
        // A test thread that panicked while holding the lock has failed already.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn serve_gateway(pending: tidesync_core::net::quic::Pending, state: Arc<Mutex<CloudState>>, keys: Keys) {
    let Ok(link) = pending.establish().await else { return };
    let Identity::Gateway(gateway) = link.peer() else { return };
    let Ok(stream) = link.accept_stream(&TransportLimits::default()).await else { return };
    let (mut sender, mut receiver) = stream.split();
    let mut ingest = Ingest::for_cloud(gateway, test_session_config(), wall_now());
    if let Some(keys) = keys {
        ingest = ingest.verifying(keys);
    }
    loop {
        let wait =
            ingest.poll_timeout().map_or(Duration::from_secs(1), |at| Duration::from_millis(at.since(wall_now())));
        let received = tokio::select! {
            frame = receiver.recv() => Some(frame),
            () = tokio::time::sleep(wait) => None,
        };
        let now = wall_now();
        {
            let mut guard = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let cloud = &mut *guard;
            match received {
                Some(Ok(Some(frame))) => {
                    let _ = ingest.handle_frame(now, frame, &mut cloud.store);
                }
                Some(_) => return,
                None => ingest.handle_timeout(now),
            }
            while let Some(event) = ingest.poll_event() {
                match event {
                    SessionEvent::EventsReceived(batch) => {
                        cloud.n_received += batch.events.len() as u64;
                        let Ok(appended) = cloud.store.append(&batch) else { continue };
                        *cloud.n_new.entry(batch.device).or_default() += appended.n_new as u64;
                        ingest.handle_durable(now, batch.device, appended.high);
                    }
                    SessionEvent::Violation { device, gateway, violation } => {
                        cloud.violations.push((device, gateway, violation));
                    }
                    _ => {}
                }
            }
            while let Some(frame) = ingest.poll_transmit(now, &mut cloud.store) {
                if sender.queue(&frame).is_err() {
                    return;
                }
            }
        }
        if sender.flush().await.is_err() {
            return;
        }
        if ingest.is_closed() {
            let _ = sender.finish().await;
            link.close(CloseCode::Done);
            return;
        }
    }
}

/// A device's in-memory store holding `n_events` readings.
pub fn device_store(device: DeviceId, n_events: u64) -> anyhow::Result<MemStore> {
    let replica = format!("device:{device}");
    let mut store = MemStore::new(&replica, MemLedger::pruning(), ShadowKeeping::Only(device), ShadowLimits::default());
    for index in 0..n_events {
        let payload =
            Payload::Reading(SensorReading { sensor: "temp".into(), value: index as f64 / 2.0, unit: "Cel".into() });
        store.ledger.record(device, Millis(1_000 + index), Millis(1_000 + index), payload)?;
    }
    Ok(store)
}

/// What a device session saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceProgress {
    /// Highest custody ack.
    pub custody: Seq,
    /// Highest commit ack.
    pub committed: Seq,
    /// Backpressure frames received.
    pub n_throttled: u64,
    /// Whether the session ended with an error from the gateway.
    pub error: Option<String>,
}

/// How a test device's sessions are made: core's `Uplink::for_device` with `config`, sealing its
/// batches when it has a signing key (the seed of its Ed25519 key).
#[derive(Clone, Debug)]
pub struct DeviceSession {
    /// Session settings.
    pub config: SessionConfig,
    /// The device's signing key seed (none: the device sends unsigned).
    pub signing_seed: Option<[u8; 32]>,
}

impl Default for DeviceSession {
    fn default() -> Self {
        Self { config: test_session_config(), signing_seed: None }
    }
}

impl DeviceSession {
    fn uplink(&self, device: DeviceId) -> Uplink {
        let uplink = Uplink::for_device(device, self.config.clone(), wall_now());
        match self.signing_seed {
            Some(seed) => uplink.signing(tidesync_core::auth::DeviceSigner::from_seed(device, seed)),
            None => uplink,
        }
    }
}

/// Runs one device session against the gateway at `addr` until `done` holds, the session ends
/// (an error, or the connection dropped: returned as is), or `timeout` passes (an error).
pub async fn sync_device(
    store: &mut MemStore,
    device: DeviceId,
    client: &Client,
    addr: SocketAddr,
    progress: &mut DeviceProgress,
    done: impl Fn(&MemStore, &DeviceProgress) -> bool,
    timeout: Duration,
) -> anyhow::Result<bool> {
    sync_device_with(&DeviceSession::default(), store, device, client, addr, progress, done, timeout).await
}

/// [`sync_device`] with the session made as `session` says.
#[allow(clippy::too_many_arguments)]
pub async fn sync_device_with(
    session: &DeviceSession,
    store: &mut MemStore,
    device: DeviceId,
    client: &Client,
    addr: SocketAddr,
    progress: &mut DeviceProgress,
    done: impl Fn(&MemStore, &DeviceProgress) -> bool,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    let link = client.connect(addr, pki::GATEWAY_SERVER_NAME, 5_000).await?;
    let stream = link.open_stream(&TransportLimits::default()).await?;
    let (mut sender, mut receiver) = stream.split();
    let mut uplink = session.uplink(device);
    loop {
        let now = wall_now();
        while let Some(frame) = uplink.poll_transmit(now, store)? {
            sender.queue(&frame)?;
        }
        if sender.flush().await.is_err() {
            return Ok(false);
        }
        while let Some(event) = uplink.poll_event() {
            match event {
                SessionEvent::Custody { up_to, .. } => progress.custody = progress.custody.max(up_to),
                SessionEvent::Committed { up_to, .. } => {
                    store.mark_committed(device, up_to)?;
                    progress.committed = progress.committed.max(up_to);
                }
                SessionEvent::Throttled { .. } => progress.n_throttled += 1,
                SessionEvent::Closed(reason) => {
                    progress.error = Some(format!("{reason:?}"));
                    return Ok(false);
                }
                _ => {}
            }
        }
        if done(store, progress) {
            uplink.close(tidesync_core::wire::GoodbyeReason::Idle);
            while let Some(frame) = uplink.poll_transmit(now, store)? {
                sender.queue(&frame)?;
            }
            let _ = sender.finish().await;
            link.close(CloseCode::Done);
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("device {device} did not finish in {timeout:?}: {progress:?}, backlog {}", uplink.backlog_events());
        }
        let wait =
            uplink.poll_timeout().map_or(Duration::from_millis(500), |at| Duration::from_millis(at.since(wall_now())));
        tokio::select! {
            frame = receiver.recv() => match frame {
                Ok(Some(frame)) => {
                    if let Frame::Error(error) = &frame {
                        progress.error = Some(error.message.clone());
                    }
                    let _ = uplink.handle_frame(wall_now(), frame, store);
                }
                Ok(None) | Err(_) => return Ok(false),
            },
            () = tokio::time::sleep(wait.min(Duration::from_millis(500))) => uplink.handle_timeout(wall_now()),
        }
    }
}

/// Runs device sessions, reconnecting after each drop, until `done` holds or `timeout` passes.
pub async fn sync_device_until(
    store: &mut MemStore,
    device: DeviceId,
    client: &Client,
    addr: SocketAddr,
    progress: &mut DeviceProgress,
    done: impl Fn(&MemStore, &DeviceProgress) -> bool + Copy,
    timeout: Duration,
) -> anyhow::Result<()> {
    sync_device_until_with(&DeviceSession::default(), store, device, client, addr, progress, done, timeout).await
}

/// [`sync_device_until`] with the sessions made as `session` says.
#[allow(clippy::too_many_arguments)]
pub async fn sync_device_until_with(
    session: &DeviceSession,
    store: &mut MemStore,
    device: DeviceId,
    client: &Client,
    addr: SocketAddr,
    progress: &mut DeviceProgress,
    done: impl Fn(&MemStore, &DeviceProgress) -> bool + Copy,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("device {device} did not finish in {timeout:?}: {progress:?}");
        }
        match sync_device_with(session, store, device, client, addr, progress, done, left).await {
            Ok(true) => return Ok(()),
            Ok(false) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until `condition` holds, checking every 20 ms, for at most `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A device's client endpoint.
pub fn device_client(fleet: &mut Fleet, device: DeviceId) -> anyhow::Result<Client> {
    let credentials = fleet.credentials(Identity::Device(device))?;
    Client::bind(loopback_any(), &credentials, &TransportLimits::default()).context("device client")
}
