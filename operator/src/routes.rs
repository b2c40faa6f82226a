//! The gateways' routes: a ConfigMap (`--routes-configmap` in `--operator-namespace`) whose
//! `routes.yaml` is the gateway's `--routes-file` format,
//! `LABEL: {relay: "taas-X-control.N.svc.<cluster domain>.:8080", ready: true|false}`, one
//! entry per LABEL, pointing at the TaasLabel that won it (the oldest of those the cluster's
//! label policy lets claim it; see [`crate::validate::winners`]). `ready` is the label's
//! Ready condition. In edge mode each entry also has `edge` (the relay's edge port,
//! `taas-X-control.N.svc.<cluster domain>.:21001`), `direct: true` for a direct label, and,
//! for a label reached through the gateway's Service, `rendezvous: [T, ...]` (its slice of
//! the shared range, in the order of the relay's local p ports).
//!
//! Rebuilt on every change of any TaasLabel (its status included, and deletions, for which
//! there is no reconcile) and applied (server-side) only when the table changed, plus every
//! few minutes in case someone edited it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube::{Api, Client};
use serde::Serialize;
use taas_crds::TaasLabel;

use crate::edge;
use crate::names::{self, FIELD_MANAGER};
use crate::settings::Settings;
use crate::status;
use crate::validate::winners;

/// How often the routes are re-applied unchanged, and the pause after a failed apply.
const REFRESH: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

/// One route, as the gateway reads it. The edge fields are written in edge mode only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub relay: String,
    pub ready: bool,
    /// The relay's edge port ([`names::edge_address`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge: Option<String>,
    /// The label is direct: its HTTPS connections go raw to its relay's edge port.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub direct: bool,
    /// Its public rendezvous ports (its slice of the shared range) in the order of the relay's
    /// local p ports; empty for a label with a Service of its own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rendezvous: Vec<u16>,
}

/// LABEL → route for every LABEL some TaasLabel wins (a label the policy refuses wins
/// nothing).
pub fn routes(all: &[Arc<TaasLabel>], settings: &Settings) -> BTreeMap<String, Route> {
    winners(all, &settings.policy)
        .into_iter()
        .map(|(label, winner)| {
            let edge = settings.edge.as_ref();
            let route = Route {
                relay: names::relay_address(&winner, &settings.cluster_domain),
                ready: status::is_ready(&winner),
                edge: edge.map(|_| names::edge_address(&winner, &settings.cluster_domain)),
                direct: edge.is_some() && winner.spec.direct,
                rendezvous: match edge {
                    Some(e) if edge::through_gateway(&winner, edge) => {
                        edge::label_slice(&winner, e)
                    }
                    _ => Vec::new(),
                },
            };
            (label, route)
        })
        .collect()
}

/// The routes ConfigMap holding `routes`.
pub fn config_map(
    settings: &Settings,
    routes: &BTreeMap<String, Route>,
) -> Result<ConfigMap, serde_yaml::Error> {
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(settings.routes_configmap.clone()),
            namespace: Some(settings.operator_namespace.clone()),
            labels: Some(BTreeMap::from([(
                names::MANAGED_BY_LABEL.to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            names::ROUTES_KEY.to_string(),
            serde_yaml::to_string(routes)?,
        )])),
        ..Default::default()
    })
}

/// Applies the routes ConfigMap.
pub async fn publish(client: &Client, config_map: &ConfigMap) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(
        client.clone(),
        config_map
            .metadata
            .namespace
            .as_deref()
            .unwrap_or("default"),
    );
    api.patch(
        config_map.metadata.name.as_deref().unwrap_or_default(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(config_map),
    )
    .await?;
    Ok(())
}

