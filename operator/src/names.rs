//! The names, labels and ports the operator gives the objects of a label `X` in namespace
//! `N`: one place, so that the builders, the checks and the routes agree.

use std::collections::BTreeMap;

use taas_crds::TaasLabel;

/// Server-side apply field manager (and events' reporting controller).
pub const FIELD_MANAGER: &str = "taas-operator";

/// The relay pod's fixed ports; the Service maps them to the external ones.
pub const CONTROL_PORT: u16 = 8080;
pub const METRICS_PORT: u16 = 9464;
pub const CLIENT_PORT: u16 = 21000;
/// The relay's edge port (`label-relay --edge`), where the gateway forwards connections it
/// took on the cluster edge's shared ports, each behind a `taas_protocol::edge` header.
pub const EDGE_PORT: u16 = 21001;
/// Rendezvous port `i` of the pod is `P_PORT_BASE + i`.
pub const P_PORT_BASE: u16 = 20000;

/// Where the relay pod mounts its ConfigMap and Secret, and the ConfigMap's keys.
pub const LABEL_DIR: &str = "/etc/taas/label";
pub const SECRET_DIR: &str = "/etc/taas/secret";
pub const LABEL_KEY: &str = "label.yaml";
pub const EXTERNAL_KEY: &str = "external.yaml";
/// The routes ConfigMap's key (the gateway's `--routes-file` format).
pub const ROUTES_KEY: &str = "routes.yaml";

pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const TAAS_LABEL_LABEL: &str = "taas.dev/label";
pub const RELAY_APP: &str = "taas-relay";
/// Selects the objects this operator made (the `.owns()` watches filter on it).
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=taas-operator";

/// The longest object name whose derived names (`taas-X-control`, a DNS-1035 label of at
/// most 63 characters) are valid.
pub const MAX_OBJECT_NAME: usize = 63 - "taas--control".len();

/// The Deployment, the ConfigMap and the external Service: `taas-X`.
pub fn relay_name(label: &TaasLabel) -> String {
    format!("taas-{}", object_name(label))
}

/// The in-cluster Service of the relay's control port: `taas-X-control`.
pub fn control_name(label: &TaasLabel) -> String {
    format!("taas-{}-control", object_name(label))
}

/// Where the gateways reach the label's relay: `taas-X-control.N.svc.<cluster_domain>.:8080`.
///
/// Fully qualified, with the trailing dot: a relative name (`taas-X-control.N.svc`) goes
/// through the pod's DNS search path first (`ndots:5`), so a namespace literally named `svc`
/// (`taas-X-control.N.svc.svc.cluster.local`) would be tried before the real one and could
/// capture the route. A trailing-dot name is looked up as is (getaddrinfo, which tokio uses).
pub fn relay_address(label: &TaasLabel, cluster_domain: &str) -> String {
    format!(
        "{}.{}.svc.{}.:{CONTROL_PORT}",
        control_name(label),
        namespace(label),
        cluster_domain.trim_end_matches('.')
    )
}

/// Where the gateways reach the label's relay's edge port:
/// `taas-X-control.N.svc.<cluster_domain>.:21001` (fully qualified, as [`relay_address`]).
pub fn edge_address(label: &TaasLabel, cluster_domain: &str) -> String {
    format!(
        "{}.{}.svc.{}.:{EDGE_PORT}",
        control_name(label),
        namespace(label),
        cluster_domain.trim_end_matches('.')
    )
}

pub fn object_name(label: &TaasLabel) -> &str {
    label.metadata.name.as_deref().unwrap_or_default()
}

pub fn namespace(label: &TaasLabel) -> &str {
    label.metadata.namespace.as_deref().unwrap_or("default")
}

/// The pod selector of a label's relay: stable for the Deployment's life (a Deployment's
/// selector is immutable).
pub fn selector(label: &TaasLabel) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), RELAY_APP.to_string()),
        (INSTANCE_LABEL.to_string(), object_name(label).to_string()),
    ])
}

/// The labels on every object of a label, and on its pod: the selector, who manages it, and
/// the LABEL itself when it fits a label value (at most 63 characters; longer LABELs are in
/// the ConfigMap and the TaasLabel only).
pub fn labels(label: &TaasLabel) -> BTreeMap<String, String> {
    let mut labels = selector(label);
    labels.insert(MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string());
    if label.spec.label.len() <= 63 {
        labels.insert(TAAS_LABEL_LABEL.to_string(), label.spec.label.clone());
    }
    labels
}

/// The pod's rendezvous ports, one per `spec.rendezvousPorts`.
pub fn p_ports(label: &TaasLabel) -> impl Iterator<Item = u16> {
    // The schema bounds rendezvousPorts to 1..=64; clamp anyway so a bad object cannot
    // overflow the port arithmetic.
    let n = label.spec.rendezvous_ports.clamp(
        taas_crds::limits::RENDEZVOUS_PORTS_MIN,
        taas_crds::limits::RENDEZVOUS_PORTS_MAX,
    ) as u16;
    (0..n).map(|i| P_PORT_BASE + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::label;

    #[test]
    fn relay_addresses_are_fully_qualified() {
        let l = label();
        assert_eq!(
            relay_address(&l, "cluster.local"),
            "taas-home-control.default.svc.cluster.local.:8080"
        );
        // A domain given with its trailing dot gets one dot, not two.
        assert_eq!(
            relay_address(&l, "k8s.example.org."),
            "taas-home-control.default.svc.k8s.example.org.:8080"
        );
        assert_eq!(
            edge_address(&l, "cluster.local."),
            "taas-home-control.default.svc.cluster.local.:21001"
        );
    }
}
