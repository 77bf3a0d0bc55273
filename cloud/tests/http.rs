//! The HTTP API over real HTTP on 127.0.0.1: a cloud started on a SQLite store that already holds
//! a device's events; every route answers JSON, pages work, bad requests get a 4xx with a JSON
//! error, desired-state writes land in the shadow (document and view).

#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidesync_cloud::store::{CloudStore, IngestMeta, CLOUD_REPLICA};
use tidesync_cloud::Config;
use tidesync_core::event::{DeviceId, Event, EventId, GatewayId, Hlc, Millis, Payload, SensorReading, Seq};
use tidesync_core::net::pki::{FleetCa, Identity};
use tidesync_core::shadow::{Section, Shadow, ShadowLimits};
use tidesync_core::value::Value;
use tidesync_core::wire::EventBatch;

/// One request with `Connection: close`; returns (status, content type, body).
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
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let mut body = response[split + 4..].to_vec();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap_or_default();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, content_type, body)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|window| window == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[line_end + 2..line_end + 2 + size]);
        body = &body[line_end + 4 + size..];
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let path = path.to_string();
    let (status, content_type, body) =
        tokio::task::spawn_blocking(move || request(addr, "GET", &path, b"")).await.unwrap();
    assert!(content_type.starts_with("application/json"), "{content_type}: {}", String::from_utf8_lossy(&body));
    (status, serde_json::from_slice(&body).unwrap())
}

async fn send_json(addr: SocketAddr, method: &'static str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (path, body) = (path.to_string(), body.as_bytes().to_vec());
    let (status, _, body) = tokio::task::spawn_blocking(move || request(addr, method, &path, &body)).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

fn wall() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
}

const BASE_MS: u64 = 1_700_000_040_000;

