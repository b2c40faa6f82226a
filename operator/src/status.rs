//! A label's status from what the reconcile found and applied (pure functions).
//!
//! One condition, `Ready`, with a reason naming the first thing in the way:
//!
//! | reason | status | meaning |
//! |---|---|---|
//! | `Ready` | True | every relay replica is ready, reachable at `endpoint` ("2 of 2 replicas serving") |
//! | `Degraded` | True | some relay replicas are ready, not all ("1 of 2 replicas serving"): the label is served |
//! | `WaitingForAddress` | False | the Service has no external address yet |
//! | `RelayNotReady` | False | no relay replica is ready (yet) |
//! | `SecretMissing` | False | the Secret or its key is missing (the pod waits for it) |
//! | `ForeignObject` | False | a same-named object the operator does not control is in the way |
//! | `LabelConflict` | False | an older TaasLabel serves this LABEL |
//! | `InvalidSpec` | False | the spec breaks a rule of the CRD, or its ports cannot make valid objects |
//! | `LabelNotAllowed` | False | the cluster's label policy does not let this namespace claim the LABEL |
//! | `ServiceNotAllowed` | False | the cluster's service policy refuses the Service type, an annotation or the pinned port |
//! | `ApplyRejected` | False | the API server refused an object (e.g. a node port in use) |
//!
//! `lastTransitionTime` changes only when the condition's status does. Once applied, the
//! status also carries `replicas` (wanted) and `readyReplicas` (the Deployment's), the
//! `REPLICAS` and `SERVING` printer columns.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use taas_crds::{Condition, ConditionStatus, StatusPorts, TaasLabel, TaasLabelStatus};

use crate::address::Exposure;
use crate::validate::Problem;

pub const READY: &str = "Ready";

/// Why a label is (not) ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Ready,
    Degraded,
    WaitingForAddress,
    RelayNotReady,
    SecretMissing,
    ForeignObject,
    LabelConflict,
    InvalidSpec,
    LabelNotAllowed,
    ServiceNotAllowed,
    ApplyRejected,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ready => "Ready",
            Reason::Degraded => "Degraded",
            Reason::WaitingForAddress => "WaitingForAddress",
            Reason::RelayNotReady => "RelayNotReady",
            Reason::SecretMissing => "SecretMissing",
            Reason::ForeignObject => "ForeignObject",
            Reason::LabelConflict => "LabelConflict",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::LabelNotAllowed => "LabelNotAllowed",
            Reason::ServiceNotAllowed => "ServiceNotAllowed",
            Reason::ApplyRejected => "ApplyRejected",
        }
    }

    /// Whether only a user can fix it (a Warning event, a slow requeue).
    pub fn needs_user_fix(self) -> bool {
        !matches!(
            self,
            Reason::Ready | Reason::Degraded | Reason::WaitingForAddress | Reason::RelayNotReady
        )
    }
}

/// What a reconcile learned about a label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was applied: the first problem says why (and the others are in the message).
    Blocked(Vec<Problem>),
    /// The objects were applied.
    Applied {
        /// Problems that did not stop the apply (a missing Secret).
        problems: Vec<Problem>,
        /// The external address, or why there is none yet.
        exposure: Result<Exposure, String>,
        /// The relay Deployment's replicas: wanted, and ready.
        replicas: Replicas,
        /// Where the gateways reach the relay ([`names::relay_address`]).
        relay: String,
    },
    /// The API server refused an object: its message.
    Rejected(String),
}

/// A relay Deployment's replica counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// How many the Deployment asks for.
    pub desired: i32,
    /// How many are ready (its `status.readyReplicas`; during a rolling update, old and new).
    pub ready: i32,
}

impl Replicas {
    /// "1 of 2 replicas serving" (never more serving than wanted: a surge pod is a
    /// replacement, not an extra replica).
    fn serving(self) -> String {
        format!(
            "{} of {} {} serving",
            self.ready.clamp(0, self.desired.max(0)),
            self.desired,
            if self.desired == 1 {
                "replica"
            } else {
                "replicas"
            }
        )
    }
}

