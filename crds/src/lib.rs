//! The `TaasLabel` API (group `taas.dev`, version `v1alpha1`): the Rust types, and the
//! Kubernetes manifests (`TaasLabel` + `Secret`) that carry them in YAML files.
//!
//! The same YAML a user would `kubectl apply` is what `taas-relay serve --labels DIR` reads,
//! so the types here are the single source of truth for both.
//!
//! With the `kube` feature (on by default; the standalone relay turns it off) the spec also
//! derives kube's `CustomResource` and a JSON schema: that gives the [`TaasLabel`] resource,
//! its [`TaasLabelStatus`], and the CRD manifest `crds/taaslabels.yaml` ([`crd_yaml`], printed
//! by the `crdgen` binary). Schema validation (patterns, ranges) and CEL rules
//! (`x-kubernetes-validations`) are written next to the fields they check, with the bounds
//! from [`limits`]; [`TaasLabelSpec::validate`] (in every build) checks the same rules for
//! readers without an API server, and a test keeps the two in agreement.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod limits;
pub mod manifest;
#[cfg(feature = "kube")]
mod status;
mod validate;

pub use validate::{
    check_dns_subdomain, check_id, is_dns_subdomain, DnsNameError, SpecError, SpecErrors,
    LOAD_BALANCER_CLASS_MESSAGE, SERVER_SPEAKS_FIRST_MESSAGE,
};

#[cfg(feature = "kube")]
use limits::{
    CLIENT_PORT_MAX, CLIENT_PORT_MIN, DNS_SUBDOMAIN_MAX_LEN, ID_MAX_LEN,
    LOAD_BALANCER_CLASS_MAX_LEN, MAX_PARKED_MAX, MAX_PARKED_MIN, PERIOD_MAX, PERIOD_MIN,
    RENDEZVOUS_PORTS_MAX, RENDEZVOUS_PORTS_MIN, REPLICAS_MAX, REPLICAS_MIN, SECRET_KEY_MAX_LEN,
};

#[cfg(feature = "kube")]
pub use status::{
    crd_yaml, Condition, ConditionStatus, StatusPorts, TaasLabelStatus, CRDGEN_COMMAND,
};

pub const GROUP: &str = "taas.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "taas.dev/v1alpha1";
pub const KIND: &str = "TaasLabel";

