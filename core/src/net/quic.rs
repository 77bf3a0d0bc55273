//! quinn endpoints for fleet nodes and core's wire frames over QUIC streams.
//!
//! A [`Server`] accepts connections (at most [`TransportLimits::connections_max`] at once) and
//! hands out [`Link`]s whose peer identity comes from the client's certificate; a [`Client`]
//! connects to a server and checks the server's certificate. A [`FrameStream`] carries
//! [`Frame`]s over one bidirectional stream as `[LEB128 length][type][body]`, bounded by
//! [`FRAME_BYTES_MAX`]. This module decides nothing about the protocol: hosts read a frame, hand it
//! to a core session, and send what the session polls out.
//!
//! Invariant: every connection is mutual TLS 1.3 against the fleet CA and revocation list, and
//! 0-RTT is never accepted or sent (see [`super::tls`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;

use super::pki::{self, Identity, PkiError};
use super::tls::{self, Credentials, TlsError};
use crate::wire::{DecodeError, Frame, FrameDecoder, FRAME_BYTES_MAX, LENGTH_PREFIX_BYTES_MAX};

/// Bytes read from a stream per call.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Transport bounds and timers of an endpoint. Every field is a bound on a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// Close a connection after this long without any packet from the peer.
    pub idle_timeout_ms: u64,
    /// Send a QUIC ping after this long without sending, so NATs and the peer's idle timer stay
    /// open while a session has nothing to say.
    pub keep_alive_ms: u64,
    /// Bidirectional streams the peer may have open at once (a session uses one).
    pub streams_bidi_max: u32,
    /// Connections a server holds at once; more are refused before their handshake.
    pub connections_max: usize,
    /// Bytes a peer may send on one stream before we read them (QUIC flow-control window).
    pub stream_window_bytes: u32,
    /// How long [`FrameSender::finish`] waits for the peer to read what was sent.
    pub finish_timeout_ms: u64,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            streams_bidi_max: 4,
            connections_max: 10_000,
            stream_window_bytes: 4 * FRAME_BYTES_MAX as u32,
            finish_timeout_ms: 2_000,
        }
    }
}

/// Application close codes on the QUIC connection (the frames say why in detail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// The session ended normally.
    Done,
    /// The peer broke the protocol or sent a malformed frame.
    ProtocolError,
    /// The peer may not do what it tried.
    Unauthorized,
    /// The node is shutting down.
    ShuttingDown,
    /// The server is at its connection limit.
    Busy,
}

impl CloseCode {
    fn code(self) -> u32 {
        match self {
            CloseCode::Done => 0,
            CloseCode::ProtocolError => 1,
            CloseCode::Unauthorized => 2,
            CloseCode::ShuttingDown => 3,
            CloseCode::Busy => 4,
        }
    }

    fn reason(self) -> &'static [u8] {
        match self {
            CloseCode::Done => b"done",
            CloseCode::ProtocolError => b"protocol error",
            CloseCode::Unauthorized => b"unauthorized",
            CloseCode::ShuttingDown => b"shutting down",
            CloseCode::Busy => b"busy",
        }
    }
}

