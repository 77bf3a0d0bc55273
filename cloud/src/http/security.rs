//! The security side of the API: `GET /api/security/events` (refused batches, newest first,
//! paged with `before=ID&limit=N`) and the security lines of `/metrics` (verification on or off,
//! keys, security events by kind, rate-limited batches).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde_json::{json, Value as Json_};

use super::{limit, number, ApiError, AppState};
use crate::server::Live;
use crate::store::SecurityEvent;

/// A security event as JSON.
pub fn security_event_json(event: &SecurityEvent) -> Json_ {
    json!({
        "id": event.id,
        "first_ms": event.first_ms.0,
        "last_ms": event.last_ms.0,
        "gateway": event.gateway.as_str(),
        "device": event.device.as_str(),
        "kind": event.kind,
        "detail": event.detail,
        "from_seq": event.from_seq.0,
        "last_seq": event.last_seq.0,
        "count": event.count,
    })
}

/// `GET /api/security/events?before&limit`: `{"events": [...], "total": n, "next": {"before": id} | null}`.
pub(super) async fn events(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Json_>, ApiError> {
    let limit = limit(&query)?;
    let before = number(&query, "before")?;
    let (events, total) = state.read(move |reader| Ok(reader.security_events(before, limit)?)).await?;
    let next = (events.len() == limit).then(|| events.last().map(|last| json!({ "before": last.id }))).flatten();
    Ok(Json(json!({
        "events": events.iter().map(security_event_json).collect::<Vec<_>>(),
        "total": total,
        "next": next,
    })))
}

/// Appends the security metrics to a Prometheus text page.
pub(super) fn write_metrics(text: &mut String, live: &Live) {
    let metrics = &live.metrics;
    let mut line = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    line(
        "tidesync_cloud_verifying",
        "1 when batches are verified against device keys, 0 when events are taken unsigned.",
        "gauge",
        u64::from(live.verifying.load(Ordering::Relaxed)),
    );
    let n_keyed = live.keyed_devices.load(Ordering::Relaxed);
    line("tidesync_cloud_device_keys", "Devices with a key in the registry in use.", "gauge", n_keyed);
    line(
        "tidesync_cloud_device_keys_reloads_total",
        "Device key registry reloads that took effect.",
        "counter",
        metrics.keys_reloads_total.load(Ordering::Relaxed),
    );
    line(
        "tidesync_cloud_device_keys_reload_failures_total",
        "Device key registry reloads that failed (the previous keys stayed).",
        "counter",
        metrics.keys_reload_failures_total.load(Ordering::Relaxed),
    );
    line(
        "tidesync_cloud_rate_limited_batches_total",
        "Batches held back because their device or gateway was over its rate limit.",
        "counter",
        metrics.rate_limited_total.load(Ordering::Relaxed),
    );
    line(
        "tidesync_cloud_rate_limited_events_total",
        "Events in batches held back by rate limits (the gateway offers them again).",
        "counter",
        metrics.rate_limited_events_total.load(Ordering::Relaxed),
    );
    let name = "tidesync_cloud_security_events_total";
    let _ = writeln!(text, "# HELP {name} Batches refused because they failed verification, by kind.");
    let _ = writeln!(text, "# TYPE {name} counter");
    let violations = live.violations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    for (kind, count) in violations {
        let _ = writeln!(text, "{name}{{kind=\"{kind}\"}} {count}");
    }
}
