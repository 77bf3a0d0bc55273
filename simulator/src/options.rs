//! What a run is made of: the fleet, the workload, the enabled fault kinds and the deliberate bugs
//! (`SimOptions`), and the fault parameters drawn from the seed (`DrawnFaults`).

use std::collections::BTreeSet;
use std::fmt;

use rand_chacha::ChaCha8Rng;

use crate::dice;

/// One kind of fault the simulator can inject. `--faults` takes their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// Frames lost on links (0–30 %).
    Loss,
    /// Frames delivered twice (0–50 %).
    Duplicate,
    /// Latency jitter, so frames overtake each other.
    Reorder,
    /// Links that hold every frame for a while, then release them.
    Stall,
    /// Gateway–cloud and device–gateway partitions, one or both directions.
    Partition,
    /// Device crash and restart, losing unsynced writes.
    DeviceCrash,
    /// Gateway crash and restart, losing unsynced writes.
    GatewayCrash,
    /// Gateway restart with a wiped spool (disk replaced).
    GatewayWipe,
    /// Device clock skew, jumps and RTC resets to the epoch.
    Clock,
    /// Devices offline for a long stretch (days on a week-long run).
    Offline,
    /// Devices moving to another gateway.
    Roaming,
    /// Devices with a small storage budget that drop their oldest events.
    StorageFull,
    /// Cloud crash and restart (losing unsynced writes) with the outage it causes.
    CloudOutage,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 13] = [
        FaultKind::Loss,
        FaultKind::Duplicate,
        FaultKind::Reorder,
        FaultKind::Stall,
        FaultKind::Partition,
        FaultKind::DeviceCrash,
        FaultKind::GatewayCrash,
        FaultKind::GatewayWipe,
        FaultKind::Clock,
        FaultKind::Offline,
        FaultKind::Roaming,
        FaultKind::StorageFull,
        FaultKind::CloudOutage,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Loss => "loss",
            FaultKind::Duplicate => "dup",
            FaultKind::Reorder => "reorder",
            FaultKind::Stall => "stall",
            FaultKind::Partition => "partition",
            FaultKind::DeviceCrash => "device-crash",
            FaultKind::GatewayCrash => "gateway-crash",
            FaultKind::GatewayWipe => "gateway-wipe",
            FaultKind::Clock => "clock",
            FaultKind::Offline => "offline",
            FaultKind::Roaming => "roaming",
            FaultKind::StorageFull => "storage-full",
            FaultKind::CloudOutage => "cloud-outage",
        }
    }
}

/// Why a command-line value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// An unknown fault name.
    #[error("unknown fault {name:?}; known are all, none, {known}")]
    UnknownFault {
        /// The name given.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// A duration that does not parse.
    #[error("bad duration {text:?}: expected a number with a unit (ms, s, m, h, d), e.g. 7d or 90m")]
    Duration {
        /// The text given.
        text: String,
    },
    /// A seed range that does not parse.
    #[error("bad seed range {text:?}: expected A..B (end exclusive) or A..=B")]
    SeedRange {
        /// The text given.
        text: String,
    },
}

/// Parses a fault list: `all`, `none`, or comma-separated names (see [`FaultKind::name`]).
pub fn parse_faults(text: &str) -> Result<BTreeSet<FaultKind>, OptionError> {
    let mut kinds = BTreeSet::new();
    for name in text.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        match name {
            "all" => kinds.extend(FaultKind::ALL),
            "none" => {}
            _ => {
                let kind = FaultKind::ALL.into_iter().find(|kind| kind.name() == name).ok_or_else(|| {
                    OptionError::UnknownFault {
                        name: name.to_string(),
                        known: FaultKind::ALL.map(FaultKind::name).join(","),
                    }
                })?;
                kinds.insert(kind);
            }
        }
    }
    Ok(kinds)
}

/// Formats a fault set so that [`parse_faults`] reads it back.
pub fn format_faults(kinds: &BTreeSet<FaultKind>) -> String {
    if kinds.len() == FaultKind::ALL.len() {
        return "all".to_string();
    }
    if kinds.is_empty() {
        return "none".to_string();
    }
    kinds.iter().map(|kind| kind.name()).collect::<Vec<_>>().join(",")
}

