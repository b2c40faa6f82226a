//! The `TaasLabel` API (group `taas.dev`, version `v1alpha1`): the Rust types, and the
//! Kubernetes manifests (`TaasLabel` + `Secret`) that carry them in YAML files.
//!
//! The same YAML a user would `kubectl apply` is what `taas-relay serve --labels DIR` reads,
//! so the types here are the single source of truth for both.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

pub mod manifest;

pub const GROUP: &str = "taas.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "taas.dev/v1alpha1";
pub const KIND: &str = "TaasLabel";

/// The desired state of one label: who may register it and how its relay behaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaasLabelSpec {
    /// The hidden server's ID: the TOTP `username` it registers with.
    pub id: String,
    /// LABEL: mobile clients ask for `LABEL.<domain>`; the hidden server registers
    /// `/register/LABEL`. DNS syntax, lower case; may contain dots.
    pub label: String,
    /// The Secret (same namespace) and key holding the base32 TOTP secret.
    pub secret_ref: SecretKeyRef,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// TOTP step in seconds.
    #[serde(default = "default_period")]
    pub period: u32,
    /// Parked connections allowed at once; further registrations get 503.
    #[serde(default = "default_max_parked")]
    pub max_parked: u32,
    /// The rendezvous port accepts only the address that registered.
    #[serde(default = "default_true")]
    pub source_pinning: bool,
    /// A PROXY protocol header sent to the hidden server before the client's bytes.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Pin the client port q; otherwise one is allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_port: Option<u16>,
    /// Who may connect to q: anyone, or only sources that received a 307 for this label
    /// in the last minute.
    #[serde(default)]
    pub client_admission: ClientAdmission,
}

pub fn default_period() -> u32 {
    30
}
pub fn default_max_parked() -> u32 {
    32
}
fn default_true() -> bool {
    true
}

/// A key of a Secret in the label's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretKeyRef {
    pub name: String,
    #[serde(default = "default_secret_key")]
    pub key: String,
}

pub fn default_secret_key() -> String {
    "secret".to_string()
}

/// The TOTP HMAC (RFC 6238).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    #[default]
    SHA1,
    SHA256,
    SHA512,
}

/// The PROXY protocol header the relay sends to the hidden server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// Admission to a label's client port q.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientAdmission {
    /// Anyone may connect (the original's behaviour).
    #[default]
    Open,
    /// Only sources that received a 307 for this label recently.
    Redirected,
}
