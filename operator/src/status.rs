//! A label's status from what the reconcile found and applied (pure functions).
//!
//! One condition, `Ready`, with a reason naming the first thing in the way:
//!
//! | reason | status | meaning |
//! |---|---|---|
//! | `Ready` | True | the relay is ready and reachable at `endpoint` |
//! | `WaitingForAddress` | False | the Service has no external address yet |
//! | `RelayNotReady` | False | the relay pod is not ready (yet) |
//! | `SecretMissing` | False | the Secret or its key is missing (the pod waits for it) |
//! | `ForeignObject` | False | a same-named object the operator does not control is in the way |
//! | `LabelConflict` | False | an older TaasLabel serves this LABEL |
//! | `InvalidSpec` | False | the spec breaks a rule of the CRD, or its ports cannot make valid objects |
//! | `LabelNotAllowed` | False | the cluster's label policy does not let this namespace claim the LABEL |
//! | `ServiceNotAllowed` | False | the cluster's service policy refuses the Service type, an annotation or the pinned port |
//! | `ApplyRejected` | False | the API server refused an object (e.g. a node port in use) |
//!
//! `lastTransitionTime` changes only when the condition's status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use taas_crds::{Condition, ConditionStatus, StatusPorts, TaasLabel, TaasLabelStatus};

use crate::address::Exposure;
use crate::validate::Problem;

pub const READY: &str = "Ready";

/// Why a label is (not) ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Ready,
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
            Reason::Ready | Reason::WaitingForAddress | Reason::RelayNotReady
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
        /// Whether the relay Deployment has a ready pod.
        relay_ready: bool,
        /// Where the gateways reach the relay ([`names::relay_address`]).
        relay: String,
    },
    /// The API server refused an object: its message.
    Rejected(String),
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
        exposure, relay, ..
    } = outcome
    {
        status.relay = Some(relay.clone());
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
            relay_ready,
            ..
        } => {
            if let Some(first) = problems.first() {
                (first.reason, joined(problems))
            } else if let Err(why) = exposure {
                (Reason::WaitingForAddress, why.clone())
            } else if !relay_ready {
                (
                    Reason::RelayNotReady,
                    "the relay pod is not ready yet".to_string(),
                )
            } else {
                (Reason::Ready, "the relay is ready".to_string())
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
    let status = if reason == Reason::Ready {
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
        Outcome::Applied {
            problems: vec![],
            exposure,
            relay_ready,
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
                    message: "the relay is ready".into(),
                    last_transition_time: at(100),
                    observed_generation: Some(1),
                }],
                endpoint: Some("203.0.113.7:21000".into()),
                relay: Some("taas-home-control.default.svc.cluster.local.:8080".into()),
                ports: Some(StatusPorts {
                    client: 21000,
                    rendezvous: vec![20000, 20001]
                }),
                parked: None,
            }
        );
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
            relay_ready: false,
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
