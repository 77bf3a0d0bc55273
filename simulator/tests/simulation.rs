//! Whole-run tests of the simulator: a fixed set of seeds passes its checks, deliberately broken
//! hosts are caught, and a seed replays to the same trace digest.
//!
//! `TIDESYNC_SIM_SEEDS=N` runs N seeds instead of the default set (for soak runs).

use tidesync_sim::{run, Bugs, FaultKind, Outcome, SimOptions};

/// Seeds in the default run: small fleets, so the whole crate's tests stay well under two
/// minutes in a debug build on a busy 2-core machine.
const DEFAULT_SEEDS: u64 = 160;

/// A small fleet; its devices send each reading at once, after a minute or after the default
/// quarter of an hour, by seed, so both the eager and the lingering paths meet every fault.
fn small(seed: u64) -> SimOptions {
    let mut options = SimOptions::new(4, 2, 90 * 60_000, seed);
    options.linger_ms = [0, 60_000, options.linger_ms][(seed % 3) as usize];
    options
}

fn seed_count() -> u64 {
    std::env::var("TIDESYNC_SIM_SEEDS").ok().and_then(|text| text.parse().ok()).unwrap_or(DEFAULT_SEEDS)
}

/// Runs `seeds` and returns the outcomes that failed a check.
fn unexpected_failures(seeds: impl Iterator<Item = u64>, options: impl Fn(u64) -> SimOptions) -> Vec<Outcome> {
    seeds.map(|seed| run(options(seed), |_, _| {})).filter(|outcome| !outcome.failures.is_empty()).collect()
}

fn describe(failed: &[Outcome]) -> String {
    failed.iter().map(|outcome| format!("{outcome}\n")).collect()
}

#[test]
fn fixed_seeds_pass_first_half() {
    let n_seeds = seed_count();
    let failed = unexpected_failures(0..n_seeds / 2, small);
    assert!(failed.is_empty(), "{}", describe(&failed));
}

#[test]
fn fixed_seeds_pass_second_half() {
    let n_seeds = seed_count();
    let failed = unexpected_failures(n_seeds / 2..n_seeds, small);
    assert!(failed.is_empty(), "{}", describe(&failed));
}

#[test]
fn a_larger_fleet_passes() {
    let options = |seed| SimOptions::new(16, 3, 12 * 3_600_000, seed);
    let failed = unexpected_failures(1_000..1_001, options);
    assert!(failed.is_empty(), "{}", describe(&failed));
}

#[test]
fn a_fault_free_run_passes_every_check_and_commits_everything() {
    let mut options = small(7);
    options.faults.clear();
    let outcome = run(options, |_, _| {});
    assert!(outcome.passed(), "{outcome}");
    assert!(outcome.n_events_durable > 300, "{outcome}");
    assert_eq!(outcome.n_events_durable, outcome.n_events_cloud, "{outcome}");
    assert_eq!(outcome.stats.n_frames_lost, 0, "{outcome}");
}

/// Runs `seeds` with `bugs` and returns how many failed, asserting the same seeds pass without.
fn caught(bugs: Bugs, faults: &[FaultKind], seeds: std::ops::Range<u64>) -> usize {
    let options = |seed, bugs| {
        let mut options = small(seed);
        if !faults.is_empty() {
            options.faults = faults.iter().copied().collect();
        }
        options.bugs = bugs;
        options
    };
    let broken = seeds.clone().filter(|seed| !run(options(*seed, bugs), |_, _| {}).passed()).count();
    let healthy = unexpected_failures(seeds, |seed| options(seed, Bugs::default()));
    assert!(healthy.is_empty(), "the healthy hosts failed: {}", describe(&healthy));
    broken
}

#[test]
fn acknowledging_before_fsync_is_caught() {
    let bugs = Bugs { ack_before_fsync: true, ..Bugs::default() };
    let faults = [FaultKind::CloudOutage, FaultKind::GatewayCrash, FaultKind::Loss];
    let n_caught = caught(bugs, &faults, 0..24);
    assert!(n_caught >= 3, "only {n_caught} of 24 seeds caught a host that acks before fsync");
}

#[test]
fn sending_events_before_they_are_durable_is_caught() {
    let bugs = Bugs { send_unsynced: true, ..Bugs::default() };
    let faults = [FaultKind::DeviceCrash, FaultKind::Loss];
    let n_caught = caught(bugs, &faults, 0..24);
    assert!(n_caught >= 3, "only {n_caught} of 24 seeds caught a device that sends unsynced events");
}

#[test]
fn dropped_gap_events_leave_no_unexplained_hole() {
    // Seeds 34 and 107 of this fleet drop an earlier gap event under storage pressure; before
    // core widened the next gap over it, the cloud ended with a hole no gap event explained.
    for seed in [34, 107] {
        let outcome = run(SimOptions::new(5, 2, 2 * 3_600_000, seed), |_, _| {});
        assert!(outcome.failures.is_empty(), "{outcome}");
    }
}

#[test]
fn a_seed_replays_to_the_same_digest_and_different_seeds_differ() {
    let first = run(small(11), |_, _| {});
    let again = run(small(11), |_, _| {});
    assert_eq!(first.digest, again.digest);
    assert_eq!(first, again, "the whole outcome replays, not only the digest");
    let other = run(small(12), |_, _| {});
    assert_ne!(first.digest, other.digest);
    let mut quiet = small(11);
    quiet.faults.clear();
    assert_ne!(run(quiet, |_, _| {}).digest, first.digest, "the fault set is part of the run");
}

#[test]
fn verifying_signatures_ahead_changes_nothing_but_who_verifies() {
    for (seed, adversaries) in [(11, false), (3, true)] {
        let mut options = small(seed);
        options.adversaries = adversaries;
        let inline = run(options.clone(), |_, _| {});
        options.verify_ahead = true;
        let mut ahead = run(options, |_, _| {});
        assert!(ahead.options.verify_ahead);
        ahead.options.verify_ahead = false;
        assert_eq!(inline, ahead, "seed {seed}: the same run, outcome and digest");
        assert!(ahead.failures.is_empty(), "{ahead}");
    }
}

#[test]
fn a_failed_run_names_its_replay_command() {
    let mut options = small(1);
    options.bugs.send_unsynced = true;
    options.faults = [FaultKind::DeviceCrash].into_iter().collect();
    let failed = (0..30)
        .map(|seed| run(SimOptions { seed, ..options.clone() }, |_, _| {}))
        .find(|outcome| !outcome.passed())
        .expect("some seed fails with the bug");
    let text = failed.to_string();
    assert!(text.contains(&format!("FAILED seed {}", failed.options.seed)), "{text}");
    assert!(text.contains(&failed.options.replay_command()), "{text}");
    assert!(failed.options.replay_command().contains("--bug send-unsynced"));
}

#[test]
fn the_plot_is_an_svg_with_both_series() {
    let outcome = run(small(3), |_, _| {});
    let svg = outcome.svg();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(outcome.plot.len() > 10, "{} points", outcome.plot.len());
}
