//! Unit tests of names, seqs and the hybrid logical clock.

use super::*;

#[test]
fn device_ids_accept_the_documented_alphabet() {
    for good in ["a", "pump-7", "site_1.rack-2", &"x".repeat(64), "A9._-"] {
        let id = DeviceId::new(good).expect(good);
        assert_eq!(id.as_str(), good);
    }
}

#[test]
fn device_ids_refuse_bad_names_with_a_reason() {
    assert_eq!(DeviceId::new(""), Err(NameError::Empty));
    assert_eq!(DeviceId::new(&"x".repeat(65)), Err(NameError::TooLong { len_bytes: 65 }));
    assert_eq!(DeviceId::new("pump 7"), Err(NameError::InvalidChar { character: ' ', index: 4 }));
    assert_eq!(DeviceId::new("pümp"), Err(NameError::InvalidChar { character: 'ü', index: 1 }));
    assert_eq!(DeviceId::new("a/b"), Err(NameError::InvalidChar { character: '/', index: 1 }));
}

#[test]
fn device_ids_order_like_their_text() {
    let a = DeviceId::new("ab").unwrap();
    let b = DeviceId::new("b").unwrap();
    assert!(a < b, "ordering is lexicographic, not by length");
}

#[test]
fn hlc_follows_the_wall_clock_when_it_moves_forward() {
    let mut clock = HlcClock::new();
    assert_eq!(clock.now(Millis(100)), Hlc { wall_ms: 100, logical: 0 });
    assert_eq!(clock.now(Millis(100)), Hlc { wall_ms: 100, logical: 1 });
    assert_eq!(clock.now(Millis(101)), Hlc { wall_ms: 101, logical: 0 });
}

#[test]
fn hlc_stays_monotonic_when_the_wall_clock_jumps_back() {
    let mut clock = HlcClock::new();
    let before = clock.now(Millis(1_700_000_000_000));
    // The RTC was reset to the epoch.
    let after = clock.now(Millis(0));
    assert!(after > before);
    assert_eq!(after, Hlc { wall_ms: 1_700_000_000_000, logical: 1 });
}

#[test]
fn hlc_orders_after_an_observed_remote_stamp() {
    let mut clock = HlcClock::new();
    clock.now(Millis(10));
    let remote = Hlc { wall_ms: 50, logical: 7 };
    let merged = clock.observe(Millis(20), remote);
    assert!(merged > remote);
    assert!(clock.now(Millis(20)) > merged);
}

#[test]
fn hlc_counter_overflow_moves_the_physical_part() {
    let mut clock = HlcClock::resume(Hlc { wall_ms: 5, logical: u32::MAX });
    assert_eq!(clock.now(Millis(5)), Hlc { wall_ms: 6, logical: 0 });
}

#[test]
fn hlc_resumes_after_a_restart() {
    let mut clock = HlcClock::new();
    let last = clock.now(Millis(1_000));
    let mut restarted = HlcClock::resume(clock.last());
    assert!(restarted.now(Millis(3)) > last);
}