fn seed_store(config: &Config, device: DeviceId, n: u64) {
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let mut store = CloudStore::open(config.backend().open_writer().unwrap(), ShadowLimits::default()).unwrap();
    let events: Vec<Event> = (1..=n)
        .map(|seq| Event {
            id: EventId { device, seq: Seq(seq) },
            hlc: Hlc { wall_ms: BASE_MS + seq, logical: 0 },
            // One reading per second; 150 readings span 3 minutes.
            event_time: Millis(BASE_MS + seq * 1_000),
            payload: Payload::Reading(SensorReading { sensor: "temp".into(), value: seq as f64, unit: "Cel".into() }),
        })
        .collect();
    let meta = IngestMeta { gateway: GatewayId::new("gw-1").unwrap(), ingest_time: wall() };
    store.append_from(&EventBatch::new(device, Seq(1), events).unwrap(), &meta).unwrap();
    store.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_json_and_bad_requests_get_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let now = wall();
    let ca = FleetCa::create("http", Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
    let issued = ca.issue(Identity::Cloud, 1, Millis(now.0 - 3_600_000), Millis(now.0 + 86_400_000)).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("cloud.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("cloud.key"), &issued.key_pem).unwrap();
    let text = "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n\
                [tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"cloud.key\"\n";
    let config = Config::parse(text, &dir.path().join("cloud.toml")).unwrap();
    let device = DeviceId::new("sensor-1").unwrap();
    seed_store(&config, device, 150);
    let cloud = tidesync_cloud::start(config).await.unwrap();
    let addr = cloud.http_addr.unwrap();

    let (status, health) = get_json(addr, "/health").await;
    assert_eq!((status, health["head"].as_u64()), (200, Some(150)));
    assert_eq!(health["backend"], "sqlite");

    // Projections catch up on the seeded log.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, projections) = get_json(addr, "/api/projections").await;
        assert_eq!(status, 200);
        let lag: u64 =
            projections["projections"].as_array().unwrap().iter().map(|p| p["lag_events"].as_u64().unwrap()).sum();
        if lag == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "projections lag {lag}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, fleet) = get_json(addr, "/api/devices").await;
    assert_eq!(status, 200);
    let entry = &fleet["devices"][0];
    assert_eq!((entry["device"].as_str(), entry["n_events"].as_u64()), (Some("sensor-1"), Some(150)));
    assert_eq!(entry["online"], false, "no gateway is connected");
    assert_eq!(entry["latest"][0]["value"], 150.0);

    let (status, one) = get_json(addr, "/api/devices/sensor-1").await;
    assert_eq!(status, 200);
    assert_eq!(one["presence"]["gateway"], "gw-1");
    assert_eq!(one["high_seq"], 150);

    // Events by seq, paged.
    let (status, page) = get_json(addr, "/api/devices/sensor-1/events?from_seq=11&limit=20").await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (11..=30).collect::<Vec<_>>());
    assert_eq!(page["next"]["from_seq"], 31);
    assert_eq!(page["events"][0]["payload"]["sensor"], "temp");
    // Events by time, paged with the cursor until the end.
    let (from, to) = (BASE_MS + 50_000, BASE_MS + 100_000);
    let mut seen = Vec::new();
    let mut path = format!("/api/devices/sensor-1/events?from_ms={from}&to_ms={to}&limit=7");
    loop {
        let (status, page) = get_json(addr, &path).await;
        assert_eq!(status, 200);
        seen.extend(page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()));
        if page["next"].is_null() {
            break;
        }
        path = format!(
            "/api/devices/sensor-1/events?from_ms={from}&to_ms={to}&limit=7&after_ms={}&after_seq={}",
            page["next"]["after_ms"], page["next"]["after_seq"]
        );
    }
    assert_eq!(seen, (50..100).collect::<Vec<_>>());

    // Aggregates per minute cover every reading once.
    let (status, minute) = get_json(addr, "/api/devices/sensor-1/aggregates?sensor=temp&resolution=minute").await;
    assert_eq!(status, 200);
    let buckets = minute["buckets"].as_array().unwrap();
    assert_eq!(buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), 150);
    assert_eq!(buckets[0]["min"], 1.0);
    let (status, hour) = get_json(addr, "/api/devices/sensor-1/aggregates?resolution=hour").await;
    assert_eq!((status, hour["buckets"][0]["count"].as_u64()), (200, Some(150)));

    // Desired state: written, then visible as view and as an automerge document.
    let (status, written) =
        send_json(addr, "PATCH", "/api/devices/sensor-1/desired", r#"{"interval_s": 30, "mode": "eco"}"#).await;
    assert_eq!(status, 200, "{written}");
    assert_eq!(written["shadow"]["desired"]["interval_s"], 30);
    let (status, removed) = send_json(addr, "PATCH", "/api/devices/sensor-1/desired", r#"{"mode": null}"#).await;
    assert_eq!(status, 200);
    assert!(removed["shadow"]["desired"].get("mode").is_none());
    let (status, shadow) = get_json(addr, "/api/devices/sensor-1/shadow").await;
    assert_eq!((status, &shadow["shadow"]["delta"]["interval_s"]), (200, &serde_json::json!(30)));
    let (status, content_type, doc) =
        tokio::task::spawn_blocking(move || request(addr, "GET", "/api/devices/sensor-1/shadow.automerge", b""))
            .await
            .unwrap();
    assert_eq!((status, content_type.as_str()), (200, "application/octet-stream"));
    let loaded = Shadow::load(&doc, CLOUD_REPLICA, ShadowLimits::default()).unwrap();
    assert_eq!(loaded.get(Section::Desired, "interval_s"), Some(Value::Int(30)));

    // Bad requests: 4xx with a JSON error, never a panic.
    for (path, expected) in [
        ("/api/devices/nobody", 404),
        ("/api/devices/bad%20name", 400),
        ("/api/devices/sensor-1/events?limit=0", 400),
        ("/api/devices/sensor-1/events?limit=100000", 400),
        ("/api/devices/sensor-1/events?from_seq=abc", 400),
        ("/api/devices/sensor-1/events?from_seq=9&to_seq=3", 400),
        ("/api/devices/sensor-1/events?from_seq=1&from_ms=1", 400),
        ("/api/devices/sensor-1/events?from_ms=1&after_ms=4", 400),
        ("/api/devices/sensor-1/aggregates?resolution=day", 400),
        ("/api/devices/nobody/shadow", 404),
        ("/no/such/route", 404),
    ] {
        let (status, error) = get_json(addr, path).await;
        assert_eq!(status, expected, "{path}: {error}");
        assert!(error["error"].is_string(), "{path}: {error}");
    }
    for body in ["not json", "[1, 2]", "{}"] {
        let (status, error) = send_json(addr, "PATCH", "/api/devices/sensor-1/desired", body).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert!(error["error"].is_string());
    }

    let (status, _, metrics) =
        tokio::task::spawn_blocking(move || request(addr, "GET", "/metrics", b"")).await.unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("tidesync_cloud_log_head_position 150"), "{metrics}");
    assert!(metrics.contains("tidesync_cloud_projection_lag_events{projection=\"minute\"} 0"), "{metrics}");
    let (status, alerts) = get_json(addr, "/api/alerts?device=sensor-1").await;
    assert_eq!((status, alerts["alerts"].as_array().map(Vec::len)), (200, Some(0)));

    cloud.shutdown().await.unwrap();
}
