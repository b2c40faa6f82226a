//! What the operator reports about a label (`TaasLabel.status`), and the CRD manifest.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResourceExt as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::TaasLabel;

/// How to regenerate `crds/taaslabels.yaml` (printed in its header and by the test that
/// compares it with the types).
pub const CRDGEN_COMMAND: &str = "cargo run -p taas-crds --bin crdgen > crds/taaslabels.yaml";

/// `metav1.Condition`'s patterns.
const CONDITION_TYPE_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$";
const CONDITION_REASON_PATTERN: &str = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$";

/// The observed state of a label, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaasLabelStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The latest observations, one per type (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
    /// `host:port` where mobile clients are redirected (the Service's external address and
    /// client port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// In-cluster address (`host:port`) of the label's relay control port, where the gateway
    /// forwards registrations and client requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// The externally reachable ports (node ports for a NodePort Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<StatusPorts>,
    /// Relay replicas wanted (the Deployment's `replicas`: `spec.replicas` or the install's
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Relay replicas ready to serve (the Deployment's `readyReplicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ready_replicas: Option<i32>,
    /// Connections the hidden server has parked right now, as last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<u32>,
}

/// A label's external ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusPorts {
    /// The client port q.
    #[schemars(range(min = 1))]
    pub client: u16,
    /// The pool of rendezvous ports p.
    #[serde(default)]
    #[schemars(inner(range(min = 1)))]
    pub rendezvous: Vec<u16>,
}

/// One aspect of a label's state, shaped like `metav1.Condition` (so `kubectl wait
/// --for=condition=Ready` and generic tools read it).
// Our own type rather than k8s-openapi's: that one's schema needs k8s-openapi's `schemars`
// feature (a schema for every Kubernetes type) and constrains nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, in CamelCase (`Ready`).
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316), pattern(CONDITION_TYPE_PATTERN))]
    pub type_: String,
    pub status: ConditionStatus,
    /// Why the condition last changed, in CamelCase (`Ready`, `SecretMissing`, ...).
    #[schemars(length(min = 1, max = 1024), pattern(CONDITION_REASON_PATTERN))]
    pub reason: String,
    /// A human-readable explanation; may be empty. No schema default: Kubernetes 1.20
    /// refuses a `default` on a status field of a list item.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed.
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub last_transition_time: Time,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// A condition's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// The CRD manifest, as committed in `crds/taaslabels.yaml`.
pub fn crd_yaml() -> String {
    let crd = serde_yaml::to_string(&TaasLabel::crd())
        .expect("a CustomResourceDefinition always serializes");
    format!(
        "# The TaasLabel CRD, generated from the Rust types in crds/src: do not edit.\n\
         # Regenerate with: {CRDGEN_COMMAND}\n{crd}"
    )
}
