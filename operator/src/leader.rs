//! Optional leader election (`--leader-elect`) through a `coordination.k8s.io/v1` Lease in the
//! operator's namespace, so that several replicas can run and only one reconciles.
//!
//! The usual protocol: the holder renews the Lease every [`RENEW`]; another replica takes it
//! over once it has seen the Lease unchanged (same `resourceVersion`) for its
//! `leaseDurationSeconds`, measured on its own clock (so clock skew between nodes does not
//! matter). Every write is an optimistic-concurrency update (`resourceVersion`), so two
//! candidates never both win. A leader that cannot renew for [`RENEW_DEADLINE`] stops (the
//! process exits and is restarted as a candidate); on a graceful shutdown it releases the
//! Lease so a standby takes over at once. API calls: leases get, create, update.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

/// How long a Lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews, and how long it may fail to before giving up.
pub const RENEW: Duration = Duration::from_secs(5);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often a candidate looks at the Lease.
pub const RETRY: Duration = Duration::from_secs(2);

/// What a candidate should do about the Lease it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is none: create it, holding it.
    Create,
    /// It is ours, free, or expired: write ourselves in (renew or take over).
    Take,
    /// Someone else holds it.
    Wait,
}

/// The decision for `lease`, seen unchanged for `unchanged_for`.
pub fn decide(lease: Option<&Lease>, identity: &str, unchanged_for: Duration) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
        None => Decision::Take,
        Some(holder) if holder == identity => Decision::Take,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(LEASE_DURATION, Duration::from_secs);
            if unchanged_for >= duration {
                Decision::Take
            } else {
                Decision::Wait
            }
        }
    }
}

/// `current` (or a new Lease named `name`) held by `identity` as of `now`.
pub fn claimed(current: Option<&Lease>, name: &str, identity: &str, now: MicroTime) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    let previous = spec.holder_identity.clone().filter(|h| !h.is_empty());
    if previous.as_deref() != Some(identity) {
        spec.acquire_time = Some(now.clone());
        if previous.is_some() {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    spec.holder_identity = Some(identity.to_string());
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    spec.renew_time = Some(now);
    lease.spec = Some(spec);
    lease
}

/// One candidate for leadership.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The Lease's last seen resourceVersion and when it was first seen.
    seen: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: String) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity,
            seen: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How long `lease` has been seen unchanged.
    fn unchanged_for(&mut self, lease: Option<&Lease>) -> Duration {
        let version = lease
            .and_then(|l| l.metadata.resource_version.clone())
            .unwrap_or_default();
        match &self.seen {
            Some((seen, since)) if *seen == version => since.elapsed(),
            _ => {
                self.seen = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }

    /// One look at the Lease: whether we hold it afterwards.
    async fn try_hold(&mut self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let unchanged_for = self.unchanged_for(current.as_ref());
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let result = match decide(current.as_ref(), &self.identity, unchanged_for) {
            Decision::Wait => return Ok(false),
            Decision::Create => {
                let lease = claimed(None, &self.name, &self.identity, now);
                self.api.create(&PostParams::default(), &lease).await
            }
            Decision::Take => {
                let lease = claimed(current.as_ref(), &self.name, &self.identity, now);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote first (409 Conflict / AlreadyExists).
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&mut self) {
        let mut said = false;
        loop {
            match self.try_hold().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "leader");
                    return;
                }
                Ok(false) if !said => {
                    tracing::info!(lease = %self.name, "standing by: another replica leads");
                    said = true;
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election: cannot read the Lease"),
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Renews the Lease; returns when leadership is lost (someone else holds it, or no
    /// renewal succeeded for [`RENEW_DEADLINE`]).
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RENEW).await;
            match self.try_hold().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    tracing::error!("leader election: another replica took the Lease");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "leader election: renewal failed");
                    if renewed.elapsed() >= RENEW_DEADLINE {
                        tracing::error!("leader election: could not renew the Lease in time");
                        return;
                    }
                }
            }
        }
    }

    /// Gives the Lease up (best effort), so that a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        // Expire at once for candidates reading it.
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("leader election: Lease released"),
            Err(error) => tracing::warn!(%error, "leader election: could not release the Lease"),
        }
    }
}

/// A unique identity for this process: the host (pod) name and a suffix from the start time.
pub fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "taas-operator".to_string());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}_{:08x}", nanos ^ std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    fn lease(holder: Option<&str>, duration: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("taas-operator".into()),
                resource_version: Some("5".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: duration,
                ..Default::default()
            }),
        }
    }

    fn at(second: i64) -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn decisions() {
        let s = Duration::from_secs;
        assert_eq!(decide(None, "me", s(0)), Decision::Create);
        assert_eq!(decide(Some(&lease(None, None)), "me", s(0)), Decision::Take);
        assert_eq!(
            decide(Some(&lease(Some(""), None)), "me", s(0)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some("me"), Some(15))), "me", s(0)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some("them"), Some(15))), "me", s(14)),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&lease(Some("them"), Some(15))), "me", s(15)),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&lease(Some("them"), None)), "me", s(14)),
            Decision::Wait
        );
        assert_eq!(
            decide(Some(&lease(Some("them"), Some(1))), "me", s(1)),
            Decision::Take
        );
    }

    #[test]
    fn claiming_counts_transitions_and_keeps_the_acquire_time_on_renewal() {
        let new = claimed(None, "taas-operator", "me", at(100));
        let spec = new.spec.clone().unwrap();
        assert_eq!(new.metadata.name.as_deref(), Some("taas-operator"));
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.acquire_time, Some(at(100)));
        assert_eq!(spec.renew_time, Some(at(100)));
        assert_eq!(spec.lease_transitions, None);

        let renewed = claimed(Some(&new), "taas-operator", "me", at(105));
        let spec = renewed.spec.unwrap();
        assert_eq!(spec.acquire_time, Some(at(100)));
        assert_eq!(spec.renew_time, Some(at(105)));

        let taken = claimed(Some(&lease(Some("them"), Some(15))), "x", "me", at(200));
        let spec = taken.spec.unwrap();
        assert_eq!(taken.metadata.resource_version.as_deref(), Some("5"));
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.acquire_time, Some(at(200)));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[test]
    fn identities_name_the_host() {
        assert!(identity().contains('_'));
    }
}