/// A DNS subdomain name in lower case (RFC 1123): dot-separated parts of 1–63 characters of
/// `[a-z0-9-]`, none starting or ending with `-`; at most 253 characters in all (`maxLength`).
/// What `LABEL` and Kubernetes object names must look like; [`check_dns_subdomain`] in code.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$";
/// The hidden server's ID: no whitespace or control characters (it travels in an HTTP header);
/// [`check_id`] in code. The control characters are Unicode's (C0, DEL and C1), as there.
pub const ID_PATTERN: &str = r"^[^\s\x00-\x1F\x7F-\x9F]+$";
/// A key of a Secret's `data`.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// The desired state of one label: who may register it and how its relay behaves.
///
/// The fields up to `serverSpeaksFirst` are what the relay serves; `service`,
/// `rendezvousPorts` and `replicas` shape the label's relay pods and Service in a cluster and
/// are ignored by the standalone relay.
// Clippy takes the printer columns' repeated `type_ = "string"` for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource, schemars::JsonSchema),
    kube(
        group = "taas.dev",
        version = "v1alpha1",
        kind = "TaasLabel",
        plural = "taaslabels",
        singular = "taaslabel",
        shortname = "tl",
        namespaced,
        status = "TaasLabelStatus",
        derive = "PartialEq",
        doc = "A hidden server's LABEL: who may register it, and the relay that serves it.",
        printcolumn(name = "LABEL", type_ = "string", json_path = ".spec.label"),
        printcolumn(name = "ID", type_ = "string", json_path = ".spec.id"),
        printcolumn(
            name = "ENDPOINT",
            type_ = "string",
            json_path = ".status.endpoint",
            description = "host:port where mobile clients are redirected"
        ),
        printcolumn(
            name = "READY",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(
            name = "SERVING",
            type_ = "integer",
            json_path = ".status.readyReplicas",
            description = "relay replicas ready to serve"
        ),
        printcolumn(
            name = "REPLICAS",
            type_ = "integer",
            json_path = ".status.replicas",
            description = "relay replicas wanted"
        ),
        printcolumn(
            name = "AGE",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
// A server-first label without a PROXY header would never be served by the TAAS agent (it
// waits for the first bytes): refuse it at the door, as the relay does.
#[cfg_attr(
    feature = "kube",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.serverSpeaksFirst) || !self.serverSpeaksFirst || (has(self.proxyProtocol) && self.proxyProtocol != 'none')",
        "message": SERVER_SPEAKS_FIRST_MESSAGE,
        "fieldPath": ".proxyProtocol",
        "reason": "FieldValueInvalid"
    }]))
)]
#[serde(rename_all = "camelCase")]
pub struct TaasLabelSpec {
    /// The hidden server's ID: the TOTP `username` it registers with. Immutable.
    #[cfg_attr(
        feature = "kube",
        schemars(
            length(min = 1, max = ID_MAX_LEN),
            pattern(ID_PATTERN),
            extend("x-kubernetes-validations" = [
                {"rule": "self == oldSelf", "message": "id is immutable"}
            ])
        )
    )]
    pub id: String,
    /// LABEL: mobile clients ask for `LABEL.<domain>`; the hidden server registers
    /// `/register/LABEL`. DNS syntax, lower case; may contain dots. Immutable.
    #[cfg_attr(
        feature = "kube",
        schemars(
            length(min = 1, max = DNS_SUBDOMAIN_MAX_LEN),
            pattern(DNS_SUBDOMAIN_PATTERN),
            extend("x-kubernetes-validations" = [
                {"rule": "self == oldSelf", "message": "label is immutable"}
            ])
        )
    )]
    pub label: String,
    /// The Secret (same namespace) and key holding the base32 TOTP secret.
    pub secret_ref: SecretKeyRef,
    /// The TOTP HMAC.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// TOTP step in seconds.
    #[serde(default = "default_period")]
    #[cfg_attr(feature = "kube", schemars(range(min = PERIOD_MIN, max = PERIOD_MAX)))]
    pub period: u32,
    /// Parked connections allowed at once; further registrations get 503.
    #[serde(default = "default_max_parked")]
    #[cfg_attr(feature = "kube", schemars(range(min = MAX_PARKED_MIN, max = MAX_PARKED_MAX)))]
    pub max_parked: u32,
    /// The rendezvous port accepts only the address that registered.
    #[serde(default = "default_true")]
    pub source_pinning: bool,
    /// A PROXY protocol header sent to the hidden server before the client's bytes.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Pin the client port q; otherwise one is allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = CLIENT_PORT_MIN, max = CLIENT_PORT_MAX)))]
    pub client_port: Option<u16>,
    /// Who may connect to q: anyone, or only sources that received a 307 for this label
    /// in the last minute.
    #[serde(default)]
    pub client_admission: ClientAdmission,
    /// The protocol has the server speak first (SSH, SMTP): q pairs a client as soon as it
    /// connects instead of waiting for its first byte. Needs `proxyProtocol` v1 or v2: that
    /// header is how the hidden server's agent learns it was paired.
    #[serde(default, skip_serializing_if = "is_false")]
    pub server_speaks_first: bool,
    /// `https://LABEL.<domain>/` on the front end's own HTTPS port goes straight to the
    /// hidden server, TLS end to end (no 307, no second port): the front end reads the
    /// ClientHello's server name before any TLS and splices the connection onto a parked
    /// one. Standalone `serve` only for now. Cannot be combined with `serverSpeaksFirst`
    /// (the client must speak first to name its label).
    #[serde(default, skip_serializing_if = "is_false")]
    pub direct: bool,
    /// How the label's relay is exposed in a cluster (its Service).
    #[serde(default)]
    pub service: LabelService,
    /// Size of the fixed pool of rendezvous ports p that the label's relay pod and Service
    /// expose in a cluster (a Service cannot grow a port per registration).
    #[serde(default = "default_rendezvous_ports")]
    #[cfg_attr(feature = "kube", schemars(range(min = RENDEZVOUS_PORTS_MIN, max = RENDEZVOUS_PORTS_MAX)))]
    pub rendezvous_ports: u32,
    /// Relay pods (replicas) serving this label in a cluster; unset: the install's default
    /// (the chart's `relay.replicas`) for a label reached through the gateway, one for a
    /// label with a Service of its own. Several with a Service of the label's own run as a
    /// StatefulSet with one Service per pod (each replica names its own address), which a
    /// pinned NodePort `clientPort` cannot share. Ignored by the standalone relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = REPLICAS_MIN, max = REPLICAS_MAX)))]
    pub replicas: Option<u32>,
}

