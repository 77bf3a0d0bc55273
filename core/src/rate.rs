//! `TokenBucket`: per-device (and per-gateway) event rate limits, as backpressure.
//!
//! A receiver that is over a sender's rate does not drop anything: it refuses the batch with
//! `Backpressure { reason: RateLimited, retry_after_ms }` and the sender keeps the events in its
//! ledger or spool and offers them again later. The bucket is a plain value with time passed in,
//! so the gateway, the cloud and the simulator share it.
//!
//! Batches are larger than a sensible burst (a device back from a day offline sends hundreds of
//! events at once), so a batch is admitted whenever the bucket is not in debt and may take it
//! below zero; the debt is paid back at the refill rate before the next batch. Over any long
//! window the admitted rate is the configured rate, and no batch size is ever refused forever.

use serde::{Deserialize, Serialize};

use crate::event::Millis;

/// A rate limit: `events_per_s` on average, with bursts of up to `burst_events`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate, events per second. 0 means unlimited.
    pub events_per_s: u32,
    /// Bucket size: how many events may come at once after a quiet period.
    pub burst_events: u32,
}

impl RateLimit {
    /// No limit.
    pub const UNLIMITED: RateLimit = RateLimit { events_per_s: 0, burst_events: 0 };

    /// The default per device: 100 events/s, bursts of 100.
    pub const DEVICE_DEFAULT: RateLimit = RateLimit { events_per_s: 100, burst_events: 100 };

    /// Whether this limit limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.events_per_s == 0
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::DEVICE_DEFAULT
    }
}

/// The state of one sender's limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    limit: RateLimit,
    /// Tokens, in thousandths of an event (so millisecond refills stay exact); negative is debt.
    milli_tokens: i64,
    updated: Millis,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(limit: RateLimit, now: Millis) -> Self {
        Self { limit, milli_tokens: i64::from(limit.burst_events) * 1000, updated: now }
    }

    /// The limit this bucket enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn refill(&mut self, now: Millis) {
        let elapsed_ms = now.since(self.updated);
        self.updated = self.updated.max(now);
        // events_per_s tokens per 1000 ms = events_per_s milli-tokens per ms.
        let gained = i64::try_from(elapsed_ms).unwrap_or(i64::MAX).saturating_mul(i64::from(self.limit.events_per_s));
        let cap = i64::from(self.limit.burst_events.max(1)) * 1000;
        self.milli_tokens = self.milli_tokens.saturating_add(gained).min(cap);
    }

    /// Takes `n_events` at `now` if the bucket is not in debt; otherwise returns how many ms to
    /// wait until it is.
    pub fn take(&mut self, now: Millis, n_events: u64) -> Result<(), u32> {
        if self.limit.is_unlimited() {
            return Ok(());
        }
        self.refill(now);
        if self.milli_tokens <= 0 {
            return Err(self.wait_ms());
        }
        let cost = i64::try_from(n_events).unwrap_or(i64::MAX).saturating_mul(1000);
        self.milli_tokens = self.milli_tokens.saturating_sub(cost);
        Ok(())
    }

    /// Milliseconds until the bucket is out of debt (0 if it is).
    pub fn wait_ms(&self) -> u32 {
        if self.milli_tokens > 0 || self.limit.is_unlimited() {
            return 0;
        }
        let rate = i64::from(self.limit.events_per_s.max(1));
        // One more millisecond than the exact figure, so the retry finds tokens.
        let ms = (1 - self.milli_tokens) / rate + 1;
        u32::try_from(ms).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_full_bucket_admits_a_burst_then_asks_to_wait_for_the_debt() {
        let limit = RateLimit { events_per_s: 100, burst_events: 100 };
        let mut bucket = TokenBucket::new(limit, Millis(0));
        assert_eq!(bucket.take(Millis(0), 300), Ok(()));
        // 200 events of debt at 100/s: two seconds.
        let wait = bucket.take(Millis(0), 1).unwrap_err();
        assert!((2_000..=2_002).contains(&wait), "{wait}");
        assert!(bucket.take(Millis(1_999), 1).is_err());
        assert_eq!(bucket.take(Millis(u64::from(wait)), 1), Ok(()));
    }

    #[test]
    fn unlimited_never_refuses() {
        let mut bucket = TokenBucket::new(RateLimit::UNLIMITED, Millis(0));
        for _ in 0..1000 {
            assert_eq!(bucket.take(Millis(0), 1_000_000), Ok(()));
        }
    }

    proptest! {
        /// Over any run of attempts, admitted events never exceed burst + rate x elapsed time
        /// + the last batch (the one allowed to go into debt), and a refused caller who waits as
        /// told is admitted.
        #[test]
        fn admitted_rate_is_bounded_and_waiting_as_told_succeeds(
            rate in 1u32..10_000,
            burst in 1u32..10_000,
            attempts in proptest::collection::vec((0u64..5_000, 1u64..2_000), 1..200),
        ) {
            let limit = RateLimit { events_per_s: rate, burst_events: burst };
            let mut bucket = TokenBucket::new(limit, Millis(0));
            let mut now = 0u64;
            let mut admitted = 0u64;
            let mut largest = 0u64;
            for (step_ms, n) in attempts {
                now += step_ms;
                match bucket.take(Millis(now), n) {
                    Ok(()) => { admitted += n; largest = largest.max(n); }
                    Err(wait) => {
                        let mut retry = bucket;
                        prop_assert!(retry.take(Millis(now + u64::from(wait)), n).is_ok());
                    }
                }
                let bound = u64::from(burst) + u64::from(rate) * now / 1000 + largest + 1;
                prop_assert!(admitted <= bound, "admitted {} > bound {}", admitted, bound);
            }
        }
    }
}
