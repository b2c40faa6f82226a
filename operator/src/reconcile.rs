//! One reconcile of one `TaasLabel`: dereference → validate → build → apply → status.
//!
//! 1. dereference: the label's Secret, any existing objects under its child names (to
//!    refuse foreign ones), in edge mode for a label without a Service of its own the
//!    gateway's Service (`--edge-service`), and for a NodePort Service (either) the nodes;
//! 2. validate ([`crate::validate`], pure);
//! 3. unless a problem blocks it (when the cluster's policy refuses the label, a relay it
//!    already has is scaled to zero), build ([`crate::build`], pure) and server-side apply, in this
//!    order: the Service `taas-X` (its answer carries the allocated node ports, cluster IP and
//!    load balancer address; not made in edge mode for a label without a Service type, whose
//!    address is the gateway Service's), the Service `taas-X-control`, the ConfigMap (whose
//!    `external.yaml` is derived from that address), the Deployment, and with several
//!    replicas the PodDisruptionBudget (deleted, before the Deployment is scaled down, when
//!    the label goes back to one: [`build::budget_action`]). Several replicas with a Service
//!    of the label's own ([`build::per_pod_services`]) get a Service per pod `taas-X-i`
//!    instead of `taas-X` and a StatefulSet instead of the Deployment; switching between the
//!    two deletes what the other way made (each checked to be the label's, by UID), and
//!    scaling down deletes the Services of the pods gone;
//! 4. status ([`crate::status`], pure) written only when it changed, and an event when the
//!    Ready reason changed.
//!
//! Problems only a user can fix end the reconcile successfully (they are in the status and
//! an event) and requeue it slowly; API errors are returned and retried with exponential
//! backoff ([`error_policy`]).

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use serde::Serialize;
use taas_crds::{ServiceType, TaasLabel, TaasLabelStatus};

use crate::budget::{self, BudgetVersion};
use crate::build::BudgetAction;
use crate::metrics::Metrics;
use crate::names::{self, FIELD_MANAGER};
use crate::settings::Settings;
use crate::status::{self, Outcome, Reason, Replicas};
use crate::validate::{self, Observed, Problem};
use crate::{address, build, edge};

/// How soon a label is looked at again when nothing else triggers it.
const REQUEUE_READY: Duration = Duration::from_secs(600);
const REQUEUE_PROGRESSING: Duration = Duration::from_secs(60);
/// Backoff after API errors: 1 s, 2 s, 4 s, ... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing {what}: {source}")]
    Yaml {
        what: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("the TaasLabel has no metadata.{0}")]
    Metadata(&'static str),
}

