//! The objects a label needs, built from its spec and the operator's settings (pure and
//! deterministic: the same inputs give byte-identical apply bodies, so re-applying them
//! changes nothing).
//!
//! For a `TaasLabel` `X` in namespace `N`, all controlled by it (garbage collection removes
//! them with it):
//! - Service `taas-X`: the external face (`client` → the pod's q, `p0..` → its p pool);
//! - Service `taas-X-control`: ClusterIP, the relay's control port, where gateways forward;
//! - ConfigMap `taas-X`: `label.yaml` (the TaasLabel manifest) and `external.yaml` (the
//!   external host and ports), mounted into the relay, which re-reads both;
//! - Deployment `taas-X`: the relay pods, `spec.replicas` of them or the install's default
//!   ([`replicas`]), replaced by surge (a new pod is ready before an old one stops), spread
//!   over nodes when there are several;
//! - or, for several replicas of a label with a Service of its own ([`per_pod_services`]),
//!   StatefulSet `taas-X` (pods `taas-X-0`, `taas-X-1`, ...) and instead of `taas-X` one
//!   Service per pod, `taas-X-i`, selecting that pod alone: each replica has an address of its
//!   own, which its relay names in its registration answers and 307s (`external.yaml` lists
//!   every pod's under `pods:`), so a hidden server's rendezvous connection always reaches
//!   the replica that granted its registration;
//! - PodDisruptionBudget `taas-X` (several replicas only): a drain evicts one at a time.
//!
//! The pod template depends only on the settings, the object name, the Secret's name, the
//! number of rendezvous ports, the LABEL (immutable; it makes the gateway token) and whether
//! there are several replicas (the spread constraint): every other spec change, and every
//! address change, reaches the running relay through the mounted ConfigMap and Secret,
//! without a restart.
//!
//! With an install secret (`--gateway-secret-file`), the relay container gets the gateway
//! token of its LABEL in `TAAS_GATEWAY_TOKEN` ([`taas_protocol::gateway_auth`]): its control
//! port then answers only requests carrying it, which only this install's gateways can
//! compute. Each label's token is its own, so whoever can read one label's Deployment learns
//! nothing that opens another label's relay. The relay gets no `--trusted-proxies`: whether
//! a request may name the client is the token's business, not its source address's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource as _;
use serde::Serialize;
use taas_crds::limits::{REPLICAS_MAX, REPLICAS_MIN};
use taas_crds::{ExternalTrafficPolicy, ServiceType, TaasLabel, TaasLabelSpec};

use crate::address::External;
use crate::names::{self, CLIENT_PORT, CONTROL_PORT, EDGE_PORT, METRICS_PORT};
use crate::settings::Settings;

/// The relay's environment variable holding its gateway token (`label-relay --gateway-token`).
pub const GATEWAY_TOKEN_ENV: &str = "TAAS_GATEWAY_TOKEN";

/// The relay's environment variable holding its pod's name (`label-relay --pod-name`), with
/// [`per_pod_services`].
pub const POD_NAME_ENV: &str = "TAAS_POD_NAME";

/// The relay runs as this non-root user (and group), as in distroless images.
pub const RELAY_UID: i64 = 65532;

/// Metadata of a child object: name, namespace, our labels, and the label as controller.
fn meta(label: &TaasLabel, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names::namespace(label).to_string()),
        labels: Some(names::labels(label)),
        owner_references: label.controller_owner_ref(&()).map(|owner| vec![owner]),
        ..Default::default()
    }
}

fn tcp(name: String, port: u16, target: u16, node_port: Option<u16>) -> ServicePort {
    ServicePort {
        name: Some(name),
        port: port.into(),
        target_port: Some(IntOrString::Int(target.into())),
        node_port: node_port.map(i32::from),
        // Kubernetes 1.20's server-side apply needs the protocol (a key of the ports list).
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

/// Service `taas-X`: the label's client port and rendezvous ports, of the spec's type
/// (`LoadBalancer` when unset; in edge mode a label without a type gets no such Service, see
/// [`crate::edge::service_type`], and this is not applied).
/// Seconds a new relay pod must have been ready before it counts as available in a rollout.
pub const MIN_READY_SECONDS: i32 = 5;

pub fn service(label: &TaasLabel) -> Service {
    service_for(
        label,
        names::relay_name(label),
        names::selector(label),
        true,
    )
}

/// Service `taas-X-i`: what [`service`] is for the whole label, for pod `i` alone (several
/// replicas with a Service of the label's own: [`per_pod_services`]). The client port keeps
/// no pinned node port (one node port cannot be two Services').
pub fn pod_service(label: &TaasLabel, i: u32) -> Service {
    let name = names::pod_name(label, i);
    let mut selector = names::selector(label);
    selector.insert(names::POD_NAME_LABEL.to_string(), name.clone());
    service_for(label, name, selector, false)
}

fn service_for(
    label: &TaasLabel,
    name: String,
    selector: BTreeMap<String, String>,
    pinned_node_port: bool,
) -> Service {
    let spec = &label.spec.service;
    let service_type = spec.type_.unwrap_or_default();
    let type_ = match service_type {
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::NodePort => "NodePort",
        ServiceType::ClusterIP => "ClusterIP",
    };
    let (client_port, client_node_port) = match service_type {
        ServiceType::NodePort => (
            CLIENT_PORT,
            label.spec.client_port.filter(|_| pinned_node_port),
        ),
        _ => (label.spec.client_port.unwrap_or(CLIENT_PORT), None),
    };
    let external = service_type != ServiceType::ClusterIP;
    let mut ports = vec![tcp(
        "client".to_string(),
        client_port,
        CLIENT_PORT,
        client_node_port,
    )];
    ports.extend(
        names::p_ports(label)
            .enumerate()
            .map(|(i, p)| tcp(format!("p{i}"), p, p, None)),
    );
    let mut metadata = meta(label, name);
    metadata.annotations = (!spec.annotations.is_empty()).then(|| spec.annotations.clone());
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_string()),
            selector: Some(selector),
            ports: Some(ports),
            external_traffic_policy: external.then(|| {
                match spec.external_traffic_policy {
                    ExternalTrafficPolicy::Local => "Local",
                    ExternalTrafficPolicy::Cluster => "Cluster",
                }
                .to_string()
            }),
            load_balancer_class: spec
                .load_balancer_class
                .clone()
                .filter(|_| service_type == ServiceType::LoadBalancer),
            ..Default::default()
        }),
        status: None,
    }
}

