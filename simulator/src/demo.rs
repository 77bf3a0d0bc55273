//! `tidesync-sim demo`: the whole system as real components in one process, over real QUIC on
//! 127.0.0.1 and real SQLite files in a temporary directory.
//!
//! A fleet CA, a cloud (SQLite store), two gateways and a few dozen device agents start; devices
//! record readings and report state; then gateway A and a quarter of the devices go offline
//! while the others keep recording, and desired state is edited in the cloud for every device
//! (offline ones included); then everything comes back. The demo waits until every event is in
//! the cloud exactly once, every device has pruned its ledger and every device shows the desired
//! state the cloud set, and prints a summary. Unlike `run`, nothing here is simulated: this is
//! the code that ships, so timings are wall-clock and vary from run to run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand_core::SeedableRng;
use tidesync_cloud::store::Backend;
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::net::pki::{FleetCa, Identity};
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::net::tls::Credentials;
use tidesync_core::shadow::Section;
use tidesync_core::sync::SessionConfig;
use tidesync_core::value::Value;
use tidesync_device::agent::wall_now;
use tidesync_device::uplink::{self, UplinkCounters, UplinkOptions};
use tidesync_device::{Agent, DeviceStore, LedgerConfig};
use tokio::sync::watch;

/// What the demo is asked to do.
#[derive(Clone, Debug)]
pub(crate) struct DemoOptions {
    /// Devices in the fleet.
    pub(crate) devices: usize,
    /// Seconds of recording in each phase.
    pub(crate) phase_secs: u64,
    /// Readings per second per device.
    pub(crate) rate_hz: u64,
    /// Keep the data here instead of a temporary directory.
    pub(crate) data_dir: Option<PathBuf>,
    /// Port of the cloud's HTTP API (0: any free port).
    pub(crate) http_port: u16,
    /// Stop after the summary instead of serving until Ctrl-C.
    pub(crate) exit: bool,
}

/// What the demo found.
#[derive(Clone, Debug, Default)]
pub(crate) struct DemoSummary {
    /// Devices that ran.
    pub(crate) devices: usize,
    /// Events recorded by all devices.
    pub(crate) events_recorded: u64,
    /// Events in the cloud store.
    pub(crate) events_in_cloud: u64,
    /// Devices whose events are all in the cloud exactly once, in seq order.
    pub(crate) devices_exact: usize,
    /// Devices whose desired state equals the cloud's.
    pub(crate) devices_converged: usize,
    /// Devices whose ledger is empty (pruned after commit).
    pub(crate) devices_pruned: usize,
    /// From the end of the last phase until everything converged.
    pub(crate) converge_ms: u64,
    /// Sessions opened by all devices (reconnects and roaming included).
    pub(crate) device_sessions: u64,
    /// Where the data is.
    pub(crate) data_dir: PathBuf,
    /// The cloud's HTTP API.
    pub(crate) http: String,
}

