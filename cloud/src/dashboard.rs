//! The fleet dashboard: one page of plain HTML, vanilla JavaScript and CSS (no build step), served
//! at `/`, that reads the JSON API of [`crate::http`], plus `GET /api/events/stream`, a
//! server-sent event stream that tells the page when the log head advanced so it refreshes.
//!
//! The stream follows the writer's [`HeadWatch`] (an in-process watch, no polling of the
//! database). Heads are coalesced: a browser gets at most one message per [`STREAM_MIN_GAP`],
//! with the newest head, however fast ingest runs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use serde_json::json;
use tokio::sync::watch;

use crate::store::{HeadWatch, Position};

/// The page.
pub const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("dashboard/app.js");
/// Its style sheet.
pub const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Least time between two stream messages: a busy log would otherwise make every open page
/// refetch the whole fleet thousands of times a second.
pub const STREAM_MIN_GAP: Duration = Duration::from_millis(250);
/// Comment lines sent on an idle stream, so proxies keep it open and dead clients are noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The dashboard routes: `/`, `/dashboard/app.js`, `/dashboard/style.css` and
/// `/api/events/stream`. Without a `head` (an API started without a writer) the stream answers
/// 503, and the page still works by reloading by hand.
pub fn router(head: Option<Arc<HeadWatch>>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/dashboard/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/dashboard/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/api/events/stream", get(stream_route))
        .with_state(head)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    // No caching: the page is small and must match the API of the binary that serves it.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn stream_route(State(head): State<Option<Arc<HeadWatch>>>) -> Response {
    match head.as_ref().and_then(|head| head.subscribe()) {
        Some(receiver) => {
            tracing::debug!("dashboard stream opened");
            Sse::new(head_stream(receiver, STREAM_MIN_GAP))
                .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
                .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "error": "no live head in this server" })))
            .into_response(),
    }
}

/// The message sent for `head`: event `head`, data `{"head": n}`, id `n` (so a reconnecting
/// browser says where it was in `Last-Event-ID`).
fn message(head: Position) -> Event {
    Event::default().event("head").id(head.0.to_string()).data(json!({ "head": head.0 }).to_string())
}

/// The current head at once, then every newer head, at most one per `min_gap`. Ends when the
/// writer's watch is dropped (the server is shutting down).
pub fn head_stream(
    receiver: watch::Receiver<Position>,
    min_gap: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    stream::unfold((receiver, None::<Position>), move |(mut receiver, sent)| async move {
        if let Some(sent) = sent {
            // Let a burst of commits pile up into one message.
            tokio::time::sleep(min_gap).await;
            if *receiver.borrow_and_update() <= sent && receiver.wait_for(|head| *head > sent).await.is_err() {
                return None;
            }
        }
        let head = *receiver.borrow_and_update();
        Some((Ok(message(head)), (receiver, Some(head))))
    })
}