/// Service `taas-X-control`: the relay's control port inside the cluster (for gateways), and
/// in edge mode its edge port.
pub fn control_service(label: &TaasLabel, edge: bool) -> Service {
    let mut ports = vec![tcp("control".to_string(), CONTROL_PORT, CONTROL_PORT, None)];
    if edge {
        ports.push(tcp("edge".to_string(), EDGE_PORT, EDGE_PORT, None));
    }
    Service {
        metadata: meta(label, names::control_name(label)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            // Headless: the name resolves to the relay pod itself, so thousands of labels
            // use no cluster IPs (a /24 service range would run out at ~125 labels).
            cluster_ip: Some("None".to_string()),
            selector: Some(names::selector(label)),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

/// `label.yaml`: the TaasLabel as the relay reads it (no status; the secret stays in its
/// Secret).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LabelManifest<'a> {
    api_version: &'a str,
    kind: &'a str,
    metadata: ManifestMeta<'a>,
    spec: &'a TaasLabelSpec,
}

#[derive(Serialize)]
struct ManifestMeta<'a> {
    name: &'a str,
    namespace: &'a str,
}

/// ConfigMap `taas-X`: `label.yaml` and `external.yaml` for the relay.
pub fn config_map(label: &TaasLabel, external: &External) -> Result<ConfigMap, serde_yaml::Error> {
    let manifest = LabelManifest {
        api_version: taas_crds::API_VERSION,
        kind: taas_crds::KIND,
        metadata: ManifestMeta {
            name: names::object_name(label),
            namespace: names::namespace(label),
        },
        spec: &label.spec,
    };
    Ok(ConfigMap {
        metadata: meta(label, names::relay_name(label)),
        data: Some(BTreeMap::from([
            (
                names::LABEL_KEY.to_string(),
                serde_yaml::to_string(&manifest)?,
            ),
            (
                names::EXTERNAL_KEY.to_string(),
                serde_yaml::to_string(external)?,
            ),
        ])),
        ..Default::default()
    })
}

fn container_port(name: String, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name),
        container_port: port.into(),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn probe(path: &str) -> HTTPGetAction {
    HTTPGetAction {
        path: Some(path.to_string()),
        port: IntOrString::String("metrics".to_string()),
        ..Default::default()
    }
}

/// The relay's command line (in edge mode with `--edge`).
pub fn relay_args(label: &TaasLabel, settings: &Settings) -> Vec<String> {
    let last_p = names::p_ports(label).last().unwrap_or(names::P_PORT_BASE);
    let mut args: Vec<String> = [
        "label-relay".to_string(),
        "--label-file".to_string(),
        format!("{}/{}", names::LABEL_DIR, names::LABEL_KEY),
        "--secret-dir".to_string(),
        names::SECRET_DIR.to_string(),
        "--external-file".to_string(),
        format!("{}/{}", names::LABEL_DIR, names::EXTERNAL_KEY),
        "--control".to_string(),
        format!("0.0.0.0:{CONTROL_PORT}"),
        "--p-ports".to_string(),
        format!("{}-{last_p}", names::P_PORT_BASE),
        "--client-port".to_string(),
        CLIENT_PORT.to_string(),
        "--registrar".to_string(),
        settings.registrar.clone(),
        "--domain".to_string(),
        settings.domain.clone(),
        "--redirect-host".to_string(),
        settings.redirect_host.as_arg().to_string(),
        "--metrics".to_string(),
        format!("0.0.0.0:{METRICS_PORT}"),
        "--drain-timeout".to_string(),
        settings.relay_drain_timeout.to_string(),
    ]
    .into();
    if settings.edge.is_some() {
        args.extend(["--edge".to_string(), format!("0.0.0.0:{EDGE_PORT}")]);
    }
    args
}

/// The relay container's environment: the operator's log settings, and the label's gateway
/// token when the install has a gateway secret.
fn relay_env(label: &TaasLabel, settings: &Settings) -> Option<Vec<EnvVar>> {
    let value = |name: &str, value: String| EnvVar {
        name: name.to_string(),
        value: Some(value),
        ..Default::default()
    };
    let mut env: Vec<EnvVar> = settings
        .relay_log_env
        .iter()
        .map(|(name, v)| value(name, v.clone()))
        .collect();
    if let Some(secret) = &settings.gateway_secret {
        let token = secret.token_for(&label.spec.label);
        env.push(value(GATEWAY_TOKEN_ENV, token.expose().to_string()));
    }
    if per_pod_services(label, settings) {
        // Which entry of the external file is this pod's own address.
        env.push(EnvVar {
            name: POD_NAME_ENV.to_string(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    (!env.is_empty()).then_some(env)
}

fn quantities(pairs: [(&str, Option<&String>); 2]) -> Option<BTreeMap<String, Quantity>> {
    let map: BTreeMap<String, Quantity> = pairs
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_string(), Quantity(value?.clone()))))
        .collect();
    (!map.is_empty()).then_some(map)
}

/// How many relay replicas the label runs: `spec.replicas`; unset, the install's default
/// (`--relay-replicas`) for a label reached through the gateway, and one for a label with a
/// Service of its own (several there means a Service per replica, [`per_pod_services`]:
/// asked for, never the install's default).
/// Clamped to the CRD's bounds, which validation enforces before anything is built.
pub fn replicas(label: &TaasLabel, settings: &Settings) -> u32 {
    let default = if crate::edge::through_gateway(label, settings.edge.as_ref()) {
        settings.relay_replicas
    } else {
        1
    };
    label
        .spec
        .replicas
        .unwrap_or(default)
        .clamp(REPLICAS_MIN, REPLICAS_MAX)
}

/// Whether each of the label's replicas gets a Service of its own: several replicas of a label
/// with a Service of its own (not reached through the gateway). One Service for all of them
/// would send a hidden server's rendezvous connection to any replica, while only the one that
/// granted the registration holds it; with an address per replica, each relay names its own
/// in its registration answers and 307s, so every connection reaches the replica it is for.
/// The replicas are then a StatefulSet ([`stateful_set`]), whose pods have stable names for
/// their Services ([`pod_service`]) to select.
pub fn per_pod_services(label: &TaasLabel, settings: &Settings) -> bool {
    !crate::edge::through_gateway(label, settings.edge.as_ref()) && replicas(label, settings) >= 2
}

/// The relay pods' spread over nodes, with several replicas: a preference (ScheduleAnyway),
/// so a one-node cluster still runs them all, but a lost node rarely takes every replica.
fn spread(label: &TaasLabel, replicas: u32) -> Option<Vec<TopologySpreadConstraint>> {
    (replicas >= 2).then(|| {
        vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".to_string(),
            when_unsatisfiable: "ScheduleAnyway".to_string(),
            label_selector: Some(LabelSelector {
                match_labels: Some(names::selector(label)),
                ..Default::default()
            }),
            ..Default::default()
        }]
    })
}

