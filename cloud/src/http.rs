//! The HTTP API (JSON) and Prometheus `/metrics`.
//!
//! Reads run on blocking threads (`spawn_blocking`) over a small pool of store readers, because
//! the PostgreSQL client is synchronous; writes of desired state go to the ingest core loop
//! ([`Control`]), which owns the shadows and the live gateway sessions. Every bad request gets a
//! 4xx with `{"error": "..."}`; handlers never panic on input.
//!
//! Routes: `GET /health`, `GET /metrics`, `GET /api/devices`, `GET /api/devices/{id}`,
//! `GET /api/devices/{id}/events?from_seq&to_seq | from_ms&to_ms&after_ms&after_seq, limit`,
//! `GET /api/devices/{id}/aggregates?sensor&resolution=minute|hour&limit`,
//! `GET /api/devices/{id}/shadow`, `GET /api/devices/{id}/shadow.automerge`,
//! `PATCH /api/devices/{id}/desired` (`{"key": value, "gone": null}`), `GET /api/projections`,
//! `GET /api/alerts`, `GET /api/security/events?before&limit` (refused batches, see
//! [`security`]); the [`dashboard`](crate::dashboard) at `/` with its event stream
//! `GET /api/events/stream`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use serde_json::{json, Value as Json_};
use tidesync_core::event::{DeviceId, Millis, Payload, Seq};
use tidesync_core::value::Value;

use crate::projection::{self, builtin};
use crate::server::{Control, Live};
use crate::store::{Backend, EventReader, HeadWatch, StoreError, StoredEvent};

pub mod security;

/// Most events or rows one request returns.
pub const PAGE_MAX: usize = 1_000;
/// Page size when the request names none.
pub const PAGE_DEFAULT: usize = 100;
/// Readers kept open for reuse.
const READERS_KEPT_MAX: usize = 8;
/// Largest desired-state patch body, in bytes.
const PATCH_BYTES_MAX: usize = 64 * 1024;

/// An error answer: a status and a message, sent as `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into() }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store read failed");
        Self { status: StatusCode::SERVICE_UNAVAILABLE, message: format!("store: {error}") }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// What the handlers share.
pub struct AppState {
    backend: Backend,
    readers: Mutex<Vec<Box<dyn EventReader>>>,
    control: Control,
    live: Arc<Live>,
    projections: Vec<String>,
    head: Option<Arc<HeadWatch>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("backend", &self.backend.kind()).finish_non_exhaustive()
    }
}

impl AppState {
    /// State over `backend`, with `control` for desired-state writes.
    pub fn new(backend: Backend, control: Control, live: Arc<Live>) -> Self {
        let projections = builtin(Vec::new()).iter().map(|projection| projection.name().to_string()).collect();
        Self { backend, readers: Mutex::new(Vec::new()), control, live, projections, head: None }
    }

    /// Follows `head` (the writer's watch) for the dashboard's event stream.
    pub fn with_head_watch(mut self, head: Arc<HeadWatch>) -> Self {
        self.head = Some(head);
        self
    }

    /// Runs `read` with a pooled reader on a blocking thread.
    async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&mut dyn EventReader) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let state = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let pooled = state.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            let mut reader = match pooled {
                Some(reader) => reader,
                None => state.backend.open_reader()?,
            };
            let result = read(&mut *reader);
            // A reader that failed may hold a broken connection: drop it.
            if !matches!(result, Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, .. })) {
                let mut readers = state.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if readers.len() < READERS_KEPT_MAX {
                    readers.push(reader);
                }
            }
            result
        })
        .await
        .map_err(|error| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: error.to_string() })?
    }
}

/// The router of the API.
pub fn router(state: Arc<AppState>) -> Router {
    let head = state.head.clone();
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/devices", get(devices))
        .route("/api/devices/{device}", get(device))
        .route("/api/devices/{device}/events", get(events))
        .route("/api/devices/{device}/aggregates", get(aggregates))
        .route("/api/devices/{device}/shadow", get(shadow))
        .route("/api/devices/{device}/shadow.automerge", get(shadow_automerge))
        .route("/api/devices/{device}/desired", patch(set_desired).put(set_desired))
        .route("/api/projections", get(projections))
        .route("/api/alerts", get(alerts))
        .route("/api/security/events", get(security::events))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
        .merge(crate::dashboard::router(head))
}

/// Serves the API on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(stop).await
}

