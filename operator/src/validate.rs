//! What stops a label from being served, decided without the API server from what
//! [`crate::reconcile`] read (pure functions).
//!
//! - `InvalidSpec`: the spec breaks a rule of the CRD ([`taas_crds::TaasLabelSpec::validate`], which the
//!   API server checks too, except its CEL rules before Kubernetes 1.25: a relay pod for such
//!   a spec would refuse to start), or the pinned client port collides with a rendezvous
//!   port of the Service, or it asks for several `replicas` with a Service of its own that
//!   cannot each get one (a pinned NodePort `clientPort`, a name too long for a StatefulSet:
//!   [`check_replicas`]). (Every object name makes valid child names: [`names::child_base`].)
//! - `LabelNotAllowed`: the cluster's label policy ([`crate::policy`]) does not let the
//!   label's namespace claim its LABEL. Such a label takes part in no conflict: it cannot
//!   pre-claim a LABEL from the namespace the policy gives it to.
//! - `ServiceNotAllowed`: the cluster's service policy refuses the Service type, an
//!   annotation key or the pinned `clientPort` in this namespace.
//!
//!   For both, a relay the label already runs (from before the policy) is scaled to zero.
//! - `LabelConflict`: another `TaasLabel` (any namespace) has the same LABEL and is older
//!   (the oldest `creationTimestamp` wins; ties go to namespace/name order), among those the
//!   label policy allows.
//! - `ForeignObject`: a Service, Deployment or ConfigMap with one of the label's names exists
//!   and is not controlled by this label: the operator never adopts or overwrites it.
//! - `SecretMissing`: the Secret or its key is missing. Unlike the others this does not stop
//!   the objects being applied: the relay pod waits for its Secret volume and starts on its
//!   own the moment the Secret appears, and the Service gets its address meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use taas_crds::limits::{RENDEZVOUS_PORTS_MAX, RENDEZVOUS_PORTS_MIN, REPLICAS_MAX};
use taas_crds::{ServiceType, TaasLabel};

use crate::edge::EdgeSettings;
use crate::names;
use crate::policy::TenantPolicy;
use crate::status::Reason;

/// What dereferencing a label found.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The Secret named by `spec.secretRef`, if it exists.
    pub secret: Option<Secret>,
    /// Objects that exist under one of the label's child names: (kind, metadata).
    pub existing: Vec<(&'static str, ObjectMeta)>,
    /// The nodes, for a NodePort Service's address (listed only for NodePort, the label's
    /// own or in edge mode the gateway's).
    pub nodes: Vec<Node>,
    /// In edge mode, the gateway's Service (`--edge-service`), if it exists: the address of
    /// the labels reached through it.
    pub gateway: Option<Service>,
    /// The `replicas` of the label's own relay Deployment or StatefulSet (the larger) as it is
    /// before this apply (not one it does not control): whether a PodDisruptionBudget may be
    /// left to delete.
    pub relay_replicas: Option<i32>,
    /// The `replicas` of the label's own StatefulSet before this apply (read only when it
    /// runs one, or ran one at the last apply): the pods' Services to remove.
    pub stateful_set_replicas: Option<i32>,
}

impl Observed {
    /// Whether the label's object of `kind` named `taas-X` exists and the label controls it.
    pub fn ours(&self, kind: &str, label: &TaasLabel) -> bool {
        let name = names::relay_name(label);
        self.existing.iter().any(|(k, meta)| {
            *k == kind
                && meta.name.as_deref() == Some(name.as_str())
                && is_controlled_by(meta, label)
        })
    }
}

/// One reason the label is not (fully) served, with a message for its status and events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

impl Problem {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// Whether the label's objects must not be applied while this problem lasts.
    pub fn blocks_apply(&self) -> bool {
        self.reason != Reason::SecretMissing
    }

    /// Whether a relay already running for the label must stop: the cluster owner's policy
    /// refuses it (it may have started before the policy did). The operator deletes nothing,
    /// so it scales the relay to zero; its other objects stay, and its route goes.
    pub fn stops_relay(&self) -> bool {
        matches!(
            self.reason,
            Reason::LabelNotAllowed | Reason::ServiceNotAllowed
        )
    }
}

