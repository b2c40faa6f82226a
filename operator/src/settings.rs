//! The operator's configuration (from its flags): what every label's relay pod gets.

use std::time::Duration;

use taas_protocol::answer::RedirectHost;
use taas_protocol::gateway_auth::InstallSecret;

use crate::edge::EdgeSettings;
use crate::policy::TenantPolicy;

/// How the relay pods are run and where the routes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The relay pods' image (`taas-relay`) and its pull policy.
    pub relay_image: String,
    pub image_pull_policy: String,
    /// Passed to every relay (`--registrar`, `--domain`): the gateways' names.
    pub registrar: String,
    pub domain: String,
    /// Passed to every relay (`--redirect-host`): `requested` keeps LABEL.<domain> in the
    /// 307 (the name the hidden server's certificate carries; *.<domain> must reach the
    /// label's client port), `advertise` names the label Service's address instead.
    pub redirect_host: RedirectHost,
    pub resources: RelayResources,
    /// Node address types to use for NodePort Services, most preferred first.
    pub node_address_types: Vec<String>,
    /// Where the gateways' routes ConfigMap lives.
    pub operator_namespace: String,
    pub routes_configmap: String,
    /// How often a label that needs a user's fix (missing Secret, foreign object, conflict)
    /// is looked at again, besides the watches that notice the fix.
    pub user_fix_requeue: Duration,
    /// Log settings the relay containers get as environment variables (`TAAS_LOG_FORMAT`,
    /// `RUST_LOG`): the operator's own, so the chart's `logFormat`/`logLevel` reach every
    /// TAAS process, relay pods included.
    pub relay_log_env: Vec<(String, String)>,
    /// The install secret the gateways share (`--gateway-secret-file`): each relay gets the
    /// token derived from it for its LABEL (`TAAS_GATEWAY_TOKEN`). `None`: relays get no
    /// token. Its `Debug` is redacted, so logging the settings never shows it.
    pub gateway_secret: Option<InstallSecret>,
    /// The cluster's DNS domain (`--cluster-domain`): routes name relays by their fully
    /// qualified name, `taas-X-control.N.svc.<cluster_domain>.`, which no DNS search path
    /// can redirect.
    pub cluster_domain: String,
    /// What each namespace's labels may claim and ask for (`--policy-file`).
    pub policy: TenantPolicy,
    /// The cluster edge (`--edge-service`): `None`, every label is exposed by a Service of
    /// its own, as before edge mode existed.
    pub edge: Option<EdgeSettings>,
    /// Seconds a stopping relay lets its active pairs finish (`--relay-drain-timeout`, passed
    /// to every relay as `--drain-timeout`); the pod's grace period is this plus
    /// [`DRAIN_GRACE_MARGIN`], so the kubelet never kills a relay that is still draining.
    pub relay_drain_timeout: u64,
    /// Relay replicas of a label reached through the gateway that does not set
    /// `spec.replicas` (`--relay-replicas`, the chart's `relay.replicas`); a label with a
    /// Service of its own runs one unless it asks (and is then refused: [`crate::validate`]).
    pub relay_replicas: u32,
}

/// How long a relay pod's grace period exceeds its drain timeout: time to exit after it.
pub const DRAIN_GRACE_MARGIN: u64 = 5;
/// The relays' drain timeout unless told otherwise (`--relay-drain-timeout`).
pub const DEFAULT_RELAY_DRAIN_TIMEOUT: u64 = 30;
/// Relay replicas per label unless told otherwise (`--relay-replicas`): one pod per label is
/// the cheapest, and its replacement surges (a new pod is ready before the old one stops).
pub const DEFAULT_RELAY_REPLICAS: u32 = 1;

/// The relay container's resource requests and limits (Kubernetes quantities).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            relay_image: concat!("taas-relay:", env!("CARGO_PKG_VERSION")).to_string(),
            image_pull_policy: "IfNotPresent".to_string(),
            registrar: "taas-registrar.localhost".to_string(),
            domain: "taas.localhost".to_string(),
            redirect_host: RedirectHost::Requested,
            resources: RelayResources::default(),
            node_address_types: vec!["ExternalIP".to_string(), "InternalIP".to_string()],
            operator_namespace: "taas-system".to_string(),
            routes_configmap: "taas-routes".to_string(),
            user_fix_requeue: Duration::from_secs(300),
            relay_log_env: Vec::new(),
            gateway_secret: None,
            cluster_domain: "cluster.local".to_string(),
            policy: TenantPolicy::default(),
            edge: None,
            relay_drain_timeout: DEFAULT_RELAY_DRAIN_TIMEOUT,
            relay_replicas: DEFAULT_RELAY_REPLICAS,
        }
    }
}

impl Default for RelayResources {
    fn default() -> Self {
        Self {
            cpu_request: "10m".to_string(),
            memory_request: "32Mi".to_string(),
            cpu_limit: Some("500m".to_string()),
            memory_limit: Some("128Mi".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_install_secret() {
        let settings = Settings {
            gateway_secret: Some(InstallSecret::new(b"0123456789abcdef-very-secret").unwrap()),
            ..Settings::default()
        };
        let shown = format!("{settings:?}");
        assert!(
            shown.contains("gateway_secret: Some(InstallSecret(<redacted>))"),
            "{shown}"
        );
        assert!(!shown.contains("very-secret"), "{shown}");
    }
}