/// Parses a device id from a request path (pub for the fuzz target).
pub fn device_of(name: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(name).map_err(|error| ApiError::bad_request(format!("device id {name:?}: {error}")))
}

fn number(query: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .map(|text| text.parse::<u64>().map_err(|_| ApiError::bad_request(format!("{name}={text:?} is not a number"))))
        .transpose()
}

fn limit(query: &HashMap<String, String>) -> Result<usize, ApiError> {
    let limit = number(query, "limit")?.map_or(PAGE_DEFAULT, |limit| limit as usize);
    if limit == 0 || limit > PAGE_MAX {
        return Err(ApiError::bad_request(format!("limit must be 1 to {PAGE_MAX}")));
    }
    Ok(limit)
}

/// An event as JSON.
pub fn event_json(stored: &StoredEvent) -> Json_ {
    let event = &stored.event;
    let payload = match &event.payload {
        Payload::Reading(reading) => json!({ "sensor": reading.sensor, "value": reading.value, "unit": reading.unit }),
        Payload::ShadowReported(shadow) => json!({ "reported": shadow.reported.to_json() }),
        Payload::Log(line) => json!({ "level": format!("{:?}", line.level), "message": line.message }),
        Payload::Gap(gap) => json!({ "first": gap.first.0, "last": gap.last.0, "reason": format!("{:?}", gap.reason) }),
        Payload::App(app) => json!({ "content_type": app.content_type, "n_bytes": app.data.len() }),
        Payload::Unknown(unknown) => {
            json!({ "kind": unknown.kind, "schema_version": unknown.schema_version, "n_bytes": unknown.body.len() })
        }
    };
    json!({
        "position": stored.position.0,
        "device": event.id.device.as_str(),
        "seq": event.id.seq.0,
        "kind": event.kind().name(),
        "schema_version": event.schema_version(),
        "event_time_ms": event.event_time.0,
        "hlc": { "wall_ms": event.hlc.wall_ms, "logical": event.hlc.logical },
        "payload": payload,
        "gateway": stored.meta.gateway.as_str(),
        "ingest_ms": stored.meta.ingest_time.0,
    })
}