/// Every problem of `label`, the most important first. `all` is every `TaasLabel` the
/// operator knows of (it may or may not contain `label` itself); `policy` the cluster
/// owner's.
pub fn validate(
    label: &TaasLabel,
    observed: &Observed,
    all: &[Arc<TaasLabel>],
    policy: &TenantPolicy,
) -> Vec<Problem> {
    validate_with_edge(label, observed, all, policy, None)
}

/// [`validate`] for an operator in edge mode (`edge`: its settings) or not (`None`).
pub fn validate_with_edge(
    label: &TaasLabel,
    observed: &Observed,
    all: &[Arc<TaasLabel>],
    policy: &TenantPolicy,
    edge: Option<&EdgeSettings>,
) -> Vec<Problem> {
    let mut problems = check_spec(label);
    problems.extend(check_ports(label, edge.is_some()));
    problems.extend(check_replicas(label, edge.is_some()));
    problems.extend(edge.and_then(|edge| check_edge_slice(label, edge)));
    let label_denied = policy.label_denial(names::namespace(label), &label.spec.label);
    let label_allowed = label_denied.is_none();
    problems.extend(label_denied.map(|message| Problem::new(Reason::LabelNotAllowed, message)));
    problems.extend(check_service_policy(label, policy, edge.is_some()));
    if label_allowed {
        problems.extend(check_conflict(label, all, policy));
    }
    problems.extend(check_foreign(label, &observed.existing));
    problems.extend(check_secret(label, observed.secret.as_ref()));
    problems
}

/// One problem per rule of the CRD the spec breaks.
fn check_spec(label: &TaasLabel) -> Vec<Problem> {
    let errors = label.spec.validate().err().map(|e| e.0).unwrap_or_default();
    errors
        .iter()
        .map(|e| Problem::new(Reason::InvalidSpec, e.to_string()))
        .collect()
}

fn check_ports(label: &TaasLabel, edge: bool) -> Option<Problem> {
    let spec = &label.spec;
    let client = spec.client_port?;
    // A NodePort Service pins the node port, which cannot clash with the Service's ports;
    // without a Service of its own (edge mode) nothing is pinned.
    if crate::edge::service_type(spec, edge).is_none_or(|t| t == ServiceType::NodePort) {
        return None;
    }
    names::p_ports(label).any(|p| p == client).then(|| {
        Problem::new(
            Reason::InvalidSpec,
            format!(
                "clientPort {client} is one of the Service's rendezvous ports {}-{}",
                names::P_PORT_BASE,
                names::P_PORT_BASE
                    + spec
                        .rendezvous_ports
                        .clamp(RENDEZVOUS_PORTS_MIN, RENDEZVOUS_PORTS_MAX)
                        as u16
                    - 1
            ),
        )
    })
}

/// Several replicas need the gateway: it offers a hidden server's rendezvous connection to
/// every replica and the one holding the registration claims it, where a Service of the
/// label's own would hand it to any replica, most often one that does not hold the
/// registration. (A count outside the CRD's bounds is [`check_spec`]'s.)
fn check_replicas(label: &TaasLabel, edge: bool) -> Option<Problem> {
    let n = label
        .spec
        .replicas
        .filter(|n| (2..=REPLICAS_MAX).contains(n))?;
    // Through the gateway: any number. With a Service of the label's own, each replica gets
    // a Service of its own (`build::per_pod_services`), which two rules of Kubernetes limit.
    let service_type = crate::edge::service_type(&label.spec, edge)?;
    if let (ServiceType::NodePort, Some(port)) = (service_type, label.spec.client_port) {
        return Some(Problem::new(
            Reason::InvalidSpec,
            format!(
                "replicas {n} with a NodePort Service of the label's own gives each replica a \
                 Service of its own, and the pinned clientPort {port} cannot be the node port \
                 of several: remove clientPort (each replica's node port is then allocated and \
                 named in its 307s), or ask for replicas 1"
            ),
        ));
    }
    let name = names::relay_name(label);
    (name.len() > names::MAX_STATEFUL_SET_NAME).then(|| {
        Problem::new(
            Reason::InvalidSpec,
            format!(
                "replicas {n} with a Service of the label's own runs the replicas as the \
                 StatefulSet {name}, longer than the {} characters Kubernetes allows a \
                 StatefulSet (its pods carry its name and a hash in a label): use a name of at \
                 most {} characters, the cluster edge (no service.type), or replicas 1",
                names::MAX_STATEFUL_SET_NAME,
                names::MAX_STATEFUL_SET_NAME - "taas-".len()
            ),
        )
    })
}