/// Parses `7d`, `36h`, `90m`, `30s`, `250ms` or `0` into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, OptionError> {
    let error = || OptionError::Duration { text: text.to_string() };
    let text_trimmed = text.trim();
    if text_trimmed == "0" {
        return Ok(0);
    }
    let split = text_trimmed.find(|c: char| !c.is_ascii_digit()).ok_or_else(error)?;
    let (number, unit) = text_trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| error())?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(error()),
    };
    number.checked_mul(unit_ms).ok_or_else(error)
}

/// Formats milliseconds the way [`parse_duration_ms`] reads them, in the largest exact unit.
pub fn format_duration_ms(duration_ms: u64) -> String {
    for (unit, unit_ms) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if duration_ms > 0 && duration_ms % unit_ms == 0 {
            return format!("{}{unit}", duration_ms / unit_ms);
        }
    }
    format!("{duration_ms}ms")
}

/// Parses `A..B` (end exclusive) or `A..=B` into the list of seeds.
pub fn parse_seed_range(text: &str) -> Result<std::ops::Range<u64>, OptionError> {
    let error = || OptionError::SeedRange { text: text.to_string() };
    let (start, end) = text.split_once("..").ok_or_else(error)?;
    let start: u64 = start.trim().parse().map_err(|_| error())?;
    let end = match end.strip_prefix('=') {
        Some(inclusive) => inclusive.trim().parse::<u64>().map_err(|_| error())?.checked_add(1).ok_or_else(error)?,
        None => end.trim().parse().map_err(|_| error())?,
    };
    if end < start {
        return Err(error());
    }
    Ok(start..end)
}

/// Deliberately broken host behaviour, so that tests can show the checks catch real bugs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// The cloud adds every received event to its log, even ones it already holds.
    pub skip_dedupe: bool,
    /// Gateways and the cloud acknowledge events before making them durable; they sync only on a
    /// periodic timer.
    pub ack_before_fsync: bool,
    /// Devices send events before making them durable (they sync only on their group-commit
    /// timer), so a crash makes them issue the same seqs again for different events.
    pub send_unsynced: bool,
    /// The cloud stores what gateways send without verifying the devices' signatures, so attacks
    /// go through undetected.
    pub skip_verify: bool,
}

impl Bugs {
    /// The names of the enabled bugs, for the replay command.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.skip_dedupe {
            names.push("skip-dedupe");
        }
        if self.ack_before_fsync {
            names.push("ack-before-fsync");
        }
        if self.send_unsynced {
            names.push("send-unsynced");
        }
        if self.skip_verify {
            names.push("skip-verify");
        }
        names
    }
}

/// How long a simulated device holds readings to send them together, by default: a battery
/// sensor reading once a minute sends every quarter of an hour.
pub const DEFAULT_LINGER_MS: u64 = 15 * 60_000;

/// Everything that defines a run besides the binary. Same options ⇒ same run, bit for bit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimOptions {
    /// Devices in the fleet.
    pub n_devices: usize,
    /// Gateways (at least 1).
    pub n_gateways: usize,
    /// Length of the workload phase, in which faults happen.
    pub duration_ms: u64,
    /// The root seed of the one RNG.
    pub seed: u64,
    /// The fault kinds that may be drawn.
    pub faults: BTreeSet<FaultKind>,
    /// Time between two sensor readings of one device.
    pub reading_interval_ms: u64,
    /// How long a device lets new readings wait so that they leave in one batch
    /// ([`tidesync_core::sync::SessionConfig::linger_ms`]; 0 sends each reading at once).
    pub linger_ms: u64,
    /// Longest heal phase before the run is declared not converged.
    pub heal_ms_max: u64,
    /// Deliberate bugs (tests only).
    pub bugs: Bugs,
    /// Duplicate shadow sync frames too (off by default: core amplifies them, see the report).
    pub duplicate_shadow_sync: bool,
    /// Replace a connection whose shadow sync spins (sync health; on by default, see the report).
    pub spin_watchdog: bool,
    /// An evil gateway and possibly a cloned device (see [`crate::world::adversary`]).
    pub adversaries: bool,
    /// Devices do not sign and the cloud does not verify: for benchmarks that compare the cost of
    /// signatures with the default (which signs and verifies everything).
    pub unsigned: bool,
    /// Verify devices' signatures on another thread as they send, so the cloud mostly finds them
    /// verified. Changes the wall time only, never the run (same verdicts, same trace digest);
    /// worth it for one large world on a machine with a spare core, not for a sweep.
    pub verify_ahead: bool,
}

