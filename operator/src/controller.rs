//! The controller: watches TaasLabels (all namespaces, or one), the Deployments, Services and
//! ConfigMaps it made (by label), and Secrets' metadata only (mapped to the TaasLabels that
//! use them: a change of a Secret's data changes its resourceVersion, which is all the
//! trigger needs, so no Secret's data is ever cached here), and in edge mode the gateway's
//! Service (mapped to every label: its address is theirs), and the PodDisruptionBudgets it
//! made (metadata only, in the version the API server serves, asked once at start); runs
//! [`reconcile`] for each change, the routes publisher beside it, and stops gracefully on
//! SIGTERM or Ctrl-C (reconciles in flight finish). With leader election, all of that starts
//! only once this replica holds the Lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::NamespaceResourceScope;
use kube::core::{DynamicObject, PartialObjectMeta};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller, WatchStreamExt as _};
use kube::{Api, Client, Resource};
use taas_crds::TaasLabel;

use crate::budget;
use crate::leader::Elector;
use crate::metrics::Metrics;
use crate::names::MANAGED_SELECTOR;
use crate::reconcile::{error_policy, labels_using, reconcile, Context};
use crate::routes;
use crate::settings::Settings;

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Every Secret that changes (in `namespace`, or all), as metadata only: an Api of
/// `PartialObjectMeta` asks the API server for `PartialObjectMetadataList`s, so no Secret's
/// data ever reaches (or stays in) the operator.
pub fn secret_changes(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static {
    watcher(
        api::<PartialObjectMeta<Secret>>(client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
}

/// Every change of the gateway's Service (`--edge-service`, in the operator's namespace; a
/// field selector watches that one object), or nothing outside edge mode.
pub fn gateway_changes(
    client: &Client,
    settings: &Settings,
) -> futures::stream::BoxStream<'static, Result<Service, watcher::Error>> {
    match &settings.edge {
        Some(edge) => watcher(
            Api::<Service>::namespaced(client.clone(), &settings.operator_namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", edge.service)),
        )
        .default_backoff()
        .touched_objects()
        .boxed(),
        None => futures::stream::empty().boxed(),
    }
}

/// Leadership was lost: the process should exit (and be restarted as a candidate).
#[derive(Debug, thiserror::Error)]
#[error("lost the leader election Lease")]
pub struct LostLeadership;

/// Resolves on Ctrl-C, or SIGTERM (how Kubernetes stops a pod).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Runs the operator until a shutdown signal. `ready` is true while a standby waits for the
/// Lease (so rolling updates proceed), and for the leader once the TaasLabels are listed.
pub async fn run(
    client: Client,
    settings: Settings,
    namespace: Option<String>,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    mut elector: Option<Elector>,
) -> Result<(), LostLeadership> {
    if let Some(elector) = elector.as_mut() {
        ready.store(true, Ordering::Relaxed);
        tracing::info!(identity = elector.identity(), "leader election: candidate");
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
        ready.store(false, Ordering::Relaxed);
    }
    let ns = namespace.as_deref();
    // Which PodDisruptionBudget API the cluster serves: asked once. If the API server cannot
    // say now, budgets are not watched, and the first label that needs one asks again.
    let budget_version = match budget::discover(&client).await {
        Ok(version) => {
            tracing::info!(version = version.version(), "PodDisruptionBudget API");
            Some(version)
        }
        Err(error) => {
            tracing::warn!(%error, "could not discover the PodDisruptionBudget API version");
            None
        }
    };
    let controller = Controller::new(api::<TaasLabel>(&client, ns), watcher::Config::default());
    let labels = controller.store();
    let ours = watcher::Config::default().labels(MANAGED_SELECTOR);
    let secret_labels = labels.clone();
    let gateway_labels = labels.clone();
    let controller = controller
        .owns(api::<Deployment>(&client, ns), ours.clone())
        .owns(api::<StatefulSet>(&client, ns), ours.clone())
        .owns(api::<Service>(&client, ns), ours.clone())
        .owns(api::<ConfigMap>(&client, ns), ours.clone())
        .watches_stream(secret_changes(&client, ns), move |secret| {
            labels_using(&secret_labels.state(), &secret.metadata)
        })
        // In edge mode: a change of the gateway's Service (its address, its ports) is every
        // label's address change. Outside edge mode the stream is empty.
        .watches_stream(
            gateway_changes(&client, &settings),
            move |_: Service| -> Vec<ObjectRef<TaasLabel>> {
                gateway_labels
                    .state()
                    .iter()
                    .map(|label| ObjectRef::from_obj(label.as_ref()))
                    .collect()
            },
        )
        .shutdown_on_signal();
    // A label's budget deleted or changed by hand is put back.
    let controller = match budget_version {
        Some(version) => {
            let resource = version.api_resource();
            let api = match ns {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource),
                None => Api::<DynamicObject>::all_with(client.clone(), &resource),
            };
            controller.owns_with(api, resource, ours)
        }
        None => controller,
    };

    let context = Context::new(client.clone(), settings.clone(), labels, metrics);
    if let Some(version) = budget_version {
        context.set_budget_version(version);
    }
    let context = Arc::new(context);
    let publisher = tokio::spawn(routes::run(
        client.clone(),
        settings,
        api::<TaasLabel>(&client, ns),
        ready,
    ));

    tracing::info!(namespace = ns.unwrap_or("(all)"), "watching TaasLabels");
    let controller =
        controller
            .run(reconcile, error_policy, context)
            .for_each(|result| async move {
                match result {
                    Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                    // Reconcile errors are logged by the error policy; these are watch errors.
                    Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                    // A child changed after its TaasLabel was deleted: nothing to do.
                    Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                        tracing::debug!(%object, "gone")
                    }
                    Err(error) => tracing::warn!(%error, "controller"),
                }
            });
    let result = {
        let lost = async {
            match elector.as_mut() {
                Some(elector) => elector.hold().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = controller => Ok(()),
            _ = lost => Err(LostLeadership),
        }
    };
    publisher.abort();
    if let (Ok(()), Some(elector)) = (&result, &elector) {
        elector.release().await;
    }
    tracing::info!("stopped");
    result
}
