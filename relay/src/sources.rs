//! What a connection's source is, and connections counted per source, so that one source
//! cannot hold a label's (or the relay's) client ports, or the front end, alone. The front
//! end, the client ports q and the gateway's 307 limit (`rate_limit`) all key by
//! [`SourceKey`].
//!
//! A source is an IPv4 address, or an IPv6 /64: one subscriber usually gets a whole /64, so
//! counting single IPv6 addresses would give an attacker 2^64 sources. IPv4-mapped IPv6
//! addresses count as their IPv4 address.
//!
//! Bounded by construction: an entry exists only while its source has a connection open (it
//! is removed when its count returns to 0), so the map never holds more entries than there are
//! open connections.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Whom a connection (or a request) is counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => Self(v4),
        }
    }
}

/// Open connections per source.
#[derive(Debug, Default)]
pub struct SourceCounts {
    open: Mutex<HashMap<SourceKey, usize>>,
}

impl SourceCounts {
    /// Counts one more connection from `source` unless it already has `cap` open; the slot
    /// gives it back when dropped.
    pub fn try_acquire(&self, source: SourceKey, cap: usize) -> Option<SourceSlot<'_>> {
        // `then`, not `then_some`: a slot built for a refusal would give back a place on drop.
        self.count_in(source, cap).then(|| SourceSlot {
            counts: self,
            source,
        })
    }

    /// [`try_acquire`](Self::try_acquire) for a slot that outlives the borrow (a connection's
    /// task).
    pub fn try_acquire_owned(
        self: &Arc<Self>,
        source: SourceKey,
        cap: usize,
    ) -> Option<OwnedSourceSlot> {
        self.count_in(source, cap).then(|| OwnedSourceSlot {
            counts: self.clone(),
            source,
        })
    }

    fn count_in(&self, source: SourceKey, cap: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(source).or_insert(0);
        if *count >= cap {
            if *count == 0 {
                open.remove(&source); // cap 0: nothing is kept for a refused source
            }
            return false;
        }
        *count += 1;
        true
    }

    /// Connections open now from `source`.
    pub fn open(&self, source: SourceKey) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&source).copied().unwrap_or(0)
    }

    /// Sources with a connection open now (the map's size).
    pub fn sources(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn release(&self, source: SourceKey) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&source);
            }
        }
    }
}

/// One open connection counted against its source.
#[derive(Debug)]
pub struct SourceSlot<'a> {
    counts: &'a SourceCounts,
    source: SourceKey,
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        self.counts.release(self.source);
    }
}

/// A [`SourceSlot`] that owns its counts.
#[derive(Debug)]
pub struct OwnedSourceSlot {
    counts: Arc<SourceCounts>,
    source: SourceKey,
}

impl Drop for OwnedSourceSlot {
    fn drop(&mut self) {
        self.counts.release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SourceKey {
        SourceKey::of(s.parse().unwrap())
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    }

    #[test]
    fn a_source_over_its_cap_is_refused_and_others_are_not() {
        let counts = SourceCounts::default();
        let a = key("192.0.2.1");
        let b = key("192.0.2.2");
        let mut held: Vec<_> = (0..3).map(|_| counts.try_acquire(a, 3).unwrap()).collect();
        assert!(counts.try_acquire(a, 3).is_none());
        assert_eq!(counts.open(a), 3);
        let other = counts.try_acquire(b, 3).expect("another source is served");
        drop(held.pop());
        assert_eq!(counts.open(a), 2);
        assert!(counts.try_acquire(a, 3).is_some(), "a slot came back");
        drop(other);
        assert_eq!(counts.open(b), 0);
    }

    #[test]
    fn entries_exist_only_while_connections_are_open() {
        let counts = SourceCounts::default();
        let slots: Vec<_> = (0..1000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
                counts.try_acquire(SourceKey::of(ip.into()), 2).unwrap()
            })
            .collect();
        assert_eq!(counts.sources(), 1000);
        drop(slots);
        assert_eq!(counts.sources(), 0);
        assert!(counts.try_acquire(key("192.0.2.1"), 0).is_none());
        assert_eq!(counts.sources(), 0, "a refusal at cap 0 leaves no entry");
    }
}
