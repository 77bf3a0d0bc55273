//! The ingest baseline: the same event batches as JSON lines over plain TCP (no TLS, no
//! sessions), into the same SQLite spool with the same group commit, acknowledged with a JSON line
//! after the commit. It is what a simple hand-written ingest would do; the gateway has to beat it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tidesync_core::event::{DeviceId, Event, Seq};
use tidesync_core::ledger::Ledger;
use tidesync_core::shadow::ShadowLimits;
use tidesync_core::sync::MemStore;
use tidesync_core::wire::EventBatch;
use tidesync_gateway::spool::Spool;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Barrier};

use super::{LoadOptions, LoadReport};
use crate::device_store;

/// Requests waiting for the spool thread, at most.
const QUEUE_REQUESTS_MAX: usize = 4_096;
/// Requests in one group commit, at most (as the gateway's core loop).
const GROUP_REQUESTS_MAX: usize = 4_096;
/// A request line longer than this closes the connection.
const LINE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// One batch on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct JsonBatch {
    device: DeviceId,
    from: Seq,
    events: Vec<Event>,
}

/// The acknowledgement after the group commit.
#[derive(Debug, Serialize, Deserialize)]
struct JsonAck {
    custody: Seq,
}

type Request = (EventBatch, mpsc::UnboundedSender<Seq>);

/// A running baseline server.
#[derive(Debug)]
pub struct JsonServer {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    queue: Option<mpsc::Sender<Request>>,
    spool_thread: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

impl JsonServer {
    /// Opens a spool at `spool_path` and listens on a loopback port.
    pub async fn start(spool_path: &Path) -> anyhow::Result<Self> {
        let mut spool = Spool::open(spool_path, "gateway:json", u64::MAX, ShadowLimits::default())?;
        let (queue, mut requests) = mpsc::channel::<Request>(QUEUE_REQUESTS_MAX);
        let spool_thread = std::thread::Builder::new().name("json-spool".into()).spawn(move || {
            let mut n_commits = 0u64;
            let mut group = Vec::new();
            while let Some(first) = requests.blocking_recv() {
                group.push(first);
                while group.len() < GROUP_REQUESTS_MAX {
                    let Ok(request) = requests.try_recv() else { break };
                    group.push(request);
                }
                let mut acks = Vec::with_capacity(group.len());
                for (batch, reply) in group.drain(..) {
                    match spool.append(&batch) {
                        Ok(appended) => acks.push((reply, appended.high)),
                        Err(error) => tracing::warn!(%error, "baseline append refused"),
                    }
                }
                spool.commit()?;
                n_commits += 1;
                for (reply, high) in acks {
                    let _ = reply.send(high);
                }
            }
            Ok(n_commits)
        })?;
        let listener = TcpListener::bind(crate::loopback_any()).await?;
        let addr = listener.local_addr()?;
        let accept_queue = queue.clone();
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, accept_queue.clone()));
            }
        });
        Ok(Self { addr, accept, queue: Some(queue), spool_thread: Some(spool_thread) })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets the spool thread finish and returns how many group commits it made.
    pub async fn stop(mut self) -> anyhow::Result<u64> {
        self.accept.abort();
        let _ = (&mut self.accept).await;
        drop(self.queue.take());
        let thread = self.spool_thread.take().context("stopped twice")?;
        // Connection tasks still hold queue senders until their sockets close.
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("spool thread panicked"))?
    }
}

async fn serve(socket: TcpStream, queue: mpsc::Sender<Request>) {
    let _ = socket.set_nodelay(true);
    let (read_half, mut write_half) = socket.into_split();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Seq>();
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(high) = ack_rx.recv().await {
            out.clear();
            let mut high = high;
            while let Ok(next) = ack_rx.try_recv() {
                high = high.max(next);
            }
            if serde_json::to_writer(&mut out, &JsonAck { custody: high }).is_err() {
                return;
            }
            out.push(b'\n');
            if write_half.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let mut reader = BufReader::new(read_half);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) if line.len() > LINE_BYTES_MAX => break,
            Ok(_) => {}
        }
        let Ok(request) = serde_json::from_str::<JsonBatch>(&line) else { break };
        let Ok(batch) = EventBatch::new(request.device, request.from, request.events) else { break };
        if queue.send((batch, ack_tx.clone())).await.is_err() {
            break;
        }
    }
    drop(ack_tx);
    let _ = writer.await;
}