/// Why an endpoint, connection or stream operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The rustls configuration has no cipher suite QUIC can use for its initial packets.
    #[error("tls configuration unusable for QUIC: {0}")]
    NoInitialCipherSuite(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A limit does not fit QUIC's variable-length integers.
    #[error("transport limit out of range: {0}")]
    Limit(#[from] quinn::VarIntBoundsExceeded),
    /// The UDP socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A connection could not be started.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// The connection failed or was closed (handshake refused, timed out, closed by the peer).
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream was already finished or reset.
    #[error("stream closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    /// The peer sent bytes that are not a frame; the stream cannot be trusted any more.
    #[error("malformed frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The peer finished its stream in the middle of a frame.
    #[error("peer finished the stream inside a frame ({buffered_bytes} bytes buffered)")]
    TruncatedStream {
        /// Bytes of the incomplete frame.
        buffered_bytes: usize,
    },
    /// A frame to send is over [`FRAME_BYTES_MAX`].
    #[error("frame of {len_bytes} bytes exceeds the maximum of {FRAME_BYTES_MAX}")]
    FrameTooLarge {
        /// Its encoded length.
        len_bytes: usize,
    },
    /// The peer presented no certificate (cannot happen with the fleet TLS configs).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate names no usable identity.
    #[error("peer identity: {0}")]
    Identity(#[from] PkiError),
    /// A connection-level deadline passed.
    #[error("{what} timed out after {timeout_ms} ms")]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// How long.
        timeout_ms: u64,
    },
}

fn transport_config(limits: &TransportLimits) -> Result<Arc<TransportConfig>, NetError> {
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u64(limits.idle_timeout_ms)?)));
    transport.keep_alive_interval(Some(Duration::from_millis(limits.keep_alive_ms)));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(limits.streams_bidi_max));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    transport.stream_receive_window(VarInt::from_u32(limits.stream_window_bytes));
    Ok(Arc::new(transport))
}

/// The identity a connection's peer certificate names.
pub fn peer_identity(connection: &quinn::Connection) -> Result<Identity, NetError> {
    let any = connection.peer_identity().ok_or(NetError::NoPeerCertificate)?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| NetError::NoPeerCertificate)?;
    let leaf = chain.first().ok_or(NetError::NoPeerCertificate)?;
    Ok(pki::identity_of(leaf)?)
}

/// A QUIC server for fleet clients (a gateway for devices, the cloud for gateways).
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    open: Arc<AtomicUsize>,
    limits: TransportLimits,
}

impl Server {
    /// Binds a server on `addr` (port 0 picks a free port) with this node's credentials.
    pub fn bind(addr: SocketAddr, credentials: &Credentials, limits: TransportLimits) -> Result<Self, NetError> {
        let crypto = QuicServerConfig::try_from(tls::server_config(credentials)?)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport_config(&limits)?);
        // Connections still in their handshake count against the same bound.
        config.max_incoming(limits.connections_max.max(1));
        let endpoint = quinn::Endpoint::server(config, addr).map_err(|source| NetError::Bind { addr, source })?;
        Ok(Self { endpoint, open: Arc::new(AtomicUsize::new(0)), limits })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        let addr =
            self.endpoint.local_addr().map_err(|source| NetError::Bind { addr: ([0, 0, 0, 0], 0).into(), source })?;
        Ok(addr)
    }

    /// Connections open now (including those in their handshake).
    pub fn n_open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The next incoming connection, before its handshake; `None` once the server is closed.
    /// Connections over [`TransportLimits::connections_max`] are refused here with a log line.
    /// Run [`Pending::establish`] in its own task so a slow handshake does not hold others up.
    pub async fn accept(&self) -> Option<Pending> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let slot = Slot::take(&self.open);
            if slot.n_open > self.limits.connections_max {
                tracing::warn!(
                    remote = %incoming.remote_address(),
                    connections_max = self.limits.connections_max,
                    "refusing connection: at the connection limit"
                );
                incoming.refuse();
                continue;
            }
            return Some(Pending { incoming, slot });
        }
    }

    /// Stops accepting and closes every connection with `code`.
    pub fn close(&self, code: CloseCode) {
        self.endpoint.close(VarInt::from_u32(code.code()), code.reason());
    }

    /// Waits until every connection is closed and its close is sent, or `timeout_ms` passes.
    pub async fn wait_idle(&self, timeout_ms: u64) {
        let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), self.endpoint.wait_idle()).await;
    }
}

/// A counted place among a server's open connections, given back when dropped.
#[derive(Debug)]
struct Slot {
    open: Arc<AtomicUsize>,
    n_open: usize,
}

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        let n_open = open.fetch_add(1, Ordering::Relaxed) + 1;
        Self { open: Arc::clone(open), n_open }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An incoming connection whose handshake has not run yet.
#[derive(Debug)]
pub struct Pending {
    incoming: quinn::Incoming,
    slot: Slot,
}