pub fn default_period() -> u32 {
    30
}
pub fn default_max_parked() -> u32 {
    32
}
pub fn default_rendezvous_ports() -> u32 {
    8
}
fn default_true() -> bool {
    true
}
fn is_false(value: &bool) -> bool {
    !value
}

/// A key of a Secret in the label's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[cfg_attr(
        feature = "kube",
        schemars(
            length(min = 1, max = DNS_SUBDOMAIN_MAX_LEN),
            pattern(DNS_SUBDOMAIN_PATTERN)
        )
    )]
    pub name: String,
    /// The key in the Secret's data.
    #[serde(default = "default_secret_key")]
    #[cfg_attr(
        feature = "kube",
        schemars(
            length(min = 1, max = SECRET_KEY_MAX_LEN),
            pattern(SECRET_KEY_PATTERN)
        )
    )]
    pub key: String,
}

pub fn default_secret_key() -> String {
    "secret".to_string()
}

/// The TOTP HMAC (RFC 6238).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum), value(rename_all = "UPPER"))]
pub enum Algorithm {
    #[default]
    SHA1,
    SHA256,
    SHA512,
}

/// The PROXY protocol header the relay sends to the hidden server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// Admission to a label's client port q.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum ClientAdmission {
    /// Anyone may connect (the original's behaviour).
    #[default]
    Open,
    /// Only sources that received a 307 for this label recently.
    Redirected,
}

/// The Service exposing a label's relay (its client port q and its pool of rendezvous ports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "kube",
    derive(schemars::JsonSchema),
    // Kubernetes refuses a Service with a loadBalancerClass of another type: refuse the label
    // at the door rather than let the operator fail on every reconcile.
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.loadBalancerClass) || (has(self.type) && self.type == 'LoadBalancer')",
        "message": LOAD_BALANCER_CLASS_MESSAGE,
        "fieldPath": ".loadBalancerClass",
        "reason": "FieldValueForbidden"
    }]))
)]
#[serde(rename_all = "camelCase")]
pub struct LabelService {
    /// The Service type. Unset: the install's default, which is `LoadBalancer`, or, when the
    /// operator runs in edge mode (the chart's `edge.enabled`), no Service of the label's own
    /// (clients and hidden servers reach its relay through the gateway's Service, whose ports
    /// stay the same however many labels there are). Set it to give the label its own
    /// Service in edge mode too.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    // Absent, never null (skipped when None): the schema is the enum's, without `nullable`.
    #[cfg_attr(feature = "kube", schemars(with = "ServiceType"))]
    pub type_: Option<ServiceType>,
    /// Annotations for the Service (e.g. a cloud load balancer's settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `Local` keeps mobile clients' source addresses (needed for source pinning and
    /// `Redirected` admission); `Cluster` spreads traffic but hides them.
    #[serde(default)]
    pub external_traffic_policy: ExternalTrafficPolicy,
    /// The load balancer implementation (only with type `LoadBalancer`, set explicitly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(length(min = 1, max = LOAD_BALANCER_CLASS_MAX_LEN)))]
    pub load_balancer_class: Option<String>,
}

/// The type of a label's Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum ServiceType {
    #[default]
    LoadBalancer,
    NodePort,
    ClusterIP,
}

/// The Service's `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub enum ExternalTrafficPolicy {
    #[default]
    Local,
    Cluster,
}