impl SimOptions {
    /// A small fleet with every fault enabled.
    pub fn new(n_devices: usize, n_gateways: usize, duration_ms: u64, seed: u64) -> Self {
        Self {
            n_devices,
            n_gateways: n_gateways.max(1),
            duration_ms,
            seed,
            faults: FaultKind::ALL.into_iter().collect(),
            reading_interval_ms: 60_000,
            linger_ms: DEFAULT_LINGER_MS,
            heal_ms_max: 2 * 86_400_000,
            bugs: Bugs::default(),
            duplicate_shadow_sync: false,
            spin_watchdog: true,
            adversaries: false,
            unsigned: false,
            verify_ahead: false,
        }
    }

    /// Whether `kind` may be drawn.
    pub fn has(&self, kind: FaultKind) -> bool {
        self.faults.contains(&kind)
    }

    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "tidesync-sim run --devices {} --gateways {} --duration {} --seed {} --faults {} --interval {}",
            self.n_devices,
            self.n_gateways,
            format_duration_ms(self.duration_ms),
            self.seed,
            format_faults(&self.faults),
            format_duration_ms(self.reading_interval_ms),
        );
        if self.linger_ms != DEFAULT_LINGER_MS {
            command.push_str(&format!(" --linger {}", format_duration_ms(self.linger_ms)));
        }
        if self.heal_ms_max != SimOptions::new(0, 1, 0, 0).heal_ms_max {
            command.push_str(&format!(" --heal-max {}", format_duration_ms(self.heal_ms_max)));
        }
        if !self.spin_watchdog {
            command.push_str(" --no-spin-watchdog");
        }
        if self.duplicate_shadow_sync {
            command.push_str(" --duplicate-shadow-sync");
        }
        if self.adversaries {
            command.push_str(" --adversaries");
        }
        if self.unsigned {
            command.push_str(" --unsigned");
        }
        for bug in self.bugs.names() {
            command.push_str(&format!(" --bug {bug}"));
        }
        command
    }
}

/// The fault parameters of one run, drawn from the seed. Printed at the start of every run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrawnFaults {
    /// Chance a frame is lost, in percent.
    pub loss_percent: u32,
    /// Chance a frame is delivered twice, in percent.
    pub duplicate_percent: u32,
    /// Fixed one-way latency of every link.
    pub latency_ms: u64,
    /// Extra random latency per frame, 0..=jitter; frames overtake each other when it is larger
    /// than the gap between them.
    pub jitter_ms: u64,
    /// Link stalls over the run.
    pub n_stalls: usize,
    /// Partitions over the run.
    pub n_partitions: usize,
    /// Device crashes over the run.
    pub n_device_crashes: usize,
    /// Gateway crashes over the run.
    pub n_gateway_crashes: usize,
    /// Chance a gateway crash wipes its spool, in percent.
    pub wipe_percent: u32,
    /// Largest device clock skew, either way.
    pub skew_ms_max: u64,
    /// Device clock jumps and RTC resets over the run.
    pub n_clock_jumps: usize,
    /// Devices that go offline for a long stretch.
    pub n_offline: usize,
    /// Longest offline stretch.
    pub offline_ms_max: u64,
    /// Device moves to another gateway over the run.
    pub n_roams: usize,
    /// Devices with a small storage budget.
    pub n_small_storage: usize,
    /// The small budget, in events held and not committed.
    pub storage_events_max: usize,
    /// Cloud outages (crash and restart) over the run.
    pub n_cloud_outages: usize,
    /// Device group-commit interval (writes between two syncs are lost in a crash).
    pub device_commit_ms: u64,
    /// The adversaries, when enabled (drawn as the world is built).
    pub adversaries: Option<crate::world::adversary::DrawnAdversaries>,
}