impl Pending {
    /// The client's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Runs the TLS handshake and learns who the client is. A refused certificate fails here
    /// (and the TLS layer has logged why).
    pub async fn establish(self) -> Result<Link, NetError> {
        let remote = self.incoming.remote_address();
        let connection = self.incoming.await.inspect_err(|error| {
            tracing::info!(%remote, %error, "handshake failed");
        })?;
        let peer = match peer_identity(&connection) {
            Ok(peer) => peer,
            Err(error) => {
                tracing::warn!(%remote, %error, "refusing connection: certificate names no tidesync identity");
                connection.close(VarInt::from_u32(CloseCode::Unauthorized.code()), CloseCode::Unauthorized.reason());
                return Err(error);
            }
        };
        Ok(Link { connection, peer, _slot: Some(self.slot) })
    }
}

/// A QUIC client endpoint of a fleet node (a device towards gateways, a gateway towards the
/// cloud). One endpoint can hold connections to several servers.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl Client {
    /// A client bound to `bind` (usually `0.0.0.0:0` or `127.0.0.1:0`) with this node's credentials.
    pub fn bind(bind: SocketAddr, credentials: &Credentials, limits: &TransportLimits) -> Result<Self, NetError> {
        let crypto = QuicClientConfig::try_from(tls::client_config(credentials)?)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport_config(limits)?);
        let endpoint = quinn::Endpoint::client(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
        Ok(Self { endpoint, config })
    }

    /// Connects to the server at `addr`, which must present a certificate for `server_name`
    /// ([`pki::GATEWAY_SERVER_NAME`] or [`pki::CLOUD_SERVER_NAME`]), within `timeout_ms`.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str, timeout_ms: u64) -> Result<Link, NetError> {
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, server_name)
            .map_err(|source| NetError::Connect { addr, source })?;
        let connection = tokio::time::timeout(Duration::from_millis(timeout_ms), connecting)
            .await
            .map_err(|_| NetError::Timeout { what: "connect", timeout_ms })??;
        let peer = peer_identity(&connection)?;
        Ok(Link { connection, peer, _slot: None })
    }

    /// Closes every connection of this endpoint and waits up to `timeout_ms` for the closes to
    /// be sent.
    pub async fn shutdown(&self, code: CloseCode, timeout_ms: u64) {
        self.endpoint.close(VarInt::from_u32(code.code()), code.reason());
        let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), self.endpoint.wait_idle()).await;
    }
}

/// An established, authenticated connection.
#[derive(Debug)]
pub struct Link {
    connection: quinn::Connection,
    peer: Identity,
    /// Held for the server's connection count; `None` on the client side.
    _slot: Option<Slot>,
}

impl Link {
    /// Who the peer is, from its certificate.
    pub fn peer(&self) -> Identity {
        self.peer
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The underlying quinn connection (for stats and tests).
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Opens the session's stream (client side). The server sees it with the first frame sent.
    pub async fn open_stream(&self, limits: &TransportLimits) -> Result<FrameStream, NetError> {
        let (send, recv) = self.connection.open_bi().await?;
        Ok(FrameStream::new(send, recv, limits))
    }

    /// Waits for the client to open its session stream (server side).
    pub async fn accept_stream(&self, limits: &TransportLimits) -> Result<FrameStream, NetError> {
        let (send, recv) = self.connection.accept_bi().await?;
        Ok(FrameStream::new(send, recv, limits))
    }

    /// Closes the connection at once with `code`. Unsent stream data is dropped: call
    /// [`FrameSender::finish`] first to deliver the last frames.
    pub fn close(&self, code: CloseCode) {
        self.connection.close(VarInt::from_u32(code.code()), code.reason());
    }

    /// Resolves when the connection is closed, with why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.connection.closed().await
    }
}

/// Frames over one bidirectional QUIC stream. Split it to read and write from different tasks.
#[derive(Debug)]
pub struct FrameStream {
    /// The writing half.
    pub sender: FrameSender,
    /// The reading half.
    pub receiver: FrameReceiver,
}

