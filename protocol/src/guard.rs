//! Token reuse, replay and failure limits for registrations (PROTOCOL.md §2).
//!
//! The original accepted any valid token any number of times from anywhere and never limited
//! guessing. The steward, however, reuses one token for a burst of registrations on new
//! connections, so a token cannot simply be single-use. [`AuthGuard`] keeps, per ID, the newest
//! accepted step, where it came from and how many new connections used it, and counts failures
//! per source and per ID in fixed windows. Every map is bounded, so a flood of sources or IDs
//! costs bounded memory; IDs are stored as keyed 64-bit hashes, so their length does not matter.
//!
//! Failures of configured IDs (the ID of the label asked for) and of unknown IDs are kept in
//! separate maps (issue 13). With one shared map, a flood of failures for made-up IDs filled
//! it, and making room evicted the oldest entries: the counter of the ID someone was guessing
//! (19 failures of 20, say) went with them, and its guessing could start again from zero after
//! every flood. Only configured IDs enter their map, so junk cannot push them out: it holds
//! at most the IDs of the labels attacked within a window (and `max_entries`, as every map).
//! Unknown IDs keep a bounded map of their own, counted and blocked exactly as configured ones,
//! so the answers do not tell which IDs exist; evicting there forgives only other unknown IDs,
//! which can never succeed anyway (blocked ones last: it takes a flood of more blocked made-up
//! IDs than the map holds, about 1.2 M failures from 120,000 sources within a block, to make a
//! blocked made-up ID answer differently from a blocked configured one).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Limits of an [`AuthGuard`]. A failure limit of 0 disables that limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    /// Failures from one source address within `window` that block it.
    pub failures_per_source: u32,
    /// Failures for one ID within `window` that block it (except from its known-good sources).
    pub failures_per_id: u32,
    /// The window in which failures are counted.
    pub window: Duration,
    /// How long a source or ID stays blocked once over its limit.
    pub block: Duration,
    /// Bound on the entries of each internal map.
    pub max_entries: usize,
}

impl Default for GuardLimits {
    fn default() -> Self {
        Self {
            failures_per_source: 10,
            failures_per_id: 20,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            max_entries: 65_536,
        }
    }
}

/// Why a token that matched its TOTP step is nevertheless refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenRefusal {
    #[error("a token for a newer step was already accepted for this ID")]
    Stale,
    #[error("this token was accepted for this ID from another source")]
    Replayed,
    #[error("this token was used for as many connections as allowed")]
    Exhausted,
}

/// One registration's use of a token whose TOTP matched `step`, as
/// [`AuthGuard::admit_many`] judges it.
#[derive(Debug, Clone, Copy)]
pub struct TokenUse<'a> {
    pub id: &'a str,
    /// The TOTP step the token matched (`totp::verify`).
    pub step: u64,
    /// The registering hidden server's address.
    pub source: IpAddr,
    /// New connections one token may serve: the label's `maxParked`.
    pub max_uses: u32,
    /// The token is accepted again only from the source that used it first.
    pub pin_source: bool,
    /// The request came on a kept-alive connection that already authenticated this ID.
    pub connection_authenticated: bool,
    /// Rendezvous ports asked for (the several-ports extension; 1 without it).
    pub wanted: u32,
}

/// Shared, thread-safe guard for all registrations of one relay.
#[derive(Debug)]
pub struct AuthGuard {
    id_hasher: RandomState,
    state: Mutex<State>,
}

/// Whether the ID of a failed registration is the one configured for the label it named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// The label exists and this is its ID: a guess that could succeed.
    Configured,
    /// Any other ID: it can never succeed here.
    Unknown,
}

#[derive(Debug, Default)]
struct State {
    limits: GuardLimits,
    source_failures: HashMap<IpAddr, Failures>,
    /// Failures of configured IDs only: junk never enters, so it never evicts them.
    configured_failures: HashMap<u64, Failures>,
    unknown_failures: HashMap<u64, Failures>,
    tokens: HashMap<u64, Token>,
    /// (ID, source) → last successful registration.
    good_sources: HashMap<(u64, IpAddr), Instant>,
}