/// The status for `label` after `outcome`, at `now` (used only if the condition changes).
pub fn status(label: &TaasLabel, outcome: &Outcome, now: &Time) -> TaasLabelStatus {
    let generation = label.metadata.generation;
    let (reason, message) = ready_reason(outcome);
    let mut status = TaasLabelStatus {
        observed_generation: generation,
        conditions: vec![condition(label, reason, message, generation, now)],
        parked: None,
        ..Default::default()
    };
    if let Outcome::Applied {
        exposure,
        relay,
        replicas,
        ..
    } = outcome
    {
        status.relay = Some(relay.clone());
        status.replicas = Some(replicas.desired);
        status.ready_replicas = Some(replicas.ready);
        if let Ok(exposure) = exposure {
            status.endpoint = Some(host_port(&exposure.host, exposure.client));
            status.ports = Some(StatusPorts {
                client: exposure.client,
                rendezvous: exposure.rendezvous.clone(),
            });
        }
    }
    status
}

/// The Ready condition's reason and message.
pub fn ready_reason(outcome: &Outcome) -> (Reason, String) {
    let joined = |problems: &[Problem]| {
        problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    };
    match outcome {
        Outcome::Blocked(problems) => (
            problems.first().map_or(Reason::InvalidSpec, |p| p.reason),
            joined(problems),
        ),
        Outcome::Rejected(message) => (Reason::ApplyRejected, message.clone()),
        Outcome::Applied {
            problems,
            exposure,
            replicas,
            ..
        } => {
            if let Some(first) = problems.first() {
                (first.reason, joined(problems))
            } else if let Err(why) = exposure {
                (Reason::WaitingForAddress, why.clone())
            } else if replicas.ready <= 0 {
                let which = if replicas.desired == 1 {
                    "pod is"
                } else {
                    "pods are"
                };
                (
                    Reason::RelayNotReady,
                    format!("{}: the relay {which} not ready yet", replicas.serving()),
                )
            } else if replicas.ready < replicas.desired {
                // Served, by fewer replicas than wanted: still Ready=True (routes keep it).
                (Reason::Degraded, replicas.serving())
            } else {
                (Reason::Ready, replicas.serving())
            }
        }
    }
}

/// The current Ready reason recorded in a status, if any.
pub fn current_reason(status: Option<&TaasLabelStatus>) -> Option<&str> {
    ready_condition(status).map(|c| c.reason.as_str())
}

/// Whether a label's recorded status says it is ready.
pub fn is_ready(label: &TaasLabel) -> bool {
    ready_condition(label.status.as_ref()).is_some_and(|c| c.status == ConditionStatus::True)
}

fn ready_condition(status: Option<&TaasLabelStatus>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == READY)
}

