//! `Outcome`: what a run did and whether its checks passed, as text and as an SVG plot of the
//! backlog and shadow convergence over simulated time.

use std::fmt::{self, Write as _};

use crate::check::CheckFailure;
use crate::options::{format_duration_ms, DrawnFaults, SimOptions};
use crate::world::{PlotPoint, Stats};

/// The result of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The options it ran with.
    pub options: SimOptions,
    /// The fault parameters drawn from the seed.
    pub drawn: DrawnFaults,
    /// The trace digest: equal for equal runs.
    pub digest: u64,
    /// Counters.
    pub stats: Stats,
    /// Events the devices made durable (what their ledgers acknowledged).
    pub n_events_durable: u64,
    /// Events in the cloud store.
    pub n_events_cloud: u64,
    /// Simulated time, workload and heal.
    pub simulated_ms: u64,
    /// When the heal began, since the start.
    pub heal_start_ms: u64,
    /// How long the heal took until quiescence; `None` if the bound passed first.
    pub converge_ms: Option<u64>,
    /// Backlog over time.
    pub plot: Vec<PlotPoint>,
    /// Failed checks; empty when the run passed.
    pub failures: Vec<CheckFailure>,
    /// Signatures, attacks and the cloud's security events.
    pub security: crate::world::adversary::SecurityReport,
}

impl Outcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The header printed before a run: options and every drawn fault parameter.
    pub fn header(options: &SimOptions, drawn: &DrawnFaults) -> String {
        format!(
            "seed {}: {} devices, {} gateways, {} of workload (a reading every {}, sent after up to {}), faults {}\n{drawn}",
            options.seed,
            options.n_devices,
            options.n_gateways,
            format_duration_ms(options.duration_ms),
            format_duration_ms(options.reading_interval_ms),
            format_duration_ms(options.linger_ms),
            crate::options::format_faults(&options.faults),
        )
    }

    /// The backlog plot as a standalone SVG document.
    pub fn svg(&self) -> String {
        plot_svg(&self.plot, self.heal_start_ms, self.converge_ms.map(|ms| self.heal_start_ms + ms), &self.options)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = &self.stats;
        writeln!(f, "trace digest {:016x}", self.digest)?;
        writeln!(
            f,
            "events: {} recorded, {} durable on devices, {} in the cloud store, {} dropped under storage pressure",
            stats.n_recorded, self.n_events_durable, self.n_events_cloud, stats.n_dropped
        )?;
        writeln!(
            f,
            "network: {} frames ({} bytes) sent, {} delivered, {} lost, {} duplicated",
            stats.n_frames_sent,
            stats.n_bytes_sent,
            stats.n_frames_delivered,
            stats.n_frames_lost,
            stats.n_frames_duplicated
        )?;
        writeln!(
            f,
            "sync: {} sessions (sync rounds), {} handshake timeouts, {} shadow spins, {} refused frames, {} stalls, {} resend loops, {} throttles, {} fsyncs",
            stats.n_sessions,
            stats.n_handshake_timeouts,
            stats.n_shadow_spins,
            stats.n_session_errors,
            stats.n_stalls_reported,
            stats.n_resend_loops,
            stats.n_throttled,
            stats.n_syncs
        )?;
        let by_type: Vec<String> = stats.n_frames_by_type.iter().map(|(name, n)| format!("{name} {n}")).collect();
        writeln!(f, "frames by type: {}", by_type.join(", "))?;
        writeln!(
            f,
            "faults injected: {}, shadow edits: {}, duplicates deduped by the cloud store: {}",
            stats.n_faults, stats.n_shadow_edits, stats.n_duplicates_at_cloud
        )?;
        let converge = match self.converge_ms {
            Some(ms) => format!("converged {} after the heal began", format_ms(ms)),
            None => "did NOT converge within the heal bound".to_string(),
        };
        writeln!(f, "time: {} simulated; {converge}", format_ms(self.simulated_ms))?;
        writeln!(f, "{}", self.security)?;
        if self.passed() {
            write!(f, "checks: all passed")
        } else {
            writeln!(f, "checks: {} FAILED", self.failures.len())?;
            for failure in &self.failures {
                writeln!(f, "  {failure}")?;
            }
            write!(f, "FAILED seed {}; replay with:\n  {}", self.options.seed, self.options.replay_command())
        }
    }
}