/// Failures counted in a fixed window that starts at the first failure.
#[derive(Debug, Clone, Copy)]
struct Failures {
    window_start: Instant,
    count: u32,
    blocked_at: Option<Instant>,
    last: Instant,
}

/// The newest accepted step of one ID.
#[derive(Debug, Clone, Copy)]
struct Token {
    newest: u64,
    source: IpAddr,
    /// New connections that used `newest`.
    uses: u32,
    touched: Instant,
}

impl AuthGuard {
    pub fn new(limits: GuardLimits) -> Self {
        Self {
            id_hasher: RandomState::new(),
            state: Mutex::new(State {
                limits,
                ..State::default()
            }),
        }
    }

    pub fn limits(&self) -> GuardLimits {
        self.lock().limits
    }

    /// Changes the limits; what was counted so far is kept and judged by the new limits.
    pub fn set_limits(&self, limits: GuardLimits) {
        self.lock().limits = limits;
    }

    /// How long `source` must wait before trying `id` again, if it is blocked: the source has
    /// too many recent failures, or the ID has and `source` is not a known-good source for it
    /// (the genuine hidden server keeps registering while someone guesses from elsewhere).
    pub fn blocked(&self, source: IpAddr, id: &str, now: Instant) -> Option<Duration> {
        let (source, id) = (source.to_canonical(), self.id_key(id));
        let state = self.lock();
        let block = state.limits.block;
        let by_source = state
            .source_failures
            .get(&source)
            .and_then(|f| f.retry_after(now, block));
        let known_good = state
            .good_sources
            .get(&(id, source))
            .is_some_and(|t| !t.expired(now, &state.limits));
        // An ID may have failures in both maps (its label was added or removed meanwhile).
        let by_id = match known_good {
            true => None,
            false => [&state.configured_failures, &state.unknown_failures]
                .iter()
                .filter_map(|map| map.get(&id)?.retry_after(now, block))
                .max(),
        };
        by_source.max(by_id)
    }

    /// Counts a failed registration (bad token, unknown ID, refused token) against both the
    /// source and the ID; `kind` says which map the ID's count is kept in.
    pub fn record_failure(&self, source: IpAddr, id: &str, kind: IdKind, now: Instant) {
        let (source, id) = (source.to_canonical(), self.id_key(id));
        let mut state = self.lock();
        let state = &mut *state;
        let limits = &state.limits;
        bump(
            &mut state.source_failures,
            source,
            limits.failures_per_source,
            limits,
            now,
        );
        let id_failures = match kind {
            IdKind::Configured => &mut state.configured_failures,
            IdKind::Unknown => &mut state.unknown_failures,
        };
        bump(id_failures, id, limits.failures_per_id, limits, now);
    }

    /// Decides whether a token whose TOTP matched its step may be used for this registration,
    /// and for how many of the rendezvous ports it asks for: at least 1.
    ///
    /// On a new connection: a step older than the newest accepted for the ID is refused; the
    /// newest step is accepted again only from its source (if `pin_source`) and for at most
    /// `max_uses` connections, every granted port counting as one use (so a token yields no
    /// more rendezvous ports over new connections with the several-ports extension than
    /// without); a newer step replaces it. On a connection that already authenticated this
    /// ID (`connection_authenticated`), any step the caller verified is accepted for all the
    /// ports asked for and nothing is counted, but the newest step never moves backwards.
    pub fn admit_many(&self, token: &TokenUse<'_>, now: Instant) -> Result<u32, TokenRefusal> {
        let TokenUse {
            id,
            step,
            source,
            max_uses,
            pin_source,
            connection_authenticated,
            wanted,
        } = *token;
        let (source, id) = (source.to_canonical(), self.id_key(id));
        let wanted = wanted.max(1);
        // A new step: as many as asked for up to the limit, and always the one port a single
        // request got before.
        let first = wanted.min(max_uses).max(1);
        let mut state = self.lock();
        let limits = state.limits;
        let limits = &limits;
        let fresh = |uses| Token {
            newest: step,
            source,
            uses,
            touched: now,
        };
        let current = state
            .tokens
            .get(&id)
            .filter(|t| !t.expired(now, limits))
            .copied();
        let (next, granted) = match current {
            None if connection_authenticated => (fresh(0), wanted),
            None => (fresh(first), first),
            Some(t) if connection_authenticated => match step > t.newest {
                true => (fresh(0), wanted),
                false => (Token { touched: now, ..t }, wanted),
            },
            Some(t) if step < t.newest => return Err(TokenRefusal::Stale),
            Some(t) if step == t.newest => {
                if pin_source && t.source != source {
                    return Err(TokenRefusal::Replayed);
                }
                if t.uses >= max_uses {
                    return Err(TokenRefusal::Exhausted);
                }
                let granted = wanted.min(max_uses - t.uses);
                let next = Token {
                    uses: t.uses + granted,
                    touched: now,
                    ..t
                };
                (next, granted)
            }
            Some(_) => (fresh(first), first),
        };
        put(&mut state.tokens, id, next, limits, now);
        put(&mut state.good_sources, (id, source), now, limits, now);
        Ok(granted)
    }

