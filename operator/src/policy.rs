//! What a cluster owner lets each namespace do through TaasLabels (issue 13, item 7), read
//! from `--policy-file` (the chart renders it from `labelPolicy` and `servicePolicy`).
//!
//! Why: creating a `TaasLabel` is all it takes for the operator to (a) serve a LABEL, the
//! oldest claim winning across namespaces, so a tenant could pre-claim another's name, and
//! (b) create a Service of any type, with any annotations (a cloud load balancer's settings)
//! and a pinned node port, which the tenant may not be allowed to create itself. The policy
//! ties LABELs to namespaces and narrows the Services per namespace; [`crate::validate`]
//! enforces it (pure) before anything is applied, and a label it refuses does not count in
//! LABEL conflicts or the gateways' routes.
//!
//! ```yaml
//! labels:                  # namespace -> LABELs it may claim; absent or empty: any namespace any LABEL
//!   team-a: [home, "*.lab.example"]   # exact LABELs, "*.SUFFIX" (one or more labels before it), or "*"
//! services:
//!   default:               # every namespace without its own entry
//!     types: [LoadBalancer, NodePort, ClusterIP]
//!     annotations: ["*"]   # allowed annotation key prefixes; "*": any key; []: none
//!     clientPort: true     # whether spec.clientPort (a pinned node or Service port) may be set
//!   namespaces:
//!     team-b: {types: [ClusterIP], annotations: [], clientPort: false}
//! ```
//!
//! A namespace's entry replaces the default as a whole (no merging: what it says is all it
//! gets). Omitted fields allow everything, so an empty file (or none) is today's behaviour.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use taas_crds::{ServiceType, TaasLabelSpec};

/// The largest policy file read (a policy is a few kilobytes; this bounds a mistake).
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the policy file {path} is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge { path: String },
    #[error("the policy is not valid: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("the policy is not valid: {0}")]
    Invalid(String),
}

/// The whole policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicy {
    /// Namespace → the LABELs it may claim. Empty: no LABEL policy.
    #[serde(default)]
    pub labels: BTreeMap<String, Vec<LabelPattern>>,
    #[serde(default)]
    pub services: ServicePolicy,
}

/// The Services labels may ask for: a default and per-namespace replacements.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    #[serde(default)]
    pub default: ServiceRules,
    #[serde(default)]
    pub namespaces: BTreeMap<String, ServiceRules>,
}

/// What one namespace's labels may put in `spec.service` and `spec.clientPort`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceRules {
    #[serde(default = "all_types")]
    pub types: Vec<ServiceType>,
    /// Allowed annotation key prefixes (an exact key is its own prefix); `"*"` allows any.
    #[serde(default = "any_annotation")]
    pub annotations: Vec<String>,
    #[serde(default = "yes")]
    pub client_port: bool,
}

fn all_types() -> Vec<ServiceType> {
    vec![
        ServiceType::LoadBalancer,
        ServiceType::NodePort,
        ServiceType::ClusterIP,
    ]
}

fn any_annotation() -> Vec<String> {
    vec!["*".to_string()]
}

fn yes() -> bool {
    true
}

impl Default for ServiceRules {
    /// Everything allowed (as without a policy).
    fn default() -> Self {
        Self {
            types: all_types(),
            annotations: any_annotation(),
            client_port: true,
        }
    }
}

/// One entry of a namespace's LABEL list.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LabelPattern {
    /// `*`: any LABEL.
    Any,
    /// `*.SUFFIX`: any LABEL ending in `.SUFFIX` with at least one character before it.
    Suffix(String),
    /// This LABEL exactly.
    Exact(String),
}

impl LabelPattern {
    pub fn matches(&self, label: &str) -> bool {
        let label = label.to_ascii_lowercase();
        match self {
            LabelPattern::Any => true,
            // The stored suffix keeps its leading dot: "*.lab" matches "a.lab", not "xlab".
            LabelPattern::Suffix(suffix) => {
                label.len() > suffix.len() && label.ends_with(suffix.as_str())
            }
            LabelPattern::Exact(exact) => label == *exact,
        }
    }
}