/// Milliseconds as `1d 2h 3m 4.5s`, for people.
pub fn format_ms(duration_ms: u64) -> String {
    let (days, rest) = (duration_ms / 86_400_000, duration_ms % 86_400_000);
    let (hours, rest) = (rest / 3_600_000, rest % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let mut text = String::new();
    for (value, unit) in [(days, "d"), (hours, "h"), (minutes, "m")] {
        if value > 0 || !text.is_empty() {
            let _ = write!(text, "{value}{unit} ");
        }
    }
    let _ = write!(text, "{}.{:01}s", rest / 1_000, rest % 1_000 / 100);
    text
}

/// Width and height of the plot area, in SVG units.
const PLOT_WIDTH: f64 = 800.0;
const PLOT_HEIGHT: f64 = 300.0;
const MARGIN: f64 = 50.0;

fn polyline(points: &[PlotPoint], x_max: f64, y_max: f64, value: impl Fn(&PlotPoint) -> u64) -> String {
    let mut text = String::new();
    for point in points {
        let x = MARGIN + point.at_ms as f64 / x_max * PLOT_WIDTH;
        let y = MARGIN + PLOT_HEIGHT - value(point) as f64 / y_max * PLOT_HEIGHT;
        let _ = write!(text, "{x:.1},{y:.1} ");
    }
    text
}

/// The backlog (events on devices not committed by the cloud) and the devices whose shadows
/// differ between device and cloud, over simulated time, with the heal and convergence marked.
pub fn plot_svg(points: &[PlotPoint], heal_start_ms: u64, converged_ms: Option<u64>, options: &SimOptions) -> String {
    let x_max = points.iter().map(|point| point.at_ms).max().unwrap_or(1).max(1) as f64;
    let backlog_max = points.iter().map(|point| point.backlog_events).max().unwrap_or(0).max(1) as f64;
    let diverged_max = points.iter().map(|point| point.shadows_diverged).max().unwrap_or(0).max(1) as f64;
    let (width, height) = (PLOT_WIDTH + 2.0 * MARGIN, PLOT_HEIGHT + 2.0 * MARGIN);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN}" y="20">tidesync-sim seed {}: {} devices, {} gateways</text>"#,
        options.seed, options.n_devices, options.n_gateways
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{MARGIN}" y="{MARGIN}" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" fill="none" stroke="#999"/>"##
    );
    let heal_x = MARGIN + heal_start_ms as f64 / x_max * PLOT_WIDTH;
    let bottom = MARGIN + PLOT_HEIGHT;
    let _ = writeln!(
        svg,
        r##"<line x1="{heal_x:.1}" y1="{MARGIN}" x2="{heal_x:.1}" y2="{bottom}" stroke="#2a2" stroke-dasharray="4"/><text x="{heal_x:.1}" y="{}" fill="#2a2">heal</text>"##,
        MARGIN - 5.0
    );
    if let Some(converged_ms) = converged_ms {
        let x = MARGIN + converged_ms as f64 / x_max * PLOT_WIDTH;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{MARGIN}" x2="{x:.1}" y2="{bottom}" stroke="#a2a" stroke-dasharray="2"/><text x="{x:.1}" y="{}" fill="#a2a">converged</text>"##,
            bottom + 15.0
        );
    }
    let backlog = polyline(points, x_max, backlog_max, |point| point.backlog_events);
    let diverged = polyline(points, x_max, diverged_max, |point| point.shadows_diverged);
    let _ = writeln!(svg, r##"<polyline fill="none" stroke="#c33" stroke-width="1.5" points="{backlog}"/>"##);
    let _ = writeln!(svg, r##"<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{diverged}"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{MARGIN}" y="{}" fill="#c33">backlog: uncommitted events on devices (max {backlog_max})</text>"##,
        bottom + 30.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{MARGIN}" y="{}" fill="#36c">devices whose shadow differs device vs cloud (max {diverged_max})</text>"##,
        bottom + 45.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
        MARGIN + PLOT_WIDTH,
        bottom + 15.0,
        format_ms(x_max as u64)
    );
    svg.push_str("</svg>\n");
    svg
}
