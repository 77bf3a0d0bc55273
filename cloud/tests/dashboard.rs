//! The fleet dashboard over real HTTP on 127.0.0.1: `/` serves the page that drives the JSON API,
//! the event stream emits a message after an append, and (in headless Chromium, when installed)
//! the rendered page shows the fleet table, a device's chart and shadow, and saves desired state.
//!
//! Chromium: the end-to-end test FAILS when `TIDESYNC_TEST_CHROMIUM=1` and `chromium` is missing;
//! otherwise a missing Chromium skips it with a loud message.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidesync_cloud::store::{CloudStore, IngestMeta};
use tidesync_cloud::Config;
use tidesync_core::event::{
    DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq, ShadowReported,
};
use tidesync_core::net::pki::{FleetCa, Identity};
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::value::Value;
use tidesync_core::wire::EventBatch;

const BASE_MS: u64 = 1_700_000_040_000;

fn wall() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
}

/// One request with `Connection: close`; returns (status, head, body).
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|window| window == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, response[split + 4..].to_vec())
}

/// `n` readings of `sensor` for `device` (value = seq), then one reported shadow.
fn events(device: DeviceId, first: u64, n: u64, reported: Option<Value>) -> Vec<Event> {
    let mut events: Vec<Event> = (first..first + n)
        .map(|seq| Event {
            id: EventId { device, seq: Seq(seq) },
            hlc: Hlc { wall_ms: BASE_MS + seq, logical: 0 },
            event_time: Millis(BASE_MS + seq * 1_000),
            payload: Payload::Reading(SensorReading {
                sensor: "temp".into(),
                value: (seq as f64 / 5.0).sin() * 10.0 + 20.0,
                unit: "Cel".into(),
            }),
        })
        .collect();
    if let Some(reported) = reported {
        let seq = first + n;
        events.push(Event {
            id: EventId { device, seq: Seq(seq) },
            hlc: Hlc { wall_ms: BASE_MS + seq, logical: 0 },
            event_time: Millis(BASE_MS + seq * 1_000),
            payload: Payload::ShadowReported(ShadowReported { reported }),
        });
    }
    events
}

fn append(store: &mut CloudStore, events: Vec<Event>) {
    let meta = IngestMeta { gateway: GatewayId::new("gw-1").unwrap(), ingest_time: wall() };
    let device = events[0].id.device;
    let first = events[0].id.seq;
    store.append_from(&EventBatch::new(device, first, events).unwrap(), &meta).unwrap();
    store.commit().unwrap();
}

