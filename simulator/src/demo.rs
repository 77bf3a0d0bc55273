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
//!
//! The fleet runs signed, as a real deployment does: the PKI directory is made with the gateway's
//! `pki init` and `pki issue` (so every device gets its `NAME.sign.key` and the registry
//! `device-keys.txt`), each device seals its batches with its key, and the cloud verifies every
//! batch against the registry (`device_keys` in its config). The summary reads the cloud's
//! `/metrics` and `GET /api/security/events` to show that verification was on and raised nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand_core::SeedableRng;
use tidesync_cloud::store::Backend;
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::net::quic::TransportLimits;
use tidesync_core::net::tls::Credentials;
use tidesync_core::shadow::Section;
use tidesync_core::sync::SessionConfig;
use tidesync_core::value::Value;
use tidesync_device::agent::wall_now;
use tidesync_device::uplink::{self, UplinkCounters, UplinkOptions};
use tidesync_device::{Agent, DeviceStore, LedgerConfig, SigningKey};
use tidesync_gateway::pki_cli::{self, Holder};
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
    /// Whether the cloud verified device signatures (`tidesync_cloud_verifying` in `/metrics`).
    pub(crate) verifying: bool,
    /// Devices with a key in the cloud's registry (`tidesync_cloud_device_keys`).
    pub(crate) keyed_devices: u64,
    /// Batches the cloud refused as forged or altered (`GET /api/security/events`, `total`).
    pub(crate) security_events: u64,
    /// Batches devices sent without a seal although they hold a key.
    pub(crate) unsigned_batches: u64,
    /// Where the data is.
    pub(crate) data_dir: PathBuf,
    /// The cloud's HTTP API.
    pub(crate) http: String,
}