/// Deployment `taas-X`: the relay pods ([`replicas`] of them), with the ConfigMap and the
/// Secret mounted, no API access, and the restricted Pod Security Standard.
///
/// Replaced by a rolling update with one pod of surge and none unavailable, for any number of
/// replicas: a new relay is ready (and in the headless Service's addresses) before an old one
/// is told to stop and drains, so even a one-replica label is never without a relay. The
/// gateways treat every address of the control Service as a replica of the label.
pub fn deployment(label: &TaasLabel, settings: &Settings) -> Deployment {
    let replicas = replicas(label, settings);
    Deployment {
        metadata: meta(label, names::relay_name(label)),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas as i32),
            // A new relay pod counts as available (and an old one is stopped) only after it has
            // been ready this long: time for its address to reach the Service's endpoints, the
            // cluster DNS and the gateways, so the old pod never drains while gateways know no
            // other (1 replica, e2e 6b: 2.4 s of failed fetches without it).
            min_ready_seconds: Some(MIN_READY_SECONDS),
            selector: LabelSelector {
                match_labels: Some(names::selector(label)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: pod_template(label, settings, replicas),
            ..Default::default()
        }),
        status: None,
    }
}

/// StatefulSet `taas-X`: the relay pods of a label whose replicas each have a Service of their
/// own ([`per_pod_services`]), named `taas-X-0`, `taas-X-1`, ... for those Services to
/// select. The same pod as [`deployment`]'s, plus its name in `TAAS_POD_NAME`. Started in
/// parallel; replaced one pod at a time (the rolling update waits for each new pod to be ready
/// before the next goes), so with two or more the label always has a replica serving, while
/// each replica's own address is dark during its replacement: clients are sent to the others.
pub fn stateful_set(label: &TaasLabel, settings: &Settings) -> StatefulSet {
    let replicas = replicas(label, settings);
    StatefulSet {
        metadata: meta(label, names::relay_name(label)),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            service_name: Some(names::control_name(label)),
            pod_management_policy: Some("Parallel".to_string()),
            selector: LabelSelector {
                match_labels: Some(names::selector(label)),
                ..Default::default()
            },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: None,
            }),
            template: pod_template(label, settings, replicas),
            ..Default::default()
        }),
        status: None,
    }
}