async fn health(State(state): State<Arc<AppState>>) -> Result<Json<Json_>, ApiError> {
    let backend = state.backend.kind();
    let head = state.read(|reader| Ok(reader.head()?)).await?;
    Ok(Json(json!({ "status": "ok", "backend": backend, "head": head.0 })))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let names = state.projections.clone();
    let (status, n_devices) =
        state.read(move |reader| Ok((projection::status(reader, &names)?, reader.streams()?.len()))).await?;
    let ingest = &state.live.metrics;
    let n_gateways = state.live.gateways.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
    let mut text = String::new();
    let mut counter = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    counter(
        "tidesync_cloud_events_stored_total",
        "New events stored.",
        "counter",
        ingest.events_stored_total.load(Ordering::Relaxed),
    );
    counter(
        "tidesync_cloud_events_duplicate_total",
        "Events received that were stored already (acknowledged, not stored again).",
        "counter",
        ingest.events_duplicate_total.load(Ordering::Relaxed),
    );
    counter(
        "tidesync_cloud_group_commits_total",
        "Group commits.",
        "counter",
        ingest.group_commits_total.load(Ordering::Relaxed),
    );
    counter(
        "tidesync_cloud_group_commit_failures_total",
        "Group commits that failed.",
        "counter",
        ingest.group_commit_failures_total.load(Ordering::Relaxed),
    );
    counter(
        "tidesync_cloud_group_commit_microseconds_total",
        "Time spent in group commits.",
        "counter",
        ingest.group_commit_us_total.load(Ordering::Relaxed),
    );
    counter(
        "tidesync_cloud_connections_total",
        "Gateway connections accepted.",
        "counter",
        ingest.connections_total.load(Ordering::Relaxed),
    );
    counter(
        "tidesync_cloud_refused_total",
        "Refused handshakes and frames.",
        "counter",
        ingest.refused_total.load(Ordering::Relaxed),
    );
    counter("tidesync_cloud_gateways_connected", "Gateways connected now.", "gauge", n_gateways as u64);
    counter("tidesync_cloud_devices", "Devices with a stream.", "gauge", n_devices as u64);
    let head = status.first().map_or(0, |projection| projection.head);
    counter("tidesync_cloud_log_head_position", "Highest position in the log.", "gauge", head);
    let _ = writeln!(text, "# HELP tidesync_cloud_projection_lag_events Events a projection has not folded yet.");
    let _ = writeln!(text, "# TYPE tidesync_cloud_projection_lag_events gauge");
    for projection in &status {
        let _ = writeln!(
            text,
            "tidesync_cloud_projection_lag_events{{projection=\"{}\"}} {}",
            projection.name, projection.lag_events
        );
    }
    let _ = writeln!(text, "# HELP tidesync_cloud_dead_letters Events a projection could not apply.");
    let _ = writeln!(text, "# TYPE tidesync_cloud_dead_letters gauge");
    for projection in &status {
        let _ = writeln!(
            text,
            "tidesync_cloud_dead_letters{{projection=\"{}\"}} {}",
            projection.name, projection.dead_letters
        );
    }
    security::write_metrics(&mut text, &state.live);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Per device: stream, presence, shadow view; the gateway backlog of its gateway if connected.
async fn devices(State(state): State<Arc<AppState>>) -> Result<Json<Json_>, ApiError> {
    let live = state.live.gateways.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let connected: BTreeMap<String, u64> =
        live.values().map(|status| (status.gateway.clone(), status.backlog_events)).collect();
    let list = state
        .read(move |reader| {
            let streams = reader.streams()?;
            let shadows: BTreeMap<DeviceId, Json_> =
                reader.shadows()?.into_iter().map(|row| (row.device, row.view)).collect();
            let mut devices = Vec::new();
            let mut names: Vec<DeviceId> = streams.keys().chain(shadows.keys()).copied().collect();
            names.sort();
            names.dedup();
            for device in names {
                let presence = reader.row("presence", device.as_str())?.unwrap_or(Json_::Null);
                let latest = reader.rows("latest", &format!("{device}|"), PAGE_MAX)?;
                let gateway = presence.get("gateway").and_then(Json_::as_str).map(str::to_string);
                let online = gateway.as_ref().is_some_and(|gateway| connected.contains_key(gateway));
                let stream = streams.get(&device);
                devices.push(json!({
                    "device": device.as_str(),
                    "high_seq": stream.map_or(0, |stream| stream.high.0),
                    "n_events": stream.map_or(0, |stream| stream.n_events),
                    "holes": stream.map_or(0, |stream| stream.holes.len()),
                    "presence": presence,
                    "online": online,
                    "gateway_backlog_events": gateway.and_then(|gateway| connected.get(&gateway).copied()),
                    "latest": latest.into_iter().map(|(_, row)| row).collect::<Vec<_>>(),
                    "shadow": shadows.get(&device).cloned().unwrap_or(Json_::Null),
                }));
            }
            Ok(devices)
        })
        .await?;
    Ok(Json(json!({ "devices": list })))
}

async fn device(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Json_>, ApiError> {
    let device = device_of(&name)?;
    let answer = state
        .read(move |reader| {
            let stream = reader.streams()?.remove(&device);
            let shadow = reader.shadow(&device)?;
            if stream.is_none() && shadow.is_none() {
                return Err(ApiError::not_found(format!("no device {device}")));
            }
            let holes: Vec<Json_> = stream
                .as_ref()
                .map(|stream| stream.holes.iter().map(|(first, last)| json!([first.0, last.0])).collect())
                .unwrap_or_default();
            Ok(json!({
                "device": device.as_str(),
                "high_seq": stream.as_ref().map_or(0, |stream| stream.high.0),
                "n_events": stream.as_ref().map_or(0, |stream| stream.n_events),
                "holes": holes,
                "presence": reader.row("presence", device.as_str())?,
                "latest": reader.rows("latest", &format!("{device}|"), PAGE_MAX)?.into_iter().map(|(_, row)| row).collect::<Vec<_>>(),
                "gaps": reader.rows("gaps", &format!("{device}|"), PAGE_MAX)?.into_iter().map(|(_, row)| row).collect::<Vec<_>>(),
                "shadow": shadow.map(|row| row.view),
            }))
        })
        .await?;
    Ok(Json(answer))
}

async fn events(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Json_>, ApiError> {
    let device = device_of(&name)?;
    match parse_events_query(&query)? {
        EventsPage::ByTime { from, to, after, limit } => {
            let page = state.read(move |reader| Ok(reader.read_times(&device, from, to, after, limit)?)).await?;
            let next = (page.len() == limit)
                .then(|| {
                    page.last()
                        .map(|last| json!({ "after_ms": last.event.event_time.0, "after_seq": last.event.id.seq.0 }))
                })
                .flatten();
            Ok(Json(json!({ "events": page.iter().map(event_json).collect::<Vec<_>>(), "next": next })))
        }
        EventsPage::BySeq { from, to, limit } => {
            let page = state.read(move |reader| Ok(reader.read_seqs(&device, from, to, limit)?)).await?;
            let next = (page.len() == limit)
                .then(|| page.last().map(|last| json!({ "from_seq": last.event.id.seq.0 + 1 })))
                .flatten();
            Ok(Json(json!({ "events": page.iter().map(event_json).collect::<Vec<_>>(), "next": next })))
        }
    }
}

/// How `GET /api/devices/{id}/events` pages, parsed from its query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsPage {
    /// Events with seqs `from..=to`, at most `limit`.
    BySeq {
        /// First seq (at least 1).
        from: Seq,
        /// Last seq.
        to: Seq,
        /// Most events.
        limit: usize,
    },
    /// Events with event times `from..=to`, after the cursor `(event time, seq)` if any.
    ByTime {
        /// Earliest event time.
        from: Millis,
        /// Latest event time.
        to: Millis,
        /// The previous page's last event.
        after: Option<(Millis, Seq)>,
        /// Most events.
        limit: usize,
    },
}

/// Parses the query of `GET /api/devices/{id}/events` (a pub function so the fuzz target
/// `cloud/fuzz` `http_bodies` calls exactly what the handler calls).
pub fn parse_events_query(query: &HashMap<String, String>) -> Result<EventsPage, ApiError> {
    let limit = limit(query)?;
    let by_time = query.contains_key("from_ms") || query.contains_key("to_ms");
    let by_seq = query.contains_key("from_seq") || query.contains_key("to_seq");
    if by_time && by_seq {
        return Err(ApiError::bad_request("page by seq (from_seq, to_seq) or by time (from_ms, to_ms), not both"));
    }
    if by_time {
        let from = number(query, "from_ms")?.unwrap_or(0);
        let to = number(query, "to_ms")?.unwrap_or(u64::MAX >> 1);
        if from > to {
            return Err(ApiError::bad_request("from_ms is after to_ms"));
        }
        let after = match (number(query, "after_ms")?, number(query, "after_seq")?) {
            (Some(time), Some(seq)) => Some((Millis(time), Seq(seq))),
            (None, None) => None,
            _ => return Err(ApiError::bad_request("after_ms and after_seq go together")),
        };
        return Ok(EventsPage::ByTime { from: Millis(from), to: Millis(to), after, limit });
    }
    let from = number(query, "from_seq")?.unwrap_or(1).max(1);
    let to = number(query, "to_seq")?.unwrap_or(u64::MAX >> 1);
    if from > to {
        return Err(ApiError::bad_request("from_seq is after to_seq"));
    }
    Ok(EventsPage::BySeq { from: Seq(from), to: Seq(to), limit })
}

async fn aggregates(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Json_>, ApiError> {
    let device = device_of(&name)?;
    let AggregatesQuery { projection, resolution, sensor, limit } = parse_aggregates_query(&query)?;
    let prefix = match &sensor {
        Some(sensor) => format!("{device}|{sensor}|"),
        None => format!("{device}|"),
    };
    let rows = state.read(move |reader| Ok(reader.rows(projection, &prefix, limit)?)).await?;
    // A sensor whose name contains '|' could share a prefix: keep exact matches only.
    let buckets: Vec<Json_> = rows
        .into_iter()
        .map(|(_, row)| row)
        .filter(|row| sensor.as_ref().is_none_or(|sensor| row.get("sensor").and_then(Json_::as_str) == Some(sensor)))
        .collect();
    Ok(Json(json!({ "device": device.as_str(), "resolution": resolution, "buckets": buckets })))
}

/// The query of `GET /api/devices/{id}/aggregates`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatesQuery {
    /// The projection to read (`minute` or `hour`).
    pub projection: &'static str,
    /// The resolution's name, echoed in the answer.
    pub resolution: &'static str,
    /// Only this sensor's buckets, if named.
    pub sensor: Option<String>,
    /// Most buckets.
    pub limit: usize,
}

/// Parses the query of `GET /api/devices/{id}/aggregates` (pub for the fuzz target, as
/// [`parse_events_query`]).
pub fn parse_aggregates_query(query: &HashMap<String, String>) -> Result<AggregatesQuery, ApiError> {
    let limit = limit(query)?;
    let (projection, resolution) = match query.get("resolution").map_or("minute", String::as_str) {
        "minute" => (builtin::MINUTE, "minute"),
        "hour" => (builtin::HOUR, "hour"),
        other => return Err(ApiError::bad_request(format!("resolution {other:?}: use minute or hour"))),
    };
    Ok(AggregatesQuery { projection, resolution, sensor: query.get("sensor").cloned(), limit })
}

async fn shadow(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Json<Json_>, ApiError> {
    let device = device_of(&name)?;
    let row = state.read(move |reader| Ok(reader.shadow(&device)?)).await?;
    let row = row.ok_or_else(|| ApiError::not_found(format!("no shadow of {device}")))?;
    Ok(Json(json!({ "device": device.as_str(), "updated_ms": row.updated.0, "shadow": row.view })))
}

async fn shadow_automerge(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let device = device_of(&name)?;
    let row = state.read(move |reader| Ok(reader.shadow(&device)?)).await?;
    let row = row.ok_or_else(|| ApiError::not_found(format!("no shadow of {device}")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], row.doc).into_response())
}

async fn set_desired(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Json_>, ApiError> {
    let device = device_of(&name)?;
    let entries = parse_desired_patch(&body)?;
    state
        .control
        .set_desired(device, entries)
        .await
        .map_err(|message| ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, message })?;
    let row = state.read(move |reader| Ok(reader.shadow(&device)?)).await?;
    Ok(Json(json!({ "device": device.as_str(), "shadow": row.map(|row| row.view) })))
}

/// Parses the body of `PATCH /api/devices/{id}/desired`: a JSON object of desired keys, `null`
/// removing a key (pub for the fuzz target, as [`parse_events_query`]).
pub fn parse_desired_patch(body: &[u8]) -> Result<BTreeMap<String, Option<Value>>, ApiError> {
    if body.len() > PATCH_BYTES_MAX {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("at most {PATCH_BYTES_MAX} bytes"),
        });
    }
    let patch: Json_ =
        serde_json::from_slice(body).map_err(|error| ApiError::bad_request(format!("body is not JSON: {error}")))?;
    let Json_::Object(object) = patch else {
        return Err(ApiError::bad_request("body must be a JSON object of desired keys (null removes a key)"));
    };
    if object.is_empty() {
        return Err(ApiError::bad_request("nothing to change"));
    }
    let mut entries = BTreeMap::new();
    for (key, value) in object {
        let value = match value {
            Json_::Null => None,
            value => Some(
                Value::from_json(&value)
                    .map_err(|_| ApiError::bad_request(format!("value of {key:?} is nested too deep")))?,
            ),
        };
        entries.insert(key, value);
    }
    Ok(entries)
}

