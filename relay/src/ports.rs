//! Port pools: the random one-shot rendezvous ports p, and the labels' client ports q.
//!
//! A pool only remembers which of its ports are leased; whether a port is really free is
//! decided by binding it (another process may hold it), and a bind that fails moves on to
//! another candidate. A lease returns its port to the pool when dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::net::{TcpListener, TcpSocket};

use crate::config::PortRange;

/// Random candidates tried before falling back to a full scan of the range.
const RANDOM_TRIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("no free port in {0}")]
    Exhausted(PortRange),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct PortPool {
    range: PortRange,
    leased: Mutex<HashSet<u16>>,
}

/// A port taken from a pool; given back on drop.
#[derive(Debug)]
pub struct PortLease {
    pool: Option<Arc<PortPool>>,
    port: u16,
    /// The listener's entry in the hand-over registry, removed with the lease (the listener
    /// closes with it).
    registration: Option<crate::handover::Registration>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A lease of a port outside any pool (a pinned client port).
    pub(crate) fn fixed(port: u16) -> Self {
        Self {
            pool: None,
            port,
            registration: None,
        }
    }

    /// The lease, holding the listener's hand-over registration until it is dropped.
    pub(crate) fn registered(mut self, registration: crate::handover::Registration) -> Self {
        self.registration = Some(registration);
        self
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.leased().remove(&self.port);
        }
    }
}

impl PortPool {
    pub fn new(range: PortRange) -> Arc<Self> {
        Arc::new(Self {
            range,
            leased: Mutex::new(HashSet::new()),
        })
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    fn leased(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        // A panic while holding this lock cannot leave the set inconsistent: keep going.
        taas_protocol::sync::lock(&self.leased)
    }

    /// Binds a listener on a random free port of the range: random candidates first (so p
    /// cannot be guessed), then every port from a random offset (so a nearly full range still
    /// finds its last free ports).
    pub fn bind_random(
        self: &Arc<Self>,
        ip: IpAddr,
        backlog: u32,
    ) -> Result<(TcpListener, PortLease), PortError> {
        let len = self.range.len();
        let mut rng = rand::thread_rng();
        let start = rng.gen_range(0..len);
        let random = (0..RANDOM_TRIES.min(len)).map(|_| rng.gen_range(0..len));
        let scan = (0..len).map(|i| (start + i) % len);
        for offset in random.chain(scan) {
            let port = self.range.lo + offset as u16;
            if let Some(found) = self.try_port(ip, port, backlog) {
                return Ok(found);
            }
        }
        Err(PortError::Exhausted(self.range))
    }

    /// Leases `port` without binding it: a listener taken over from a predecessor holds it.
    /// `None` when it is outside the range or leased already.
    pub(crate) fn lease(self: &Arc<Self>, port: u16) -> Option<PortLease> {
        (self.range.contains(port) && self.leased().insert(port)).then(|| PortLease {
            pool: Some(self.clone()),
            port,
            registration: None,
        })
    }

    fn try_port(
        self: &Arc<Self>,
        ip: IpAddr,
        port: u16,
        backlog: u32,
    ) -> Option<(TcpListener, PortLease)> {
        if !self.leased().insert(port) {
            return None;
        }
        let lease = PortLease {
            pool: Some(self.clone()),
            port,
            registration: None,
        };
        listen(SocketAddr::new(ip, port), backlog)
            .ok()
            .map(|listener| (listener, lease))
    }
}

/// Binds a listener on a fixed address (a pinned client port), outside any pool.
pub fn bind_fixed(addr: SocketAddr, backlog: u32) -> Result<(TcpListener, PortLease), PortError> {
    let listener = listen(addr, backlog).map_err(|source| PortError::Bind { addr, source })?;
    let port = listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(addr.port());
    Ok((listener, PortLease::fixed(port)))
}

/// A listening socket with SO_REUSEADDR (a port must be reusable while connections it
/// accepted earlier sit in TIME_WAIT).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn free_range(len: u16) -> PortRange {
        // A block below Linux's ephemeral range, picked per process to keep tests apart.
        let base = 23_000 + (std::process::id() % 400) as u16 * 20;
        PortRange::new(base, base + len - 1).unwrap()
    }

    #[tokio::test]
    async fn leases_every_port_once_then_reports_exhaustion_and_reuses_returned_ports() {
        let pool = PortPool::new(free_range(4));
        let mut held = Vec::new();
        while let Ok(found) = pool.bind_random(LOCALHOST, 8) {
            held.push(found);
        }
        assert!(!held.is_empty() && held.len() <= 4);
        let ports: HashSet<u16> = held.iter().map(|(_, lease)| lease.port()).collect();
        assert_eq!(ports.len(), held.len(), "no port handed out twice");
        assert!(matches!(
            pool.bind_random(LOCALHOST, 8),
            Err(PortError::Exhausted(_))
        ));
        let returned = held.pop().unwrap().1.port();
        assert_eq!(pool.bind_random(LOCALHOST, 8).unwrap().1.port(), returned);
    }

    #[tokio::test]
    async fn a_port_held_by_someone_else_is_skipped() {
        let range = free_range(2);
        let outsider = listen(SocketAddr::new(LOCALHOST, range.lo), 8).unwrap();
        let pool = PortPool::new(range);
        let (_listener, lease) = pool.bind_random(LOCALHOST, 8).unwrap();
        assert_eq!(lease.port(), range.hi);
        drop(outsider);
    }
}
