//! Many devices against one gateway on loopback: the load test, the `tidesync-load` binary and
//! the ingest benchmark share this driver.
//!
//! Every device has its own identity (a certificate from one fleet CA), its own QUIC endpoint and
//! a core `Uplink::for_device` over a `MemStore` holding its events. All devices connect first
//! (QUIC, mutual TLS, `Hello`/`Welcome`); once every one is connected (or has failed) they start
//! sending together, so the figures are those of N devices connected at once. Throughput is
//! counted from that start to the last custody ack: events per second from custody request to
//! custody ack, the gateway's group commits included. Bytes per event are counted after the
//! handshake; the handshake's bytes are reported per connection. [`json`] is the baseline: the
//! same events as JSON over plain TCP into the same spool.

pub mod json;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tidesync_core::event::{DeviceId, Seq};
use tidesync_core::net::pki::{self, Identity};
use tidesync_core::net::quic::{Client, CloseCode, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::sync::{MemStore, SessionConfig, SessionEvent, Uplink};
use tidesync_core::wire::{Frame, GoodbyeReason};
use tokio::sync::{Barrier, Semaphore};

use crate::{device_store, wall_now, Fleet};

/// Handshakes run at once while devices connect (the rest wait their turn).
const CONNECTS_IN_FLIGHT_MAX: usize = 64;
/// Error messages kept in a report.
const ERRORS_KEPT_MAX: usize = 8;
/// The per-device rate limit of the gateway a load run starts: none, so that the run measures
/// the gateway's throughput rather than the limit.
pub const LOAD_DEVICE_RATE: tidesync_core::rate::RateLimit = tidesync_core::rate::RateLimit::UNLIMITED;

/// What a load run does.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Devices, each with its own identity and connection.
    pub n_devices: usize,
    /// Events each device sends.
    pub n_events_per_device: u64,
    /// The devices' session settings (batch size, batches in flight).
    pub session: SessionConfig,
    /// Also wait until the cloud has committed every event (the gateway needs an upstream).
    pub until_committed: bool,
    /// The whole run, connecting included, ends after this.
    pub timeout: Duration,
}

/// One device's identity, issued ahead of the run so key generation is not measured.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    /// The device.
    pub device: DeviceId,
    /// Its certificate and key.
    pub credentials: Credentials,
}

/// Issues `n_devices` device identities (`load-0`, `load-1`, …) from `fleet`.
pub fn issue_devices(fleet: &mut Fleet, n_devices: usize) -> anyhow::Result<Vec<DeviceIdentity>> {
    (0..n_devices)
        .map(|index| {
            let device = DeviceId::new(&format!("load-{index}")).context("device name")?;
            let credentials = fleet.credentials(Identity::Device(device))?;
            Ok(DeviceIdentity { device, credentials })
        })
        .collect()
}

/// What a load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Devices started.
    pub n_devices: usize,
    /// Devices whose session was established (QUIC, TLS and Welcome).
    pub n_connected: usize,
    /// Events the devices held at the start.
    pub n_events: u64,
    /// Events acknowledged with custody (sum of the devices' custody watermarks).
    pub n_custody: u64,
    /// Events acknowledged with commit.
    pub n_committed: u64,
    /// Devices that failed (connect, session error, timeout).
    pub n_errors: usize,
    /// The first few error messages.
    pub errors: Vec<String>,
    /// From the start signal to the last custody ack.
    pub custody_elapsed: Duration,
    /// Time to connect every device.
    pub connect_elapsed: Duration,
    /// Stream bytes device → gateway after the handshake (frames as encoded).
    pub frame_bytes_up: u64,
    /// Stream bytes gateway → device.
    pub frame_bytes_down: u64,
    /// UDP payload bytes in both directions after the sessions were established (QUIC headers,
    /// encryption, acks, keep-alives included).
    pub udp_bytes: u64,
    /// UDP payload bytes of the connections' handshakes (QUIC, TLS with both certificates, and
    /// the session's Hello and Welcome), both directions.
    pub udp_handshake_bytes: u64,
    /// Backpressure frames the devices received.
    pub n_throttled: u64,
}

