//! The operator's metrics and its small plain-HTTP endpoint: `/metrics` (Prometheus text),
//! `/healthz` (the process runs) and `/readyz` (the TaasLabel cache is filled).
//!
//! - `taas_operator_reconciles_total`: reconciles run;
//! - `taas_operator_reconcile_failures_total{reason}`: reconciles that failed (`reason` is the
//!   error kind, e.g. `kube_api`) or ended with a problem only a user can fix (`reason` is the
//!   Ready condition's reason, e.g. `SecretMissing`);
//! - `taas_operator_reconcile_duration_seconds`: histogram of reconcile durations.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByReason {
    reason: String,
}

/// The reconcile metrics, shared by all reconciles.
#[derive(Clone)]
pub struct Metrics {
    reconciles: Counter,
    failures: Family<ByReason, Counter>,
    duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            // 5 ms .. about 40 s.
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
        }
    }
}

impl Metrics {
    /// New metrics, registered in `registry` under the `taas_operator` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix("taas_operator");
        registry.register(
            "reconciles",
            "Reconciles of TaasLabel objects",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed or need a user's fix, by reason",
            metrics.failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciles",
            metrics.duration.clone(),
        );
        metrics
    }

    pub fn reconciled(&self, duration: Duration) {
        self.reconciles.inc();
        self.duration.observe(duration.as_secs_f64());
    }

    pub fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&ByReason {
                reason: reason.to_string(),
            })
            .inc();
    }
}

/// `/metrics`, `/healthz` and `/readyz`: the same endpoint as the relay's.
pub use taas_process::metrics::serve;

/// Binds `addr` and serves it in a task.
pub async fn spawn(
    addr: SocketAddr,
    registry: Registry,
    ready: Arc<AtomicBool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((
        local,
        tokio::spawn(serve(listener, Arc::new(registry), ready)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.reconciled(Duration::from_millis(20));
        metrics.failed("SecretMissing");
        let ready = Arc::new(AtomicBool::new(false));
        let (addr, task) = spawn("127.0.0.1:0".parse().unwrap(), registry, ready.clone())
            .await
            .unwrap();

        let body = get(addr, "/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("taas_operator_reconciles_total 1"), "{body}");
        assert!(
            body.contains("taas_operator_reconcile_failures_total{reason=\"SecretMissing\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("taas_operator_reconcile_duration_seconds_count 1"),
            "{body}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
