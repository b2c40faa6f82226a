//! Port ranges for relays the tests start. Tests run concurrently (test threads, and several
//! test binaries at once), so each relay gets a block of its own, below Linux's ephemeral
//! range (32768+) where the OS-chosen ports live:
//!
//! - 11000–19999: [`own_ports`], spawned relays (`spawned::SpawnedRelay`);
//! - 20000–21999: the relay's defaults (`--p-ports`, `--q-ports`), which the operator's
//!   API-server test keeps (its label relay's client port is 127.0.0.1:21000);
//! - 22000–30999: [`port_block`], in-process relays (`TestRelay`);
//! - 31000–32767: [`upper_block`], the README's command run as a newcomer would.

use std::sync::Mutex;

use taas_relay::config::PortRange;

/// Port blocks below Linux's ephemeral range, distinct per relay started by this process
/// and spread across processes, so concurrently running tests rarely meet (and a port found
/// taken is simply skipped by the relay).
pub fn port_block(len: u16) -> (PortRange, PortRange) {
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    next_block(&NEXT, 22_000, 9_000, 7, len)
}

/// Port ranges for a relay started by these tests: `len` rendezvous ports and `len` client
/// ports, below the blocks [`port_block`] hands out (22000+) and outside Linux's
/// ephemeral range, distinct per call and spread across processes.
pub fn own_ports(len: u16) -> (PortRange, PortRange) {
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    next_block(&NEXT, 11_000, 9_000, 13, len)
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
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    assert!((1..=128).contains(&len), "upper_block: 1 to 128 ports");
    next_block(&NEXT, 31_000, 1_768, 11, len)
}

/// The next `2 × len` ports of the part `[first, first + room)`: right after the block this
/// process took before (the first one at an offset that depends on the process, so test
/// binaries running at once start apart), or at the beginning of the part when the end is
/// reached. Blocks of different sizes never overlap until the part is used up; laid out by
/// slot × their own size, they did (a fixed port of one test fell in another's p ports).
fn next_block(
    next: &Mutex<Option<u32>>,
    first: u16,
    room: u16,
    salt: u32,
    len: u16,
) -> (PortRange, PortRange) {
    let span = 2 * u32::from(len);
    let room = u32::from(room);
    assert!(span <= room, "{len} ports do not fit in {room}");
    let mut next = next.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let at = next.unwrap_or_else(|| std::process::id().wrapping_mul(salt).wrapping_mul(64) % room);
    let at = if at + span > room { 0 } else { at };
    *next = Some(at + span);
    let base = first + at as u16;
    (
        PortRange::new(base, base + len - 1).unwrap(),
        PortRange::new(base + len, base + 2 * len - 1).unwrap(),
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
    fn blocks_of_different_sizes_taken_in_turn_never_overlap_until_the_part_is_used_up() {
        let next = Mutex::new(None);
        let mut taken: Vec<(u16, u16)> = Vec::new();
        let mut used = 0u32;
        for len in [2, 8, 1, 40, 8, 2, 64, 3].into_iter().cycle().take(60) {
            used += 2 * u32::from(len);
            // Short of the whole part: the tail skipped at a wrap is room lost.
            if used > 1_500 {
                break;
            }
            let (p, q) = next_block(&next, 10_000, 2_000, 7, len);
            assert!(p.lo >= 10_000 && q.hi < 12_000, "{p:?} {q:?}");
            for &(lo, hi) in &taken {
                assert!(
                    q.hi < lo || p.lo > hi,
                    "{}-{} overlaps {lo}-{hi}",
                    p.lo,
                    q.hi
                );
            }
            taken.push((p.lo, q.hi));
        }
        assert!(taken.len() > 20);
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
