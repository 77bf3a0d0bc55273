//! Whole-run tests of the simulator's adversaries (issue 8, point 4): over a fixed set of seeds
//! an evil gateway makes every kind of attack and a cloned device signs a second history (also
//! when the pair runs short of storage and declares holes); the checks find every attack the
//! cloud examined, no alarm the ground truth does not explain, and no attacked data in the store. A cloud that does not verify lets attacks through, and the
//! checks say so.
//!
//! `TIDESYNC_SIM_ADVERSARY_SEEDS=N` runs N seeds instead of the default set (for soak runs).

use std::collections::BTreeMap;

use tidesync_sim::world::adversary::AttackKind;
use tidesync_sim::{run, Bugs, Outcome, SimOptions};

/// Seeds in the default run.
const DEFAULT_SEEDS: u64 = 24;

fn adversarial(seed: u64) -> SimOptions {
    let mut options = SimOptions::new(6, 3, 2 * 3_600_000, seed);
    options.adversaries = true;
    options
}

fn seed_count() -> u64 {
    std::env::var("TIDESYNC_SIM_ADVERSARY_SEEDS").ok().and_then(|text| text.parse().ok()).unwrap_or(DEFAULT_SEEDS)
}

fn failed(outcomes: &[Outcome]) -> String {
    outcomes.iter().filter(|outcome| !outcome.passed()).map(|outcome| format!("{outcome}\n")).collect()
}

fn add(total: &mut BTreeMap<AttackKind, u64>, counts: &BTreeMap<AttackKind, u64>) {
    for (kind, n) in counts {
        *total.entry(*kind).or_default() += n;
    }
}

#[test]
fn every_attack_is_detected_with_no_false_alarm_over_the_fixed_seeds() {
    let outcomes: Vec<Outcome> = (0..seed_count()).map(|seed| run(adversarial(seed), |_, _| {})).collect();
    let failures = failed(&outcomes);
    assert!(failures.is_empty(), "{failures}");
    let (mut made, mut examined, mut detected) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for outcome in &outcomes {
        let security = &outcome.security;
        assert!(security.drawn.is_some(), "seed {}: no adversaries drawn", outcome.options.seed);
        // No false alarm, in numbers: every violation answered an attack or the clone.
        let n_violations: u64 = security.violations.values().sum();
        assert_eq!(n_violations, security.n_detected() + security.clone_equivocations, "{outcome}");
        add(&mut made, &security.attacks);
        add(&mut examined, &security.examined);
        add(&mut detected, &security.detected);
    }
    eprintln!("attacks over {} seeds: made {made:?}, examined {examined:?}, detected {detected:?}", outcomes.len());
    for kind in AttackKind::ALL {
        let n_examined = examined.get(&kind).copied().unwrap_or(0);
        assert!(n_examined > 0, "no {} attack reached the cloud over the seed set: {examined:?}", kind.name());
    }
    assert_eq!(examined, detected, "100 % detection");
}

#[test]
fn a_cloned_device_is_caught_equivocating_and_one_history_is_kept() {
    let mut n_clones = 0;
    let mut n_caught = 0;
    for seed in 100..112 {
        let outcome = run(adversarial(seed), |_, _| {});
        assert!(outcome.passed(), "{outcome}");
        let drawn = outcome.security.drawn.clone().expect("adversaries drawn");
        if drawn.cloned_device.is_some() {
            n_clones += 1;
            if outcome.security.clone_equivocations > 0 {
                n_caught += 1;
            }
        }
    }
    assert!(n_clones >= 3, "only {n_clones} of 12 seeds drew a clone");
    assert_eq!(n_caught, n_clones, "every clone that reached the cloud is caught as an equivocation");
}

#[test]
fn a_clone_short_of_storage_declares_holes_and_is_still_caught() {
    // The cloned pair may drop events and start batches with holes: a hole proof signs the chain
    // in front of the hole, so the fork cannot hide behind one.
    let mut n_short = 0;
    for seed in 200..240 {
        let options = adversarial(seed);
        let outcome = run(options, |_, _| {});
        let drawn = outcome.security.drawn.clone().expect("adversaries drawn");
        if drawn.cloned_device.is_none() || drawn.clone_storage_events_max.is_none() {
            continue;
        }
        assert!(outcome.passed(), "{outcome}");
        assert!(outcome.stats.n_dropped > 0, "the pair short of storage dropped nothing: {outcome}");
        let n_violations: u64 = outcome.security.violations.values().sum();
        assert_eq!(n_violations, outcome.security.n_detected() + outcome.security.clone_equivocations, "{outcome}");
        n_short += 1;
        if n_short == 4 {
            break;
        }
    }
    assert_eq!(n_short, 4, "too few seeds drew a clone short of storage");
}

#[test]
fn a_cloud_that_does_not_verify_fails_the_checks() {
    let mut n_failed = 0;
    for seed in 0..4 {
        let mut options = adversarial(seed);
        options.bugs = Bugs { skip_verify: true, ..Bugs::default() };
        let outcome = run(options, |_, _| {});
        let undetected = outcome.failures.iter().filter(|failure| failure.check == "attacks_detected").count();
        if outcome.security.n_examined() > 0 {
            assert!(undetected > 0, "seed {seed}: attacks went through and the checks did not notice:\n{outcome}");
            assert!(!outcome.passed());
            assert!(outcome.options.replay_command().contains("--adversaries --bug skip-verify"));
            n_failed += 1;
        }
    }
    assert!(n_failed >= 3, "only {n_failed} of 4 seeds had attacks reach the cloud");
}

#[test]
fn honest_runs_sign_and_verify_without_a_single_violation() {
    for seed in 0..4 {
        let outcome = run(SimOptions::new(4, 2, 90 * 60_000, seed), |_, _| {});
        assert!(outcome.passed(), "{outcome}");
        assert!(outcome.security.violations.is_empty(), "{outcome}");
        assert!(outcome.security.drawn.is_none());
        assert!(outcome.n_events_cloud > 0);
    }
}

#[test]
fn an_adversarial_seed_replays_bit_for_bit() {
    let first = run(adversarial(5), |_, _| {});
    let again = run(adversarial(5), |_, _| {});
    assert_eq!(first, again);
    assert!(first.security.n_examined() > 0, "{first}");
}

#[test]
fn an_unsigned_run_for_benchmarks_passes_and_sends_fewer_bytes() {
    let signed = run(SimOptions::new(4, 2, 90 * 60_000, 3), |_, _| {});
    let mut options = SimOptions::new(4, 2, 90 * 60_000, 3);
    options.unsigned = true;
    let unsigned = run(options.clone(), |_, _| {});
    assert!(unsigned.passed(), "{unsigned}");
    assert!(unsigned.stats.n_bytes_sent < signed.stats.n_bytes_sent, "proofs cost bytes: {unsigned}\n{signed}");
    assert!(options.replay_command().ends_with("--unsigned"));
}