fn config(dir: &Path) -> Config {
    let now = wall();
    let ca = FleetCa::create("dash", Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
    let issued = ca.issue(Identity::Cloud, 1, Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("cloud.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.join("cloud.key"), &issued.key_pem).unwrap();
    let text = "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\
                [tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"cloud.key\"\n";
    Config::parse(text, &dir.join("cloud.toml")).unwrap()
}

/// A cloud over a SQLite store seeded with two devices; returns it once projections caught up.
async fn seeded_cloud(dir: &Path) -> tidesync_cloud::Cloud {
    let config = config(dir);
    std::fs::create_dir_all(&config.data_dir).unwrap();
    {
        let mut store = CloudStore::open(config.backend().open_writer().unwrap(), ShadowLimits::default()).unwrap();
        // A reported-shadow event as device 1's last: the log shows it, though only a live
        // gateway session (not this direct append) folds it into the cloud's shadow.
        let reported = Value::from_json(&serde_json::json!({ "interval_s": 60, "fw": "1.2.0" })).unwrap();
        append(&mut store, events(DeviceId::new("sensor-1").unwrap(), 1, 120, Some(reported)));
        append(&mut store, events(DeviceId::new("pump-7").unwrap(), 1, 30, None));
    }
    let cloud = tidesync_cloud::start(config).await.unwrap();
    let addr = cloud.http_addr.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, body) =
            tokio::task::spawn_blocking(move || request(addr, "GET", "/api/projections", b"")).await.unwrap();
        let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let lag: u64 =
            status["projections"].as_array().unwrap().iter().map(|p| p["lag_events"].as_u64().unwrap()).sum();
        if lag == 0 {
            return cloud;
        }
        assert!(Instant::now() < deadline, "projections lag {lag}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_are_served_and_reference_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = seeded_cloud(dir.path()).await;
    let addr = cloud.http_addr.unwrap();
    let get = |path: &'static str| tokio::task::spawn_blocking(move || request(addr, "GET", path, b""));

    let (status, head, page) = get("/").await.unwrap();
    let page = String::from_utf8(page).unwrap();
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(page.contains("<script src=\"/dashboard/app.js\"></script>"), "{page}");
    assert!(page.contains("/dashboard/style.css"));

    let (status, head, script) = get("/dashboard/app.js").await.unwrap();
    let script = String::from_utf8(script).unwrap();
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    for api in
        ["/api/devices", "/events?from_seq=", "/desired", "method: \"PATCH\"", "/api/events/stream", "EventSource"]
    {
        assert!(script.contains(api), "app.js does not use {api}");
    }
    let (status, head, _) = get("/dashboard/style.css").await.unwrap();
    assert_eq!((status, head.contains("content-type: text/css")), (200, true), "{head}");

    // The JSON API still answers beside the page, and unknown paths still get a JSON 404.
    let (status, _, fleet) = get("/api/devices").await.unwrap();
    let fleet: serde_json::Value = serde_json::from_slice(&fleet).unwrap();
    assert_eq!((status, fleet["devices"].as_array().unwrap().len()), (200, 2));
    let (status, _, missing) = get("/nothing-here").await.unwrap();
    assert_eq!(status, 404);
    assert!(String::from_utf8(missing).unwrap().contains("\"error\""));
    cloud.shutdown().await.unwrap();
}

/// Reads server-sent events from `reader` until one with `data:`; returns (event, id, data).
fn next_event(reader: &mut impl std::io::BufRead) -> (String, String, serde_json::Value) {
    let (mut event, mut id) = (String::new(), String::new());
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end();
        if let Some(value) = line.strip_prefix("event:") {
            event = value.trim().to_string();
        } else if let Some(value) = line.strip_prefix("id:") {
            id = value.trim().to_string();
        } else if let Some(value) = line.strip_prefix("data:") {
            return (event, id, serde_json::from_str(value.trim()).unwrap());
        }
        // Chunk sizes, blank lines and keep-alive comments carry no event.
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_emits_the_new_head_after_an_append() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let mut store = CloudStore::open(config.backend().open_writer().unwrap(), ShadowLimits::default()).unwrap();
    let device = DeviceId::new("sensor-1").unwrap();
    append(&mut store, events(device, 1, 10, None));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = tidesync_cloud::dashboard::router(Some(store.head_watch()));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let connect = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream
            .write_all(b"GET /api/events/stream HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        while reader.read_line(&mut head).unwrap() > 2 && !head.ends_with("\r\n\r\n") {}
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
        // The current head comes at once.
        let first = next_event(&mut reader);
        (reader, first)
    });
    let (mut reader, first) = connect.await.unwrap();
    assert_eq!(first, ("head".to_string(), "10".to_string(), serde_json::json!({ "head": 10 })));

    // Nothing is sent while the log stands still.
    let waiting = tokio::task::spawn_blocking(move || {
        reader.get_mut().set_read_timeout(Some(Duration::from_millis(600))).unwrap();
        let mut byte = [0; 1];
        let idle = reader.get_mut().read(&mut byte).is_err();
        reader.get_mut().set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        (idle, reader)
    });
    let (idle, mut reader) = waiting.await.unwrap();
    assert!(idle, "the stream sent something without an append");

    append(&mut store, events(device, 11, 5, None));
    let (event, id, data) = tokio::task::spawn_blocking(move || next_event(&mut reader)).await.unwrap();
    assert_eq!((event.as_str(), id.as_str(), data), ("head", "15", serde_json::json!({ "head": 15 })));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_answers_503_without_a_head() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, tidesync_cloud::dashboard::router(None)).await });
    let (status, _, body) =
        tokio::task::spawn_blocking(move || request(addr, "GET", "/api/events/stream", b"")).await.unwrap();
    assert_eq!(status, 503);
    assert!(String::from_utf8(body).unwrap().contains("no live head"));
    server.abort();
}