fn condition(
    label: &TaasLabel,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if matches!(reason, Reason::Ready | Reason::Degraded) {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let last_transition_time = ready_condition(label.status.as_ref())
        .filter(|previous| previous.status == status)
        .map_or_else(
            || now.clone(),
            |previous| previous.last_transition_time.clone(),
        );
    Condition {
        type_: READY.to_string(),
        status,
        reason: reason.as_str().to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::label;
    use crate::names;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    fn exposure() -> Exposure {
        Exposure {
            host: "203.0.113.7".into(),
            client: 21000,
            rendezvous: vec![20000, 20001],
        }
    }

    fn applied(exposure: Result<Exposure, String>, relay_ready: bool) -> Outcome {
        serving(exposure, 1, i32::from(relay_ready))
    }

    fn serving(exposure: Result<Exposure, String>, desired: i32, ready: i32) -> Outcome {
        Outcome::Applied {
            problems: vec![],
            exposure,
            replicas: Replicas { desired, ready },
            relay: names::relay_address(&label(), "cluster.local"),
        }
    }

    fn ready(s: &TaasLabelStatus) -> &Condition {
        &s.conditions[0]
    }

    #[test]
    fn ready_label() {
        let s = status(&label(), &applied(Ok(exposure()), true), &at(100));
        assert_eq!(
            s,
            TaasLabelStatus {
                observed_generation: Some(1),
                conditions: vec![Condition {
                    type_: "Ready".into(),
                    status: ConditionStatus::True,
                    reason: "Ready".into(),
                    message: "1 of 1 replica serving".into(),
                    last_transition_time: at(100),
                    observed_generation: Some(1),
                }],
                endpoint: Some("203.0.113.7:21000".into()),
                relay: Some("taas-home-control.default.svc.cluster.local.:8080".into()),
                ports: Some(StatusPorts {
                    client: 21000,
                    rendezvous: vec![20000, 20001]
                }),
                replicas: Some(1),
                ready_replicas: Some(1),
                parked: None,
            }
        );
    }

    #[test]
    fn the_label_is_served_while_one_replica_is_ready() {
        let s = status(&label(), &serving(Ok(exposure()), 2, 2), &at(100));
        assert_eq!(
            (
                ready(&s).status,
                ready(&s).reason.as_str(),
                ready(&s).message.as_str()
            ),
            (ConditionStatus::True, "Ready", "2 of 2 replicas serving")
        );
        assert_eq!((s.replicas, s.ready_replicas), (Some(2), Some(2)));
        let mut l = label();
        l.status = Some(s);
        // One replica lost: still True (same transition time), reason Degraded.
        let s = status(&l, &serving(Ok(exposure()), 2, 1), &at(200));
        assert_eq!(
            (
                ready(&s).status,
                ready(&s).reason.as_str(),
                ready(&s).message.as_str()
            ),
            (ConditionStatus::True, "Degraded", "1 of 2 replicas serving")
        );
        assert_eq!(ready(&s).last_transition_time, at(100));
        assert_eq!((s.replicas, s.ready_replicas), (Some(2), Some(1)));
        l.status = Some(s);
        assert!(is_ready(&l));
        assert!(!Reason::Degraded.needs_user_fix());
        // None: False.
        let s = status(&l, &serving(Ok(exposure()), 2, 0), &at(300));
        assert_eq!(
            (
                ready(&s).status,
                ready(&s).reason.as_str(),
                ready(&s).message.as_str()
            ),
            (
                ConditionStatus::False,
                "RelayNotReady",
                "0 of 2 replicas serving: the relay pods are not ready yet"
            )
        );
        assert_eq!(ready(&s).last_transition_time, at(300));
        // A rolling update's surge pod is ready beside the old one: not "3 of 2".
        let s = status(&label(), &serving(Ok(exposure()), 2, 3), &at(1));
        assert_eq!(ready(&s).message, "2 of 2 replicas serving");
        assert_eq!(s.ready_replicas, Some(3));
    }

    proptest::proptest! {
        #[test]
        fn ready_is_true_exactly_while_a_replica_serves(desired in 1i32..=16, ready in 0i32..=17) {
            let s = status(&label(), &serving(Ok(exposure()), desired, ready), &at(1));
            let c = &s.conditions[0];
            proptest::prop_assert_eq!(c.status == ConditionStatus::True, ready >= 1);
            let expected = if ready == 0 {
                "RelayNotReady"
            } else if ready < desired {
                "Degraded"
            } else {
                "Ready"
            };
            proptest::prop_assert_eq!(c.reason.as_str(), expected);
            let serving_count = format!("{} of {desired} ", ready.min(desired));
            proptest::prop_assert!(c.message.starts_with(&serving_count), "{}", c.message);
            proptest::prop_assert_eq!((s.replicas, s.ready_replicas), (Some(desired), Some(ready)));
        }
    }

    #[test]
    fn waiting_and_not_ready() {
        let s = status(
            &label(),
            &applied(Err("waiting for the load balancer's address".into()), false),
            &at(100),
        );
        assert_eq!(ready(&s).status, ConditionStatus::False);
        assert_eq!(ready(&s).reason, "WaitingForAddress");
        assert_eq!(ready(&s).message, "waiting for the load balancer's address");
        assert_eq!(s.endpoint, None);
        assert_eq!(s.ports, None);
        assert_eq!(
            s.relay.as_deref(),
            Some("taas-home-control.default.svc.cluster.local.:8080")
        );

        let s = status(&label(), &applied(Ok(exposure()), false), &at(100));
        assert_eq!(ready(&s).reason, "RelayNotReady");
        // The address is known: shown even while the relay starts.
        assert_eq!(s.endpoint.as_deref(), Some("203.0.113.7:21000"));
    }

    #[test]
    fn problems_win_over_progress() {
        let secret = Problem {
            reason: Reason::SecretMissing,
            message: "Secret default/home-totp not found".into(),
        };
        let outcome = Outcome::Applied {
            problems: vec![secret.clone()],
            exposure: Ok(exposure()),
            replicas: Replicas {
                desired: 1,
                ready: 0,
            },
            relay: names::relay_address(&label(), "cluster.local"),
        };
        let s = status(&label(), &outcome, &at(1));
        assert_eq!(ready(&s).reason, "SecretMissing");
        assert_eq!(ready(&s).message, "Secret default/home-totp not found");
        assert_eq!(s.endpoint.as_deref(), Some("203.0.113.7:21000"));

        let foreign = Problem {
            reason: Reason::ForeignObject,
            message: "Service taas-home already exists".into(),
        };
        let s = status(&label(), &Outcome::Blocked(vec![foreign, secret]), &at(1));
        assert_eq!(ready(&s).reason, "ForeignObject");
        assert_eq!(
            ready(&s).message,
            "Service taas-home already exists; Secret default/home-totp not found"
        );
        assert_eq!((s.endpoint, s.relay, s.ports), (None, None, None));

        let s = status(
            &label(),
            &Outcome::Rejected("nodePort 30443 is already allocated".into()),
            &at(1),
        );
        assert_eq!(ready(&s).reason, "ApplyRejected");
        assert_eq!(s.relay, None);
    }

    #[test]
    fn transition_time_changes_only_with_the_status() {
        let mut l = label();
        let first = status(&l, &applied(Err("waiting".into()), false), &at(100));
        l.status = Some(first.clone());
        // Another False reason: same transition time, new reason and message.
        let second = status(&l, &applied(Ok(exposure()), false), &at(200));
        assert_eq!(ready(&second).last_transition_time, at(100));
        assert_eq!(ready(&second).reason, "RelayNotReady");
        l.status = Some(second);
        // True: a transition.
        let third = status(&l, &applied(Ok(exposure()), true), &at(300));
        assert_eq!(ready(&third).last_transition_time, at(300));
        l.status = Some(third.clone());
        // Nothing new: the same status, so no write is needed.
        assert_eq!(status(&l, &applied(Ok(exposure()), true), &at(400)), third);
        assert!(is_ready(&l));
        assert_eq!(current_reason(l.status.as_ref()), Some("Ready"));
    }

    #[test]
    fn generation_is_observed() {
        let mut l = label();
        l.metadata.generation = Some(4);
        let s = status(&l, &applied(Ok(exposure()), true), &at(1));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(ready(&s).observed_generation, Some(4));
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(host_port("2001:db8::7", 21000), "[2001:db8::7]:21000");
        assert_eq!(host_port("lb.example.net", 443), "lb.example.net:443");
    }

    #[test]
    fn reasons_that_need_a_user() {
        for reason in [
            Reason::Ready,
            Reason::WaitingForAddress,
            Reason::RelayNotReady,
        ] {
            assert!(!reason.needs_user_fix());
        }
        for reason in [
            Reason::SecretMissing,
            Reason::ForeignObject,
            Reason::LabelConflict,
            Reason::InvalidSpec,
            Reason::ApplyRejected,
        ] {
            assert!(reason.needs_user_fix());
        }
    }
}