impl DemoSummary {
    /// Whether every device converged with every event in the cloud exactly once.
    pub(crate) fn passed(&self) -> bool {
        self.devices > 0
            && self.devices_exact == self.devices
            && self.devices_converged == self.devices
            && self.devices_pruned == self.devices
            && self.events_in_cloud == self.events_recorded
    }
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "demo summary")?;
        writeln!(f, "  devices:                         {}", self.devices)?;
        writeln!(f, "  events recorded:                 {}", self.events_recorded)?;
        writeln!(f, "  events in the cloud store:       {}", self.events_in_cloud)?;
        writeln!(f, "  devices with every event once:   {} of {}", self.devices_exact, self.devices)?;
        writeln!(f, "  devices pruned after commit:     {} of {}", self.devices_pruned, self.devices)?;
        writeln!(f, "  devices with the cloud's desired: {} of {}", self.devices_converged, self.devices)?;
        writeln!(f, "  device sessions (incl. roaming): {}", self.device_sessions)?;
        writeln!(f, "  converged after healing in:      {} ms", self.converge_ms)?;
        writeln!(f, "  data (SQLite files, PKI):        {}", self.data_dir.display())?;
        write!(f, "  result:                          {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// The fleet's certificates, written as PEM files for the daemons' configs.
struct Pki {
    ca: FleetCa,
    dir: PathBuf,
    serial: u64,
}

impl Pki {
    fn new(dir: &Path) -> Result<Self> {
        let now = wall_now();
        let ca = FleetCa::create("demo-fleet", Millis(now.0.saturating_sub(3_600_000)), now.plus_ms(86_400_000))?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), ca.cert_pem())?;
        Ok(Self { ca, dir: dir.to_path_buf(), serial: 1 })
    }

    fn credentials(&mut self, identity: Identity) -> Result<Credentials> {
        self.serial += 1;
        let now = wall_now();
        let issued =
            self.ca.issue(identity, self.serial, Millis(now.0.saturating_sub(3_600_000)), now.plus_ms(86_400_000))?;
        Ok(Credentials {
            ca_pem: self.ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            crl_pem: None,
        })
    }

    /// Issues a certificate and writes `NAME.pem` and `NAME.key`.
    fn files(&mut self, identity: Identity, name: &str) -> Result<(PathBuf, PathBuf)> {
        let credentials = self.credentials(identity)?;
        let cert = self.dir.join(format!("{name}.pem"));
        let key = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert, credentials.cert_pem)?;
        std::fs::write(&key, credentials.key_pem)?;
        Ok((cert, key))
    }
}

fn free_udp_port() -> Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

/// One gateway: its config (so it can be started again on the same spool) and, when up, its daemon.
struct Gateway {
    name: GatewayId,
    config: tidesync_gateway::config::Config,
    running: Option<tidesync_gateway::daemon::Running>,
}

impl Gateway {
    fn new(pki: &mut Pki, dir: &Path, name: &str, cloud: SocketAddr) -> Result<Self> {
        let gateway = GatewayId::new(name)?;
        let (cert, key) = pki.files(Identity::Gateway(gateway), name)?;
        let listen = free_udp_port()?;
        let text = format!(
            "gateway = \"{name}\"\nlisten = \"{listen}\"\nspool = {spool:?}\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n[upstream]\naddr = \"{cloud}\"\nreconnect_ms = 200\n",
            spool = dir.join(format!("{name}-spool.sqlite3")),
            ca = pki.dir.join("ca.pem"),
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        let config = tidesync_gateway::config::Config::load(&path)?;
        Ok(Self { name: gateway, config, running: None })
    }

    fn addr(&self) -> SocketAddr {
        self.config.listen
    }

    async fn start(&mut self) -> Result<()> {
        self.running = Some(tidesync_gateway::daemon::start(self.config.clone()).await?);
        Ok(())
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some(running) = self.running.take() {
            running.shutdown().await?;
        }
        Ok(())
    }
}

/// One device agent and, when online, its uplink task.
struct Device {
    id: DeviceId,
    agent: Arc<Agent>,
    options: UplinkOptions,
    counters: Arc<UplinkCounters>,
    online: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    recorded: u64,
    seed: u64,
}

impl Device {
    fn go_online(&mut self) {
        if self.online.is_some() {
            return;
        }
        let (stop, shutdown) = watch::channel(false);
        self.seed += 1;
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let task = tokio::spawn(uplink::run(
            Arc::clone(&self.agent),
            self.options.clone(),
            Arc::clone(&self.counters),
            rng,
            shutdown,
        ));
        let id = self.id;
        let task = tokio::spawn(async move {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(device = %id, %error, "uplink failed"),
                Err(error) => tracing::error!(device = %id, %error, "uplink panicked"),
            }
        });
        self.online = Some((stop, task));
    }