/// The Chromium binary, or None (after a loud message) when it is missing and not required.
fn chromium() -> Option<PathBuf> {
    let required = std::env::var("TIDESYNC_TEST_CHROMIUM").is_ok_and(|value| value == "1");
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new(name).arg("--version").output().is_ok_and(|output| output.status.success());
        if found {
            return Some(PathBuf::from(name));
        }
    }
    assert!(!required, "TIDESYNC_TEST_CHROMIUM=1 but no chromium found (apt-get install -y chromium)");
    eprintln!("\n!!!!! SKIPPED: the dashboard end-to-end test needs chromium (apt-get install -y chromium); set TIDESYNC_TEST_CHROMIUM=1 to make its absence fail !!!!!\n");
    None
}

/// The DOM of `url` after its scripts ran, from headless Chromium; also saves a screenshot.
/// Pages are loaded with `?static` (no event stream): `--virtual-time-budget` waits for the
/// network to go idle, which an open event stream never does.
fn render(chromium: &Path, url: &str, screenshot: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let common = [
        "--headless".to_string(),
        "--no-sandbox".to_string(),
        "--disable-gpu".to_string(),
        "--disable-dev-shm-usage".to_string(),
        "--no-first-run".to_string(),
        "--virtual-time-budget=5000".to_string(),
        "--window-size=1000,900".to_string(),
        format!("--user-data-dir={}", profile.path().display()),
    ];
    let output = Command::new(chromium).args(&common).arg("--dump-dom").arg(url).output().unwrap();
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    let shot = Command::new(chromium)
        .args(&common)
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(shot.status.success(), "chromium screenshot failed: {}", String::from_utf8_lossy(&shot.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_renders_the_fleet_and_a_device_page() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cloud = seeded_cloud(dir.path()).await;
    let addr = cloud.http_addr.unwrap();
    let (status, _, _) = tokio::task::spawn_blocking(move || {
        request(addr, "PATCH", "/api/devices/sensor-1/desired", br#"{"interval_s": 30, "mode": "eco"}"#)
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    let shots = std::env::var_os("TIDESYNC_SCREENSHOT_DIR").map_or_else(|| dir.path().to_path_buf(), PathBuf::from);

    let browser = chromium.clone();
    let (fleet_shot, device_shot) = (shots.join("dashboard-fleet.png"), shots.join("dashboard-device.png"));
    let (fleet, device) = tokio::task::spawn_blocking({
        let (fleet_shot, device_shot) = (fleet_shot.clone(), device_shot.clone());
        move || {
            (
                render(&browser, &format!("http://{addr}/?static"), &fleet_shot),
                render(&browser, &format!("http://{addr}/?static#/device/sensor-1"), &device_shot),
            )
        }
    })
    .await
    .unwrap();

    // The fleet table: both devices, offline (no gateway connected), their last readings, and
    // the delta of the device whose desired state differs from what it reported.
    assert!(fleet.contains("<table id=\"fleet\">"), "{fleet}");
    let row = |device: &str| {
        let start =
            fleet.find(&format!("data-device=\"{device}\"")).unwrap_or_else(|| panic!("no row {device}: {fleet}"));
        let end = fleet[start..].find("</tr>").unwrap() + start;
        fleet[start..end].to_string()
    };
    let (sensor, pump) = (row("sensor-1"), row("pump-7"));
    assert!(sensor.contains(">offline<") && pump.contains(">offline<"), "{sensor}\n{pump}");
    assert!(sensor.contains("temp = ") && sensor.contains(" Cel"), "{sensor}");
    assert!(sensor.contains("interval_s") && sensor.contains("mode"), "delta missing: {sensor}");
    assert!(fleet.contains("Fleet (2 devices)"));

    // The device page: a chart with a path per sensor, and the shadow's three sections.
    assert!(device.contains("<h2 id=\"device-name\">sensor-1</h2>"), "{device}");
    let chart = &device[device.find("<svg").unwrap_or_else(|| panic!("no chart: {device}"))..];
    let path = &chart[chart.find("<path").unwrap()..];
    let d = path.split("d=\"").nth(1).unwrap().split('"').next().unwrap();
    assert_eq!(d.matches('L').count(), 119, "120 readings make 119 segments: {d}");
    assert!(device.contains("Last 120 readings"));
    let cell = |id: &str| {
        let start = device.find(&format!("id=\"{id}\"")).unwrap();
        device[start..start + device[start..].find("</td>").unwrap()].to_string()
    };
    assert!(cell("reported").contains("<pre>{}</pre>"), "nothing reported through a session: {}", cell("reported"));
    assert!(cell("desired").contains("\"mode\": \"eco\""), "{}", cell("desired"));
    assert!(
        cell("delta").contains("\"interval_s\": 30") && cell("delta").contains("\"mode\": \"eco\""),
        "{}",
        cell("delta")
    );
    assert!(device.contains("id=\"desired-form\""));

    for shot in [&fleet_shot, &device_shot] {
        let bytes = std::fs::read(shot).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "{}: {} bytes", shot.display(), bytes.len());
    }
    cloud.shutdown().await.unwrap();
}

/// A WebDriver command to chromedriver at `driver`; returns the `value` of the answer.
fn webdriver(driver: SocketAddr, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let body = if method == "GET" || method == "DELETE" { Vec::new() } else { body.to_string().into_bytes() };
    // chromedriver keeps connections open whatever the request says: read Content-Length bytes.
    let mut stream = std::net::TcpStream::connect(driver).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    let mut reader = BufReader::new(stream);
    let (mut status, mut length) = (0, 0);
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(code) = line.strip_prefix("http/1.1 ") {
            status = code[..3].parse().unwrap();
        } else if let Some(value) = line.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut answer = vec![0; length];
    reader.read_exact(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(status, 200, "{method} {path}: {answer}");
    answer["value"].clone()
}

/// Runs `script` in the page until it returns something truthy (or fails after 20 s).
fn wait_for(driver: SocketAddr, session: &str, what: &str, script: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = webdriver(
            driver,
            "POST",
            &format!("/session/{session}/execute/sync"),
            &serde_json::json!({ "script": script, "args": [] }),
        );
        if !(value.is_null() || value == false || value == "") {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// chromedriver and the browser it started (found by its unique profile directory, as it is not
/// chromedriver's child), killed when the test ends, failed or not.
struct Killed(std::process::Child, PathBuf);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let profile = format!("--user-data-dir={}", self.1.display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let is_ours = cmdline.split(|byte| *byte == 0).any(|arg| arg == profile.as_bytes());
            if is_ours {
                let _ = Command::new("kill").arg("-KILL").arg(entry.file_name()).status();
            }
        }
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_form_saves_desired_state_and_appends_show_up_live() {
    if chromium().is_none() {
        return;
    }
    let required = std::env::var("TIDESYNC_TEST_CHROMIUM").is_ok_and(|value| value == "1");
    let found = Command::new("chromedriver").arg("--version").output().is_ok_and(|output| output.status.success());
    if !found {
        assert!(!required, "TIDESYNC_TEST_CHROMIUM=1 but no chromedriver (apt-get install -y chromium-driver)");
        eprintln!(
            "\n!!!!! SKIPPED: the dashboard form test needs chromedriver (apt-get install -y chromium-driver) !!!!!\n"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cloud = seeded_cloud(dir.path()).await;
    let addr = cloud.http_addr.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let profile = dir.path().join("profile");
    let _driver = Killed(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        profile.clone(),
    );
    let driver: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let saved = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(driver).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            .iter()
            .map(|arg| arg.to_string())
            .chain([format!("--user-data-dir={}", profile.display())])
            .collect::<Vec<_>>();
        let session = webdriver(
            driver,
            "POST",
            "/session",
            // "eager": navigation returns at DOMContentLoaded; the open event stream may keep the
            // page from ever counting as fully loaded.
            &serde_json::json!({ "capabilities": { "alwaysMatch": {
                "pageLoadStrategy": "eager", "goog:chromeOptions": { "args": args } } } }),
        );
        let session = session["sessionId"].as_str().unwrap().to_string();
        let url = format!("http://{addr}/#/device/sensor-1");
        webdriver(driver, "POST", &format!("/session/{session}/url"), &serde_json::json!({ "url": url }));
        // The event stream connects and delivers the current head (120 + 1 events of sensor-1,
        // 30 of pump-7).
        wait_for(driver, &session, "the live badge", "return document.getElementById('live').textContent === 'live'");
        let head = wait_for(driver, &session, "the head", "return document.getElementById('head').textContent");
        assert_eq!(head, "log head 151");
        wait_for(driver, &session, "the form", "return document.getElementById('desired-form') !== null");
        // Fill in the form and press its button, as a user would.
        webdriver(
            driver,
            "POST",
            &format!("/session/{session}/execute/sync"),
            &serde_json::json!({ "script": "const f = document.getElementById('desired-form'); \
                f.elements.patch.value = '{\"threshold\": 5, \"label\": \"north\"}'; \
                f.querySelector('button').click(); return true;", "args": [] }),
        );
        let desired = wait_for(
            driver,
            &session,
            "the saved desired state",
            "const d = document.getElementById('desired'); return d && d.textContent.includes('threshold') && d.textContent",
        );
        let status = wait_for(driver, &session, "the status", "return document.getElementById('form-status').textContent");
        let png = webdriver(driver, "GET", &format!("/session/{session}/screenshot"), &serde_json::Value::Null);
        (desired, status, png, driver, session)
    })
    .await
    .unwrap();
    let (desired, status, png, driver, session) = saved;

    // Live: a reading appended to the log shows up in the open fleet page without a reload. A
    // second writer appends to the same SQLite file and the new head is published on the
    // cloud's watch, as the ingest writer does after each group commit.
    let config = config(dir.path());
    let mut store = CloudStore::open(config.backend().open_writer().unwrap(), ShadowLimits::default()).unwrap();
    let pump = DeviceId::new("pump-7").unwrap();
    let mut reading = events(pump, 31, 1, None);
    reading[0].payload = Payload::Reading(SensorReading { sensor: "temp".into(), value: 99.5, unit: "Cel".into() });
    let session_for_fleet = session.clone();
    tokio::task::spawn_blocking(move || {
        webdriver(
            driver,
            "POST",
            &format!("/session/{session_for_fleet}/url"),
            &serde_json::json!({ "url": format!("http://{addr}/#/") }),
        );
        wait_for(
            driver,
            &session_for_fleet,
            "the fleet",
            "return document.querySelector('tr[data-device=\"pump-7\"]') !== null",
        );
    })
    .await
    .unwrap();
    append(&mut store, reading);
    cloud.ingest.head_watch().publish(store.head());
    let live = tokio::task::spawn_blocking(move || {
        let row = wait_for(
            driver,
            &session,
            "the live reading",
            "const r = document.querySelector('tr[data-device=\"pump-7\"]'); return r && r.textContent.includes('99.5') && r.textContent",
        );
        let head = wait_for(driver, &session, "the head", "return document.getElementById('head').textContent");
        webdriver(driver, "DELETE", &format!("/session/{session}"), &serde_json::Value::Null);
        (row, head)
    })
    .await
    .unwrap();
    assert!(live.0.as_str().unwrap().contains("temp = 99.5 Cel"), "{}", live.0);
    assert_eq!(live.1, "log head 152");
    assert!(desired.as_str().unwrap().contains("\"label\": \"north\""), "{desired}");
    assert_eq!(status, "saved");
    assert!(png.as_str().is_some_and(|png| png.len() > 5_000), "no screenshot");

    // The form went through the API: the cloud's shadow holds the new desired state.
    let (status, _, shadow) =
        tokio::task::spawn_blocking(move || request(addr, "GET", "/api/devices/sensor-1/shadow", b"")).await.unwrap();
    let shadow: serde_json::Value = serde_json::from_slice(&shadow).unwrap();
    assert_eq!(status, 200);
    assert_eq!(shadow["shadow"]["desired"], serde_json::json!({ "threshold": 5, "label": "north" }));
    cloud.shutdown().await.unwrap();
}