/// The relay pod: the ConfigMap and the Secret mounted, no API access, and the restricted Pod
/// Security Standard.
fn pod_template(label: &TaasLabel, settings: &Settings, replicas: u32) -> PodTemplateSpec {
    let mut ports = vec![
        container_port("control".to_string(), CONTROL_PORT),
        container_port("metrics".to_string(), METRICS_PORT),
        container_port("client".to_string(), CLIENT_PORT),
    ];
    ports.extend(
        names::p_ports(label)
            .enumerate()
            .map(|(i, p)| container_port(format!("p{i}"), p)),
    );
    if settings.edge.is_some() {
        ports.push(container_port("edge".to_string(), EDGE_PORT));
    }
    let resources = &settings.resources;
    let container = Container {
        name: "relay".to_string(),
        image: Some(settings.relay_image.clone()),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        args: Some(relay_args(label, settings)),
        env: relay_env(label, settings),
        ports: Some(ports),
        readiness_probe: Some(Probe {
            http_get: Some(probe("/readyz")),
            period_seconds: Some(5),
            timeout_seconds: Some(3),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(probe("/healthz")),
            initial_delay_seconds: Some(10),
            period_seconds: Some(20),
            timeout_seconds: Some(5),
            failure_threshold: Some(6),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: quantities([
                ("cpu", Some(&resources.cpu_request)),
                ("memory", Some(&resources.memory_request)),
            ]),
            limits: quantities([
                ("cpu", resources.cpu_limit.as_ref()),
                ("memory", resources.memory_limit.as_ref()),
            ]),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Default::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "label".to_string(),
                mount_path: names::LABEL_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "secret".to_string(),
                mount_path: names::SECRET_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let pod_labels = names::labels(label);
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            // The relay drains for --drain-timeout on SIGTERM, then exits: the
            // kubelet waits that long and a little more before it kills.
            termination_grace_period_seconds: Some(
                i64::try_from(
                    settings
                        .relay_drain_timeout
                        .saturating_add(crate::settings::DRAIN_GRACE_MARGIN),
                )
                .unwrap_or(i64::MAX),
            ),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RELAY_UID),
                run_as_group: Some(RELAY_UID),
                // The Secret's files are group-readable by the relay only.
                fs_group: Some(RELAY_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![container],
            topology_spread_constraints: spread(label, replicas),
            volumes: Some(vec![
                Volume {
                    name: "label".to_string(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: names::relay_name(label),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "secret".to_string(),
                    // The whole Secret (no `items`): a changed `secretRef.key` is
                    // read from the same directory without a restart.
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(label.spec.secret_ref.name.clone()),
                        default_mode: Some(0o440),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
    }
}

/// PodDisruptionBudget `taas-X` (`policy/v1`; the apply step sends it as the version the API
/// server serves): with several replicas, a node drain evicts at most one relay pod of the
/// label at a time, so the others keep serving. `None` with one replica, where a budget
/// would only block drains (or, at maxUnavailable 1, protect nothing).
pub fn pod_disruption_budget(
    label: &TaasLabel,
    settings: &Settings,
) -> Option<PodDisruptionBudget> {
    (replicas(label, settings) >= 2).then(|| PodDisruptionBudget {
        metadata: meta(label, names::relay_name(label)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector(label)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

/// What the apply step does about the label's PodDisruptionBudget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetAction {
    /// Apply [`pod_disruption_budget`] (several replicas).
    Apply,
    /// Delete it if it is there and ours: the label went back to one replica (or its
    /// Deployment was scaled to zero).
    Delete,
    /// Nothing: one replica, as before (no request for the thousands of labels that never
    /// had a budget).
    Keep,
}

/// The budget's fate, from the replicas wanted now and the `replicas` of the label's
/// Deployment before this apply (`None`: no Deployment yet, or one without a count). The
/// budget is deleted before the Deployment is scaled down, so a failed delete is retried:
/// the Deployment still shows the old count.
pub fn budget_action(desired: u32, previous: Option<i32>) -> BudgetAction {
    if desired >= 2 {
        BudgetAction::Apply
    } else if previous.is_some_and(|p| p != desired as i32) {
        BudgetAction::Delete
    } else {
        BudgetAction::Keep
    }
}

/// The label's Deployment scaled to zero: what a relay the cluster's policy refuses is
/// turned into (the operator never deletes; the same apply with one replica brings it back).
pub fn stopped_deployment(label: &TaasLabel, settings: &Settings) -> Deployment {
    let mut deployment = deployment(label, settings);
    if let Some(spec) = deployment.spec.as_mut() {
        spec.replicas = Some(0);
    }
    deployment
}

/// The label's StatefulSet scaled to zero (as [`stopped_deployment`]).
pub fn stopped_stateful_set(label: &TaasLabel, settings: &Settings) -> StatefulSet {
    let mut stateful_set = stateful_set(label, settings);
    if let Some(spec) = stateful_set.spec.as_mut() {
        spec.replicas = Some(0);
    }
    stateful_set
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::address::tests::{applied, ip};
    use crate::address::{exposure, external};
    use k8s_openapi::api::core::v1::LoadBalancerIngress;

    /// A label as the API server returns it: `default/home`, LABEL `home`, two rendezvous
    /// ports.
    pub fn label() -> TaasLabel {
        let mut label: TaasLabel = serde_yaml::from_str(
            "apiVersion: taas.dev/v1alpha1\n\
             kind: TaasLabel\n\
             metadata: {name: home, namespace: default, uid: 0c1d-uid, generation: 1}\n\
             spec:\n  id: id-1\n  label: home\n  secretRef: {name: home-totp}\n  \
             rendezvousPorts: 2\n",
        )
        .unwrap();
        label.metadata.resource_version = Some("1".into());
        label
    }

    /// Metadata of an object named `name` controlled by `label`.
    pub fn owned_meta(label: &TaasLabel, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            owner_references: label.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        }
    }

    fn json<T: Serialize>(value: &T) -> serde_json::Value {
        serde_json::to_value(value).unwrap()
    }

    const OWNER: &str = r#"[{"apiVersion":"taas.dev/v1alpha1","kind":"TaasLabel","name":"home","uid":"0c1d-uid","controller":true}]"#;

    fn owner() -> serde_json::Value {
        serde_json::from_str(OWNER).unwrap()
    }

    fn labels() -> serde_json::Value {
        serde_json::json!({
            "app.kubernetes.io/name": "taas-relay",
            "app.kubernetes.io/instance": "home",
            "app.kubernetes.io/managed-by": "taas-operator",
            "taas.dev/label": "home",
        })
    }

    #[test]
    fn load_balancer_service() {
        let mut l = label();
        l.spec
            .service
            .annotations
            .insert("lb.example/internal".into(), "true".into());
        l.spec.service.load_balancer_class = Some("example.net/lb".into());
        assert_eq!(
            json(&service(&l)),
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "taas-home",
                    "namespace": "default",
                    "labels": labels(),
                    "annotations": {"lb.example/internal": "true"},
                    "ownerReferences": owner(),
                },
                "spec": {
                    "type": "LoadBalancer",
                    "selector": {"app.kubernetes.io/name": "taas-relay", "app.kubernetes.io/instance": "home"},
                    "externalTrafficPolicy": "Local",
                    "loadBalancerClass": "example.net/lb",
                    "ports": [
                        {"name": "client", "port": 21000, "targetPort": 21000, "protocol": "TCP"},
                        {"name": "p0", "port": 20000, "targetPort": 20000, "protocol": "TCP"},
                        {"name": "p1", "port": 20001, "targetPort": 20001, "protocol": "TCP"},
                    ],
                },
            })
        );
    }

    #[test]
    fn pinned_client_port_by_service_type() {
        let mut l = label();
        l.spec.client_port = Some(30443);
        let client = |l: &TaasLabel| json(&service(l))["spec"]["ports"][0].clone();
        // LoadBalancer: the Service port.
        assert_eq!(
            client(&l),
            serde_json::json!({"name": "client", "port": 30443, "targetPort": 21000, "protocol": "TCP"})
        );
        // NodePort: the node port.
        l.spec.service.type_ = Some(ServiceType::NodePort);
        l.spec.service.external_traffic_policy = ExternalTrafficPolicy::Cluster;
        assert_eq!(
            client(&l),
            serde_json::json!({"name": "client", "port": 21000, "targetPort": 21000, "nodePort": 30443, "protocol": "TCP"})
        );
        let spec = json(&service(&l))["spec"].clone();
        assert_eq!(spec["type"], "NodePort");
        assert_eq!(spec["externalTrafficPolicy"], "Cluster");
        // ClusterIP: the Service port, and no external traffic policy or load balancer class.
        l.spec.service.type_ = Some(ServiceType::ClusterIP);
        l.spec.service.load_balancer_class = Some("example.net/lb".into());
        assert_eq!(
            client(&l),
            serde_json::json!({"name": "client", "port": 30443, "targetPort": 21000, "protocol": "TCP"})
        );
        let spec = json(&service(&l))["spec"].clone();
        assert_eq!(spec["type"], "ClusterIP");
        assert!(spec.get("externalTrafficPolicy").is_none());
        assert!(spec.get("loadBalancerClass").is_none());
    }

    #[test]
    fn control_service_is_cluster_internal() {
        assert_eq!(
            json(&control_service(&label(), false)),
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "taas-home-control",
                    "namespace": "default",
                    "labels": labels(),
                    "ownerReferences": owner(),
                },
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": "None",
                    "selector": {"app.kubernetes.io/name": "taas-relay", "app.kubernetes.io/instance": "home"},
                    "ports": [{"name": "control", "port": 8080, "targetPort": 8080, "protocol": "TCP"}],
                },
            })
        );
    }

    #[test]
    fn the_relay_drains_for_the_operators_drain_timeout_and_its_pod_waits_a_little_longer() {
        let settings = Settings {
            relay_drain_timeout: 10,
            ..Settings::default()
        };
        let args = relay_args(&label(), &settings);
        let at = args.iter().position(|a| a == "--drain-timeout").unwrap();
        assert_eq!(args[at + 1], "10");
        let deployment = deployment(&label(), &settings);
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(15));
    }

    fn edge_mode() -> Settings {
        Settings {
            edge: Some(crate::edge::tests::edge_settings()),
            ..Settings::default()
        }
    }

    #[test]
    fn in_edge_mode_the_relay_listens_on_its_edge_port_for_the_gateway() {
        let l = label();
        let c = relay_container(&l, &edge_mode());
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(&args[args.len() - 2..], ["--edge", "0.0.0.0:21001"]);
        assert_eq!(
            c["ports"].as_array().unwrap().last().unwrap(),
            &serde_json::json!({"name": "edge", "containerPort": 21001, "protocol": "TCP"})
        );
        // Outside edge mode, neither.
        let c = relay_container(&l, &Settings::default());
        assert!(!c["args"].to_string().contains("--edge"));
        assert!(!c["ports"].to_string().contains("21001"));
        // The control Service exposes it to the gateways.
        assert_eq!(
            json(&control_service(&l, true))["spec"]["ports"],
            serde_json::json!([
                {"name": "control", "port": 8080, "targetPort": 8080, "protocol": "TCP"},
                {"name": "edge", "port": 21001, "targetPort": 21001, "protocol": "TCP"},
            ])
        );
    }

    #[test]
    fn in_edge_mode_the_relay_is_told_the_gateways_address_and_its_slice() {
        let l = label();
        let edge = crate::edge::tests::edge_settings();
        let gateway = crate::edge::tests::gateway_service("LoadBalancer", &edge, ip("203.0.113.1"));
        let exposure = crate::edge::exposure(&l, &edge, Some(&gateway), &[], &[]).unwrap();
        let cm = config_map(&l, &external(&l, &Service::default(), Some(&exposure))).unwrap();
        let slice = crate::edge::label_slice(&l, &edge);
        assert_eq!(
            cm.data.unwrap()["external.yaml"],
            format!(
                "host: 203.0.113.1\nports:\n  20000: {}\n  20001: {}\n  21000: 9443\n",
                slice[0], slice[1]
            )
        );
    }

    #[test]
    fn config_map_holds_the_manifest_and_the_external_address() {
        let l = label();
        let service = applied(&l, ip("203.0.113.7"));
        let exposure = exposure(&l, &service, &[], &[]).unwrap();
        let cm = config_map(&l, &external(&l, &service, Some(&exposure))).unwrap();
        assert_eq!(cm.metadata.name.as_deref(), Some("taas-home"));
        assert_eq!(json(&cm.metadata.owner_references), owner());
        let data = cm.data.unwrap();
        assert_eq!(
            data["label.yaml"],
            "apiVersion: taas.dev/v1alpha1\n\
             kind: TaasLabel\n\
             metadata:\n  name: home\n  namespace: default\n\
             spec:\n  id: id-1\n  label: home\n  secretRef:\n    name: home-totp\n    key: secret\n  \
             algorithm: SHA1\n  period: 30\n  maxParked: 32\n  sourcePinning: true\n  \
             proxyProtocol: none\n  clientAdmission: Open\n  service:\n    \
             externalTrafficPolicy: Local\n  rendezvousPorts: 2\n"
        );
        assert_eq!(
            data["external.yaml"],
            "host: 203.0.113.7\nports:\n  20000: 20000\n  20001: 20001\n  21000: 21000\n"
        );
        // What the relay reads back.
        let parsed = taas_crds::manifest::parse_documents(&data["label.yaml"]).unwrap();
        assert!(matches!(
            &parsed[..],
            [taas_crds::manifest::Object::Label(object)] if object.spec == l.spec
                && object.name == "home" && object.namespace == "default"
        ));
    }

    #[test]
    fn relay_containers_get_the_log_settings() {
        let settings = Settings {
            relay_log_env: vec![
                ("TAAS_LOG_FORMAT".into(), "json".into()),
                ("RUST_LOG".into(), "debug".into()),
            ],
            ..Settings::default()
        };
        let d = json(&deployment(&label(), &settings));
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["env"],
            serde_json::json!([
                {"name": "TAAS_LOG_FORMAT", "value": "json"},
                {"name": "RUST_LOG", "value": "debug"},
            ])
        );
    }

    #[test]
    fn deployment_runs_one_restricted_relay() {
        let l = label();
        let settings = Settings::default();
        let d = json(&deployment(&l, &settings));
        assert_eq!(d["metadata"]["name"], "taas-home");
        assert_eq!(d["metadata"]["ownerReferences"], owner());
        assert_eq!(d["metadata"]["labels"], labels());
        let spec = &d["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["minReadySeconds"], 5);
        assert_eq!(
            spec["strategy"],
            serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        );
        assert_eq!(
            spec["selector"],
            serde_json::json!({"matchLabels": {"app.kubernetes.io/name": "taas-relay", "app.kubernetes.io/instance": "home"}})
        );
        let template = &spec["template"];
        assert_eq!(
            template["metadata"],
            serde_json::json!({"labels": labels()})
        );
        let pod = &template["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(
            pod["securityContext"],
            serde_json::json!({
                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            })
        );
        assert_eq!(
            pod["volumes"],
            serde_json::json!([
                {"name": "label", "configMap": {"name": "taas-home"}},
                {"name": "secret", "secret": {"secretName": "home-totp", "defaultMode": 0o440}},
            ])
        );
        let c = &pod["containers"][0];
        assert_eq!(c["env"], serde_json::Value::Null);
        assert_eq!(c["image"], settings.relay_image);
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            c["args"],
            serde_json::json!([
                "label-relay",
                "--label-file",
                "/etc/taas/label/label.yaml",
                "--secret-dir",
                "/etc/taas/secret",
                "--external-file",
                "/etc/taas/label/external.yaml",
                "--control",
                "0.0.0.0:8080",
                "--p-ports",
                "20000-20001",
                "--client-port",
                "21000",
                "--registrar",
                "taas-registrar.localhost",
                "--domain",
                "taas.localhost",
                "--redirect-host",
                "requested",
                "--metrics",
                "0.0.0.0:9464",
                "--drain-timeout",
                "30",
            ])
        );
        assert_eq!(pod["terminationGracePeriodSeconds"], 35);
        let ports: Vec<(String, u64)> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert_eq!(p["protocol"], "TCP");
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("control", 8080),
                ("metrics", 9464),
                ("client", 21000),
                ("p0", 20000),
                ("p1", 20001)
            ]
            .map(|(n, p)| (n.to_string(), p))
        );
        assert_eq!(
            c["securityContext"],
            serde_json::json!({
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            })
        );
        assert_eq!(
            c["resources"],
            serde_json::json!({
                "requests": {"cpu": "10m", "memory": "32Mi"},
                "limits": {"cpu": "500m", "memory": "128Mi"},
            })
        );
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            serde_json::json!({"path": "/readyz", "port": "metrics"})
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"],
            serde_json::json!({"path": "/healthz", "port": "metrics"})
        );
        assert_eq!(c["livenessProbe"]["failureThreshold"], 6);
        assert_eq!(
            c["volumeMounts"],
            serde_json::json!([
                {"name": "label", "mountPath": "/etc/taas/label", "readOnly": true},
                {"name": "secret", "mountPath": "/etc/taas/secret", "readOnly": true},
            ])
        );
    }

    fn with_replicas(n: u32) -> TaasLabel {
        let mut l = label();
        l.spec.replicas = Some(n);
        l
    }

    #[test]
    fn several_replicas_with_a_service_of_the_labels_own_run_as_a_stateful_set_with_a_service_each()
    {
        let settings = Settings::default();
        let l = with_replicas(3);
        assert!(per_pod_services(&l, &settings));
        assert!(!per_pod_services(&with_replicas(1), &settings));
        // Through the gateway, several replicas share its ports: a Deployment as before.
        assert!(!per_pod_services(&l, &edge_mode()));
        assert!(
            json(&deployment(&l, &edge_mode()))["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .is_none_or(|env| !env.iter().any(|e| e["name"] == POD_NAME_ENV))
        );

        let set = json(&stateful_set(&l, &settings));
        assert_eq!(set["kind"], "StatefulSet");
        assert_eq!(set["metadata"]["name"], "taas-home");
        assert_eq!(set["spec"]["replicas"], 3);
        assert_eq!(set["spec"]["serviceName"], "taas-home-control");
        assert_eq!(set["spec"]["podManagementPolicy"], "Parallel");
        assert_eq!(
            set["spec"]["updateStrategy"],
            serde_json::json!({"type": "RollingUpdate"})
        );
        // The same pod as the Deployment's, plus its own name from the downward API.
        let template = &set["spec"]["template"];
        let env = template["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(env.contains(&serde_json::json!({
            "name": "TAAS_POD_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}
        })));
        let mut same = json(&deployment(&l, &settings))["spec"]["template"].clone();
        same["spec"]["containers"][0]["env"] = template["spec"]["containers"][0]["env"].clone();
        assert_eq!(template, &same);
        assert_eq!(
            set["spec"]["selector"],
            json(&deployment(&l, &settings))["spec"]["selector"]
        );

        // Each pod's Service selects that pod alone, with the label's ports and type.
        let one = json(&pod_service(&l, 1));
        assert_eq!(one["metadata"]["name"], "taas-home-1");
        assert_eq!(
            one["spec"]["selector"],
            serde_json::json!({
                "app.kubernetes.io/name": "taas-relay",
                "app.kubernetes.io/instance": "home",
                "statefulset.kubernetes.io/pod-name": "taas-home-1",
            })
        );
        let whole = json(&service(&l));
        assert_eq!(one["spec"]["ports"], whole["spec"]["ports"]);
        assert_eq!(one["spec"]["type"], whole["spec"]["type"]);
        // A pinned node port stays the label's one Service's (validation refuses it with
        // several replicas).
        let mut pinned = with_replicas(2);
        pinned.spec.service.type_ = Some(ServiceType::NodePort);
        pinned.spec.client_port = Some(30443);
        assert_eq!(
            json(&service(&pinned))["spec"]["ports"][0]["nodePort"],
            30443
        );
        assert!(json(&pod_service(&pinned, 0))["spec"]["ports"][0]
            .get("nodePort")
            .is_none());
        // Stopped by a policy: zero replicas.
        assert_eq!(
            json(&stopped_stateful_set(&l, &settings))["spec"]["replicas"],
            0
        );
    }

    #[test]
    fn two_replicas_surge_spread_over_nodes_and_get_a_disruption_budget() {
        let settings = edge_mode();
        let l = with_replicas(2);
        let d = json(&deployment(&l, &settings));
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(
            d["spec"]["strategy"],
            serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
        );
        let selector = serde_json::json!({"matchLabels": {"app.kubernetes.io/name": "taas-relay", "app.kubernetes.io/instance": "home"}});
        assert_eq!(
            d["spec"]["template"]["spec"]["topologySpreadConstraints"],
            serde_json::json!([{
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": selector,
            }])
        );
        let pdb = pod_disruption_budget(&l, &settings).unwrap();
        assert_eq!(
            json(&pdb),
            serde_json::json!({
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {
                    "name": "taas-home",
                    "namespace": "default",
                    "labels": labels(),
                    "ownerReferences": owner(),
                },
                "spec": {"maxUnavailable": 1, "selector": selector},
            })
        );
        // One replica: no spread, no budget.
        let one = json(&deployment(&with_replicas(1), &settings));
        assert!(one["spec"]["template"]["spec"]
            .get("topologySpreadConstraints")
            .is_none());
        assert_eq!(pod_disruption_budget(&with_replicas(1), &settings), None);
    }

    #[test]
    fn the_install_default_applies_to_labels_reached_through_the_gateway_only() {
        let mut settings = edge_mode();
        settings.relay_replicas = 3;
        assert_eq!(replicas(&label(), &settings), 3);
        // The label's own count wins.
        assert_eq!(replicas(&with_replicas(1), &settings), 1);
        assert_eq!(replicas(&with_replicas(5), &settings), 5);
        // A label with a Service of its own, or any outside edge mode, runs one unless it
        // asks (validation refuses more there).
        let mut own = label();
        own.spec.service.type_ = Some(ServiceType::LoadBalancer);
        assert_eq!(replicas(&own, &settings), 1);
        let outside = Settings {
            relay_replicas: 3,
            ..Settings::default()
        };
        assert_eq!(replicas(&label(), &outside), 1);
        assert_eq!(replicas(&with_replicas(2), &outside), 2);
        // Out of the CRD's bounds (an API server that skipped the schema): clamped.
        assert_eq!(replicas(&with_replicas(0), &settings), 1);
        assert_eq!(replicas(&with_replicas(99), &settings), 16);
    }

    #[test]
    fn the_budget_is_applied_with_several_replicas_and_deleted_on_the_way_back_to_one() {
        for previous in [None, Some(0), Some(1), Some(2), Some(16)] {
            assert_eq!(budget_action(2, previous), BudgetAction::Apply);
            assert_eq!(budget_action(16, previous), BudgetAction::Apply);
        }
        assert_eq!(budget_action(1, Some(2)), BudgetAction::Delete);
        assert_eq!(budget_action(1, Some(0)), BudgetAction::Delete);
        assert_eq!(budget_action(1, Some(1)), BudgetAction::Keep);
        assert_eq!(budget_action(1, None), BudgetAction::Keep);
    }

    proptest::proptest! {
        #[test]
        fn every_replica_count_surges_and_only_several_spread_and_get_a_budget(
            n in 1u32..=16,
            edge in proptest::bool::ANY,
        ) {
            let settings = if edge { edge_mode() } else { Settings::default() };
            let l = with_replicas(n);
            let d = deployment(&l, &settings);
            let spec = d.spec.as_ref().unwrap();
            proptest::prop_assert_eq!(spec.replicas, Some(n as i32));
            proptest::prop_assert_eq!(spec.min_ready_seconds, Some(MIN_READY_SECONDS));
            let strategy = spec.strategy.as_ref().unwrap();
            proptest::prop_assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
            let rolling = strategy.rolling_update.as_ref().unwrap();
            proptest::prop_assert_eq!(&rolling.max_surge, &Some(IntOrString::Int(1)));
            proptest::prop_assert_eq!(&rolling.max_unavailable, &Some(IntOrString::Int(0)));
            let pod = spec.template.spec.as_ref().unwrap();
            proptest::prop_assert_eq!(pod.topology_spread_constraints.is_some(), n >= 2);
            let pdb = pod_disruption_budget(&l, &settings);
            proptest::prop_assert_eq!(pdb.is_some(), n >= 2);
            if let Some(pdb) = pdb {
                let pdb_spec = pdb.spec.unwrap();
                proptest::prop_assert_eq!(pdb_spec.max_unavailable, Some(IntOrString::Int(1)));
                proptest::prop_assert_eq!(
                    pdb_spec.selector.unwrap().match_labels,
                    Some(names::selector(&l))
                );
                proptest::prop_assert_eq!(pdb.metadata.owner_references, d.metadata.owner_references.clone());
            }
            proptest::prop_assert_eq!(
                budget_action(n, Some(n as i32)),
                if n >= 2 { BudgetAction::Apply } else { BudgetAction::Keep }
            );
            // Scaling never touches the pod template except for the spread constraint, and
            // with a Service of the label's own (a StatefulSet then) the pod's name.
            let mut template = pod.clone();
            template.topology_spread_constraints = None;
            if per_pod_services(&l, &settings) {
                let env = template.containers[0].env.take().unwrap_or_default();
                let rest: Vec<EnvVar> = env.into_iter().filter(|e| e.name != POD_NAME_ENV).collect();
                template.containers[0].env = (!rest.is_empty()).then_some(rest);
            }
            let one = deployment(&with_replicas(1), &settings).spec.unwrap().template.spec.unwrap();
            proptest::prop_assert_eq!(template, one);
        }
    }

    #[test]
    fn resources_without_limits() {
        let mut settings = Settings::default();
        settings.resources.cpu_limit = None;
        settings.resources.memory_limit = None;
        let d = json(&deployment(&label(), &settings));
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["resources"],
            serde_json::json!({"requests": {"cpu": "10m", "memory": "32Mi"}})
        );
    }

    #[test]
    fn only_image_args_and_port_count_change_the_pod() {
        let settings = Settings::default();
        let base = deployment(&label(), &settings);
        let mut l = label();
        l.spec.max_parked = 5;
        l.spec.period = 60;
        l.spec.client_port = Some(443);
        l.spec.secret_ref.key = "other".into();
        l.spec.service.type_ = Some(ServiceType::NodePort);
        l.spec.service.annotations.insert("a".into(), "b".into());
        l.metadata.generation = Some(7);
        assert_eq!(deployment(&l, &settings), base);

        l.spec.rendezvous_ports = 3;
        let more = json(&deployment(&l, &settings));
        let c = &more["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["args"][10], "20000-20002");
        assert_eq!(c["ports"].as_array().unwrap().len(), 6);

        let mut new_image = settings.clone();
        new_image.relay_image = "taas-relay:next".into();
        assert_ne!(deployment(&label(), &new_image), base);
    }

    #[test]
    fn a_long_label_is_not_a_label_value() {
        let mut l = label();
        l.spec.label = format!("{}.example", "a".repeat(60));
        let labels = deployment(&l, &Settings::default())
            .metadata
            .labels
            .unwrap();
        assert!(!labels.contains_key("taas.dev/label"));
        assert_eq!(labels["app.kubernetes.io/instance"], "home");
    }

    #[test]
    fn build_is_deterministic() {
        let mut l = label();
        for i in 0..20 {
            l.spec
                .service
                .annotations
                .insert(format!("k{i}"), format!("v{i}"));
        }
        let settings = Settings::default();
        let service_with = |ingress: Option<LoadBalancerIngress>| applied(&l, ingress);
        let bodies = || {
            let svc = service_with(ip("203.0.113.7"));
            let e = exposure(&l, &svc, &[], &[]).ok();
            (
                serde_json::to_string(&service(&l)).unwrap(),
                serde_json::to_string(&control_service(&l, false)).unwrap(),
                serde_json::to_string(&config_map(&l, &external(&l, &svc, e.as_ref())).unwrap())
                    .unwrap(),
                serde_json::to_string(&deployment(&l, &settings)).unwrap(),
            )
        };
        let first = bodies();
        for _ in 0..5 {
            assert_eq!(bodies(), first);
        }
        // The same label read back from the API server (with a status) builds the same.
        let mut with_status = l.clone();
        with_status.status = Some(Default::default());
        assert_eq!(
            serde_json::to_string(&deployment(&with_status, &settings)).unwrap(),
            first.3
        );
    }

    fn with_secret() -> Settings {
        Settings {
            gateway_secret: Some(
                taas_protocol::gateway_auth::InstallSecret::new(
                    b"an install secret of 32 chars!!!",
                )
                .unwrap(),
            ),
            ..Settings::default()
        }
    }

    fn relay_container(label: &TaasLabel, settings: &Settings) -> serde_json::Value {
        json(&deployment(label, settings))["spec"]["template"]["spec"]["containers"][0].clone()
    }

    #[test]
    fn each_relay_gets_the_gateway_token_of_its_own_label() {
        let settings = with_secret();
        let secret = settings.gateway_secret.clone().unwrap();
        let home = relay_container(&label(), &settings);
        assert_eq!(
            home["env"],
            serde_json::json!([
                {"name": "TAAS_GATEWAY_TOKEN", "value": secret.token_for("home").expose()},
            ])
        );
        // What a gateway of this install sends for LABEL "home" opens this relay only.
        let token = taas_protocol::gateway_auth::GatewayToken::new(
            home["env"][0]["value"].as_str().unwrap(),
        )
        .unwrap();
        assert!(token.verify(secret.token_for("home").expose().as_bytes()));
        assert!(!token.verify(secret.token_for("office").expose().as_bytes()));
        let mut office = label();
        office.metadata.name = Some("office".into());
        office.spec.label = "office".into();
        let office = relay_container(&office, &settings);
        assert_eq!(
            office["env"][0]["value"],
            secret.token_for("office").expose()
        );
        assert_ne!(office["env"][0]["value"], home["env"][0]["value"]);
        // Next to the log settings.
        let mut logged = settings.clone();
        logged.relay_log_env = vec![("TAAS_LOG_FORMAT".into(), "json".into())];
        let env = relay_container(&label(), &logged)["env"].clone();
        assert_eq!(env[0]["name"], "TAAS_LOG_FORMAT");
        assert_eq!(env[1]["name"], "TAAS_GATEWAY_TOKEN");
        // The token never shows in the arguments (they are in `ps` and in events).
        let args = home["args"].to_string();
        assert!(!args.contains(secret.token_for("home").expose()), "{args}");
    }

    #[test]
    fn no_gateway_secret_no_token() {
        let c = relay_container(&label(), &Settings::default());
        assert_eq!(c["env"], serde_json::Value::Null);
        let logged = Settings {
            relay_log_env: vec![("TAAS_LOG_FORMAT".into(), "json".into())],
            ..Settings::default()
        };
        let env = relay_container(&label(), &logged)["env"].to_string();
        assert!(!env.contains("TAAS_GATEWAY_TOKEN"), "{env}");
    }

    #[test]
    fn relays_are_not_told_to_trust_source_addresses() {
        for settings in [Settings::default(), with_secret()] {
            let args = relay_args(&label(), &settings);
            assert!(
                !args.iter().any(|a| a.contains("trusted-proxies")),
                "{args:?}"
            );
        }
    }
}