    fn id_key(&self, id: &str) -> u64 {
        self.id_hasher.hash_one(id)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is one insert: the state stays consistent even if a holder panicked.
        crate::sync::lock(&self.state)
    }

    #[cfg(test)]
    fn sizes(&self) -> [usize; 5] {
        let s = self.lock();
        [
            s.source_failures.len(),
            s.configured_failures.len(),
            s.unknown_failures.len(),
            s.tokens.len(),
            s.good_sources.len(),
        ]
    }
}

impl Default for AuthGuard {
    fn default() -> Self {
        Self::new(GuardLimits::default())
    }
}

impl Failures {
    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            count: 0,
            blocked_at: None,
            last: now,
        }
    }

    fn retry_after(&self, now: Instant, block: Duration) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.blocked_at?);
        block.checked_sub(elapsed).filter(|d| !d.is_zero())
    }
}

/// What the bounded maps need of their entries.
trait Entry {
    fn expired(&self, now: Instant, limits: &GuardLimits) -> bool;
    /// Eviction order when a map is full: the smallest goes first.
    fn rank(&self, limits: &GuardLimits) -> Instant;
}

impl Entry for Failures {
    fn expired(&self, now: Instant, limits: &GuardLimits) -> bool {
        self.retry_after(now, limits.block).is_none()
            && now.saturating_duration_since(self.window_start) >= limits.window
    }

    /// A blocked entry ranks by the end of its block, so a flood of new sources evicts blocks
    /// about to end rather than fresh ones.
    fn rank(&self, limits: &GuardLimits) -> Instant {
        let block_end = self.blocked_at.and_then(|b| b.checked_add(limits.block));
        block_end.map_or(self.last, |end| end.max(self.last))
    }
}

/// Token state outlives a step's validity: a step is accepted over 3 periods (90 s with the
/// 30 s step), and `window + block` (120 s by default) covers that.
impl Entry for Token {
    fn expired(&self, now: Instant, limits: &GuardLimits) -> bool {
        now.saturating_duration_since(self.touched) >= limits.window.saturating_add(limits.block)
    }

    fn rank(&self, _: &GuardLimits) -> Instant {
        self.touched
    }
}

/// A known-good source: its last successful registration.
impl Entry for Instant {
    fn expired(&self, now: Instant, limits: &GuardLimits) -> bool {
        now.saturating_duration_since(*self) >= limits.window.saturating_add(limits.block)
    }

    fn rank(&self, _: &GuardLimits) -> Instant {
        *self
    }
}

/// Counts one failure for `key`, starting a new window once the old one (and any block) ended.
fn bump<K: Hash + Eq + Clone>(
    map: &mut HashMap<K, Failures>,
    key: K,
    limit: u32,
    limits: &GuardLimits,
    now: Instant,
) {
    let mut entry = match map.get(&key) {
        // Same window, unless it ended, or the block it led to did.
        Some(f)
            if !f.expired(now, limits)
                && (f.blocked_at.is_none() || f.retry_after(now, limits.block).is_some()) =>
        {
            *f
        }
        _ => Failures::new(now),
    };
    entry.count = entry.count.saturating_add(1);
    entry.last = now;
    if limit > 0 && entry.count >= limit && entry.blocked_at.is_none() {
        entry.blocked_at = Some(now);
    }
    put(map, key, entry, limits, now);
}