impl TryFrom<String> for LabelPattern {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "*" {
            return Ok(LabelPattern::Any);
        }
        let (pattern, name) = match text.strip_prefix("*.") {
            Some(rest) => (LabelPattern::Suffix(format!(".{rest}")), rest),
            None => (LabelPattern::Exact(text.clone()), text.as_str()),
        };
        if !is_dns_subdomain(name) {
            return Err(format!(
                "{text:?} is not a LABEL, \"*.SUFFIX\" or \"*\" (LABELs are DNS names: a-z, \
                 0-9, '-' and '.')"
            ));
        }
        Ok(pattern)
    }
}

impl fmt::Debug for LabelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for LabelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabelPattern::Any => f.write_str("*"),
            LabelPattern::Suffix(suffix) => write!(f, "*{suffix}"),
            LabelPattern::Exact(exact) => f.write_str(exact),
        }
    }
}

/// A DNS subdomain as Kubernetes checks one (RFC 1123 labels, at most 253 characters): the
/// CRD's rule for LABEL.
pub use taas_crds::is_dns_subdomain;

fn type_name(type_: ServiceType) -> &'static str {
    match type_ {
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::NodePort => "NodePort",
        ServiceType::ClusterIP => "ClusterIP",
    }
}

impl TenantPolicy {
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        // An empty file (or one holding only comments) is no policy.
        let policy: TenantPolicy =
            serde_yaml::from_str::<Option<TenantPolicy>>(text)?.unwrap_or_default();
        policy.check()?;
        Ok(policy)
    }

    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        use std::io::Read as _;
        let display = || path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| PolicyError::Read {
            path: display(),
            source,
        })?;
        let mut text = String::new();
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| PolicyError::Read {
                path: display(),
                source,
            })?;
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { path: display() });
        }
        Self::from_yaml(&text)
    }

    fn check(&self) -> Result<(), PolicyError> {
        let namespaces = self.labels.keys().chain(self.services.namespaces.keys());
        for namespace in namespaces {
            if namespace.contains('.') || !is_dns_subdomain(namespace) {
                return Err(PolicyError::Invalid(format!(
                    "{namespace:?} is not a namespace name"
                )));
            }
        }
        let rules = std::iter::once(("default", &self.services.default)).chain(
            self.services
                .namespaces
                .iter()
                .map(|(ns, rules)| (ns.as_str(), rules)),
        );
        for (namespace, rules) in rules {
            if rules.annotations.iter().any(|p| p.trim().is_empty()) {
                return Err(PolicyError::Invalid(format!(
                    "services {namespace}: an empty annotation prefix (use \"*\" for any key)"
                )));
            }
        }
        Ok(())
    }

    /// Whether there is a LABEL policy at all.
    pub fn restricts_labels(&self) -> bool {
        !self.labels.is_empty()
    }

    /// Whether `namespace` may claim `label`.
    pub fn allows_label(&self, namespace: &str, label: &str) -> bool {
        self.label_denial(namespace, label).is_none()
    }

    /// Why `namespace` may not claim `label`, if it may not.
    pub fn label_denial(&self, namespace: &str, label: &str) -> Option<String> {
        if !self.restricts_labels() {
            return None;
        }
        let allowed = self.labels.get(namespace).map(Vec::as_slice).unwrap_or(&[]);
        if allowed.iter().any(|p| p.matches(label)) {
            return None;
        }
        let here = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed
                .iter()
                .map(|p| format!("{:?}", p.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Some(format!(
            "the cluster's label policy does not let namespace {namespace} claim LABEL \
             {label:?} (allowed here: {here})"
        ))
    }

    /// The rules for `namespace`'s labels.
    pub fn service_rules(&self, namespace: &str) -> &ServiceRules {
        self.services
            .namespaces
            .get(namespace)
            .unwrap_or(&self.services.default)
    }

    /// Everything in `spec` that `namespace` may not ask for (empty: all allowed). `edge`:
    /// the operator runs in edge mode, where a label without a Service type gets no Service
    /// of its own, and so asks for nothing this policy governs.
    pub fn service_denials(
        &self,
        namespace: &str,
        spec: &TaasLabelSpec,
        edge: bool,
    ) -> Vec<String> {
        let Some(type_) = crate::edge::service_type(spec, edge) else {
            return Vec::new();
        };
        let rules = self.service_rules(namespace);
        let mut denials = Vec::new();
        if !rules.types.contains(&type_) {
            denials.push(format!(
                "Service type {} is not allowed in namespace {namespace} (allowed: {})",
                type_name(type_),
                if rules.types.is_empty() {
                    "none".to_string()
                } else {
                    rules
                        .types
                        .iter()
                        .map(|t| type_name(*t))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        let any = rules.annotations.iter().any(|p| p == "*");
        let refused: Vec<&str> = spec
            .service
            .annotations
            .keys()
            .filter(|key| {
                !any && !rules
                    .annotations
                    .iter()
                    .any(|p| key.starts_with(p.as_str()))
            })
            .map(String::as_str)
            .collect();
        if !refused.is_empty() {
            denials.push(format!(
                "Service annotation{} {} not allowed in namespace {namespace} (allowed key \
                 prefixes: {})",
                if refused.len() == 1 { "" } else { "s" },
                refused
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if refused.len() == 1 { " is" } else { " are" },
                if rules.annotations.is_empty() {
                    "none".to_string()
                } else {
                    rules
                        .annotations
                        .iter()
                        .map(|p| format!("{p:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        if let (Some(port), false) = (spec.client_port, rules.client_port) {
            denials.push(format!(
                "a pinned clientPort ({port}) is not allowed in namespace {namespace}: leave \
                 it out and the port is allocated"
            ));
        }
        denials
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "\
labels:
  team-a: [home, \"*.lab.example\"]
  admins: [\"*\"]
services:
  default: {types: [ClusterIP, NodePort], annotations: [\"metallb.universe.tf/\", \"a.example/exact\"], clientPort: false}
  namespaces:
    admins: {}
";

    fn spec() -> TaasLabelSpec {
        crate::build::tests::label().spec
    }

    #[test]
    fn no_file_and_an_empty_file_allow_everything() {
        for policy in [
            TenantPolicy::default(),
            TenantPolicy::from_yaml("").unwrap(),
            TenantPolicy::from_yaml("# nothing\n").unwrap(),
            TenantPolicy::from_yaml("labels: {}\nservices: {}\n").unwrap(),
            // What the chart renders from a release's values stored before these keys existed.
            TenantPolicy::from_yaml(
                "labels:\n  {}\nservices:\n  default:\n    {}\n  namespaces:\n    {}\n",
            )
            .unwrap(),
        ] {
            assert!(!policy.restricts_labels());
            assert!(policy.allows_label("anyone", "home"));
            let mut s = spec();
            s.client_port = Some(30443);
            s.service.type_ = Some(ServiceType::NodePort);
            s.service.annotations.insert("x/y".into(), "z".into());
            assert_eq!(
                policy.service_denials("anyone", &s, false),
                Vec::<String>::new()
            );
        }
    }

    #[test]
    fn labels_are_tied_to_namespaces_by_exact_name_or_suffix() {
        let policy = TenantPolicy::from_yaml(EXAMPLE).unwrap();
        assert!(policy.allows_label("team-a", "home"));
        assert!(policy.allows_label("team-a", "HOME"));
        assert!(policy.allows_label("team-a", "x.lab.example"));
        assert!(policy.allows_label("team-a", "a.b.lab.example"));
        // The suffix needs a label before it, and a dot boundary.
        assert!(!policy.allows_label("team-a", "lab.example"));
        assert!(!policy.allows_label("team-a", "xlab.example"));
        assert!(!policy.allows_label("team-a", "office"));
        assert!(!policy.allows_label("team-a", "home.evil"));
        assert!(policy.allows_label("admins", "anything.at.all"));
        // A namespace the policy does not name may claim nothing.
        assert_eq!(
            policy.label_denial("team-b", "home").unwrap(),
            "the cluster's label policy does not let namespace team-b claim LABEL \"home\" \
             (allowed here: none)"
        );
        assert_eq!(
            policy.label_denial("team-a", "office").unwrap(),
            "the cluster's label policy does not let namespace team-a claim LABEL \"office\" \
             (allowed here: \"home\", \"*.lab.example\")"
        );
    }

    #[test]
    fn services_are_narrowed_per_namespace_with_a_default() {
        let policy = TenantPolicy::from_yaml(EXAMPLE).unwrap();
        let mut s = spec(); // LoadBalancer, no annotations, no clientPort
        assert_eq!(
            policy.service_denials("team-a", &s, false),
            ["Service type LoadBalancer is not allowed in namespace team-a (allowed: ClusterIP, NodePort)"]
        );
        s.service.type_ = Some(ServiceType::NodePort);
        s.service
            .annotations
            .insert("metallb.universe.tf/address-pool".into(), "x".into());
        s.service
            .annotations
            .insert("a.example/exact".into(), "x".into());
        assert_eq!(
            policy.service_denials("team-a", &s, false),
            Vec::<String>::new()
        );
        s.service.annotations.insert(
            "service.beta.kubernetes.io/aws-load-balancer-internal".into(),
            "x".into(),
        );
        s.client_port = Some(30443);
        assert_eq!(
            policy.service_denials("team-a", &s, false),
            [
                "Service annotation \"service.beta.kubernetes.io/aws-load-balancer-internal\" is \
                 not allowed in namespace team-a (allowed key prefixes: \"metallb.universe.tf/\", \
                 \"a.example/exact\")",
                "a pinned clientPort (30443) is not allowed in namespace team-a: leave it out and \
                 the port is allocated"
            ]
        );
        // The admins' own entry replaces the default: everything (its fields are omitted).
        s.service.type_ = Some(ServiceType::LoadBalancer);
        assert_eq!(
            policy.service_denials("admins", &s, false),
            Vec::<String>::new()
        );
        // No annotations at all.
        let none =
            TenantPolicy::from_yaml("services: {default: {annotations: [], types: []}}").unwrap();
        let denials = none.service_denials("x", &s, false);
        assert!(denials[0].ends_with("(allowed: none)"), "{denials:?}");
        assert!(denials[1].contains("annotations") && denials[1].ends_with("prefixes: none)"));
    }

    #[test]
    fn in_edge_mode_a_label_without_a_service_type_asks_for_no_service() {
        let none =
            TenantPolicy::from_yaml("services: {default: {annotations: [], types: []}}").unwrap();
        let mut s = spec();
        s.service.type_ = None;
        assert_eq!(none.service_denials("x", &s, true), Vec::<String>::new());
        // Outside edge mode it is a LoadBalancer, and one it asks for explicitly is one too.
        assert_eq!(none.service_denials("x", &s, false).len(), 1);
        s.service.type_ = Some(ServiceType::LoadBalancer);
        assert_eq!(none.service_denials("x", &s, true).len(), 1);
    }

    #[test]
    fn bad_policies_are_refused_with_a_reason() {
        for (text, want) in [
            ("labels: {team-a: [\"Not A Label\"]}", "is not a LABEL"),
            ("labels: {team-a: [\"*.\"]}", "is not a LABEL"),
            ("labels: {team-a: [\"**\"]}", "is not a LABEL"),
            ("labels: {\"Team A\": [home]}", "not a namespace"),
            ("labels: {a.b: [home]}", "not a namespace"),
            ("services: {default: {types: [Ingress]}}", "unknown variant"),
            (
                "services: {default: {annotations: [\"\"]}}",
                "empty annotation prefix",
            ),
            ("services: {defaults: {}}", "unknown field"),
            ("label: {}", "unknown field"),
        ] {
            let error = TenantPolicy::from_yaml(text).unwrap_err().to_string();
            assert!(error.contains(want), "{text}: {error}");
        }
    }

    #[test]
    fn a_policy_file_is_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, EXAMPLE).unwrap();
        assert_eq!(
            TenantPolicy::from_file(&path).unwrap(),
            TenantPolicy::from_yaml(EXAMPLE).unwrap()
        );
        std::fs::write(&path, "#".repeat(MAX_POLICY_BYTES as usize + 1)).unwrap();
        assert!(matches!(
            TenantPolicy::from_file(&path),
            Err(PolicyError::TooLarge { .. })
        ));
        assert!(matches!(
            TenantPolicy::from_file(&dir.path().join("missing")),
            Err(PolicyError::Read { .. })
        ));
    }
}