impl LoadReport {
    /// Events per second from custody request to custody ack.
    pub fn events_per_s(&self) -> f64 {
        self.n_custody as f64 / self.custody_elapsed.as_secs_f64().max(1e-9)
    }

    /// Frame bytes in both directions per event taken into custody.
    pub fn frame_bytes_per_event(&self) -> f64 {
        (self.frame_bytes_up + self.frame_bytes_down) as f64 / self.n_custody.max(1) as f64
    }

    /// UDP bytes in both directions per event taken into custody.
    pub fn udp_bytes_per_event(&self) -> f64 {
        self.udp_bytes as f64 / self.n_custody.max(1) as f64
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "devices {} connected {} (in {:.2} s), events {} custody {} committed {}, {:.0} events/s, \
             {:.2} frame B/event, {:.2} UDP B/event, {:.0} UDP B/handshake, throttled {}, errors {}",
            self.n_devices,
            self.n_connected,
            self.connect_elapsed.as_secs_f64(),
            self.n_events,
            self.n_custody,
            self.n_committed,
            self.events_per_s(),
            self.frame_bytes_per_event(),
            self.udp_bytes_per_event(),
            self.udp_handshake_bytes as f64 / self.n_connected.max(1) as f64,
            self.n_throttled,
            self.n_errors,
        )?;
        for error in &self.errors {
            write!(f, "\n  error: {error}")?;
        }
        Ok(())
    }
}

/// What one device did.
#[derive(Debug, Default)]
struct DeviceOutcome {
    connected: bool,
    custody: Seq,
    committed: Seq,
    frame_bytes_up: u64,
    frame_bytes_down: u64,
    udp_bytes: u64,
    udp_handshake_bytes: u64,
    n_throttled: u64,
    last_custody_at: Option<Instant>,
    error: Option<String>,
}

/// Runs `devices` against the gateway at `gateway`, each sending `options.n_events_per_device`.
pub async fn run(gateway: SocketAddr, devices: Vec<DeviceIdentity>, options: &LoadOptions) -> LoadReport {
    let n_devices = devices.len();
    let connected = Arc::new(Barrier::new(n_devices + 1));
    let connects = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT_MAX));
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
    let deadline = Instant::now() + options.timeout;
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(n_devices);
    for identity in devices {
        let store = match device_store(identity.device, options.n_events_per_device) {
            Ok(store) => store,
            Err(error) => {
                let outcome =
                    DeviceOutcome { error: Some(format!("{}: {error:#}", identity.device)), ..Default::default() };
                let barrier = Arc::clone(&connected);
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    outcome
                }));
                continue;
            }
        };
        let barrier = Arc::clone(&connected);
        let connects = Arc::clone(&connects);
        let start = start_rx.clone();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            run_device(gateway, identity, store, &options, barrier, connects, start, deadline).await
        }));
    }
    connected.wait().await;
    let connect_elapsed = connect_started.elapsed();
    let started = Instant::now();
    let _ = start_tx.send(Some(started));

    let mut report = LoadReport {
        n_devices,
        n_events: n_devices as u64 * options.n_events_per_device,
        connect_elapsed,
        ..LoadReport::default()
    };
    let mut last_custody_at = started;
    for task in tasks {
        let outcome = match task.await {
            Ok(outcome) => outcome,
            Err(error) => DeviceOutcome { error: Some(format!("device task: {error}")), ..Default::default() },
        };
        report.n_connected += usize::from(outcome.connected);
        report.n_custody += outcome.custody.0;
        report.n_committed += outcome.committed.0;
        report.frame_bytes_up += outcome.frame_bytes_up;
        report.frame_bytes_down += outcome.frame_bytes_down;
        report.udp_bytes += outcome.udp_bytes;
        report.udp_handshake_bytes += outcome.udp_handshake_bytes;
        report.n_throttled += outcome.n_throttled;
        if let Some(at) = outcome.last_custody_at {
            last_custody_at = last_custody_at.max(at);
        }
        if let Some(error) = outcome.error {
            report.n_errors += 1;
            if report.errors.len() < ERRORS_KEPT_MAX {
                report.errors.push(error);
            }
        }
    }
    report.custody_elapsed = last_custody_at.saturating_duration_since(started);
    report
}

