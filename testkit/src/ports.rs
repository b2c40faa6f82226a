//! Port ranges for relays the tests start. Tests run concurrently (test threads, and several
//! test binaries at once), so each relay gets a block of its own, below Linux's ephemeral
//! range (32768+) where the OS-chosen ports live:
//!
//! - 11000–19999: [`own_ports`], spawned relays (`spawned::SpawnedRelay`);
//! - 20000–21999: the relay's defaults (`--p-ports`, `--q-ports`), which the operator's
//!   API-server test keeps (its label relay's client port is 127.0.0.1:21000);
//! - 22000–30999: [`port_block`], in-process relays (`TestRelay`);
//! - 31000–32767: [`upper_block`], the README's command run as a newcomer would.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use taas_relay::config::PortRange;

/// Port blocks below Linux's ephemeral range, distinct per relay started by this process
/// and spread across processes, so concurrently running tests rarely meet (and a port found
/// taken is simply skipped by the relay).
pub fn port_block(len: u16) -> (PortRange, PortRange) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    let blocks = 9_000 / (2 * len);
    let index = (std::process::id() as u16)
        .wrapping_mul(7)
        .wrapping_add(slot)
        % blocks;
    let base = 22_000 + index * 2 * len;
    (
        PortRange::new(base, base + len - 1).unwrap(),
        PortRange::new(base + len, base + 2 * len - 1).unwrap(),
    )
}

/// Port ranges for a relay started by these tests: `len` rendezvous ports and `len` client
/// ports, below the blocks [`port_block`] hands out (22000+) and outside Linux's
/// ephemeral range, distinct per call and spread across processes.
pub fn own_ports(len: u16) -> (taas_relay::config::PortRange, taas_relay::config::PortRange) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed) as u16;
    let span = 2 * len;
    let blocks = 9_000 / span;
    let index = ((std::process::id() as u16)
        .wrapping_mul(13)
        .wrapping_add(slot))
        % blocks;
    let base = 11_000 + index * span;
    (
        taas_relay::config::PortRange::new(base, base + len - 1).unwrap(),
        taas_relay::config::PortRange::new(base + len, base + span - 1).unwrap(),
    )
}

/// A free loopback port (closed again; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Rendezvous ports p and client ports q (`len` each, at most 128) above the other blocks:
/// 31000–32767, spread across processes. For relays started through the README's command,
/// whose ports are set with `TAAS_P_PORTS` and `TAAS_Q_PORTS`.
pub fn upper_block(len: u16) -> (PortRange, PortRange) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    assert!((1..=128).contains(&len), "upper_block: 1 to 128 ports");
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    let span = 2 * len;
    let blocks = 1_768 / span;
    let index = (std::process::id() as u16)
        .wrapping_mul(11)
        .wrapping_add(slot)
        % blocks;
    let base = 31_000 + index * span;
    (
        PortRange::new(base, base + len - 1).unwrap(),
        PortRange::new(base + len, base + span - 1).unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks_of(make: fn(u16) -> (PortRange, PortRange), len: u16) -> (u16, u16) {
        let (p, q) = make(len);
        assert_eq!(p.hi - p.lo + 1, len);
        assert_eq!(q.lo, p.hi + 1);
        assert_eq!(q.hi - q.lo + 1, len);
        (p.lo, q.hi)
    }

    #[test]
    fn each_kind_of_block_stays_in_its_own_part_of_the_port_map() {
        for len in [1, 8, 40, 64, 128] {
            for _ in 0..50 {
                let (lo, hi) = blocks_of(own_ports, len);
                assert!(lo >= 11_000 && hi < 20_000, "own_ports({len}): {lo}-{hi}");
                let (lo, hi) = blocks_of(port_block, len);
                assert!(lo >= 22_000 && hi < 31_000, "port_block({len}): {lo}-{hi}");
                let (lo, hi) = blocks_of(upper_block, len);
                assert!(lo >= 31_000 && hi < 32_768, "upper_block({len}): {lo}-{hi}");
            }
        }
    }
}