/// A label reached through the gateway needs as many distinct ports of the shared range as
/// it has rendezvous ports: two of its local ports on one public port could not be told
/// apart.
fn check_edge_slice(label: &TaasLabel, edge: &EdgeSettings) -> Option<Problem> {
    let n = names::p_ports(label).count();
    let count = usize::from(edge.rendezvous.count());
    (crate::edge::through_gateway(label, Some(edge)) && n > count).then(|| {
        Problem::new(
            Reason::InvalidSpec,
            format!(
                "rendezvousPorts {n} is more than the cluster edge's {count} shared rendezvous \
                 ports ({}): ask for at most {count}, or for a Service of the label's own \
                 (service.type)",
                edge.rendezvous
            ),
        )
    })
}

fn check_service_policy(label: &TaasLabel, policy: &TenantPolicy, edge: bool) -> Option<Problem> {
    let denials = policy.service_denials(names::namespace(label), &label.spec, edge);
    (!denials.is_empty()).then(|| Problem::new(Reason::ServiceNotAllowed, denials.join("; ")))
}

/// Whether `label` may hold its LABEL at all: not being deleted, and allowed by the policy.
fn may_claim(label: &TaasLabel, policy: &TenantPolicy) -> bool {
    label.metadata.deletion_timestamp.is_none()
        && policy.allows_label(names::namespace(label), &label.spec.label)
}

fn check_conflict(
    label: &TaasLabel,
    all: &[Arc<TaasLabel>],
    policy: &TenantPolicy,
) -> Option<Problem> {
    let winner = all
        .iter()
        .map(|other| other.as_ref())
        .filter(|other| other.spec.label == label.spec.label && may_claim(other, policy))
        .chain(std::iter::once(label))
        .min_by(|a, b| precedence(a).cmp(&precedence(b)))?;
    (key(winner) != key(label)).then(|| {
        Problem::new(
            Reason::LabelConflict,
            format!(
                "LABEL {:?} is already served by TaasLabel {}/{} (the oldest one wins)",
                label.spec.label,
                names::namespace(winner),
                names::object_name(winner)
            ),
        )
    })
}