#[allow(clippy::too_many_arguments)]
async fn run_device(
    gateway: SocketAddr,
    identity: DeviceIdentity,
    mut store: MemStore,
    options: &LoadOptions,
    connected: Arc<Barrier>,
    connects: Arc<Semaphore>,
    mut start: tokio::sync::watch::Receiver<Option<Instant>>,
    deadline: Instant,
) -> DeviceOutcome {
    let mut outcome = DeviceOutcome::default();
    let device = identity.device;
    let limits = TransportLimits::default();
    // Connect and say hello before the start, so the gateway holds every session at once; the
    // session's events wait for the start (the gateway closes a connection whose stream stays
    // silent, so the handshake cannot wait).
    let setup = async {
        let _permit = connects.acquire().await.context("connect permits")?;
        let client = Client::bind(crate::loopback_any(), &identity.credentials, &limits).context("bind")?;
        let left_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        let link = client.connect(gateway, pki::GATEWAY_SERVER_NAME, left_ms.max(1)).await.context("connect")?;
        let (mut sender, mut receiver) = link.open_stream(&limits).await.context("open stream")?.split();
        let mut uplink = Uplink::for_device(device, options.session.clone(), wall_now());
        while let Some(frame) = uplink.poll_transmit(wall_now(), &mut store)? {
            sender.queue(&frame)?;
        }
        sender.flush().await?;
        let welcome = receiver.recv().await.context("welcome")?.context("the gateway ended the stream")?;
        uplink.handle_frame(wall_now(), welcome, &mut store)?;
        anyhow::ensure!(
            matches!(uplink.poll_event(), Some(SessionEvent::Established { .. })),
            "no session after the handshake"
        );
        anyhow::Ok((client, link, sender, receiver, uplink))
    };
    let setup = setup.await;
    // Everyone waits here, connected or failed, so that sending starts together.
    connected.wait().await;
    let (client, link, mut sender, mut receiver, mut uplink) = match setup {
        Ok(parts) => parts,
        Err(error) => {
            outcome.error = Some(format!("{device}: {error:#}"));
            return outcome;
        }
    };
    outcome.connected = true;
    // What the handshake cost is counted apart: the figures per event are for the sending.
    let handshake = link.connection().stats();
    outcome.udp_handshake_bytes = handshake.udp_tx.bytes + handshake.udp_rx.bytes;
    let (frames_up_before, frames_down_before) = (sender.n_bytes(), receiver.n_bytes());
    if start.wait_for(Option::is_some).await.is_err() {
        outcome.error = Some(format!("{device}: no start signal"));
        return outcome;
    }
    let n_events = Seq(options.n_events_per_device);
    let result: anyhow::Result<()> = async {
        loop {
            let now = wall_now();
            while let Some(frame) = uplink.poll_transmit(now, &mut store)? {
                sender.queue(&frame)?;
            }
            sender.flush().await?;
            while let Some(event) = uplink.poll_event() {
                match event {
                    SessionEvent::Custody { up_to, .. } if up_to > outcome.custody => {
                        outcome.custody = up_to;
                        outcome.last_custody_at = Some(Instant::now());
                    }
                    SessionEvent::Committed { up_to, .. } => {
                        outcome.committed = outcome.committed.max(up_to);
                        tidesync_core::ledger::Ledger::mark_committed(&mut store, device, up_to)?;
                    }
                    SessionEvent::Throttled { .. } => outcome.n_throttled += 1,
                    SessionEvent::Closed(reason) => anyhow::bail!("session closed: {reason:?}"),
                    _ => {}
                }
            }
            let done = outcome.custody == n_events && (!options.until_committed || outcome.committed == n_events);
            if done {
                uplink.close(GoodbyeReason::Idle);
                while let Some(frame) = uplink.poll_transmit(now, &mut store)? {
                    sender.queue(&frame)?;
                }
                let _ = sender.finish().await;
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("timed out: custody {} committed {}", outcome.custody, outcome.committed);
            }
            let wait = uplink
                .poll_timeout()
                .map_or(Duration::from_millis(500), |at| Duration::from_millis(at.since(wall_now())))
                .min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                frame = receiver.recv() => match frame? {
                    Some(frame) => {
                        if let Frame::Error(error) = &frame {
                            anyhow::bail!("error frame: {:?} {}", error.code, error.message);
                        }
                        uplink.handle_frame(wall_now(), frame, &mut store)?;
                    }
                    None => anyhow::bail!("the gateway ended the stream"),
                },
                () = tokio::time::sleep(wait) => uplink.handle_timeout(wall_now()),
            }
        }
    }
    .await;
    if let Err(error) = result {
        outcome.error = Some(format!("{device}: {error:#}"));
    }
    outcome.frame_bytes_up = sender.n_bytes() - frames_up_before;
    outcome.frame_bytes_down = receiver.n_bytes() - frames_down_before;
    let stats = link.connection().stats();
    outcome.udp_bytes = (stats.udp_tx.bytes + stats.udp_rx.bytes).saturating_sub(outcome.udp_handshake_bytes);
    link.close(CloseCode::Done);
    client.shutdown(CloseCode::Done, 200).await;
    outcome
}