impl Error {
    /// The `reason` label of the failures metric.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::Yaml { .. } => "yaml",
            Error::Metadata(_) => "metadata",
        }
    }
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    /// Every `TaasLabel` the controller watches (for LABEL conflicts and routes).
    pub labels: Store<TaasLabel>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The time for status conditions (whole seconds, as the API server stores them).
    pub now: fn() -> Time,
    /// Consecutive failures per label, for the backoff.
    failures: Mutex<HashMap<ObjectRef<TaasLabel>, u32>>,
    /// The PodDisruptionBudget version the API server serves: found at start
    /// ([`Context::set_budget_version`]) or at the first label that needs a budget.
    budget_version: OnceLock<BudgetVersion>,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        labels: Store<TaasLabel>,
        metrics: Metrics,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_string(),
                instance: None,
            },
        );
        Self {
            client,
            settings,
            labels,
            recorder,
            metrics,
            now: now_seconds,
            failures: Mutex::default(),
            budget_version: OnceLock::new(),
        }
    }

    /// Records the PodDisruptionBudget version the API server serves (the controller asks
    /// once at start).
    pub fn set_budget_version(&self, version: BudgetVersion) {
        let _ = self.budget_version.set(version);
    }

    /// The PodDisruptionBudget version, asked of the API server the first time if nobody
    /// has yet (a failure is returned and the next reconcile asks again).
    async fn budget_version(&self) -> Result<BudgetVersion, Error> {
        if let Some(version) = self.budget_version.get() {
            return Ok(*version);
        }
        let version = budget::discover(&self.client).await.map_err(kube_error(
            "discovering the PodDisruptionBudget API version",
        ))?;
        Ok(*self.budget_version.get_or_init(|| version))
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<TaasLabel>, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Now, in whole seconds.
pub fn now_seconds() -> Time {
    let now = k8s_openapi::jiff::Timestamp::now();
    Time(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// The controller's reconcile function.
pub async fn reconcile(label: Arc<TaasLabel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_label(&label, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    match &result {
        Ok(Some(reason)) if reason.needs_user_fix() => ctx.metrics.failed(reason.as_str()),
        Ok(_) => {}
        Err(error) => ctx.metrics.failed(error.metric_reason()),
    }
    if result.is_ok() {
        ctx.failures().remove(&ObjectRef::from_obj(label.as_ref()));
    }
    Ok(match result? {
        None => Action::await_change(),
        Some(reason) if reason.needs_user_fix() => Action::requeue(ctx.settings.user_fix_requeue),
        Some(Reason::Ready) => Action::requeue(REQUEUE_READY),
        Some(_) => Action::requeue(REQUEUE_PROGRESSING),
    })
}

/// After an error: retry with exponential backoff (1 s, 2 s, 4 s, ... 5 min).
pub fn error_policy(label: Arc<TaasLabel>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures();
    let count = failures
        .entry(ObjectRef::from_obj(label.as_ref()))
        .or_default();
    *count = count.saturating_add(1);
    let delay = backoff(*count);
    tracing::warn!(
        namespace = names::namespace(&label),
        name = names::object_name(&label),
        %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// The delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF)
}

/// Reconciles one label; the Ready reason it ended with (`None`: nothing to do).
async fn reconcile_label(label: &TaasLabel, ctx: &Context) -> Result<Option<Reason>, Error> {
    if label.metadata.deletion_timestamp.is_some() {
        // Being deleted: garbage collection removes the children, the routes drop it.
        return Ok(None);
    }
    if label.metadata.uid.is_none() {
        return Err(Error::Metadata("uid"));
    }
    let observed = dereference(label, ctx).await?;
    let problems = validate::validate_with_edge(
        label,
        &observed,
        &ctx.labels.state(),
        &ctx.settings.policy,
        ctx.settings.edge.as_ref(),
    );
    let outcome = if problems.iter().any(Problem::blocks_apply) {
        if problems.iter().any(Problem::stops_relay) {
            if observed.ours("Deployment", label) {
                let stopped = build::stopped_deployment(label, &ctx.settings);
                apply(
                    &namespaced::<Deployment>(ctx, label),
                    "Deployment",
                    &stopped,
                )
                .await?;
            }
            if observed.ours("StatefulSet", label) {
                let stopped = build::stopped_stateful_set(label, &ctx.settings);
                apply(
                    &namespaced::<StatefulSet>(ctx, label),
                    "StatefulSet",
                    &stopped,
                )
                .await?;
            }
        }
        Outcome::Blocked(problems)
    } else {
        match apply_objects(label, ctx, &observed, problems).await {
            Ok(outcome) => outcome,
            Err(Error::Kube {
                action,
                source: kube::Error::Api(status),
            }) if status.code == 422 => Outcome::Rejected(format!("{action}: {}", status.message)),
            Err(error) => return Err(error),
        }
    };
    let status = status::status(label, &outcome, &(ctx.now)());
    let (reason, message) = status::ready_reason(&outcome);
    write_status(label, ctx, &status).await?;
    if status::current_reason(label.status.as_ref()) != Some(reason.as_str()) {
        publish_event(label, ctx, reason, message).await;
    }
    Ok(Some(reason))
}

fn namespaced<K>(ctx: &Context, label: &TaasLabel) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(ctx.client.clone(), names::namespace(label))
}

/// Reads what the label refers to. The label's own Secret is read whole (`get`), to tell a
/// missing key from a missing Secret in the status; no other Secret's data is ever asked for
/// (the controller watches Secrets' metadata only).
async fn dereference(label: &TaasLabel, ctx: &Context) -> Result<Observed, Error> {
    let secret_name = &label.spec.secret_ref.name;
    let secret = namespaced::<Secret>(ctx, label)
        .get_opt(secret_name)
        .await
        .map_err(kube_error(format!("reading Secret {secret_name}")))?;
    let mut existing = Vec::new();
    let services = namespaced::<Service>(ctx, label);
    for name in [names::relay_name(label), names::control_name(label)] {
        if let Some(found) = get(&services, "Service", &name).await? {
            existing.push(("Service", found.metadata));
        }
    }
    let relay = names::relay_name(label);
    let mut relay_replicas = None;
    if let Some(found) = get(&namespaced::<Deployment>(ctx, label), "Deployment", &relay).await? {
        if validate::is_controlled_by(&found.metadata, label) {
            relay_replicas = found.spec.as_ref().and_then(|spec| spec.replicas);
        }
        existing.push(("Deployment", found.metadata));
    }
    let mut stateful_set_replicas = None;
    if build::per_pod_services(label, &ctx.settings) || ran_per_pod(label, &ctx.settings) {
        let api = namespaced::<StatefulSet>(ctx, label);
        if let Some(found) = get(&api, "StatefulSet", &relay).await? {
            if validate::is_controlled_by(&found.metadata, label) {
                stateful_set_replicas = found.spec.as_ref().and_then(|spec| spec.replicas);
            }
            existing.push(("StatefulSet", found.metadata));
        }
    }
    if let Some(found) = get(&namespaced::<ConfigMap>(ctx, label), "ConfigMap", &relay).await? {
        existing.push(("ConfigMap", found.metadata));
    }
    let edge = ctx.settings.edge.as_ref();
    // In edge mode, a label without a Service of its own is reached at the gateway's.
    let gateway = match edge.filter(|_| edge::through_gateway(label, edge)) {
        Some(edge) => {
            let api: Api<Service> =
                Api::namespaced(ctx.client.clone(), &ctx.settings.operator_namespace);
            get(&api, "Service", &edge.service).await?
        }
        None => None,
    };
    let gateway_node_port = gateway
        .as_ref()
        .and_then(|service| service.spec.as_ref())
        .is_some_and(|spec| spec.type_.as_deref() == Some("NodePort"));
    let own_node_port =
        edge::service_type(&label.spec, edge.is_some()) == Some(ServiceType::NodePort);
    let nodes = if own_node_port || gateway_node_port {
        Api::<Node>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(kube_error("listing nodes"))?
            .items
    } else {
        Vec::new()
    };
    Ok(Observed {
        secret,
        existing,
        nodes,
        gateway,
        relay_replicas: relay_replicas.max(stateful_set_replicas),
        stateful_set_replicas,
    })
}

/// Whether the last apply ran the label's replicas as a StatefulSet, each with a Service of
/// its own (its status counted several, and it has a Service of its own): then one reconcile
/// after it goes back to one replica looks for them, to remove them. Labels that never had
/// several cost no extra request.
fn ran_per_pod(label: &TaasLabel, settings: &Settings) -> bool {
    !edge::through_gateway(label, settings.edge.as_ref())
        && label
            .status
            .as_ref()
            .and_then(|status| status.replicas)
            .is_some_and(|n| n >= 2)
}

async fn get<K>(api: &Api<K>, kind: &str, name: &str) -> Result<Option<K>, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    api.get_opt(name)
        .await
        .map_err(kube_error(format!("reading {kind} {name}")))
}

/// Server-side apply of one object (forcing: the operator owns these fields).
async fn apply<K>(api: &Api<K>, kind: &str, object: &K) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(kube_error(format!("applying {kind} {name}")))
}

/// Applies the label's objects, its own Service first (its answer gives the external
/// address); in edge mode, a label without one is reached at the gateway Service's address.
async fn apply_objects(
    label: &TaasLabel,
    ctx: &Context,
    observed: &Observed,
    problems: Vec<Problem>,
) -> Result<Outcome, Error> {
    let services = namespaced::<Service>(ctx, label);
    let settings = &ctx.settings;
    let edge = settings.edge.as_ref();
    let desired = build::replicas(label, settings);
    let per_pod = build::per_pod_services(label, settings);
    let (exposure, external) = match edge.filter(|_| edge::through_gateway(label, edge)) {
        Some(edge) => {
            let exposure = edge::exposure(
                label,
                edge,
                observed.gateway.as_ref(),
                &observed.nodes,
                &settings.node_address_types,
            );
            // Until the gateway has an address, the relay is told its Service's name.
            let provisional = edge::provisional_external(label, edge, &settings.operator_namespace);
            let advertised = exposure.as_ref().unwrap_or(&provisional);
            let external = address::external(label, &Service::default(), Some(advertised));
            (exposure, external)
        }
        None if per_pod => {
            let mut exposures = Vec::new();
            let mut pods = Vec::new();
            for i in 0..desired {
                let service = apply(&services, "Service", &build::pod_service(label, i)).await?;
                let exposure = address::exposure(
                    label,
                    &service,
                    &observed.nodes,
                    &settings.node_address_types,
                );
                let external = address::external(label, &service, exposure.as_ref().ok());
                pods.push((names::pod_name(label, i), external));
                exposures.push(exposure);
            }
            (address::first_exposure(exposures), address::per_pod(pods))
        }
        None => {
            let service = apply(&services, "Service", &build::service(label)).await?;
            let exposure = address::exposure(
                label,
                &service,
                &observed.nodes,
                &settings.node_address_types,
            );
            let external = address::external(label, &service, exposure.as_ref().ok());
            (exposure, external)
        }
    };
    apply(
        &services,
        "Service",
        &build::control_service(label, edge.is_some()),
    )
    .await?;
    let config_map = build::config_map(label, &external).map_err(|source| Error::Yaml {
        what: "the relay's ConfigMap",
        source,
    })?;
    apply(
        &namespaced::<ConfigMap>(ctx, label),
        "ConfigMap",
        &config_map,
    )
    .await?;
    let budget_action = build::budget_action(desired, observed.relay_replicas);
    if budget_action == BudgetAction::Delete {
        delete_budget(label, ctx).await?;
    }
    let ready = if per_pod {
        let stateful_set = apply(
            &namespaced::<StatefulSet>(ctx, label),
            "StatefulSet",
            &build::stateful_set(label, settings),
        )
        .await?;
        // From one replica (a Deployment behind the label's one Service), or fewer replicas:
        // what is left goes (its pods drain; the agent parks on the StatefulSet's).
        let relay = names::relay_name(label);
        if observed.ours("Deployment", label) {
            delete_ours(
                &namespaced::<Deployment>(ctx, label),
                "Deployment",
                &relay,
                label,
            )
            .await?;
        }
        if observed.ours("Service", label) {
            delete_ours(&services, "Service", &relay, label).await?;
        }
        delete_pod_services(label, ctx, desired, observed.stateful_set_replicas).await?;
        stateful_set
            .status
            .and_then(|status| status.ready_replicas)
            .unwrap_or(0)
    } else {
        let deployment = apply(
            &namespaced::<Deployment>(ctx, label),
            "Deployment",
            &build::deployment(label, &ctx.settings),
        )
        .await?;
        if observed.ours("StatefulSet", label) {
            // Back to one replica: the StatefulSet and its pods' Services go.
            let relay = names::relay_name(label);
            let api = namespaced::<StatefulSet>(ctx, label);
            delete_ours(&api, "StatefulSet", &relay, label).await?;
            delete_pod_services(label, ctx, 0, observed.stateful_set_replicas).await?;
        }
        deployment
            .status
            .and_then(|status| status.ready_replicas)
            .unwrap_or(0)
    };
    if budget_action == BudgetAction::Apply {
        if let Some(budget) = build::pod_disruption_budget(label, settings) {
            let version = ctx.budget_version().await?;
            let api = budget_api(ctx, label, version);
            apply(
                &api,
                "PodDisruptionBudget",
                &budget::dynamic(&budget, version),
            )
            .await?;
        }
    }
    Ok(Outcome::Applied {
        problems,
        exposure,
        replicas: Replicas {
            desired: desired as i32,
            ready,
        },
        relay: names::relay_address(label, &ctx.settings.cluster_domain),
    })
}

fn budget_api(ctx: &Context, label: &TaasLabel, version: BudgetVersion) -> Api<DynamicObject> {
    Api::namespaced_with(
        ctx.client.clone(),
        names::namespace(label),
        &version.api_resource(),
    )
}

/// Deletes the label's PodDisruptionBudget if it exists and the label controls it.
async fn delete_budget(label: &TaasLabel, ctx: &Context) -> Result<(), Error> {
    let api = budget_api(ctx, label, ctx.budget_version().await?);
    let name = names::relay_name(label);
    delete_ours(&api, "PodDisruptionBudget", &name, label).await
}

/// The Services of pods `from..` of the label's StatefulSet (`taas-X-i`), up to the replicas
/// it had (`previous`): gone with their pods.
async fn delete_pod_services(
    label: &TaasLabel,
    ctx: &Context,
    from: u32,
    previous: Option<i32>,
) -> Result<(), Error> {
    let previous = previous.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    let services = namespaced::<Service>(ctx, label);
    for i in from..previous.min(taas_crds::limits::REPLICAS_MAX) {
        delete_ours(&services, "Service", &names::pod_name(label, i), label).await?;
    }
    Ok(())
}

/// Deletes the object `name` if it exists and the label controls it (never another's of the
/// same name; the UID precondition keeps a replacement made meanwhile).
async fn delete_ours<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    label: &TaasLabel,
) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(found) = get(api, kind, name).await? else {
        return Ok(());
    };
    if !validate::is_controlled_by(found.meta(), label) {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: found.meta().uid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("deleting {kind} {name}"),
            source,
        }),
    }
}

