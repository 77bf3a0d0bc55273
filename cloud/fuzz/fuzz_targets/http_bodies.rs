//! Fuzz target `http_bodies`: what the cloud's HTTP API parses from a request before it touches
//! the store, through the same functions its handlers call (`cloud/src/http.rs`): the body of a
//! desired-state write (`parse_desired_patch`), the query strings of the events, aggregates and
//! alerts pages (`axum`'s `Query` extractor, then `parse_events_query`, `parse_aggregates_query`,
//! `parse_alerts_query`) and a device id from the path (`device_of`). The first input byte picks
//! which. Checks: no panic; every refusal is a 4xx; what is accepted is within the API's bounds.
#![no_main]

use std::collections::HashMap;

use axum::extract::Query;
use axum::http::Uri;
use libfuzzer_sys::fuzz_target;
use tidesync_cloud::http::{
    device_of, parse_aggregates_query, parse_alerts_query, parse_desired_patch, parse_events_query, ApiError,
    EventsPage, PAGE_MAX,
};
use tidesync_core::value::VALUE_DEPTH_MAX;

fn refused(error: &ApiError) {
    assert!(error.status().is_client_error(), "input refused with {}", error.status());
}

/// The query map axum hands a handler for `?query`, or `None` where axum (or the HTTP parser
/// before it) answers the request itself.
fn query_map(query: &[u8]) -> Option<HashMap<String, String>> {
    let text = std::str::from_utf8(query).ok()?;
    let uri = Uri::try_from(format!("/api/devices/pump-7/events?{text}")).ok()?;
    Query::<HashMap<String, String>>::try_from_uri(&uri).ok().map(|Query(map)| map)
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&selector, rest)) = bytes.split_first() else {
        return;
    };
    match selector % 5 {
        0 => match parse_desired_patch(rest) {
            Ok(entries) => {
                assert!(!entries.is_empty());
                for value in entries.values().flatten() {
                    assert!(value.depth() <= VALUE_DEPTH_MAX + 1, "value of depth {}", value.depth());
                }
            }
            Err(error) => refused(&error),
        },
        1 => {
            let Some(query) = query_map(rest) else { return };
            match parse_events_query(&query) {
                Ok(EventsPage::BySeq { from, to, limit }) => {
                    assert!(from.0 >= 1 && from <= to && (1..=PAGE_MAX).contains(&limit));
                }
                Ok(EventsPage::ByTime { from, to, limit, .. }) => {
                    assert!(from <= to && (1..=PAGE_MAX).contains(&limit));
                }
                Err(error) => refused(&error),
            }
        }
        2 => {
            let Some(query) = query_map(rest) else { return };
            match parse_aggregates_query(&query) {
                Ok(parsed) => assert!((1..=PAGE_MAX).contains(&parsed.limit)),
                Err(error) => refused(&error),
            }
        }
        3 => {
            let Some(query) = query_map(rest) else { return };
            match parse_alerts_query(&query) {
                Ok((_, limit)) => assert!((1..=PAGE_MAX).contains(&limit)),
                Err(error) => refused(&error),
            }
        }
        _ => {
            let Ok(name) = std::str::from_utf8(rest) else { return };
            match device_of(name) {
                Ok(device) => assert_eq!(device.as_str(), name),
                Err(error) => refused(&error),
            }
        }
    }
});