/// A load run against a gateway started in this process, and what the gateway saw.
#[derive(Debug)]
pub struct GatewayRun {
    /// What the devices measured.
    pub report: LoadReport,
    /// Most devices the gateway had connected at once.
    pub peak_connected: u64,
    /// Events the gateway took into custody (its counter).
    pub events_in_total: u64,
    /// Group commits of its spool during the run.
    pub group_commits: u64,
    /// How long issuing the device certificates took.
    pub issue_elapsed: Duration,
    /// The cloud, when the run had one.
    pub cloud: Option<crate::TestCloud>,
}

/// Starts a gateway with its spool under `dir` (forwarding to a test cloud when
/// `options.until_committed`), issues one identity per device, runs the load and stops the gateway.
pub async fn run_with_gateway(dir: &std::path::Path, options: &LoadOptions) -> anyhow::Result<GatewayRun> {
    use std::sync::atomic::Ordering;
    use tidesync_gateway::metrics::Metrics;

    let mut fleet = Fleet::new(dir)?;
    let cloud = match options.until_committed {
        true => Some(crate::TestCloud::start(&mut fleet, crate::loopback_any())?),
        false => None,
    };
    let settings = crate::GatewaySettings {
        upstream: cloud.as_ref().map(crate::TestCloud::addr),
        metrics_listen: None,
        // The run measures the ingest ceiling: no per-device rate limit (the production default,
        // 100 events/s per device, would make it measure the limit instead).
        device_rate: LOAD_DEVICE_RATE,
        ..crate::GatewaySettings::default()
    };
    let gateway = tidesync_core::event::GatewayId::new("load-gw").context("gateway name")?;
    let config = tidesync_gateway::Config::load(&fleet.gateway_config(gateway, &settings)?)?;
    let running = tidesync_gateway::start(config).await?;
    let issue_started = Instant::now();
    let devices = issue_devices(&mut fleet, options.n_devices)?;
    let issue_elapsed = issue_started.elapsed();

    let metrics = Arc::clone(running.metrics());
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let metrics = Arc::clone(&metrics);
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(Metrics::get(&metrics.connected_devices), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let commits_before = Metrics::get(&metrics.group_commits_total);
    let report = run(running.quic_addr(), devices, options).await;
    sampler.abort();
    let group_commits = Metrics::get(&metrics.group_commits_total) - commits_before;
    let events_in_total = Metrics::get(&metrics.events_in_total);
    running.shutdown().await?;
    Ok(GatewayRun {
        report,
        peak_connected: peak.load(Ordering::Relaxed),
        events_in_total,
        group_commits,
        issue_elapsed,
        cloud,
    })
}