async fn projections(State(state): State<Arc<AppState>>) -> Result<Json<Json_>, ApiError> {
    let names = state.projections.clone();
    let (status, letters) = state
        .read(move |reader| Ok((projection::status(reader, &names)?, reader.dead_letters(None, PAGE_DEFAULT)?.0)))
        .await?;
    let letters: Vec<Json_> = letters
        .iter()
        .map(|letter| {
            json!({ "projection": letter.projection, "position": letter.position.0, "event": letter.id.to_string(), "reason": letter.reason })
        })
        .collect();
    Ok(Json(json!({ "projections": status, "dead_letters": letters })))
}

async fn alerts(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Json_>, ApiError> {
    let (device, limit) = parse_alerts_query(&query)?;
    let prefix = match device {
        Some(device) => format!("alert|{device}|"),
        None => "alert|".to_string(),
    };
    let rows = state.read(move |reader| Ok(reader.rows(builtin::ALERTS, &prefix, limit)?)).await?;
    Ok(Json(json!({ "alerts": rows.into_iter().map(|(_, row)| row).collect::<Vec<_>>() })))
}

/// Parses the query of `GET /api/alerts`: an optional device and the limit (pub for the fuzz
/// target, as [`parse_events_query`]).
pub fn parse_alerts_query(query: &HashMap<String, String>) -> Result<(Option<DeviceId>, usize), ApiError> {
    let limit = limit(query)?;
    let device = query.get("device").map(|device| device_of(device)).transpose()?;
    Ok((device, limit))
}

/// Binds `addr` and serves the API in a task until `stop` turns true; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    state: Arc<AppState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        if let Err(error) = serve(listener, state, stopped).await {
            tracing::error!(%error, "http server failed");
        }
    });
    tracing::info!(%bound, "http api listening");
    Ok((bound, task))
}
