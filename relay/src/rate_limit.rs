//! A per-source token bucket for the gateway's 307s (issue 13, item 3).
//!
//! Why: a 307 costs the gateway a forwarded request and the label's relay a redirect
//! decision; one source asking thousands of times a second should be told to slow down (429
//! with `Retry-After`) before it crowds out everyone else on the same gateway replica.
//!
//! Why these defaults (20/s, burst 100): a mobile client needs one 307 per page load and then
//! talks to the label's client port q directly, so one person makes a handful a minute. A
//! carrier-grade NAT puts thousands of phones behind one IPv4 address; 20/s sustained (1200 a
//! minute) with a burst of 100 leaves room for that, while a flood from one address is cut to
//! a trickle.
//!
//! Sources are keyed by IPv4 address, and by the /64 prefix for IPv6: one subscriber gets a
//! whole /64, so per-address buckets would let it rotate through 2^64 fresh buckets.
//!
//! Bounded: at most `max_sources` buckets. When full, buckets already back at full burst go
//! first (forgetting them changes nothing: a new bucket starts full), then the fullest ones.
//! An evicted source starts over with a full bucket, which is the only "reward" eviction can
//! give; since the fullest buckets go first, that reward goes to the sources that used the
//! least, and a flooding source (an empty bucket) is the last one to be forgotten. Spreading a
//! flood over many addresses to force evictions only ever evicts the flood's own or idle
//! sources' nearly full buckets, each worth less than one burst.
//!
//! Pure: the caller passes the time; no I/O, no clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::sources::SourceKey;

/// Rate and burst of one source's bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second; 0 disables the limit.
    pub per_second: f64,
    /// Largest number of requests allowed at once (the bucket's size).
    pub burst: u32,
    /// Sources tracked at once.
    pub max_sources: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 20.0,
            burst: 100,
            max_sources: 65_536,
        }
    }
}

impl RateLimit {
    pub fn enabled(&self) -> bool {
        self.per_second > 0.0 && self.per_second.is_finite()
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per source.
#[derive(Debug)]
pub struct SourceRateLimiter {
    limit: RateLimit,
    buckets: HashMap<SourceKey, Bucket>,
}

impl SourceRateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Buckets tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn burst(&self) -> f64 {
        f64::from(self.limit.burst.max(1))
    }

    /// The bucket's tokens at `now` (refilled, capped at the burst).
    fn level(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.limit.per_second).min(self.burst())
    }

