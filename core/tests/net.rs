//! The `net` feature over real QUIC on 127.0.0.1: fleet PKI, mutual TLS refusals (wrong CA,
//! expired, not yet valid, revoked), connection limits and frame transport.
#![cfg(feature = "net")]
// Helpers outside #[test] functions unwrap too: a failing setup is a failing test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use tidesync_core::event::{DeviceId, GatewayId, Millis, Payload, SensorReading, Seq};
use tidesync_core::ledger::{Ledger, MemLedger};
use tidesync_core::net::pki::{self, FleetCa, Identity};
use tidesync_core::net::quic::{Client, CloseCode, NetError, Server, TransportLimits};
use tidesync_core::net::tls::{self, Credentials};
use tidesync_core::vv::VersionVector;
use tidesync_core::wire::{Ack, DecodeError, Frame, Hello, Peer, ShadowSync, FRAME_BYTES_MAX};

const DAY_MS: u64 = 86_400_000;
const CONNECT_TIMEOUT_MS: u64 = 5_000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap()
}

fn device(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn gateway(name: &str) -> GatewayId {
    GatewayId::new(name).unwrap()
}

struct Fleet {
    ca: FleetCa,
    next_serial: u64,
    revoked: Vec<u64>,
}

impl Fleet {
    fn new(name: &str) -> Self {
        let now = now_ms();
        Self {
            ca: FleetCa::create(name, Millis(now - DAY_MS), Millis(now + 365 * DAY_MS)).unwrap(),
            next_serial: 1,
            revoked: Vec::new(),
        }
    }

    /// Credentials for `identity`, valid from `from_ms` to `until_ms` relative to now.
    fn credentials_valid(&mut self, identity: Identity, from_ms: i64, until_ms: i64) -> (Credentials, u64) {
        let now = now_ms() as i64;
        let serial = self.next_serial;
        self.next_serial += 1;
        let issued =
            self.ca.issue(identity, serial, Millis((now + from_ms) as u64), Millis((now + until_ms) as u64)).unwrap();
        let crl =
            self.ca.revocation_list(1, &self.revoked, Millis(now_ms() - 1_000), Millis(now_ms() + DAY_MS)).unwrap();
        let credentials = Credentials {
            ca_pem: self.ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            crl_pem: Some(crl),
        };
        (credentials, serial)
    }

    fn credentials(&mut self, identity: Identity) -> Credentials {
        self.credentials_valid(identity, -(DAY_MS as i64), 30 * DAY_MS as i64).0
    }

    /// Revokes `serial` and returns the new revocation list.
    fn revoke(&mut self, serial: u64) -> String {
        self.revoked.push(serial);
        self.ca.revocation_list(2, &self.revoked, Millis(now_ms() - 1_000), Millis(now_ms() + DAY_MS)).unwrap()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn server(credentials: &Credentials, limits: TransportLimits) -> (Server, SocketAddr) {
    let server = Server::bind(loopback(), credentials, limits).unwrap();
    let addr = server.local_addr().unwrap();
    (server, addr)
}

/// Tries a full handshake plus one frame each way; returns the server's and client's results.
async fn try_session(
    server_credentials: &Credentials,
    client_credentials: &Credentials,
) -> (Result<Identity, NetError>, Result<(), NetError>) {
    let (server, addr) = server(server_credentials, TransportLimits::default());
    let server_task = tokio::spawn(async move {
        let pending = server.accept().await.expect("server open");
        let link = pending.establish().await?;
        let mut stream = link.accept_stream(&TransportLimits::default()).await?;
        let frame = stream.recv().await?;
        assert!(matches!(frame, Some(Frame::KeepAlive(_))));
        stream.send(&Frame::KeepAlive(tidesync_core::wire::KeepAlive { backlog_events: 0 })).await?;
        stream.sender.finish().await.ok();
        Ok::<_, NetError>(link.peer())
    });
    let client = Client::bind(loopback(), client_credentials, &TransportLimits::default()).unwrap();
    let client_result = async {
        let link = client.connect(addr, pki::GATEWAY_SERVER_NAME, CONNECT_TIMEOUT_MS).await?;
        let mut stream = link.open_stream(&TransportLimits::default()).await?;
        stream.send(&Frame::KeepAlive(tidesync_core::wire::KeepAlive { backlog_events: 7 })).await?;
        match stream.recv().await? {
            Some(Frame::KeepAlive(_)) => Ok(()),
            other => panic!("unexpected {other:?}"),
        }
    }
    .await;
    let server_result = server_task.await.unwrap();
    (server_result, client_result)
}

#[test]
fn certificates_name_their_holder_and_serial() {
    let mut fleet = Fleet::new("test");
    let (credentials, serial) = fleet.credentials_valid(Identity::Device(device("pump-7")), -1_000, DAY_MS as i64);
    let der = pki::first_cert_der(&credentials.cert_pem).unwrap();
    assert_eq!(pki::identity_of(&der).unwrap(), Identity::Device(device("pump-7")));
    assert_eq!(pki::serial_of(&der).unwrap(), serial);
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let der = pki::first_cert_der(&gateway_credentials.cert_pem).unwrap();
    assert_eq!(pki::identity_of(&der).unwrap(), Identity::Gateway(gateway("site-1")));
    // The CA itself names no tidesync identity.
    let ca_der = pki::first_cert_der(fleet.ca.cert_pem()).unwrap();
    assert!(pki::identity_of(&ca_der).is_err());
    // A CA reloaded from its files issues certificates the same clients accept.
    let reloaded = FleetCa::from_pem(fleet.ca.cert_pem(), fleet.ca.key_pem()).unwrap();
    let issued = reloaded.issue(Identity::Cloud, 99, Millis(now_ms() - DAY_MS), Millis(now_ms() + DAY_MS)).unwrap();
    let der = pki::first_cert_der(&issued.cert_pem).unwrap();
    assert_eq!(pki::identity_of(&der).unwrap(), Identity::Cloud);
    assert_eq!(pki::serial_of(&der).unwrap(), 99);
}

#[tokio::test]
async fn mutual_tls_names_both_peers() {
    let mut fleet = Fleet::new("test");
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let device_credentials = fleet.credentials(Identity::Device(device("pump-7")));
    let (server, addr) = server(&gateway_credentials, TransportLimits::default());
    let client = Client::bind(loopback(), &device_credentials, &TransportLimits::default()).unwrap();
    let (link, accepted) = tokio::join!(client.connect(addr, pki::GATEWAY_SERVER_NAME, CONNECT_TIMEOUT_MS), async {
        server.accept().await.unwrap().establish().await
    });
    assert_eq!(link.unwrap().peer(), Identity::Gateway(gateway("site-1")));
    assert_eq!(accepted.unwrap().peer(), Identity::Device(device("pump-7")));
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let mut fleet = Fleet::new("test");
    let mut other = Fleet::new("other");
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let mut intruder = other.credentials(Identity::Device(device("pump-7")));
    // The intruder trusts our CA, so only the server's check stands in its way.
    intruder.ca_pem = fleet.ca.cert_pem().to_string();
    let (server_result, client_result) = try_session(&gateway_credentials, &intruder).await;
    // webpki reports an unknown issuer, or (with a revocation list configured) that no list of
    // the certificate's issuer covers it; either way it is refused.
    let error = server_result.unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer") || error.contains("UnknownRevocationStatus"), "{error}");
    assert!(client_result.is_err());
    let der = pki::first_cert_der(&intruder.cert_pem).unwrap();
    let line = tls::refusal(&der, &rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
    assert_eq!(line, "refused device pump-7: it was not issued by the fleet CA");
}

#[tokio::test]
async fn client_refuses_a_gateway_of_another_fleet() {
    let mut fleet = Fleet::new("test");
    let mut other = Fleet::new("other");
    let mut rogue_gateway = other.credentials(Identity::Gateway(gateway("site-1")));
    rogue_gateway.ca_pem = fleet.ca.cert_pem().to_string();
    let device_credentials = fleet.credentials(Identity::Device(device("pump-7")));
    let (_server_result, client_result) = try_session(&rogue_gateway, &device_credentials).await;
    let error = client_result.unwrap_err().to_string();
    assert!(error.contains("UnknownIssuer") || error.contains("unknown"), "{error}");
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let mut fleet = Fleet::new("test");
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let (expired, _) =
        fleet.credentials_valid(Identity::Device(device("pump-7")), -2 * DAY_MS as i64, -(DAY_MS as i64));
    let (server_result, client_result) = try_session(&gateway_credentials, &expired).await;
    let error = server_result.unwrap_err().to_string();
    assert!(error.to_lowercase().contains("expired"), "{error}");
    assert!(client_result.is_err());
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused() {
    let mut fleet = Fleet::new("test");
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let (early, _) = fleet.credentials_valid(Identity::Device(device("pump-7")), DAY_MS as i64, 2 * DAY_MS as i64);
    let (server_result, client_result) = try_session(&gateway_credentials, &early).await;
    let error = server_result.unwrap_err().to_string();
    assert!(error.contains("not valid yet"), "{error}");
    assert!(client_result.is_err());
}

#[tokio::test]
async fn revoked_certificate_is_refused_and_others_still_pass() {
    let mut fleet = Fleet::new("test");
    let (device_credentials, serial) =
        fleet.credentials_valid(Identity::Device(device("pump-7")), -(DAY_MS as i64), DAY_MS as i64);
    let (mut gateway_credentials, _) =
        fleet.credentials_valid(Identity::Gateway(gateway("site-1")), -(DAY_MS as i64), DAY_MS as i64);
    let (server_result, client_result) = try_session(&gateway_credentials, &device_credentials).await;
    assert_eq!(server_result.unwrap(), Identity::Device(device("pump-7")));
    client_result.unwrap();

    gateway_credentials.crl_pem = Some(fleet.revoke(serial));
    let (server_result, client_result) = try_session(&gateway_credentials, &device_credentials).await;
    let error = server_result.unwrap_err().to_string();
    assert!(error.contains("Revoked"), "{error}");
    assert!(client_result.is_err());
    let der = pki::first_cert_der(&device_credentials.cert_pem).unwrap();
    let line = tls::refusal(&der, &rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
    assert_eq!(line, "refused device pump-7: it is on the fleet revocation list");

    let other_device = fleet.credentials(Identity::Device(device("pump-8")));
    let (server_result, _) = try_session(&gateway_credentials, &other_device).await;
    assert_eq!(server_result.unwrap(), Identity::Device(device("pump-8")));
}

#[tokio::test]
async fn connections_over_the_limit_are_refused() {
    let mut fleet = Fleet::new("test");
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let limits = TransportLimits { connections_max: 1, ..TransportLimits::default() };
    let (server, addr) = server(&gateway_credentials, limits);
    let server = std::sync::Arc::new(server);
    let accepting = std::sync::Arc::clone(&server);
    let (links_tx, mut links_rx) = tokio::sync::mpsc::unbounded_channel();
    let accept_task = tokio::spawn(async move {
        while let Some(pending) = accepting.accept().await {
            if let Ok(link) = pending.establish().await {
                let _ = links_tx.send(link);
            }
        }
    });
    let first =
        Client::bind(loopback(), &fleet.credentials(Identity::Device(device("a"))), &TransportLimits::default())
            .unwrap();
    let second =
        Client::bind(loopback(), &fleet.credentials(Identity::Device(device("b"))), &TransportLimits::default())
            .unwrap();
    let _first_link = first.connect(addr, pki::GATEWAY_SERVER_NAME, CONNECT_TIMEOUT_MS).await.unwrap();
    let first_server_link = links_rx.recv().await.unwrap();
    assert_eq!(first_server_link.peer(), Identity::Device(device("a")));
    let refused = second.connect(addr, pki::GATEWAY_SERVER_NAME, CONNECT_TIMEOUT_MS).await;
    assert!(refused.is_err(), "second connection accepted");
    assert_eq!(server.n_open(), 1);
    // Once the first goes, its place is free again.
    first_server_link.close(CloseCode::Done);
    drop(first_server_link);
    assert_eq!(server.n_open(), 0);
    let retried = second.connect(addr, pki::GATEWAY_SERVER_NAME, CONNECT_TIMEOUT_MS).await.unwrap();
    assert_eq!(retried.peer(), Identity::Gateway(gateway("site-1")));
    assert_eq!(links_rx.recv().await.unwrap().peer(), Identity::Device(device("b")));
    server.close(CloseCode::ShuttingDown);
    accept_task.await.unwrap();
}

fn batch_of(device_id: DeviceId, n_events: u64) -> tidesync_core::wire::EventBatch {
    let mut ledger = MemLedger::new();
    for index in 0..n_events {
        let payload =
            Payload::Reading(SensorReading { sensor: "temp".into(), value: index as f64 / 4.0, unit: "Cel".into() });
        ledger.record(device_id, Millis(1_000 + index), Millis(1_000 + index), payload).unwrap();
    }
    ledger.read(&device_id, Seq(1), n_events as usize).unwrap().unwrap()
}

/// A connected pair: the client's stream and the server's stream.
async fn stream_pair(
) -> (tidesync_core::net::quic::FrameStream, tidesync_core::net::quic::FrameStream, Vec<Box<dyn std::any::Any + Send>>)
{
    let mut fleet = Fleet::new("test");
    let gateway_credentials = fleet.credentials(Identity::Gateway(gateway("site-1")));
    let device_credentials = fleet.credentials(Identity::Device(device("pump-7")));
    let (server, addr) = server(&gateway_credentials, TransportLimits::default());
    let client = Client::bind(loopback(), &device_credentials, &TransportLimits::default()).unwrap();
    let (client_link, server_link) =
        tokio::join!(client.connect(addr, pki::GATEWAY_SERVER_NAME, CONNECT_TIMEOUT_MS), async {
            server.accept().await.unwrap().establish().await
        });
    let (client_link, server_link) = (client_link.unwrap(), server_link.unwrap());
    let mut client_stream = client_link.open_stream(&TransportLimits::default()).await.unwrap();
    // The server sees the stream only once something is sent on it.
    client_stream.send(&Frame::KeepAlive(tidesync_core::wire::KeepAlive { backlog_events: 0 })).await.unwrap();
    let mut server_stream = server_link.accept_stream(&TransportLimits::default()).await.unwrap();
    assert!(matches!(server_stream.recv().await.unwrap(), Some(Frame::KeepAlive(_))));
    let keep: Vec<Box<dyn std::any::Any + Send>> =
        vec![Box::new(server), Box::new(client), Box::new(client_link), Box::new(server_link)];
    (client_stream, server_stream, keep)
}

#[tokio::test]
async fn frames_cross_intact_and_a_clean_finish_ends_the_stream() {
    let (mut client_stream, mut server_stream, _keep) = stream_pair().await;
    let pump = device("pump-7");
    let frames = vec![
        Frame::Hello(Hello {
            protocol_min: 1,
            protocol_max: 1,
            peer: Peer::Device(pump),
            vv: VersionVector::new(),
            wall: Millis(now_ms()),
        }),
        Frame::Events(batch_of(pump, 1_000)),
        Frame::ShadowSync(ShadowSync { device: pump, message: vec![7; 300_000] }),
        Frame::Custody(Ack { device: pump, up_to: Seq(1_000) }),
    ];
    for frame in &frames {
        client_stream.sender.queue(frame).unwrap();
    }
    client_stream.sender.flush().await.unwrap();
    client_stream.sender.finish().await.ok();
    let mut received = Vec::new();
    while let Some(frame) = server_stream.recv().await.unwrap() {
        received.push(frame);
    }
    assert_eq!(received, frames);
    assert_eq!(server_stream.receiver.n_bytes(), client_stream.sender.n_bytes());
}

#[tokio::test]
async fn unknown_frame_types_are_skipped() {
    let (mut client_stream, mut server_stream, _keep) = stream_pair().await;
    // Length 3, type 200, two body bytes: a frame from a newer build.
    client_stream.sender.send_raw(&[3, 200, 1, 2]).await.unwrap();
    client_stream.send(&Frame::Commit(Ack { device: device("pump-7"), up_to: Seq(3) })).await.unwrap();
    assert_eq!(
        server_stream.recv().await.unwrap(),
        Some(Frame::Commit(Ack { device: device("pump-7"), up_to: Seq(3) }))
    );
    assert_eq!(server_stream.receiver.n_unknown(), 1);
}

#[tokio::test]
async fn oversized_frame_is_refused_before_its_body_arrives() {
    let (mut client_stream, mut server_stream, _keep) = stream_pair().await;
    // A LEB128 prefix claiming FRAME_BYTES_MAX + 1 bytes, and nothing after it.
    let mut prefix = Vec::new();
    let mut len = FRAME_BYTES_MAX as u64 + 1;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            prefix.push(byte);
            break;
        }
        prefix.push(byte | 0x80);
    }
    client_stream.sender.send_raw(&prefix).await.unwrap();
    match server_stream.recv().await {
        Err(NetError::Decode(DecodeError::FrameTooLarge { len_bytes, .. })) => {
            assert_eq!(len_bytes, FRAME_BYTES_MAX as u64 + 1)
        }
        other => panic!("expected frame too large, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_and_truncated_frames_are_errors() {
    let (mut client_stream, mut server_stream, _keep) = stream_pair().await;
    // A custody frame whose body is not a postcard Ack.
    client_stream.sender.send_raw(&[2, 4, 0xff]).await.unwrap();
    assert!(matches!(server_stream.recv().await, Err(NetError::Decode(_))));

    let (mut client_stream, mut server_stream, _keep) = stream_pair().await;
    // Half a frame, then the end of the stream.
    client_stream.sender.send_raw(&[10, 9, 1]).await.unwrap();
    client_stream.sender.finish().await.ok();
    assert!(matches!(server_stream.recv().await, Err(NetError::TruncatedStream { buffered_bytes: 3 })));
}
