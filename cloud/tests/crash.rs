//! kill -9 of the real `tidesync-cloud run` process during ingest: a gateway (core's
//! `Uplink::for_gateway` over an in-memory spool that prunes on commit) streams events, the cloud
//! is SIGKILLed mid-stream and started again on the same files, and in the end the store holds
//! every event exactly once. A commit ack the cloud sent for events it then lost would leave a
//! hole: the gateway prunes on commit and never sends them again.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidesync_cloud::store::Backend;
use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::net::pki::{FleetCa, Identity, CLOUD_SERVER_NAME};
use tidesync_core::net::quic::{Client, TransportLimits};
use tidesync_core::net::tls::Credentials;
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::{MemStore, SessionConfig, SessionEvent, ShadowKeeping, Uplink};

const DEVICES: u64 = 4;
const EVENTS_PER_DEVICE: u64 = 5_000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn start_cloud(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tidesync-cloud"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn device(index: u64) -> DeviceId {
    DeviceId::new(&format!("pump-{index}")).unwrap()
}

/// One session: sends until everything is committed, or until `kill_at` commits were seen (then
/// returns so the caller can kill the cloud), or the connection fails.
async fn session(
    client: &Client,
    addr: SocketAddr,
    spool: &mut MemStore,
    committed_total: &mut u64,
    kill_at: Option<u64>,
) -> bool {
    let Ok(link) = client.connect(addr, CLOUD_SERVER_NAME, 2_000).await else { return false };
    let Ok(stream) = link.open_stream(&TransportLimits::default()).await else { return false };
    let (mut sender, mut receiver) = stream.split();
    let gateway = GatewayId::new("gw-1").unwrap();
    let mut uplink = Uplink::for_gateway(gateway, SessionConfig::default(), Millis(now_ms()));
    for index in 0..DEVICES {
        uplink.handle_appended(device(index));
    }
    loop {
        let now = Millis(now_ms());
        while let Some(frame) = uplink.poll_transmit(now, spool).unwrap() {
            if sender.send(&frame).await.is_err() {
                return false;
            }
        }
        while let Some(event) = uplink.poll_event() {
            if let SessionEvent::Committed { device, up_to } = event {
                let before = spool.ledger.committed(&device);
                if up_to > before {
                    *committed_total += up_to.0 - before.0;
                    spool.mark_committed(device, up_to).unwrap();
                }
            }
        }
        if *committed_total == DEVICES * EVENTS_PER_DEVICE {
            return true;
        }
        if kill_at.is_some_and(|kill_at| *committed_total >= kill_at) {
            return false;
        }
        let frame = tokio::select! {
            frame = receiver.recv() => frame,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                uplink.handle_timeout(Millis(now_ms()));
                continue;
            }
        };
        match frame {
            Ok(Some(frame)) => {
                if uplink.handle_frame(Millis(now_ms()), frame, spool).is_err() {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_killed_during_ingest_loses_nothing_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let (not_before, not_after) = (Millis(now - 3_600_000), Millis(now + 86_400_000));
    let ca = FleetCa::create("crash", not_before, not_after).unwrap();
    let cloud_cert = ca.issue(Identity::Cloud, 1, not_before, not_after).unwrap();
    let gateway_cert = ca.issue(Identity::Gateway(GatewayId::new("gw-1").unwrap()), 2, not_before, not_after).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("cloud.pem"), &cloud_cert.cert_pem).unwrap();
    std::fs::write(dir.path().join("cloud.key"), &cloud_cert.key_pem).unwrap();
    let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = dir.path().join("cloud.toml");
    std::fs::write(
        &config,
        format!("listen = \"{addr}\"\ndata_dir = \"data\"\n[tls]\nca = \"ca.pem\"\ncert = \"cloud.pem\"\nkey = \"cloud.key\"\n\
                 [limits]\ndevice_events_per_s = 0\ngateway_events_per_s = 0\n"),
    )
    .unwrap();

    let mut spool = MemStore::new("gateway:gw-1", MemLedger::pruning(), ShadowKeeping::All, ShadowLimits::default());
    for index in 0..DEVICES {
        for i in 0..EVENTS_PER_DEVICE {
            let reading = Payload::Reading(SensorReading { sensor: "t".into(), value: i as f64, unit: "Cel".into() });
            spool.ledger.record(device(index), Millis(now + i), Millis(now + i), reading).unwrap();
        }
    }
    let credentials = Credentials {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: gateway_cert.cert_pem,
        key_pem: gateway_cert.key_pem,
        crl_pem: None,
    };
    let client = Client::bind("127.0.0.1:0".parse().unwrap(), &credentials, &TransportLimits::default()).unwrap();

    let mut cloud = start_cloud(&config);
    let mut committed_total = 0;
    let mut kills = 0;
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress: {committed_total} committed");
        // Kill mid-stream twice: once a quarter is committed, once half is.
        let kill_at = match kills {
            0 => Some(DEVICES * EVENTS_PER_DEVICE / 4),
            1 => Some(DEVICES * EVENTS_PER_DEVICE / 2),
            _ => None,
        };
        let done = session(&client, addr, &mut spool, &mut committed_total, kill_at).await;
        if done {
            break;
        }
        if kill_at.is_some_and(|kill_at| committed_total >= kill_at) {
            cloud.kill().unwrap(); // SIGKILL
            cloud.wait().unwrap();
            kills += 1;
            cloud = start_cloud(&config);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kills, 2);
    cloud.kill().unwrap();
    cloud.wait().unwrap();

    assert!(spool.ledger.is_empty(), "the gateway pruned everything after commits");
    let backend = Backend::Sqlite { path: dir.path().join("data").join("cloud.sqlite3") };
    let mut reader = backend.open_reader().unwrap();
    for index in 0..DEVICES {
        let events = reader.read_seqs(&device(index), Seq(1), Seq(u64::MAX >> 1), 1 << 20).unwrap();
        let seqs: Vec<u64> = events.iter().map(|stored| stored.event.id.seq.0).collect();
        assert_eq!(seqs, (1..=EVENTS_PER_DEVICE).collect::<Vec<_>>(), "device {index}: lost or doubled events");
    }
}