impl DrawnFaults {
    /// Draws the parameters of `options` from `rng`.
    pub fn draw(options: &SimOptions, rng: &mut ChaCha8Rng) -> Self {
        let n_devices = options.n_devices as u64;
        let n_gateways = options.n_gateways as u64;
        let days = options.duration_ms.div_ceil(86_400_000).max(1);
        let pick = |rng: &mut ChaCha8Rng, kind: FaultKind, low: u64, high: u64| -> u64 {
            if options.has(kind) {
                dice::range(rng, low, high)
            } else {
                0
            }
        };
        let latency_ms = dice::range(rng, 2, 80);
        Self {
            loss_percent: pick(rng, FaultKind::Loss, 0, 30) as u32,
            duplicate_percent: pick(rng, FaultKind::Duplicate, 0, 50) as u32,
            latency_ms,
            jitter_ms: pick(rng, FaultKind::Reorder, 0, 4 * latency_ms),
            n_stalls: pick(rng, FaultKind::Stall, 0, 3 * days * n_gateways.min(8)) as usize,
            n_partitions: pick(rng, FaultKind::Partition, 0, 3 * days * n_gateways.min(8)) as usize,
            n_device_crashes: pick(rng, FaultKind::DeviceCrash, 0, days * n_devices.div_ceil(4).min(200)) as usize,
            n_gateway_crashes: pick(rng, FaultKind::GatewayCrash, 0, days * n_gateways.min(8)) as usize,
            wipe_percent: pick(rng, FaultKind::GatewayWipe, 0, 60) as u32,
            skew_ms_max: pick(rng, FaultKind::Clock, 0, 15 * 60_000),
            n_clock_jumps: pick(rng, FaultKind::Clock, 0, days * n_devices.div_ceil(5).min(100)) as usize,
            n_offline: pick(rng, FaultKind::Offline, 0, n_devices.div_ceil(4)) as usize,
            offline_ms_max: options.duration_ms / 2,
            n_roams: pick(rng, FaultKind::Roaming, 0, days * n_devices.div_ceil(3).min(300)) as usize,
            n_small_storage: pick(rng, FaultKind::StorageFull, 0, n_devices.div_ceil(4)) as usize,
            storage_events_max: dice::range(rng, 8, 200) as usize,
            n_cloud_outages: pick(rng, FaultKind::CloudOutage, 0, 2 * days) as usize,
            device_commit_ms: dice::range(rng, 1, 10) * options.reading_interval_ms,
            adversaries: None,
        }
    }
}

impl fmt::Display for DrawnFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  loss {} %, duplication {} %", self.loss_percent, self.duplicate_percent)?;
        writeln!(f, "  latency {} ms + jitter 0..={} ms", self.latency_ms, self.jitter_ms)?;
        writeln!(f, "  link stalls {}, partitions {}", self.n_stalls, self.n_partitions)?;
        writeln!(
            f,
            "  device crashes {}, gateway crashes {} ({} % wipe the spool), cloud outages {}",
            self.n_device_crashes, self.n_gateway_crashes, self.wipe_percent, self.n_cloud_outages
        )?;
        writeln!(f, "  clock skew up to ±{} ms, clock jumps/RTC resets {}", self.skew_ms_max, self.n_clock_jumps)?;
        writeln!(
            f,
            "  offline devices {} (up to {}), roams {}",
            self.n_offline,
            format_duration_ms(self.offline_ms_max.max(1)),
            self.n_roams
        )?;
        write!(
            f,
            "  small-storage devices {} (budget {} events), device group commit every {}",
            self.n_small_storage,
            self.storage_events_max,
            format_duration_ms(self.device_commit_ms)
        )?;
        if let Some(adversaries) = &self.adversaries {
            write!(f, "\n{adversaries}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
