//! Unit tests of option parsing and fault drawing.

use super::*;
use rand_core::SeedableRng;

#[test]
fn durations_parse_and_format_round_trip() {
    assert_eq!(parse_duration_ms("7d").unwrap(), 7 * 86_400_000);
    assert_eq!(parse_duration_ms("90m").unwrap(), 5_400_000);
    assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
    assert_eq!(parse_duration_ms("0").unwrap(), 0);
    assert!(parse_duration_ms("7").is_err());
    assert!(parse_duration_ms("d").is_err());
    assert!(parse_duration_ms("3w").is_err());
    for duration_ms in [0, 250, 1_000, 90 * 60_000, 7 * 86_400_000, 36 * 3_600_000] {
        assert_eq!(parse_duration_ms(&format_duration_ms(duration_ms)).unwrap(), duration_ms);
    }
}

#[test]
fn fault_lists_parse_and_format_round_trip() {
    assert_eq!(parse_faults("all").unwrap().len(), FaultKind::ALL.len());
    assert!(parse_faults("none").unwrap().is_empty());
    let some = parse_faults("loss,dup,cloud-outage").unwrap();
    assert_eq!(some.len(), 3);
    assert_eq!(parse_faults(&format_faults(&some)).unwrap(), some);
    assert!(matches!(parse_faults("loss,meteor"), Err(OptionError::UnknownFault { .. })));
}

#[test]
fn seed_ranges_parse() {
    assert_eq!(parse_seed_range("3..7").unwrap(), 3..7);
    assert_eq!(parse_seed_range("3..=7").unwrap(), 3..8);
    assert!(parse_seed_range("7..3").is_err());
    assert!(parse_seed_range("x..3").is_err());
}

#[test]
fn drawn_faults_stay_in_their_ranges_and_respect_the_enabled_set() {
    for seed in 0..200 {
        let options = SimOptions::new(10, 3, 86_400_000, seed);
        let drawn = DrawnFaults::draw(&options, &mut ChaCha8Rng::seed_from_u64(seed));
        assert!(drawn.loss_percent <= 30 && drawn.duplicate_percent <= 50);
        assert!(drawn.jitter_ms <= 4 * drawn.latency_ms);
        let mut quiet = options.clone();
        quiet.faults.clear();
        let none = DrawnFaults::draw(&quiet, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(
            (none.loss_percent, none.duplicate_percent, none.jitter_ms, none.n_device_crashes, none.n_cloud_outages),
            (0, 0, 0, 0, 0)
        );
    }
}

#[test]
fn the_replay_command_names_every_option() {
    let mut options = SimOptions::new(12, 3, 7 * 86_400_000, 42);
    options.bugs.skip_dedupe = true;
    let command = options.replay_command();
    assert!(command.contains("--devices 12 --gateways 3 --duration 7d --seed 42 --faults all"), "{command}");
    assert!(command.ends_with("--bug skip-dedupe"), "{command}");
}