impl FrameStream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream, limits: &TransportLimits) -> Self {
        Self {
            sender: FrameSender { send, buffer: Vec::new(), finish_timeout_ms: limits.finish_timeout_ms, n_bytes: 0 },
            receiver: FrameReceiver {
                recv,
                decoder: FrameDecoder::new(),
                chunk: vec![0; READ_CHUNK_BYTES],
                n_bytes: 0,
                n_unknown: 0,
            },
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), NetError> {
        self.sender.send(frame).await
    }

    /// The next frame; `None` when the peer finished the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        self.receiver.recv().await
    }

    /// Splits into halves.
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (self.sender, self.receiver)
    }
}

/// The writing half of a [`FrameStream`]. Frames can be queued and written together, so a burst
/// of small frames (acks) costs one write.
#[derive(Debug)]
pub struct FrameSender {
    send: quinn::SendStream,
    buffer: Vec<u8>,
    finish_timeout_ms: u64,
    n_bytes: u64,
}

impl FrameSender {
    /// Encodes `frame` into the send buffer; [`FrameSender::flush`] writes it.
    pub fn queue(&mut self, frame: &Frame) -> Result<(), NetError> {
        let start = self.buffer.len();
        frame.encode(&mut self.buffer);
        let len_bytes = self.buffer.len() - start;
        if len_bytes > FRAME_BYTES_MAX + LENGTH_PREFIX_BYTES_MAX {
            self.buffer.truncate(start);
            return Err(NetError::FrameTooLarge { len_bytes });
        }
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), NetError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.send.write_all(&self.buffer).await?;
        self.n_bytes += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Sends one frame now.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), NetError> {
        self.queue(frame)?;
        self.flush().await
    }

    /// Writes bytes as they are, bypassing the encoder: for tools and tests that must send what a
    /// broken or hostile peer would.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), NetError> {
        self.flush().await?;
        self.send.write_all(bytes).await?;
        self.n_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written to the stream so far.
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }

    /// Flushes, ends the stream, and waits (up to the finish timeout) until the peer has read
    /// everything, so a goodbye or error frame is delivered before the connection closes.
    pub async fn finish(&mut self) -> Result<(), NetError> {
        self.flush().await?;
        self.send.finish()?;
        let timeout_ms = self.finish_timeout_ms;
        match tokio::time::timeout(Duration::from_millis(timeout_ms), self.send.stopped()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(NetError::Timeout { what: "finishing the stream", timeout_ms }),
        }
    }
}

/// The reading half of a [`FrameStream`]. [`FrameReceiver::recv`] is cancel-safe: it may be used
/// in `tokio::select!` beside timers without losing bytes.
#[derive(Debug)]
pub struct FrameReceiver {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    chunk: Vec<u8>,
    n_bytes: u64,
    n_unknown: u64,
}

impl FrameReceiver {
    /// The next frame; `Ok(None)` when the peer finished the stream cleanly between frames.
    /// Frames of a type this build does not know are skipped (and logged), as the wire rules
    /// say; any other decode error means the stream is broken: send an error frame and close.
    pub async fn recv(&mut self) -> Result<Option<Frame>, NetError> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(DecodeError::UnknownFrameType { tag }) => {
                    self.n_unknown += 1;
                    tracing::debug!(tag, "skipping a frame of unknown type");
                    continue;
                }
                Err(error) => return Err(error.into()),
            }
            match self.recv.read(&mut self.chunk).await? {
                Some(n_read) => {
                    self.n_bytes += n_read as u64;
                    // `read` never returns more than the buffer's length.
                    self.decoder.push(&self.chunk[..n_read.min(self.chunk.len())]);
                }
                None if self.decoder.buffered_bytes() == 0 => return Ok(None),
                None => return Err(NetError::TruncatedStream { buffered_bytes: self.decoder.buffered_bytes() }),
            }
        }
    }

    /// Bytes read from the stream so far.
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }

    /// Frames of unknown type skipped so far.
    pub fn n_unknown(&self) -> u64 {
        self.n_unknown
    }
}