    /// Takes one token for `source` at `now`: `Ok` if allowed, else how long until the next
    /// token (at least one second, as `Retry-After` counts whole seconds).
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        if !self.limit.enabled() {
            return Ok(());
        }
        let key = SourceKey::of(source);
        let tokens = match self.buckets.get(&key) {
            Some(bucket) => self.level(bucket, now),
            None => {
                self.make_room(now);
                self.burst()
            }
        };
        if tokens >= 1.0 {
            self.buckets.insert(
                key,
                Bucket {
                    tokens: tokens - 1.0,
                    at: now,
                },
            );
            Ok(())
        } else {
            self.buckets.insert(key, Bucket { tokens, at: now });
            let wait = (1.0 - tokens) / self.limit.per_second;
            Err(Duration::from_secs_f64(wait.ceil().max(1.0)))
        }
    }

    /// Makes room for one more bucket: full buckets go (losslessly), then the fullest eighth
    /// at once, so a flood of new sources costs amortised O(1) per request, not a scan each.
    fn make_room(&mut self, now: Instant) {
        let max = self.limit.max_sources.max(1);
        if self.buckets.len() < max {
            return;
        }
        let burst = self.burst();
        let levels: Vec<(SourceKey, f64)> = self
            .buckets
            .iter()
            .map(|(key, bucket)| (*key, self.level(bucket, now)))
            .collect();
        for (key, level) in &levels {
            if *level >= burst {
                self.buckets.remove(key);
            }
        }
        if self.buckets.len() < max {
            return;
        }
        let mut partial: Vec<(SourceKey, f64)> =
            levels.into_iter().filter(|(_, l)| *l < burst).collect();
        let evict = (max / 8)
            .max(self.buckets.len() + 1 - max)
            .min(partial.len());
        if evict == 0 {
            return;
        }
        // Fullest first: descending by level.
        partial.select_nth_unstable_by(evict - 1, |a, b| b.1.total_cmp(&a.1));
        for (key, _) in partial.into_iter().take(evict) {
            self.buckets.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn limit(per_second: f64, burst: u32, max_sources: usize) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            max_sources,
        }
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate() {
        let mut limiter = SourceRateLimiter::new(limit(10.0, 5, 100));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.check(ip(1), t0), Ok(()));
        }
        assert_eq!(limiter.check(ip(1), t0), Err(Duration::from_secs(1)));
        // Another source is not affected.
        assert_eq!(limiter.check(ip(2), t0), Ok(()));
        // 100 ms later, one more token.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limiter.check(ip(1), t1), Ok(()));
        assert!(limiter.check(ip(1), t1).is_err());
        // Long idle: back to the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(limiter.check(ip(1), t2), Ok(()));
        }
        assert!(limiter.check(ip(1), t2).is_err());
    }

    #[test]
    fn retry_after_says_when_the_next_token_comes() {
        let mut limiter = SourceRateLimiter::new(limit(0.25, 1, 100));
        let t0 = Instant::now();
        assert_eq!(limiter.check(ip(1), t0), Ok(()));
        assert_eq!(limiter.check(ip(1), t0), Err(Duration::from_secs(4)));
        assert_eq!(
            limiter.check(ip(1), t0 + Duration::from_secs(3)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(limiter.check(ip(1), t0 + Duration::from_secs(4)), Ok(()));
    }

    #[test]
    fn a_rate_of_zero_disables_the_limit() {
        let mut limiter = SourceRateLimiter::new(limit(0.0, 1, 1));
        let t0 = Instant::now();
        for last in 0..=255 {
            assert_eq!(limiter.check(ip(last), t0), Ok(()));
            assert_eq!(limiter.check(ip(last), t0), Ok(()));
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn an_ipv6_subscriber_gets_one_bucket_for_its_whole_prefix() {
        let mut limiter = SourceRateLimiter::new(limit(1.0, 3, 100));
        let t0 = Instant::now();
        for host in 1..=3u16 {
            let addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, host);
            assert_eq!(limiter.check(IpAddr::V6(addr), t0), Ok(()));
        }
        let other_host = Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0xffff, 1, 2, 3);
        assert!(limiter.check(IpAddr::V6(other_host), t0).is_err());
        let other_prefix = Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1);
        assert_eq!(limiter.check(IpAddr::V6(other_prefix), t0), Ok(()));
        // An IPv4-mapped address is its IPv4 source.
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped());
        assert_eq!(limiter.check(mapped, t0), Ok(()));
        assert_eq!(limiter.check(mapped, t0), Ok(()));
        assert_eq!(limiter.check(ip(9), t0), Ok(()));
        assert!(limiter.check(ip(9), t0).is_err());
    }

    #[test]
    fn the_map_stays_bounded_and_a_flooding_source_is_never_forgotten_first() {
        let mut limiter = SourceRateLimiter::new(limit(1.0, 10, 64));
        let t0 = Instant::now();
        let flooder = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
        for _ in 0..10 {
            assert_eq!(limiter.check(flooder, t0), Ok(()));
        }
        assert!(limiter.check(flooder, t0).is_err());
        // Thousands of other sources, each taking one token (so none is full): the map stays
        // within its bound and the drained flooder stays tracked, still refused.
        for n in 0..5000u32 {
            let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
            assert_eq!(limiter.check(source, t0), Ok(()));
            assert!(limiter.tracked() <= 64);
        }
        assert!(limiter.check(flooder, t0).is_err());
    }

    #[test]
    fn buckets_back_at_full_are_dropped_before_any_other() {
        let mut limiter = SourceRateLimiter::new(limit(1.0, 2, 4));
        let t0 = Instant::now();
        for last in 1..=4 {
            assert_eq!(limiter.check(ip(last), t0), Ok(()));
        }
        // ip(4) drains its bucket; a second later 1..3 are full again, 4 is not.
        assert_eq!(limiter.check(ip(4), t0), Ok(()));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.check(ip(5), t1), Ok(()));
        assert_eq!(limiter.tracked(), 2);
        assert!(limiter.check(ip(4), t1).is_ok());
        assert!(limiter.check(ip(4), t1).is_err(), "ip(4) was remembered");
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// In any window of length t, one source gets at most burst + rate × t requests
            /// (when its bucket is never evicted: 12 sources, room for all); and the map never
            /// holds more than its bound, whatever the churn.
            #[test]
            fn never_more_than_burst_plus_rate_times_the_window(
                rate in 0.5f64..50.0,
                burst in 1u32..20,
                max_sources in 1usize..24,
                steps in proptest::collection::vec((0u64..200, 0u8..12), 1..400),
            ) {
                let mut limiter = SourceRateLimiter::new(limit(rate, burst, max_sources));
                let mut now = Instant::now();
                let mut allowed: Vec<Instant> = Vec::new();
                for (advance_ms, source) in steps {
                    now += Duration::from_millis(advance_ms);
                    // Source 0 is watched; the others churn the map.
                    if limiter.check(ip(source), now).is_ok() && source == 0 {
                        allowed.push(now);
                    }
                    prop_assert!(limiter.tracked() <= max_sources);
                }
                if max_sources >= 12 {
                    for (i, start) in allowed.iter().enumerate() {
                        for (j, end) in allowed.iter().enumerate().skip(i) {
                            let window = end.duration_since(*start).as_secs_f64();
                            let count = (j - i + 1) as f64;
                            prop_assert!(count <= f64::from(burst) + rate * window + 1e-9);
                        }
                    }
                }
            }
        }
    }
}