fn check_foreign(label: &TaasLabel, existing: &[(&'static str, ObjectMeta)]) -> Option<Problem> {
    let foreign: Vec<String> = existing
        .iter()
        .filter(|(_, meta)| !is_controlled_by(meta, label))
        .map(|(kind, meta)| format!("{kind} {}", meta.name.as_deref().unwrap_or_default()))
        .collect();
    (!foreign.is_empty()).then(|| {
        Problem::new(
            Reason::ForeignObject,
            format!(
                "{} already exist{} and {} not controlled by this TaasLabel: not adopting; \
                 delete or rename {}",
                foreign.join(", "),
                if foreign.len() == 1 { "s" } else { "" },
                if foreign.len() == 1 { "is" } else { "are" },
                if foreign.len() == 1 { "it" } else { "them" },
            ),
        )
    })
}

fn check_secret(label: &TaasLabel, secret: Option<&Secret>) -> Option<Problem> {
    let reference = &label.spec.secret_ref;
    let Some(secret) = secret else {
        return Some(Problem::new(
            Reason::SecretMissing,
            format!(
                "Secret {}/{} not found",
                names::namespace(label),
                reference.name
            ),
        ));
    };
    let has_key = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .is_some_and(|value| !value.0.is_empty())
        || secret
            .string_data
            .as_ref()
            .and_then(|data| data.get(&reference.key))
            .is_some_and(|value| !value.is_empty());
    (!has_key).then(|| {
        Problem::new(
            Reason::SecretMissing,
            format!(
                "Secret {}/{} has no key {:?}",
                names::namespace(label),
                reference.name,
                reference.key
            ),
        )
    })
}

/// Whether `meta`'s controller owner is `label` (by UID).
pub fn is_controlled_by(meta: &ObjectMeta, label: &TaasLabel) -> bool {
    let Some(uid) = label.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references.iter().flatten().any(|owner| {
        owner.controller == Some(true)
            && owner.uid == uid
            && owner.kind == taas_crds::KIND
            && owner.api_version == taas_crds::API_VERSION
    })
}

/// The `TaasLabel` serving each LABEL: the oldest of those that name it (labels being deleted,
/// and labels the policy does not let claim their LABEL, do not count).
pub fn winners(all: &[Arc<TaasLabel>], policy: &TenantPolicy) -> BTreeMap<String, Arc<TaasLabel>> {
    let mut winners: BTreeMap<String, Arc<TaasLabel>> = BTreeMap::new();
    for label in all.iter().filter(|label| may_claim(label, policy)) {
        match winners.get(&label.spec.label) {
            Some(current) if precedence(current) <= precedence(label) => {}
            _ => {
                winners.insert(label.spec.label.clone(), label.clone());
            }
        }
    }
    winners
}

/// Sort key: older first; an object without a creation time (never from the API server)
/// last; then namespace and name, so the order is total.
fn precedence(label: &TaasLabel) -> (bool, Option<i64>, (&str, &str)) {
    let created = label.metadata.creation_timestamp.as_ref();
    (
        created.is_none(),
        created.map(|time| time.0.as_second()),
        key(label),
    )
}

fn key(label: &TaasLabel) -> (&str, &str) {
    (names::namespace(label), names::object_name(label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::{label, owned_meta};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::ByteString;

    fn secret(key: &str, value: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("home-totp".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(value.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn observed_ok() -> Observed {
        Observed {
            secret: Some(secret("secret", "JBSWY3DPEHPK3PXP")),
            ..Default::default()
        }
    }

    fn created(mut label: TaasLabel, namespace: &str, name: &str, second: i64) -> Arc<TaasLabel> {
        label.metadata.namespace = Some(namespace.into());
        label.metadata.name = Some(name.into());
        label.metadata.uid = Some(format!("uid-{namespace}-{name}"));
        label.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + second).unwrap(),
        ));
        Arc::new(label)
    }

    /// No policy: every namespace may claim any LABEL and ask for any Service.
    fn open() -> TenantPolicy {
        TenantPolicy::default()
    }

    fn reasons(problems: &[Problem]) -> Vec<Reason> {
        problems.iter().map(|p| p.reason).collect()
    }

    #[test]
    fn a_good_label_has_no_problems() {
        assert_eq!(validate(&label(), &observed_ok(), &[], &open()), vec![]);
        let me = Arc::new(label());
        assert_eq!(validate(&label(), &observed_ok(), &[me], &open()), vec![]);
    }

    #[test]
    fn missing_secret_and_missing_key() {
        let mut observed = observed_ok();
        observed.secret = None;
        let problems = validate(&label(), &observed, &[], &open());
        assert_eq!(reasons(&problems), vec![Reason::SecretMissing]);
        assert_eq!(problems[0].message, "Secret default/home-totp not found");
        assert!(!problems[0].blocks_apply());

        observed.secret = Some(secret("other", "JBSWY3DPEHPK3PXP"));
        let problems = validate(&label(), &observed, &[], &open());
        assert_eq!(reasons(&problems), vec![Reason::SecretMissing]);
        assert_eq!(
            problems[0].message,
            "Secret default/home-totp has no key \"secret\""
        );

        observed.secret = Some(secret("secret", ""));
        assert_eq!(
            reasons(&validate(&label(), &observed, &[], &open())),
            vec![Reason::SecretMissing]
        );

        // stringData (never returned by the API server, but harmless) counts too.
        let mut with_string_data = secret("other", "x");
        with_string_data.string_data = Some(BTreeMap::from([(
            "secret".to_string(),
            "JBSWY3DPEHPK3PXP".to_string(),
        )]));
        observed.secret = Some(with_string_data);
        assert_eq!(validate(&label(), &observed, &[], &open()), vec![]);
    }

    #[test]
    fn foreign_same_named_objects_are_refused() {
        let me = label();
        let mut observed = observed_ok();
        observed.existing = vec![
            ("Service", owned_meta(&me, "taas-home")),
            (
                "Deployment",
                ObjectMeta {
                    name: Some("taas-home".into()),
                    ..Default::default()
                },
            ),
        ];
        let problems = validate(&me, &observed, &[], &open());
        assert_eq!(reasons(&problems), vec![Reason::ForeignObject]);
        assert_eq!(
            problems[0].message,
            "Deployment taas-home already exists and is not controlled by this TaasLabel: \
             not adopting; delete or rename it"
        );
        assert!(problems[0].blocks_apply());

        // Owned, but by another TaasLabel (same name, earlier incarnation: another UID).
        let mut other_uid = owned_meta(&me, "taas-home");
        other_uid.owner_references.as_mut().unwrap()[0].uid = "old".into();
        // Owned by us but not as controller.
        let mut not_controller = owned_meta(&me, "taas-home");
        not_controller.owner_references.as_mut().unwrap()[0].controller = None;
        observed.existing = vec![("ConfigMap", other_uid), ("Service", not_controller)];
        let problems = validate(&me, &observed, &[], &open());
        assert_eq!(
            problems[0].message,
            "ConfigMap taas-home, Service taas-home already exist and are not controlled by \
             this TaasLabel: not adopting; delete or rename them"
        );

        // Everything ours: fine.
        observed.existing = vec![
            ("Service", owned_meta(&me, "taas-home")),
            ("Service", owned_meta(&me, "taas-home-control")),
            ("Deployment", owned_meta(&me, "taas-home")),
            ("ConfigMap", owned_meta(&me, "taas-home")),
        ];
        assert_eq!(validate(&me, &observed, &[], &open()), vec![]);
    }

    #[test]
    fn the_oldest_label_wins_a_conflict() {
        let old = created(label(), "team-a", "home", 0);
        let new = created(label(), "team-b", "home", 10);
        let all = vec![new.clone(), old.clone()];
        assert_eq!(validate(&old, &observed_ok(), &all, &open()), vec![]);
        let problems = validate(&new, &observed_ok(), &all, &open());
        assert_eq!(reasons(&problems), vec![Reason::LabelConflict]);
        assert_eq!(
            problems[0].message,
            "LABEL \"home\" is already served by TaasLabel team-a/home (the oldest one wins)"
        );
        // The newer one conflicts even if the store has not seen it yet.
        assert_eq!(
            reasons(&validate(
                &new,
                &observed_ok(),
                std::slice::from_ref(&old),
                &open()
            )),
            vec![Reason::LabelConflict]
        );
        // Same age: namespace/name order decides.
        let twin = created(label(), "team-0", "home", 10);
        let all = vec![new.clone(), twin.clone()];
        assert_eq!(validate(&twin, &observed_ok(), &all, &open()), vec![]);
        assert_eq!(
            reasons(&validate(&new, &observed_ok(), &all, &open())),
            vec![Reason::LabelConflict]
        );
        // A label being deleted does not hold on to its LABEL.
        let mut going = (*old).clone();
        going.metadata.deletion_timestamp = old.metadata.creation_timestamp.clone();
        let all = vec![Arc::new(going), new.clone()];
        assert_eq!(validate(&new, &observed_ok(), &all, &open()), vec![]);
        // Other LABELs do not conflict.
        let mut other = (*old).clone();
        other.spec.label = "office".into();
        assert_eq!(
            validate(&new, &observed_ok(), &[Arc::new(other)], &open()),
            vec![]
        );

        let winners = winners(&[new.clone(), old.clone(), twin.clone()], &open());
        assert_eq!(winners.len(), 1);
        assert_eq!(
            winners["home"].metadata.namespace.as_deref(),
            Some("team-a")
        );
    }

    #[test]
    fn every_name_the_api_server_accepts_is_served() {
        let longest = crate::names::tests::longest_name();
        for name in ["automatic.home", "a.b", &"x".repeat(51), &longest] {
            let mut l = label();
            l.metadata.name = Some(name.to_string());
            assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![], "{name}");
        }
    }

    #[test]
    fn a_spec_that_breaks_the_crds_rules_is_invalid() {
        // What an API server without CEL (before Kubernetes 1.25) lets through.
        let mut l = label();
        l.spec.server_speaks_first = true;
        let problems = validate(&l, &observed_ok(), &[], &open());
        assert_eq!(reasons(&problems), vec![Reason::InvalidSpec]);
        assert_eq!(
            problems[0].message,
            "serverSpeaksFirst needs proxyProtocol v1 or v2"
        );
        assert!(problems[0].blocks_apply());
        // Every rule broken is one problem.
        l.spec.period = 0;
        l.spec.rendezvous_ports = 65;
        let problems = validate(&l, &observed_ok(), &[], &open());
        let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "period 0 must be 1 to 300 seconds",
                "serverSpeaksFirst needs proxyProtocol v1 or v2",
                "rendezvousPorts 65 must be 1 to 64",
            ]
        );
    }

    #[test]
    fn a_pinned_client_port_must_not_be_a_rendezvous_port() {
        let mut l = label();
        l.spec.client_port = Some(20003);
        l.spec.rendezvous_ports = 4;
        let problems = validate(&l, &observed_ok(), &[], &open());
        assert_eq!(reasons(&problems), vec![Reason::InvalidSpec]);
        assert_eq!(
            problems[0].message,
            "clientPort 20003 is one of the Service's rendezvous ports 20000-20003"
        );
        l.spec.client_port = Some(20004);
        assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
        // With NodePort the pin is the node port, not the Service port.
        l.spec.client_port = Some(20003);
        l.spec.service.type_ = Some(ServiceType::NodePort);
        assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
        // In edge mode, without a Service of its own, nothing is pinned.
        l.spec.service.type_ = None;
        let edge = crate::edge::tests::edge_settings();
        assert_eq!(
            validate_with_edge(&l, &observed_ok(), &[], &open(), Some(&edge)),
            vec![]
        );
    }

    #[test]
    fn in_edge_mode_a_label_needs_no_more_ports_than_the_shared_range_has() {
        let mut edge = crate::edge::tests::edge_settings();
        edge.rendezvous = "30000-30003".parse().unwrap();
        let mut l = label();
        l.spec.rendezvous_ports = 4;
        let ok = |l: &TaasLabel| validate_with_edge(l, &observed_ok(), &[], &open(), Some(&edge));
        assert_eq!(ok(&l), vec![]);
        l.spec.rendezvous_ports = 5;
        let problems = ok(&l);
        assert_eq!(reasons(&problems), vec![Reason::InvalidSpec]);
        assert_eq!(
            problems[0].message,
            "rendezvousPorts 5 is more than the cluster edge's 4 shared rendezvous ports \
             (30000-30003): ask for at most 4, or for a Service of the label's own (service.type)"
        );
        // A label with its own Service does not use the shared range.
        l.spec.service.type_ = Some(ServiceType::LoadBalancer);
        assert_eq!(ok(&l), vec![]);
        // Nor does any label outside edge mode.
        l.spec.service.type_ = None;
        assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
    }

    #[test]
    fn several_replicas_with_a_service_of_the_labels_own_are_refused_only_where_each_cannot_get_one(
    ) {
        let edge = crate::edge::tests::edge_settings();
        let mut l = label();
        l.spec.replicas = Some(2);
        // Through the gateway, or each with a Service of its own: fine.
        assert_eq!(
            validate_with_edge(&l, &observed_ok(), &[], &open(), Some(&edge)),
            vec![]
        );
        assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
        l.spec.service.type_ = Some(ServiceType::NodePort);
        assert_eq!(
            validate_with_edge(&l, &observed_ok(), &[], &open(), Some(&edge)),
            vec![]
        );
        // A pinned node port cannot be several Services': refused, saying why and what to do.
        l.spec.client_port = Some(30443);
        let problems = validate_with_edge(&l, &observed_ok(), &[], &open(), Some(&edge));
        assert_eq!(reasons(&problems), vec![Reason::InvalidSpec]);
        assert_eq!(
            problems[0].message,
            "replicas 2 with a NodePort Service of the label's own gives each replica a Service \
             of its own, and the pinned clientPort 30443 cannot be the node port of several: \
             remove clientPort (each replica's node port is then allocated and named in its \
             307s), or ask for replicas 1"
        );
        assert!(problems[0].blocks_apply());
        assert!(!problems[0].stops_relay());
        // A LoadBalancer's port is no node port: pinned, it is the same on every replica's.
        l.spec.service.type_ = Some(ServiceType::LoadBalancer);
        assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
        l.spec.client_port = None;
        // A name too long for a StatefulSet (47 characters fit, 48 do not).
        l.metadata.name = Some("a".repeat(47));
        assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
        l.metadata.name = Some("a".repeat(48));
        let problems = validate(&l, &observed_ok(), &[], &open());
        assert_eq!(reasons(&problems), vec![Reason::InvalidSpec]);
        assert!(
            problems[0]
                .message
                .contains("use a name of at most 47 characters"),
            "{}",
            problems[0].message
        );
        l.metadata.name = Some("home".into());
        // One replica is fine anywhere; an unset count never is refused (the install's
        // default applies only through the gateway).
        for replicas in [Some(1), None] {
            l.spec.replicas = replicas;
            assert_eq!(validate(&l, &observed_ok(), &[], &open()), vec![]);
        }
        // Out of bounds: the CRD's rule alone says so.
        l.spec.replicas = Some(17);
        let problems = validate(&l, &observed_ok(), &[], &open());
        let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages, ["replicas 17 must be 1 to 16"]);
    }

    proptest::proptest! {
        #[test]
        fn replicas_are_refused_exactly_when_several_meet_a_pinned_node_port_of_the_labels_own(
            n in proptest::option::of(0u32..=20),
            type_ in proptest::option::of(proptest::sample::select(vec![
                ServiceType::LoadBalancer, ServiceType::NodePort, ServiceType::ClusterIP,
            ])),
            pinned in proptest::bool::ANY,
            edge_mode in proptest::bool::ANY,
        ) {
            let edge = crate::edge::tests::edge_settings();
            let mut l = label();
            l.spec.replicas = n;
            l.spec.service.type_ = type_;
            l.spec.client_port = pinned.then_some(30443);
            let problems = validate_with_edge(
                &l, &observed_ok(), &[], &open(), edge_mode.then_some(&edge),
            );
            let in_bounds = n.is_none_or(|n| (1..=16).contains(&n));
            let node_port = type_ == Some(ServiceType::NodePort);
            let refused_for_the_service =
                n.is_some_and(|n| (2..=16).contains(&n)) && node_port && pinned;
            proptest::prop_assert_eq!(problems.is_empty(), in_bounds && !refused_for_the_service);
            proptest::prop_assert!(problems.len() <= 1);
            proptest::prop_assert!(problems.iter().all(|p| p.reason == Reason::InvalidSpec));
        }
    }

    #[test]
    fn problems_come_most_important_first() {
        let mut l = label();
        l.spec.period = 0;
        let old = created(label(), "aaa", "home", -5);
        let observed = Observed {
            secret: None,
            existing: vec![("Service", ObjectMeta::default())],
            ..Default::default()
        };
        assert_eq!(
            reasons(&validate(&l, &observed, &[old], &open())),
            vec![
                Reason::InvalidSpec,
                Reason::LabelConflict,
                Reason::ForeignObject,
                Reason::SecretMissing
            ]
        );
    }

    #[test]
    fn a_label_the_policy_does_not_allow_in_its_namespace_is_refused() {
        let policy = TenantPolicy::from_yaml("labels: {team-a: [home, \"*.lab\"]}").unwrap();
        let mine = created(label(), "team-a", "home", 10);
        assert_eq!(validate(&mine, &observed_ok(), &[], &policy), vec![]);
        // Another namespace: refused, with the reason, and nothing applied.
        let squatter = created(label(), "team-b", "home", 0);
        let problems = validate(&squatter, &observed_ok(), &[], &policy);
        assert_eq!(reasons(&problems), vec![Reason::LabelNotAllowed]);
        assert_eq!(
            problems[0].message,
            "the cluster's label policy does not let namespace team-b claim LABEL \"home\" \
             (allowed here: none)"
        );
        assert!(problems[0].blocks_apply());
        // The older squatter does not take the LABEL from its owner: no conflict.
        let all = vec![squatter.clone(), mine.clone()];
        assert_eq!(validate(&mine, &observed_ok(), &all, &policy), vec![]);
        assert_eq!(
            reasons(&validate(&squatter, &observed_ok(), &all, &policy)),
            vec![Reason::LabelNotAllowed]
        );
        let winners = winners(&all, &policy);
        assert_eq!(
            winners["home"].metadata.namespace.as_deref(),
            Some("team-a")
        );
        // Without the policy the older one would have won (today's behaviour).
        assert_eq!(
            reasons(&validate(&mine, &observed_ok(), &all, &open())),
            vec![Reason::LabelConflict]
        );
        // Suffixes.
        let mut lab = (*mine).clone();
        lab.spec.label = "x.lab".into();
        assert_eq!(validate(&lab, &observed_ok(), &[], &policy), vec![]);
        lab.spec.label = "x.lab.evil".into();
        assert_eq!(
            reasons(&validate(&lab, &observed_ok(), &[], &policy)),
            vec![Reason::LabelNotAllowed]
        );
    }

    #[test]
    fn a_service_the_policy_does_not_allow_is_refused() {
        let policy = TenantPolicy::from_yaml(
            "services: {default: {types: [ClusterIP]}, namespaces: {edge: {types: [LoadBalancer], \
             annotations: [\"metallb.universe.tf/\"], clientPort: false}}}",
        )
        .unwrap();
        let l = created(label(), "team-a", "home", 0); // LoadBalancer
        let problems = validate(&l, &observed_ok(), &[], &policy);
        assert_eq!(reasons(&problems), vec![Reason::ServiceNotAllowed]);
        assert_eq!(
            problems[0].message,
            "Service type LoadBalancer is not allowed in namespace team-a (allowed: ClusterIP)"
        );
        assert!(problems[0].blocks_apply());
        let mut edge = (*created(label(), "edge", "home", 0)).clone();
        assert_eq!(validate(&edge, &observed_ok(), &[], &policy), vec![]);
        edge.spec.client_port = Some(443);
        edge.spec
            .service
            .annotations
            .insert("cloud.example/public".into(), "true".into());
        let problems = validate(&edge, &observed_ok(), &[], &policy);
        assert_eq!(reasons(&problems), vec![Reason::ServiceNotAllowed]);
        assert!(
            problems[0]
                .message
                .contains("\"cloud.example/public\" is not allowed")
                && problems[0].message.contains("; a pinned clientPort (443)"),
            "{}",
            problems[0].message
        );
        // Refused Services still hold their LABEL (the namespace may claim it).
        let edge = Arc::new(edge);
        assert_eq!(winners(&[edge], &policy).len(), 1);
    }
}