/// Writes the status (server-side apply on the status subresource) if it changed.
async fn write_status(
    label: &TaasLabel,
    ctx: &Context,
    status: &TaasLabelStatus,
) -> Result<(), Error> {
    if label.status.as_ref() == Some(status) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": taas_crds::API_VERSION,
        "kind": taas_crds::KIND,
        "metadata": {"name": label.name_any(), "namespace": names::namespace(label)},
        "status": status,
    });
    namespaced::<TaasLabel>(ctx, label)
        .patch_status(
            &label.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(kube_error("writing the status"))?;
    Ok(())
}

/// An event on the label (best effort: a failure is logged, not retried).
async fn publish_event(label: &TaasLabel, ctx: &Context, reason: Reason, message: String) {
    let event = Event {
        type_: if reason.needs_user_fix() {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.as_str().to_string(),
        note: Some(message),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &label.object_ref(&())).await {
        tracing::warn!(%error, name = names::object_name(label), "could not publish an event");
    }
}

/// The labels that use the Secret with this metadata (for the Secret watch, which sees only
/// metadata).
pub fn labels_using(all: &[Arc<TaasLabel>], secret: &ObjectMeta) -> Vec<ObjectRef<TaasLabel>> {
    let namespace = secret.namespace.as_deref().unwrap_or("default");
    let name = secret.name.as_deref().unwrap_or_default();
    all.iter()
        .filter(|label| names::namespace(label) == namespace && label.spec.secret_ref.name == name)
        .map(|label| ObjectRef::from_obj(label.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_change_wakes_the_labels_that_use_it() {
        let mut a = crate::build::tests::label();
        a.metadata.namespace = Some("team-a".into());
        let mut other_ns = a.clone();
        other_ns.metadata.namespace = Some("team-b".into());
        let mut other_secret = a.clone();
        other_secret.metadata.name = Some("office".into());
        other_secret.spec.secret_ref.name = "office-totp".into();
        let all: Vec<Arc<TaasLabel>> = [a.clone(), other_ns, other_secret]
            .into_iter()
            .map(Arc::new)
            .collect();
        let meta = ObjectMeta {
            name: Some("home-totp".into()),
            namespace: Some("team-a".into()),
            ..Default::default()
        };
        assert_eq!(labels_using(&all, &meta), vec![ObjectRef::from_obj(&a)]);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