impl DemoSummary {
    /// Whether every device converged with every event in the cloud exactly once, every event
    /// verified against its device's key with no security event raised.
    pub(crate) fn passed(&self) -> bool {
        self.devices > 0
            && self.devices_exact == self.devices
            && self.devices_converged == self.devices
            && self.devices_pruned == self.devices
            && self.events_in_cloud == self.events_recorded
            && self.verifying
            && self.keyed_devices >= self.devices as u64
            && self.security_events == 0
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
        let verified = if self.verifying { "on" } else { "OFF" };
        writeln!(f, "  signatures verified by the cloud: {verified} ({} devices with keys)", self.keyed_devices)?;
        writeln!(f, "  security events (refused):       {}", self.security_events)?;
        writeln!(f, "  batches sent unsealed:           {}", self.unsigned_batches)?;
        writeln!(f, "  converged after healing in:      {} ms", self.converge_ms)?;
        writeln!(f, "  data (SQLite files, PKI):        {}", self.data_dir.display())?;
        write!(f, "  result:                          {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// The fleet's PKI directory, made and used by the gateway's `pki` commands (`pki_cli`, what
/// `tidesync-gateway pki init|issue` run): the same files an operator has, device signing keys and
/// the cloud's key registry included.
struct Pki {
    dir: PathBuf,
}

/// Validity of the demo's CA, certificates and revocation list.
const PKI_DAYS: u64 = 30;

impl Pki {
    /// Makes the fleet CA in `dir`, or uses the one a `--data-dir` of an earlier run holds.
    fn new(dir: &Path) -> Result<Self> {
        if !dir.join("ca.key").exists() {
            pki_cli::init(dir, "demo-fleet", PKI_DAYS, PKI_DAYS, &mut std::io::sink()).context("pki init")?;
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Issues a certificate for `holder` as `NAME.pem` and `NAME.key` (and, for a device, its
    /// signing key `NAME.sign.key`, registered in `device-keys.txt`). Returns the cert and key paths.
    fn issue(&self, holder: &Holder, name: &str) -> Result<(PathBuf, PathBuf)> {
        let out = self.dir.join(name);
        pki_cli::issue(&self.dir, holder, &out, PKI_DAYS, &mut std::io::sink())
            .with_context(|| format!("pki issue {name}"))?;
        Ok((self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key"))))
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The registry of device public keys the cloud verifies with.
    fn device_keys(&self) -> PathBuf {
        self.dir.join(pki_cli::DEVICE_KEYS_FILE)
    }

    /// A device's credentials and signing key, issued as `pki issue --device NAME` does.
    fn device(&self, device: DeviceId) -> Result<(Credentials, SigningKey)> {
        let name = device.as_str();
        let (cert, key) = self.issue(&Holder::Device(device), name)?;
        let read = |path: &Path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()));
        let credentials =
            Credentials { ca_pem: read(&self.ca())?, cert_pem: read(&cert)?, key_pem: read(&key)?, crl_pem: None };
        let signing = SigningKey::load(&self.dir.join(format!("{name}.sign.key")))?;
        Ok((credentials, signing))
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
    fn new(pki: &Pki, dir: &Path, name: &str, cloud: SocketAddr) -> Result<Self> {
        let gateway = GatewayId::new(name)?;
        let (cert, key) = pki.issue(&Holder::Gateway(gateway), name)?;
        let listen = free_udp_port()?;
        let text = format!(
            "gateway = \"{name}\"\nlisten = \"{listen}\"\nspool = {spool:?}\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n[upstream]\naddr = \"{cloud}\"\nreconnect_ms = 200\n",
            spool = dir.join(format!("{name}-spool.sqlite3")),
            ca = pki.ca(),
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
    /// The key it seals every batch with.
    signing: SigningKey,
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
        let task = tokio::spawn(uplink::run_with_key(
            Arc::clone(&self.agent),
            self.options.clone(),
            Some(self.signing.clone()),
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

/// `GET path` from the cloud's HTTP API; the body (an error unless the status is 200).
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response).with_context(|| format!("reading GET {path}"))?;
        let (head, body) = response.split_once("\r\n\r\n").with_context(|| format!("GET {path}: no HTTP response"))?;
        let status = head.lines().next().unwrap_or_default();
        if !status.contains(" 200 ") {
            bail!("GET {path}: {status}");
        }
        Ok(body.to_string())
    })
    .await?
}

/// The value of an unlabelled sample `name` on a Prometheus text page.
fn metric(page: &str, name: &str) -> Result<u64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("{name} is not in the cloud's /metrics"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} is not a number"))
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
    let pki = Pki::new(&dir.join("pki"))?;

    // Every device's certificate and signing key first: the cloud loads the key registry at start.
    let mut issued = Vec::new();
    for index in 0..options.devices {
        let id = DeviceId::new(&format!("sensor-{index:03}"))?;
        let (credentials, signing) = pki.device(id)?;
        issued.push((id, credentials, signing));
    }
    say(&format!(
        "fleet PKI in {}: {} devices with certificates and signing keys in {}",
        pki.dir.display(),
        issued.len(),
        pki.device_keys().display()
    ));

    // The cloud: ingest, projections and the HTTP API, as `tidesync-cloud run` starts them,
    // verifying every batch against the device keys.
    let (cloud_cert, cloud_key) = pki.issue(&Holder::Cloud, "cloud")?;
    let cloud_toml = dir.join("cloud.toml");
    std::fs::write(
        &cloud_toml,
        format!(
            "listen = \"{listen}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\ndata_dir = {data:?}\ndevice_keys = {keys:?}\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n",
            listen = free_udp_port()?,
            http_port = options.http_port,
            data = dir,
            keys = pki.device_keys(),
            ca = pki.ca(),
            cert = cloud_cert,
            key = cloud_key,
        ),
    )?;
    let cloud = tidesync_cloud::cli::start(tidesync_cloud::config::Config::load(&cloud_toml)?)
        .await
        .context("starting the cloud")?;
    let cloud_db = dir.join(tidesync_cloud::config::SQLITE_FILE);
    let cloud_quic = cloud.ingest.quic_addr();
    let http_addr = cloud.http_addr.context("the cloud serves no HTTP API")?;
    let http = format!("http://{http_addr}/");
    say(&format!("cloud ingest on {cloud_quic}, HTTP on {http} (SQLite {})", cloud_db.display()));

    // Two gateways.
    let mut gateways = Vec::new();
    for name in ["gateway-a", "gateway-b"] {
        let mut gateway = Gateway::new(&pki, &dir, name, cloud_quic)?;
        gateway.start().await.with_context(|| format!("starting {name}"))?;
        say(&format!("{name} on {}", gateway.addr()));
        gateways.push(gateway);
    }

    // The devices: even ones prefer gateway A, odd ones gateway B; each roams to the other.
    let mut devices = Vec::new();
    for (index, (id, credentials, signing)) in issued.into_iter().enumerate() {
        let device_dir = dir.join("devices").join(id.as_str());
        std::fs::create_dir_all(&device_dir)?;
        let store = DeviceStore::create(&device_dir.join("ledger.sqlite3"), id, LedgerConfig::default())?;
        let agent = Arc::new(Agent::start(store)?);
        let (first, second) = if index % 2 == 0 { (0, 1) } else { (1, 0) };
        let options = UplinkOptions {
            gateways: vec![gateways[first].addr(), gateways[second].addr()],
            credentials,
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
            signing,
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
        DemoSummary { devices: devices.len(), converge_ms, data_dir: dir.clone(), http, ..DemoSummary::default() };
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
        let counters = device.counters.snapshot();
        summary.device_sessions += counters.sessions;
        summary.unsigned_batches += counters.unsigned_batches;
    }

    // What the cloud says about verification, read as an operator would: its metrics page and its
    // security events API.
    let metrics = http_get(http_addr, "/metrics").await?;
    summary.verifying = metric(&metrics, "tidesync_cloud_verifying")? == 1;
    summary.keyed_devices = metric(&metrics, "tidesync_cloud_device_keys")?;
    let page: serde_json::Value = serde_json::from_str(&http_get(http_addr, "/api/security/events").await?)
        .context("GET /api/security/events is not JSON")?;
    summary.security_events = page["total"].as_u64().context("GET /api/security/events has no total")?;
    let refused_by_kind: u64 = metrics
        .lines()
        .filter(|line| line.starts_with("tidesync_cloud_security_events_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    // The stored events and the counters since start describe the same refusals.
    summary.security_events = summary.security_events.max(refused_by_kind);

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
