//! Jittered exponential backoff between failed attempts.

use std::time::Duration;

/// The first delay after a failure.
pub const INITIAL: Duration = Duration::from_millis(250);

/// Delays `INITIAL`, `2·INITIAL`, `4·INITIAL`, … capped at `max`, each jittered down by up
/// to half ("equal jitter": never less than half the nominal delay, so a storm of failures
/// still slows down). `reset` after a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// Consecutive failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Records a failure and returns the delay before the next attempt. `unit` is a random
    /// number in `[0, 1)`; `retry_after` (from the server) wins when it is longer, still capped
    /// at the maximum.
    pub fn fail(&mut self, unit: f64, retry_after: Option<Duration>) -> Duration {
        let delay = delay(self.failures, self.initial, self.max, unit);
        self.failures = self.failures.saturating_add(1);
        match retry_after {
            Some(ra) if ra > delay => ra.min(self.max),
            _ => delay,
        }
    }
}

/// The delay after `failures` earlier failures (0 for the first): nominal
/// `min(initial · 2^failures, max)`, times a factor in `[0.5, 1)` taken from `unit`.
pub fn delay(failures: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let nominal = initial
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    nominal.mul_f64(0.5 + 0.5 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_up_to_the_cap() {
        let max = Duration::from_secs(30);
        let top: Vec<Duration> = (0..10).map(|n| delay(n, INITIAL, max, 1.0)).collect();
        assert_eq!(
            top,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000].map(MS)
        );
        assert_eq!(delay(0, INITIAL, max, 0.0), MS(125));
        assert_eq!(delay(3, INITIAL, max, 0.5), MS(1500));
        assert_eq!(delay(u32::MAX, INITIAL, max, 0.0), MS(15000));
        assert_eq!(delay(40, INITIAL, max, f64::NAN), MS(15000));
    }

    #[test]
    fn fail_and_reset() {
        let mut b = Backoff::new(INITIAL, Duration::from_secs(2));
        assert_eq!(b.fail(1.0, None), MS(250));
        assert_eq!(b.fail(1.0, None), MS(500));
        assert_eq!(b.fail(1.0, None), MS(1000));
        assert_eq!(b.fail(1.0, None), MS(2000));
        assert_eq!(b.fail(1.0, None), MS(2000));
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!(b.fail(0.0, None), MS(125));
    }

    #[test]
    fn retry_after_when_longer_but_capped() {
        let mut b = Backoff::new(INITIAL, Duration::from_secs(30));
        assert_eq!(b.fail(1.0, Some(Duration::from_secs(5))), MS(5000));
        // Shorter than the backoff: the backoff wins.
        b.failures = 8;
        assert_eq!(b.fail(1.0, Some(MS(100))), MS(30000));
        // Longer than the cap: the cap wins.
        assert_eq!(b.fail(1.0, Some(Duration::from_secs(3600))), MS(30000));
    }

    #[test]
    fn max_below_initial() {
        let mut b = Backoff::new(INITIAL, MS(100));
        assert_eq!(b.fail(1.0, None), MS(250));
    }
}
