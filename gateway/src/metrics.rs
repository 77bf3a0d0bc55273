//! The gateway's counters and gauges, and their Prometheus text rendering for `/metrics`.
//!
//! The daemon's core loop updates them; the HTTP handler only reads. Atomics, no locks: a scrape
//! never waits for a group commit.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the latency histogram buckets, in milliseconds.
const LATENCY_BUCKETS_MS: [u64; 10] = [1, 5, 10, 50, 100, 500, 1_000, 5_000, 30_000, 300_000];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    count: AtomicU64,
    sum_ms: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe_ms(&self, latency_ms: u64) {
        for (bucket, bound_ms) in self.buckets.iter().zip(LATENCY_BUCKETS_MS) {
            if latency_ms <= bound_ms {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(latency_ms, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bucket, bound_ms) in self.buckets.iter().zip(LATENCY_BUCKETS_MS) {
            let le = bound_ms as f64 / 1000.0;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", bucket.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything `/metrics` shows.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Devices connected now.
    pub connected_devices: AtomicU64,
    /// 1 while the cloud session is up.
    pub upstream_connected: AtomicU64,
    /// New events taken into custody.
    pub events_in_total: AtomicU64,
    /// Events the cloud committed.
    pub events_out_total: AtomicU64,
    /// Events held in the spool.
    pub spool_events: AtomicU64,
    /// Bytes held in the spool (counted against the budget).
    pub spool_bytes: AtomicU64,
    /// The spool budget.
    pub spool_budget_bytes: AtomicU64,
    /// Group commits done.
    pub group_commits_total: AtomicU64,
    /// Batches refused because the spool was full.
    pub custody_refused_total: AtomicU64,
    /// Device batches refused because the device was over its rate limit (it keeps them and
    /// sends them again after the wait it was told).
    pub throttled_batches_total: AtomicU64,
    /// Events in those batches.
    pub throttled_events_total: AtomicU64,
    /// Frames naming another device, identity mismatches.
    pub auth_failures_total: AtomicU64,
    /// TLS handshakes that failed (bad, expired, revoked certificates among them).
    pub handshake_failures_total: AtomicU64,
    /// Malformed or oversized frames received.
    pub malformed_frames_total: AtomicU64,
    /// From receiving events to acknowledging custody.
    pub custody_latency: Histogram,
    /// From spooling events to the cloud's commit.
    pub commit_latency: Histogram,
}

impl Metrics {
    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauges: [(&str, &str, &AtomicU64, &str); 14] = [
            ("tidesync_gateway_connected_devices", "Devices connected now.", &self.connected_devices, "gauge"),
            (
                "tidesync_gateway_upstream_connected",
                "1 while the cloud session is up.",
                &self.upstream_connected,
                "gauge",
            ),
            ("tidesync_gateway_events_in_total", "Events taken into custody.", &self.events_in_total, "counter"),
            ("tidesync_gateway_events_out_total", "Events committed by the cloud.", &self.events_out_total, "counter"),
            ("tidesync_gateway_spool_events", "Events held in the spool.", &self.spool_events, "gauge"),
            ("tidesync_gateway_spool_bytes", "Bytes held in the spool.", &self.spool_bytes, "gauge"),
            ("tidesync_gateway_spool_budget_bytes", "Spool byte budget.", &self.spool_budget_bytes, "gauge"),
            ("tidesync_gateway_group_commits_total", "Spool group commits.", &self.group_commits_total, "counter"),
            (
                "tidesync_gateway_custody_refused_total",
                "Batches refused: spool full.",
                &self.custody_refused_total,
                "counter",
            ),
            (
                "tidesync_gateway_throttled_batches_total",
                "Device batches refused: over the device's rate limit (kept by the device).",
                &self.throttled_batches_total,
                "counter",
            ),
            (
                "tidesync_gateway_throttled_events_total",
                "Events in device batches refused over the rate limit (kept by the device).",
                &self.throttled_events_total,
                "counter",
            ),
            (
                "tidesync_gateway_auth_failures_total",
                "Frames or hellos naming another identity.",
                &self.auth_failures_total,
                "counter",
            ),
            (
                "tidesync_gateway_handshake_failures_total",
                "Failed TLS handshakes.",
                &self.handshake_failures_total,
                "counter",
            ),
            (
                "tidesync_gateway_malformed_frames_total",
                "Malformed or oversized frames.",
                &self.malformed_frames_total,
                "counter",
            ),
        ];
        for (name, help, value, kind) in gauges {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Ordering::Relaxed));
        }
        self.custody_latency.render(
            &mut out,
            "tidesync_gateway_custody_latency_seconds",
            "From receiving events to acknowledging custody.",
        );
        self.commit_latency.render(
            &mut out,
            "tidesync_gateway_commit_latency_seconds",
            "From spooling events to the cloud's commit.",
        );
        out
    }

    /// Reads a counter or gauge.
    pub fn get(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }
}

/// Parses one sample `name value` out of a Prometheus text page (for `status` and tests).
pub fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
