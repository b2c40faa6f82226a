//! The agent's Prometheus metrics (prefix `taas_agent`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type ResultLabel = [(&'static str, &'static str); 1];

/// Counters and gauges shared by the supervisor and the connection tasks.
#[derive(Clone, Default)]
pub struct AgentMetrics {
    /// Registrations by result: `ok`, or the `Problem::kind` of the failure.
    pub registrations: Family<ResultLabel, Counter>,
    /// Connections parked at the relay now.
    pub parked: Gauge,
    /// Parked connections that ended before being paired (relay restarted or dropped them).
    pub parked_lost: Counter,
    /// Connections to a rendezvous port p that failed.
    pub rendezvous_failures: Counter,
    /// Pairs being forwarded now.
    pub pairs_active: Gauge,
    /// Pairs started (a parked connection received its first bytes).
    pub pairings: Counter,
    /// Bytes from the relay (the mobile client) to the forward target.
    pub bytes_from_relay: Counter,
    /// Bytes from the forward target to the relay.
    pub bytes_to_relay: Counter,
    /// Of the bytes either way, those splice(2) moved (never copied through user space),
    /// counted when a pair ends.
    pub spliced_bytes: Counter,
    /// Paired connections dropped because `--forward` could not be reached.
    pub forward_failures: Counter,
    /// At least one connection is parked (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

impl AgentMetrics {
    /// The metrics with a registry that exposes them.
    pub fn new() -> (Self, Registry) {
        let metrics = Self::default();
        let mut registry = Registry::with_prefix("taas_agent");
        registry.register(
            "registrations",
            "Registration attempts by result (ok or the failure kind)",
            metrics.registrations.clone(),
        );
        registry.register(
            "parked",
            "Connections parked at the relay, waiting to be paired",
            metrics.parked.clone(),
        );
        registry.register(
            "parked_lost",
            "Parked connections that ended before being paired",
            metrics.parked_lost.clone(),
        );
        registry.register(
            "rendezvous_failures",
            "Failed connections to a rendezvous port",
            metrics.rendezvous_failures.clone(),
        );
        registry.register(
            "pairs_active",
            "Paired connections being forwarded",
            metrics.pairs_active.clone(),
        );
        registry.register(
            "pairings",
            "Parked connections that were paired with a client",
            metrics.pairings.clone(),
        );
        registry.register(
            "bytes_from_relay",
            "Bytes copied from the relay to the forward target",
            metrics.bytes_from_relay.clone(),
        );
        registry.register(
            "bytes_to_relay",
            "Bytes copied from the forward target to the relay",
            metrics.bytes_to_relay.clone(),
        );
        registry.register(
            "spliced_bytes",
            "Bytes moved by splice(2) without a copy through user space (both directions, \
             counted when a pair ends)",
            metrics.spliced_bytes.clone(),
        );
        registry.register(
            "forward_failures",
            "Paired connections dropped because the forward target could not be reached",
            metrics.forward_failures.clone(),
        );
        (metrics, registry)
    }

    pub fn registration(&self, result: &'static str) {
        self.registrations
            .get_or_create(&[("result", result)])
            .inc();
    }

    pub fn set_parked(&self, parked: usize) {
        self.parked.set(i64::try_from(parked).unwrap_or(i64::MAX));
        self.ready.store(parked > 0, Ordering::Relaxed);
    }
}