/// What one baseline device did.
#[derive(Debug, Default)]
struct Outcome {
    custody: Seq,
    bytes_up: u64,
    bytes_down: u64,
    last_custody_at: Option<Instant>,
    error: Option<String>,
}

/// Runs `n_devices` devices against the baseline server at `addr`, with the batch size and
/// batches in flight of `options.session` (the same window the QUIC devices get).
pub async fn run(addr: SocketAddr, devices: &[DeviceId], options: &LoadOptions) -> LoadReport {
    let barrier = Arc::new(Barrier::new(devices.len() + 1));
    let deadline = Instant::now() + options.timeout;
    let connect_started = Instant::now();
    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for device in devices.iter().copied() {
        let barrier = Arc::clone(&barrier);
        let options = options.clone();
        let mut start = start_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = Outcome::default();
            let prepared = async {
                let store = device_store(device, options.n_events_per_device)?;
                let socket = TcpStream::connect(addr).await.context("connect")?;
                socket.set_nodelay(true)?;
                anyhow::Ok((store, socket))
            }
            .await;
            barrier.wait().await;
            let result = match prepared {
                Ok((store, socket)) => {
                    let _ = start.wait_for(|started| *started).await;
                    send_all(device, &store, socket, &options, deadline, &mut outcome).await
                }
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                outcome.error = Some(format!("{device}: {error:#}"));
            }
            outcome
        }));
    }
    barrier.wait().await;
    let connect_elapsed = connect_started.elapsed();
    let started = Instant::now();
    let _ = start_tx.send(true);
    let mut report = LoadReport {
        n_devices: devices.len(),
        n_events: devices.len() as u64 * options.n_events_per_device,
        connect_elapsed,
        ..LoadReport::default()
    };
    let mut last_custody_at = started;
    for task in tasks {
        let outcome =
            task.await.unwrap_or_else(|error| Outcome { error: Some(error.to_string()), ..Default::default() });
        report.n_custody += outcome.custody.0;
        report.frame_bytes_up += outcome.bytes_up;
        report.frame_bytes_down += outcome.bytes_down;
        if let Some(at) = outcome.last_custody_at {
            last_custody_at = last_custody_at.max(at);
        }
        match outcome.error {
            Some(error) => {
                report.n_errors += 1;
                report.errors.push(error);
            }
            None => report.n_connected += 1,
        }
    }
    report.custody_elapsed = last_custody_at.saturating_duration_since(started);
    report
}

async fn send_all(
    device: DeviceId,
    store: &MemStore,
    socket: TcpStream,
    options: &LoadOptions,
    deadline: Instant,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let (read_half, mut write_half) = socket.into_split();
    let mut acks = BufReader::new(read_half).lines();
    let n_events = Seq(options.n_events_per_device);
    let batch_events = options.session.batch_events_max;
    let window = options.session.batches_in_flight_max.max(1);
    let mut next = Seq(1);
    let mut in_flight: std::collections::VecDeque<Seq> = std::collections::VecDeque::new();
    let mut line = Vec::new();
    while outcome.custody < n_events {
        while in_flight.len() < window && next <= n_events {
            let batch = store.ledger.read(&device, next, batch_events)?.context("the device ran out of events")?;
            let last = batch.last_seq();
            line.clear();
            serde_json::to_writer(&mut line, &JsonBatch { device, from: batch.from, events: batch.events })?;
            line.push(b'\n');
            write_half.write_all(&line).await?;
            outcome.bytes_up += line.len() as u64;
            in_flight.push_back(last);
            next = last.next();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let ack = tokio::time::timeout(left.max(Duration::from_millis(1)), acks.next_line())
            .await
            .context("timed out waiting for an ack")??
            .context("the server closed the connection")?;
        outcome.bytes_down += ack.len() as u64 + 1;
        let ack: JsonAck = serde_json::from_str(&ack)?;
        if ack.custody > outcome.custody {
            outcome.custody = ack.custody;
            outcome.last_custody_at = Some(Instant::now());
        }
        while in_flight.front().is_some_and(|last| *last <= outcome.custody) {
            in_flight.pop_front();
        }
    }
    write_half.shutdown().await?;
    Ok(())
}