/// Inserts, first making room if the map is full: expired entries go, then the lowest ranked
/// eighth at once (so a flood costs amortised O(1) per insert, not a scan each time).
fn put<K: Hash + Eq + Clone, V: Entry>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    limits: &GuardLimits,
    now: Instant,
) {
    let max = limits.max_entries.max(1);
    if map.len() >= max && !map.contains_key(&key) {
        map.retain(|_, v| !v.expired(now, limits));
        if map.len() >= max {
            let evict = (max / 8).max(map.len() + 1 - max);
            let mut by_rank: Vec<(Instant, K)> = map
                .iter()
                .map(|(k, v)| (v.rank(limits), k.clone()))
                .collect();
            by_rank.select_nth_unstable_by_key(evict - 1, |(rank, _)| *rank);
            for (_, k) in by_rank.into_iter().take(evict) {
                map.remove(&k);
            }
        }
    }
    map.insert(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const ID: &str = "7d3e0c4a-1b2c-4d5e-8f90-123456789abc";
    const S: u64 = 37_037_036;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// [`AuthGuard::admit_many`] with the fields in a row, as the tables below read.
    #[allow(clippy::too_many_arguments)]
    fn admit_many(
        g: &AuthGuard,
        id: &str,
        step: u64,
        source: IpAddr,
        max_uses: u32,
        pin_source: bool,
        connection_authenticated: bool,
        wanted: u32,
        now: Instant,
    ) -> Result<u32, TokenRefusal> {
        let token = TokenUse {
            id,
            step,
            source,
            max_uses,
            pin_source,
            connection_authenticated,
            wanted,
        };
        g.admit_many(&token, now)
    }

    /// A single-port registration (no several-ports extension).
    #[allow(clippy::too_many_arguments)]
    fn admit(
        g: &AuthGuard,
        id: &str,
        step: u64,
        source: IpAddr,
        max_uses: u32,
        pin_source: bool,
        connection_authenticated: bool,
        now: Instant,
    ) -> Result<(), TokenRefusal> {
        admit_many(
            g,
            id,
            step,
            source,
            max_uses,
            pin_source,
            connection_authenticated,
            1,
            now,
        )
        .map(|_| ())
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AuthGuard>();
    }

    #[test]
    fn steward_burst_reuses_one_token() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        for i in 0..15 {
            assert_eq!(
                admit(&g, ID, S, ip(1), 15, true, false, t0 + secs(i)),
                Ok(())
            );
        }
        assert_eq!(
            admit(&g, ID, S, ip(1), 15, true, false, t0 + secs(15)),
            Err(TokenRefusal::Exhausted)
        );
        assert_eq!(
            admit(&g, ID, S, ip(1), 16, true, false, t0 + secs(15)),
            Ok(())
        );
        assert_eq!(
            admit(&g, ID, S, ip(1), 16, true, false, t0 + secs(16)),
            Err(TokenRefusal::Exhausted)
        );
    }

    #[test]
    fn several_ports_per_request_count_each_port_as_a_use() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        // New connections: 10 of 15 uses, then the 5 left, then nothing.
        assert_eq!(
            admit_many(&g, ID, S, ip(1), 15, true, false, 10, t0),
            Ok(10)
        );
        assert_eq!(admit_many(&g, ID, S, ip(1), 15, true, false, 10, t0), Ok(5));
        assert_eq!(
            admit_many(&g, ID, S, ip(1), 15, true, false, 10, t0),
            Err(TokenRefusal::Exhausted)
        );
        assert_eq!(
            admit(&g, ID, S, ip(1), 15, true, false, t0),
            Err(TokenRefusal::Exhausted)
        );
        // Pinning and staleness as for single requests.
        assert_eq!(
            admit_many(&g, ID, S, ip(2), 32, true, false, 4, t0),
            Err(TokenRefusal::Replayed)
        );
        assert_eq!(
            admit_many(&g, ID, S + 1, ip(1), 32, true, false, 40, t0),
            Ok(32)
        );
        assert_eq!(
            admit_many(&g, ID, S, ip(1), 32, true, false, 1, t0),
            Err(TokenRefusal::Stale)
        );
        // On an authenticated connection nothing is counted.
        assert_eq!(
            admit_many(&g, ID, S + 1, ip(1), 32, true, true, 16, t0),
            Ok(16)
        );
        // A request for 0 is a request for 1.
        assert_eq!(
            admit_many(&g, "other", S, ip(1), 4, true, false, 0, t0),
            Ok(1)
        );
    }

    #[test]
    fn source_pinning() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        assert_eq!(admit(&g, ID, S, ip(1), 32, true, false, t0), Ok(()));
        assert_eq!(
            admit(&g, ID, S, ip(2), 32, true, false, t0),
            Err(TokenRefusal::Replayed)
        );
        assert_eq!(admit(&g, ID, S, ip(2), 32, false, false, t0), Ok(()));
        // An IPv4-mapped IPv6 address is the same source.
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_eq!(admit(&g, ID, S, mapped, 32, true, false, t0), Ok(()));
        // Another ID is independent.
        assert_eq!(admit(&g, "other", S, ip(2), 32, true, false, t0), Ok(()));
    }

    #[test]
    fn older_step_refused_after_newer() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        assert_eq!(admit(&g, ID, S, ip(1), 32, true, false, t0), Ok(()));
        assert_eq!(admit(&g, ID, S + 1, ip(1), 32, true, false, t0), Ok(()));
        assert_eq!(
            admit(&g, ID, S, ip(1), 32, true, false, t0),
            Err(TokenRefusal::Stale)
        );
        // A newer step from another source takes over, even with pinning.
        assert_eq!(admit(&g, ID, S + 2, ip(2), 32, true, false, t0), Ok(()));
        assert_eq!(
            admit(&g, ID, S + 2, ip(1), 32, true, false, t0),
            Err(TokenRefusal::Replayed)
        );
    }

    #[test]
    fn authenticated_connection_is_not_counted() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        assert_eq!(admit(&g, ID, S, ip(1), 2, true, false, t0), Ok(()));
        for _ in 0..100 {
            assert_eq!(admit(&g, ID, S, ip(1), 2, true, true, t0), Ok(()));
        }
        // Still one use left for a new connection.
        assert_eq!(admit(&g, ID, S, ip(1), 2, true, false, t0), Ok(()));
        // An older (caller-verified) step is fine on the connection but does not move newest back.
        assert_eq!(admit(&g, ID, S - 1, ip(1), 2, true, true, t0), Ok(()));
        assert_eq!(
            admit(&g, ID, S - 1, ip(1), 2, true, false, t0),
            Err(TokenRefusal::Stale)
        );
        // A newer step on the connection moves newest forward without using it up.
        assert_eq!(admit(&g, ID, S + 1, ip(1), 2, true, true, t0), Ok(()));
        assert_eq!(
            admit(&g, ID, S, ip(1), 2, true, false, t0),
            Err(TokenRefusal::Stale)
        );
        assert_eq!(admit(&g, ID, S + 1, ip(1), 2, true, false, t0), Ok(()));
        assert_eq!(admit(&g, ID, S + 1, ip(1), 2, true, false, t0), Ok(()));
    }

    #[test]
    fn source_failures_block_that_source() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        for i in 0..9 {
            g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(i));
        }
        assert_eq!(g.blocked(ip(1), ID, t0 + secs(9)), None);
        g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(9));
        assert_eq!(g.blocked(ip(1), ID, t0 + secs(9)), Some(secs(60)));
        assert_eq!(g.blocked(ip(1), "other", t0 + secs(30)), Some(secs(39)));
        assert_eq!(g.blocked(ip(2), ID, t0 + secs(10)), None);
        assert_eq!(g.blocked(ip(1), ID, t0 + secs(69)), None);
        // The mapped spelling of the address is the same source.
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert!(g.blocked(mapped, ID, t0 + secs(10)).is_some());
        // After the block the count starts again.
        g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(70));
        assert_eq!(g.blocked(ip(1), ID, t0 + secs(70)), None);
    }

    #[test]
    fn id_block_spares_known_good_source() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        assert_eq!(admit(&g, ID, S, ip(1), 32, true, false, t0), Ok(()));
        for i in 0..20u8 {
            g.record_failure(ip(100 + i), ID, IdKind::Configured, t0 + secs(1));
        }
        let now = t0 + secs(2);
        assert_eq!(g.blocked(ip(99), ID, now), Some(secs(59)));
        assert_eq!(g.blocked(ip(1), ID, now), None);
        assert_eq!(g.blocked(ip(99), "other", now), None);
        // Each source has only one failure: not blocked for other IDs.
        assert_eq!(g.blocked(ip(100), "other", now), None);
        // A source that last succeeded longer than block + window ago is no longer trusted.
        let g = AuthGuard::default();
        assert_eq!(admit(&g, ID, S, ip(1), 32, true, false, t0), Ok(()));
        for i in 0..20u8 {
            g.record_failure(ip(100 + i), ID, IdKind::Configured, t0 + secs(120));
        }
        assert!(g.blocked(ip(1), ID, t0 + secs(121)).is_some());
    }

    #[test]
    fn window_expiry() {
        let (g, t0) = (AuthGuard::default(), Instant::now());
        for i in 0..9 {
            g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(i));
        }
        // The window started at t0: these are in a new one.
        g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(60));
        assert_eq!(g.blocked(ip(1), ID, t0 + secs(60)), None);
        for i in 0..8 {
            g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(61 + i));
        }
        assert_eq!(g.blocked(ip(1), ID, t0 + secs(70)), None);
        g.record_failure(ip(1), ID, IdKind::Configured, t0 + secs(119));
        assert!(g.blocked(ip(1), ID, t0 + secs(119)).is_some());
        // Token state expires after window + block; an older step is then not known to be old.
        assert_eq!(admit(&g, ID, S + 1, ip(1), 32, true, false, t0), Ok(()));
        assert_eq!(
            admit(&g, ID, S, ip(1), 32, true, false, t0 + secs(119)),
            Err(TokenRefusal::Stale)
        );
        assert_eq!(
            admit(&g, ID, S, ip(1), 32, true, false, t0 + secs(240)),
            Ok(())
        );
    }

    #[test]
    fn zero_limit_disables() {
        let limits = GuardLimits {
            failures_per_source: 0,
            failures_per_id: 0,
            ..GuardLimits::default()
        };
        let (g, t0) = (AuthGuard::new(limits), Instant::now());
        for _ in 0..1000 {
            g.record_failure(ip(1), ID, IdKind::Configured, t0);
        }
        assert_eq!(g.blocked(ip(1), ID, t0), None);
    }

    #[test]
    fn memory_is_bounded() {
        let limits = GuardLimits {
            max_entries: 1000,
            ..GuardLimits::default()
        };
        let (g, t0) = (AuthGuard::new(limits), Instant::now());
        for i in 0..200_000u32 {
            let source = IpAddr::V6(Ipv6Addr::from(u128::from(i) | (0x2001_0db8 << 96)));
            let now = t0 + Duration::from_millis(u64::from(i));
            g.record_failure(source, &format!("id-{i}"), IdKind::Unknown, now);
            if i % 10 == 0 {
                let _ = admit(&g, &format!("id-{i}"), S, source, 32, true, false, now);
            }
            assert!(g.sizes().iter().all(|&n| n <= 1000));
        }
        // A recently blocked source survives the flood of newer, unblocked ones.
        let end = t0 + Duration::from_millis(200_000);
        for _ in 0..10 {
            g.record_failure(ip(1), ID, IdKind::Configured, end);
        }
        for i in 0..5_000u32 {
            g.record_failure(
                IpAddr::V6(Ipv6Addr::from(u128::from(i))),
                "x",
                IdKind::Unknown,
                end,
            );
        }
        assert!(g.blocked(ip(1), "y", end).is_some());
    }

    /// What an attacker can do to a guessed ID's count: fail for made-up IDs (from a pool
    /// larger than the map) and for the other configured IDs (fewer than the map holds),
    /// from many sources, at any time within the window.
    mod junk {
        use super::*;
        use proptest::prelude::*;

        const GUESSED: &str = "the-guessed-id";

        #[derive(Debug, Clone)]
        struct Junk {
            configured: bool,
            id: u16,
            source: u16,
            /// Milliseconds after the guessed ID's first failure, below the 60 s window.
            at: u64,
        }

        fn junk(max_entries: usize) -> impl Strategy<Value = Vec<Junk>> {
            let one = (
                any::<bool>(),
                0..(max_entries as u16 * 4),
                any::<u16>(),
                0..59_000u64,
            )
                .prop_map(|(configured, id, source, at)| Junk {
                    configured,
                    id,
                    source,
                    at,
                });
            proptest::collection::vec(one, 0..1500).prop_map(|mut junk| {
                junk.sort_by_key(|j| j.at);
                junk
            })
        }

        fn source(n: u16) -> IpAddr {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, n))
        }

        /// Never used by the attacker: asks whether the guessed ID is blocked.
        fn fresh() -> IpAddr {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 2, 1))
        }

        /// Plays `junk` from `t0` on; returns the time of the last failure.
        fn play(g: &AuthGuard, junk: &[Junk], max_entries: usize, t0: Instant) -> Instant {
            let mut last = t0;
            for j in junk {
                last = t0 + Duration::from_millis(j.at);
                // Other configured IDs: fewer than the map holds, as labels are.
                let (id, kind) = match j.configured {
                    true => (
                        format!("label-{}", usize::from(j.id) % (max_entries - 1)),
                        IdKind::Configured,
                    ),
                    false => (format!("junk-{}", j.id), IdKind::Unknown),
                };
                g.record_failure(source(j.source), &id, kind, last);
            }
            last
        }

        fn limits(max_entries: usize, failures_per_id: u32) -> GuardLimits {
            GuardLimits {
                failures_per_id,
                max_entries,
                ..GuardLimits::default()
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn after_any_junk_a_blocked_configured_id_stays_blocked(
                max_entries in 2usize..48,
                failures_per_id in 1u32..8,
                junk in junk(48),
            ) {
                let (g, t0) = (AuthGuard::new(limits(max_entries, failures_per_id)), Instant::now());
                for n in 0..failures_per_id {
                    g.record_failure(source(n as u16), GUESSED, IdKind::Configured, t0);
                }
                prop_assert!(g.blocked(fresh(), GUESSED, t0).is_some());
                let last = play(&g, &junk, max_entries, t0);
                prop_assert!(g.blocked(fresh(), GUESSED, last).is_some());
                prop_assert!(g.sizes().iter().all(|&n| n <= max_entries));
            }

            #[test]
            fn after_any_junk_a_guessed_configured_id_keeps_its_count(
                max_entries in 2usize..48,
                failures_per_id in 2u32..8,
                before in 1u32..7,
                junk in junk(48),
            ) {
                let before = before.min(failures_per_id - 1);
                let (g, t0) = (AuthGuard::new(limits(max_entries, failures_per_id)), Instant::now());
                for n in 0..before {
                    g.record_failure(source(n as u16), GUESSED, IdKind::Configured, t0);
                }
                let last = play(&g, &junk, max_entries, t0);
                prop_assert!(g.blocked(fresh(), GUESSED, last).is_none());
                // The guesses left before the limit, and no more.
                for n in before..failures_per_id {
                    g.record_failure(source(n as u16), GUESSED, IdKind::Configured, last);
                }
                prop_assert!(g.blocked(fresh(), GUESSED, last).is_some());
            }
        }

        /// Unknown IDs are counted and blocked like configured ones: the answer does not say
        /// which IDs exist.
        #[test]
        fn unknown_ids_are_blocked_like_configured_ones() {
            let (g, t0) = (AuthGuard::default(), Instant::now());
            for n in 0..20 {
                assert_eq!(g.blocked(source(n), "made-up", t0), None);
                assert_eq!(g.blocked(source(n), GUESSED, t0), None);
                g.record_failure(source(n), "made-up", IdKind::Unknown, t0);
                g.record_failure(source(n), GUESSED, IdKind::Configured, t0);
            }
            assert_eq!(g.blocked(fresh(), "made-up", t0), Some(secs(60)));
            assert_eq!(g.blocked(fresh(), GUESSED, t0), Some(secs(60)));
        }
    }
}