/// Keeps the routes ConfigMap in step with the TaasLabels `labels` lists and watches, until
/// the task is dropped. It keeps its own cache (a second watch of the TaasLabels), so it sees
/// every change, deletions included, and knows when its first full list is in: it never
/// publishes a partial table, and sets `ready` then (the operator's `/readyz`).
///
/// (Not the controller's cache: kube's `Store::wait_until_ready` wakes only one waiter, and the
/// controller is already waiting on its own store.)
pub async fn run(
    client: Client,
    settings: Settings,
    labels: Api<TaasLabel>,
    ready: Arc<AtomicBool>,
) {
    let (cache, writer) = reflector::store();
    let mut events = reflector(writer, watcher(labels, watcher::Config::default()))
        .default_backoff()
        .boxed();
    let mut synced = false;
    let mut published: Option<(BTreeMap<String, Route>, Instant)> = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::InitDone)) if !synced => {
                    synced = true;
                    ready.store(true, Ordering::Relaxed);
                    tracing::info!(labels = cache.len(), "TaasLabels listed: ready");
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => tracing::warn!(%error, "watching TaasLabels for the routes"),
                None => return,
            },
            _ = tokio::time::sleep(REFRESH) => {}
        }
        if !synced {
            continue;
        }
        let routes = routes(&cache.state(), &settings);
        let due = match &published {
            Some((last, at)) => *last != routes || at.elapsed() >= REFRESH,
            None => true,
        };
        if !due {
            continue;
        }
        let result = match config_map(&settings, &routes) {
            Ok(config_map) => publish(&client, &config_map)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match result {
            Ok(()) => {
                tracing::info!(labels = routes.len(), "routes published");
                published = Some((routes, Instant::now()));
            }
            Err(error) => {
                tracing::warn!(%error, "could not publish the routes (retrying)");
                published = None;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::label;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use taas_crds::{Condition, ConditionStatus, TaasLabelStatus};

    fn labelled(
        namespace: &str,
        name: &str,
        label_name: &str,
        second: i64,
        ready: bool,
    ) -> Arc<TaasLabel> {
        let mut l = label();
        l.metadata.namespace = Some(namespace.into());
        l.metadata.name = Some(name.into());
        l.spec.label = label_name.into();
        let time = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + second).unwrap());
        l.metadata.creation_timestamp = Some(time.clone());
        l.status = Some(TaasLabelStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: if ready {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                reason: "x".into(),
                message: String::new(),
                last_transition_time: time,
                observed_generation: None,
            }],
            ..Default::default()
        });
        Arc::new(l)
    }

    #[test]
    fn one_route_per_label_to_the_winner() {
        let all = vec![
            labelled("b", "home2", "home", 5, true),
            labelled("a", "home", "home", 1, false),
            labelled("a", "office", "office.example", 1, true),
        ];
        let settings = Settings::default();
        let cm = config_map(&settings, &routes(&all, &settings)).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("taas-routes"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("taas-system"));
        assert_eq!(
            cm.data.unwrap()["routes.yaml"],
            "home:\n  relay: taas-home-control.a.svc.cluster.local.:8080\n  ready: false\n\
             office.example:\n  relay: taas-office-control.a.svc.cluster.local.:8080\n  ready: true\n"
        );
    }

    #[test]
    fn deleted_labels_drop_out() {
        let mut going = (*labelled("a", "home", "home", 1, true)).clone();
        going.metadata.deletion_timestamp = going.metadata.creation_timestamp.clone();
        let all = vec![Arc::new(going), labelled("b", "home", "home", 5, true)];
        let routes = routes(&all, &Settings::default());
        assert_eq!(
            routes["home"].relay,
            "taas-home-control.b.svc.cluster.local.:8080"
        );
        assert_eq!(super::routes(&[], &Settings::default()), BTreeMap::new());
        assert_eq!(
            config_map(&Settings::default(), &BTreeMap::new())
                .unwrap()
                .data
                .unwrap()["routes.yaml"],
            "{}\n"
        );
    }

    #[test]
    fn the_gateway_format_parses() {
        // The gateway's reader: `LABEL: {relay: HOST:PORT, ready: BOOL}`.
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct GatewayRoute {
            relay: String,
            ready: bool,
        }
        let all = vec![labelled("a", "home", "home", 1, true)];
        let yaml = config_map(&Settings::default(), &routes(&all, &Settings::default()))
            .unwrap()
            .data
            .unwrap()["routes.yaml"]
            .clone();
        let parsed: BTreeMap<String, GatewayRoute> = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(
            parsed["home"],
            GatewayRoute {
                relay: "taas-home-control.a.svc.cluster.local.:8080".into(),
                ready: true
            }
        );
    }

    #[test]
    fn in_edge_mode_routes_name_the_edge_port_the_direct_labels_and_the_slices() {
        let settings = Settings {
            edge: Some(crate::edge::tests::edge_settings()),
            ..Settings::default()
        };
        let home = labelled("a", "home", "home", 1, true);
        let mut direct = (*labelled("a", "web", "web", 1, true)).clone();
        direct.spec.direct = true;
        let mut own = (*labelled("a", "own", "own", 1, true)).clone();
        own.spec.service.type_ = Some(taas_crds::ServiceType::LoadBalancer);
        let all = vec![home.clone(), Arc::new(direct), Arc::new(own)];
        let routes = routes(&all, &settings);
        let slice = crate::edge::label_slice(&home, settings.edge.as_ref().unwrap());
        assert_eq!(
            routes["home"],
            Route {
                relay: "taas-home-control.a.svc.cluster.local.:8080".into(),
                ready: true,
                edge: Some("taas-home-control.a.svc.cluster.local.:21001".into()),
                direct: false,
                rendezvous: slice.clone(),
            }
        );
        assert!(routes["web"].direct);
        // A label with its own Service is still reached on its edge port for clients, but
        // its hidden server comes to its own Service's ports.
        assert_eq!(
            routes["own"].edge.as_deref(),
            Some("taas-own-control.a.svc.cluster.local.:21001")
        );
        assert_eq!(routes["own"].rendezvous, Vec::<u16>::new());
        let yaml = config_map(&settings, &routes).unwrap().data.unwrap()["routes.yaml"].clone();
        assert!(
            yaml.contains(&format!(
                "home:\n  relay: taas-home-control.a.svc.cluster.local.:8080\n  ready: true\n  \
                 edge: taas-home-control.a.svc.cluster.local.:21001\n  rendezvous:\n  - {}\n  - {}\n",
                slice[0], slice[1]
            )),
            "{yaml}"
        );
        assert!(yaml.contains("  direct: true\n"), "{yaml}");
        // Outside edge mode none of the three fields is written, even for a direct label.
        let mut direct = (*labelled("a", "web", "web", 1, true)).clone();
        direct.spec.direct = true;
        let plain = super::routes(&[Arc::new(direct)], &Settings::default());
        let yaml = config_map(&Settings::default(), &plain)
            .unwrap()
            .data
            .unwrap()["routes.yaml"]
            .clone();
        assert_eq!(
            yaml,
            "web:\n  relay: taas-web-control.a.svc.cluster.local.:8080\n  ready: true\n"
        );
    }

    #[test]
    fn routes_follow_the_cluster_domain() {
        let settings = Settings {
            cluster_domain: "k8s.example.org".into(),
            ..Settings::default()
        };
        let all = vec![labelled("a", "home", "home", 1, true)];
        assert_eq!(
            routes(&all, &settings)["home"].relay,
            "taas-home-control.a.svc.k8s.example.org.:8080"
        );
    }

    #[test]
    fn a_label_the_policy_refuses_gets_no_route_and_takes_no_label() {
        let settings = Settings {
            policy: crate::policy::TenantPolicy::from_yaml("labels: {owner: [home]}").unwrap(),
            ..Settings::default()
        };
        // The squatter is older, but its namespace may not claim "home".
        let squatter = labelled("squatter", "home", "home", 1, true);
        assert_eq!(
            routes(std::slice::from_ref(&squatter), &settings),
            BTreeMap::new()
        );
        let owner = labelled("owner", "home", "home", 5, false);
        let routes = routes(&[squatter, owner], &settings);
        assert_eq!(
            routes["home"].relay,
            "taas-home-control.owner.svc.cluster.local.:8080"
        );
    }
}