    async fn go_offline(&mut self) {
        if let Some((stop, task)) = self.online.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Records `n` readings of a slow sine, as a sensor would.
    async fn record(&mut self, n: u64) -> Result<()> {
        let base = self.recorded;
        let offset = self.seed as f64;
        let items: Vec<(Millis, Payload)> = (0..n)
            .map(|i| {
                let k = (base + i) as f64;
                let value = 20.0 + 5.0 * ((k / 50.0) + offset).sin();
                let reading = SensorReading {
                    sensor: "sht31.temperature".into(),
                    value: (value * 100.0).round() / 100.0,
                    unit: "Cel".into(),
                };
                (wall_now(), Payload::Reading(reading))
            })
            .collect();
        let agent = Arc::clone(&self.agent);
        tokio::task::spawn_blocking(move || agent.record_batch(&items)).await??;
        self.recorded += n;
        Ok(())
    }
}

fn say(line: &str) {
    println!("[demo] {line}");
}

/// Runs the demo and returns its summary. Call inside a multi-threaded tokio runtime.
pub(crate) async fn run(options: &DemoOptions) -> Result<DemoSummary> {
    let scratch;
    let dir = match &options.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            scratch = tempfile::Builder::new().prefix("tidesync-demo-").tempdir()?.keep();
            scratch
        }
    };
    say(&format!("data in {}", dir.display()));
    let mut pki = Pki::new(&dir.join("pki"))?;

    // The cloud: ingest, projections and the HTTP API, as `tidesync-cloud run` starts them.
    let (cloud_cert, cloud_key) = pki.files(Identity::Cloud, "cloud")?;
    let cloud_toml = dir.join("cloud.toml");
    std::fs::write(
        &cloud_toml,
        format!(
            "listen = \"{listen}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\ndata_dir = {data:?}\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            listen = free_udp_port()?,
            http_port = options.http_port,
            data = dir,
            ca = pki.dir.join("ca.pem"),
            cert = cloud_cert,
            key = cloud_key,
        ),
    )?;
    let cloud = tidesync_cloud::cli::start(tidesync_cloud::config::Config::load(&cloud_toml)?)
        .await
        .context("starting the cloud")?;
    let cloud_db = dir.join(tidesync_cloud::config::SQLITE_FILE);
    let cloud_quic = cloud.ingest.quic_addr();
    let http = cloud.http_addr.map(|addr| format!("http://{addr}/")).unwrap_or_default();
    say(&format!("cloud ingest on {cloud_quic}, HTTP on {http} (SQLite {})", cloud_db.display()));

    // Two gateways.
    let mut gateways = Vec::new();
    for name in ["gateway-a", "gateway-b"] {
        let mut gateway = Gateway::new(&mut pki, &dir, name, cloud_quic)?;
        gateway.start().await.with_context(|| format!("starting {name}"))?;
        say(&format!("{name} on {}", gateway.addr()));
        gateways.push(gateway);
    }

    // The devices: even ones prefer gateway A, odd ones gateway B; each roams to the other.
    let mut devices = Vec::new();
    for index in 0..options.devices {
        let id = DeviceId::new(&format!("sensor-{index:03}"))?;
        let device_dir = dir.join("devices").join(id.as_str());
        std::fs::create_dir_all(&device_dir)?;
        let store = DeviceStore::create(&device_dir.join("ledger.sqlite3"), id, LedgerConfig::default())?;
        let agent = Arc::new(Agent::start(store)?);
        let (first, second) = if index % 2 == 0 { (0, 1) } else { (1, 0) };
        let options = UplinkOptions {
            gateways: vec![gateways[first].addr(), gateways[second].addr()],
            credentials: pki.credentials(Identity::Device(id))?,
            session: SessionConfig { retransmit_ms: 1_000, ..SessionConfig::default() },
            transport: TransportLimits { idle_timeout_ms: 5_000, keep_alive_ms: 1_000, ..TransportLimits::default() },
            connect_timeout_ms: 1_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 1_000,
        };
        let mut device = Device {
            id,
            agent,
            options,
            counters: Arc::new(UplinkCounters::default()),
            online: None,
            recorded: 0,
            seed: index as u64 * 1_000,
        };
        device.go_online();
        devices.push(device);
    }
    say(&format!("{} devices online", devices.len()));

    let per_tick = options.rate_hz.max(1);
    let phase = |name: &str| say(&format!("phase: {name}"));

    phase("everyone online, recording");
    for device in &devices {
        let agent = Arc::clone(&device.agent);
        tokio::task::spawn_blocking(move || agent.report("firmware", Value::Text("1.4.2".into()))).await??;
    }
    for _ in 0..options.phase_secs {
        for device in &mut devices {
            device.record(per_tick).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    phase("gateway-a goes down; a quarter of the devices go offline; desired state edited in the cloud");
    gateways[0].stop().await?;
    let offline: Vec<usize> = (0..devices.len()).filter(|index| index % 4 == 3).collect();
    for index in &offline {
        devices[*index].go_offline().await;
    }
    let control = cloud.ingest.control();
    for device in &devices {
        let mut entries = BTreeMap::new();
        entries.insert("interval_s".to_string(), Some(Value::Int(30)));
        entries.insert("mode".to_string(), Some(Value::Text("eco".into())));
        control.set_desired(device.id, entries).await.map_err(|error| anyhow::anyhow!(error))?;
    }
    for _ in 0..options.phase_secs {
        for device in &mut devices {
            device.record(per_tick).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    phase("gateway-a and the offline devices come back");
    gateways[0].start().await?;
    for index in &offline {
        devices[*index].go_online();
    }
    let healed = Instant::now();

    // Converged: every device's events are committed and pruned, and its desired state is the
    // cloud's.
    let deadline = Duration::from_secs(120);
    loop {
        let mut done = 0;
        for device in &devices {
            let agent = Arc::clone(&device.agent);
            let (status, desired) = tokio::task::spawn_blocking(move || -> Result<_> {
                Ok((agent.status()?, agent.with_store(|store| store.shadow().get(Section::Desired, "mode"))?))
            })
            .await??;
            if status.committed_seq == status.high_seq
                && status.held_events == 0
                && desired == Some(Value::Text("eco".into()))
            {
                done += 1;
            }
        }
        if done == devices.len() {
            break;
        }
        if healed.elapsed() > deadline {
            bail!("not converged after {deadline:?}: {done} of {} devices done", devices.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converge_ms = healed.elapsed().as_millis() as u64;
    say(&format!("converged {converge_ms} ms after healing"));

    // Check the cloud's store against what the devices recorded.
    let mut summary =
        DemoSummary { devices: devices.len(), converge_ms, data_dir: dir.clone(), ..DemoSummary::default() };
    let backend = Backend::Sqlite { path: cloud_db };
    let mut reader = tokio::task::spawn_blocking(move || backend.open_reader()).await??;
    for device in &devices {
        // One shadow_reported event plus the readings.
        let expected = device.recorded + 1;
        summary.events_recorded += expected;
        let events = reader.read_seqs(&device.id, Seq(1), Seq(u64::MAX >> 1), 1 << 20)?;
        summary.events_in_cloud += events.len() as u64;
        let seqs: Vec<u64> = events.iter().map(|stored| stored.event.id.seq.0).collect();
        if seqs == (1..=expected).collect::<Vec<_>>() {
            summary.devices_exact += 1;
        }
        let status = {
            let agent = Arc::clone(&device.agent);
            tokio::task::spawn_blocking(move || agent.status()).await??
        };
        if status.held_events == 0 {
            summary.devices_pruned += 1;
        }
        let cloud_shadow = reader.shadow(&device.id)?;
        let cloud_desired = cloud_shadow.map(|row| row.view["desired"].clone());
        let device_desired = {
            let agent = Arc::clone(&device.agent);
            tokio::task::spawn_blocking(move || agent.shadow_json()).await??["desired"].clone()
        };
        if cloud_desired.as_ref() == Some(&device_desired) {
            summary.devices_converged += 1;
        }
        summary.device_sessions += device.counters.snapshot().sessions;
    }

    println!("{summary}");
    if !options.exit {
        println!("fleet API and dashboard: {} (Ctrl-C to stop)", summary.http);
        tokio::signal::ctrl_c().await?;
    }
    for device in &mut devices {
        device.go_offline().await;
    }
    for gateway in &mut gateways {
        gateway.stop().await?;
        tracing::debug!(gateway = %gateway.name, "stopped");
    }
    cloud.shutdown().await?;
    Ok(summary)
}
