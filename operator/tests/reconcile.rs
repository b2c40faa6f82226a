//! `reconcile()` against a mocked API server (tower-test behind a real `kube::Client`): the
//! exact requests of each scenario, in order, with the answers an API server would give.
//! Every request is also checked against the RBAC table (`taas_operator::rbac`).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector;
use kube::runtime::watcher;
use kube::Client;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use taas_crds::TaasLabel;
use taas_operator::budget::BudgetVersion;
use taas_operator::reconcile::{error_policy, reconcile, Context};
use taas_operator::{metrics::Metrics, rbac, routes, Settings};

// ---------------------------------------------------------------------------------------
// The mock API server: a script of expected requests, each with its answer.

/// How the mock answers one request.
enum Answer {
    /// This status and body.
    Json(u16, Value),
    /// 404 with a `Status` body.
    NotFound,
    /// The request body, changed by the function (what the API server adds: cluster IPs,
    /// node ports, status...).
    Echo(fn(&mut Value)),
}

struct Step {
    method: Method,
    path: String,
    answer: Answer,
}

fn step(method: Method, path: &str, answer: Answer) -> Step {
    Step {
        method,
        path: path.to_string(),
        answer,
    }
}

/// A request the mock received.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

const NS: &str = "/api/v1/namespaces/default";
const APPS: &str = "/apis/apps/v1/namespaces/default";
const LABELS: &str = "/apis/taas.dev/v1alpha1/namespaces/default/taaslabels";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn no_change(_: &mut Value) {}

/// The RBAC rule a request needs: (group, resource[/subresource], verb); `None` for
/// discovery (`/apis/GROUP/VERSION`), which every authenticated client may read.
fn rbac_of(method: &Method, path: &str) -> Option<(String, String, &'static str)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if parts.len() == 3 && parts[0] == "apis" && method == Method::GET {
        return None;
    }
    let (group, rest) = match parts[0] {
        "api" => ("", &parts[2..]),
        _ => (parts[1], &parts[3..]),
    };
    let rest = match rest {
        ["namespaces", _, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        other => panic!("unexpected path {other:?}"),
    };
    let verb = match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("PATCH", _) => "patch",
        ("POST", _) => "create",
        ("DELETE", true) => "delete",
        (other, _) => panic!("unexpected method {other}"),
    };
    Some((group.to_string(), resource, verb))
}

/// Serves `steps` in order and returns what it saw; panics (failing the test) on any
/// unexpected request, and on requests after the script ends.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    steps: Vec<Step>,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "step {i}: no request; expected {} {}",
                    step.method, step.path
                )
            })
            .unwrap_or_else(|| {
                panic!(
                    "step {i}: the client is gone; expected {} {} (after {:?})",
                    step.method,
                    step.path,
                    seen.iter()
                        .map(|s: &Seen| format!("{} {}", s.method, s.path))
                        .collect::<Vec<_>>()
                )
            });
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        assert_eq!(
            (&method, path.as_str()),
            (&step.method, step.path.as_str()),
            "step {i} (after {:?})",
            seen.iter()
                .map(|s: &Seen| format!("{} {}", s.method, s.path))
                .collect::<Vec<_>>()
        );
        if let Some((group, resource, verb)) = rbac_of(&method, &path) {
            assert!(
                rbac::allows(&group, &resource, verb),
                "{verb} {group}/{resource} is not in the RBAC table"
            );
        }
        if method == Method::PATCH && !path.starts_with(EVENTS) {
            assert!(
                query.contains("fieldManager=taas-operator") && query.contains("force=true"),
                "{path}?{query}: not a forced server-side apply by taas-operator"
            );
            assert_eq!(
                request.headers()["content-type"],
                "application/apply-patch+yaml"
            );
        }
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let (status, answer) = match step.answer {
            Answer::Json(status, value) => (status, value),
            Answer::NotFound => (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": "not found", "reason": "NotFound", "code": 404}),
            ),
            Answer::Echo(change) => {
                let mut value = body.clone();
                change(&mut value);
                (if method == Method::POST { 201 } else { 200 }, value)
            }
        };
        seen.push(Seen { method, path, body });
        let mut response = Response::new(Body::from(serde_json::to_vec(&answer).unwrap()));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        send.send_response(response);
    }
    if let Ok(Some((request, _))) =
        tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await
    {
        panic!(
            "unexpected request after the script: {} {}",
            request.method(),
            request.uri()
        );
    }
    seen
}

/// A test set-up: the labels the controller's cache holds, the operator's settings, and
/// the PodDisruptionBudget version found at start (`None`: not yet asked).
struct Harness {
    cache: Vec<TaasLabel>,
    settings: Settings,
    budget_version: Option<BudgetVersion>,
}

impl Harness {
    fn new() -> Self {
        Self {
            cache: Vec::new(),
            settings: Settings::default(),
            budget_version: None,
        }
    }

    fn context(&self, client: Client) -> Arc<Context> {
        let (store, mut writer) = reflector::store();
        for label in &self.cache {
            writer.apply_watcher_event(&watcher::Event::Apply(label.clone()));
        }
        let mut context = Context::new(
            client,
            self.settings.clone(),
            store,
            Metrics::new(&mut Registry::default()),
        );
        context.now = || Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_100).unwrap());
        if let Some(version) = self.budget_version {
            context.set_budget_version(version);
        }
        Arc::new(context)
    }

    /// Runs one reconcile of `label` against `steps`.
    async fn reconcile(
        &self,
        label: &TaasLabel,
        steps: Vec<Step>,
    ) -> (Result<Action, String>, Vec<Seen>) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(serve(handle, steps));
        let context = self.context(Client::new(service, "default"));
        let result = reconcile(Arc::new(label.clone()), context)
            .await
            .map_err(|e| e.to_string());
        match server.await {
            Ok(seen) => (result, seen),
            Err(error) => {
                eprintln!("reconcile returned {result:?}");
                std::panic::resume_unwind(error.into_panic())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures.

fn label() -> TaasLabel {
    serde_json::from_value(json!({
        "apiVersion": "taas.dev/v1alpha1",
        "kind": "TaasLabel",
        "metadata": {
            "name": "home", "namespace": "default", "uid": "uid-home",
            "generation": 1, "resourceVersion": "10",
            "creationTimestamp": "2023-11-14T22:13:20Z",
        },
        "spec": {"id": "id-1", "label": "home", "secretRef": {"name": "home-totp"}, "rendezvousPorts": 2},
    }))
    .unwrap()
}

fn secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "home-totp", "namespace": "default"},
           "data": {"secret": "SkJTV1kzRFBFSFBLM1BYUA=="}})
}

/// An object named `name` controlled by the fixture label.
fn owned(kind: &str, api_version: &str, name: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"name": name, "namespace": "default",
                        "ownerReferences": [{"apiVersion": "taas.dev/v1alpha1", "kind": "TaasLabel",
                                             "name": "home", "uid": "uid-home", "controller": true}]}})
}

/// What the API server adds to an applied LoadBalancer Service with an address.
fn lb_with_address(service: &mut Value) {
    service["spec"]["clusterIP"] = json!("10.0.0.7");
    service["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});
}

fn cluster_ip(service: &mut Value) {
    service["spec"]["clusterIP"] = json!("10.0.0.8");
}

fn node_ports(service: &mut Value) {
    service["spec"]["clusterIP"] = json!("10.0.0.7");
    for (i, port) in service["spec"]["ports"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        if port.get("nodePort").is_none() {
            port["nodePort"] = json!(32000 + i);
        }
    }
}

fn relay_ready(deployment: &mut Value) {
    deployment["status"] = json!({"replicas": 1, "readyReplicas": 1});
}

/// The five reads of every reconcile, with nothing there but the Secret.
fn reads_fresh() -> Vec<Step> {
    reads_fresh_of("home")
}

/// [`reads_fresh`] for a label whose children are `taas-BASE` and `taas-BASE-control`.
fn reads_fresh_of(base: &str) -> Vec<Step> {
    vec![
        step(
            Method::GET,
            &format!("{NS}/secrets/home-totp"),
            Answer::Json(200, secret()),
        ),
        step(
            Method::GET,
            &format!("{NS}/services/taas-{base}"),
            Answer::NotFound,
        ),
        step(
            Method::GET,
            &format!("{NS}/services/taas-{base}-control"),
            Answer::NotFound,
        ),
        step(
            Method::GET,
            &format!("{APPS}/deployments/taas-{base}"),
            Answer::NotFound,
        ),
        step(
            Method::GET,
            &format!("{NS}/configmaps/taas-{base}"),
            Answer::NotFound,
        ),
    ]
}

/// The same reads once the label's objects exist.
fn reads_existing() -> Vec<Step> {
    vec![
        step(
            Method::GET,
            &format!("{NS}/secrets/home-totp"),
            Answer::Json(200, secret()),
        ),
        step(
            Method::GET,
            &format!("{NS}/services/taas-home"),
            Answer::Json(200, owned("Service", "v1", "taas-home")),
        ),
        step(
            Method::GET,
            &format!("{NS}/services/taas-home-control"),
            Answer::Json(200, owned("Service", "v1", "taas-home-control")),
        ),
        step(
            Method::GET,
            &format!("{APPS}/deployments/taas-home"),
            Answer::Json(200, owned("Deployment", "apps/v1", "taas-home")),
        ),
        step(
            Method::GET,
            &format!("{NS}/configmaps/taas-home"),
            Answer::Json(200, owned("ConfigMap", "v1", "taas-home")),
        ),
    ]
}

/// The four applies, in order, with the Service and Deployment answers given.
fn applies(service: fn(&mut Value), deployment: fn(&mut Value)) -> Vec<Step> {
    applies_of("home", service, deployment)
}

/// [`applies`] for a label whose children are `taas-BASE` and `taas-BASE-control`.
fn applies_of(base: &str, service: fn(&mut Value), deployment: fn(&mut Value)) -> Vec<Step> {
    vec![
        step(
            Method::PATCH,
            &format!("{NS}/services/taas-{base}"),
            Answer::Echo(service),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/services/taas-{base}-control"),
            Answer::Echo(cluster_ip),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/configmaps/taas-{base}"),
            Answer::Echo(no_change),
        ),
        step(
            Method::PATCH,
            &format!("{APPS}/deployments/taas-{base}"),
            Answer::Echo(deployment),
        ),
    ]
}

/// The API server answers a status write with the whole object.
fn whole_label(body: &mut Value) {
    body["spec"] = serde_json::to_value(&label().spec).unwrap();
}

fn status_write() -> Step {
    step(
        Method::PATCH,
        &format!("{LABELS}/home/status"),
        Answer::Echo(whole_label),
    )
}

fn event() -> Step {
    step(Method::POST, EVENTS, Answer::Echo(no_change))
}

fn script(parts: Vec<Vec<Step>>) -> Vec<Step> {
    parts.into_iter().flatten().collect()
}

fn find<'a>(seen: &'a [Seen], method: Method, path: &str) -> &'a Value {
    &seen
        .iter()
        .find(|s| s.method == method && s.path == path)
        .unwrap_or_else(|| panic!("no {method} {path}"))
        .body
}

/// The label with the status a status write carried (what the next watch event brings).
fn with_status(label: &TaasLabel, seen: &[Seen]) -> TaasLabel {
    let mut next = label.clone();
    next.status = Some(
        serde_json::from_value(
            find(seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"].clone(),
        )
        .unwrap(),
    );
    next
}

/// Reconciles a label the operator refuses before applying anything (a LABEL conflict, a
/// tenant policy): it reads what exists, writes the status and a Warning event, applies
/// nothing (the script has no apply) and looks again after the user-fix requeue.
async fn refused_before_applying(harness: &Harness, label: &TaasLabel) -> Vec<Seen> {
    let (result, seen) = harness
        .reconcile(
            label,
            script(vec![reads_fresh(), vec![status_write(), event()]]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    seen
}

fn ready_condition(seen: &[Seen]) -> Value {
    find(seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"]["conditions"][0].clone()
}

// ---------------------------------------------------------------------------------------
// Scenarios.

#[tokio::test]
async fn first_pass_creates_everything_and_reports_the_address() {
    let harness = Harness::new();
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_fresh(),
                applies(lb_with_address, no_change),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(60))));

    // The Service went first, then the ConfigMap carries the address read back from it.
    let cm = find(&seen, Method::PATCH, &format!("{NS}/configmaps/taas-home"));
    assert_eq!(
        cm["data"]["external.yaml"],
        "host: 203.0.113.7\nports:\n  20000: 20000\n  20001: 20001\n  21000: 21000\n"
    );
    assert!(cm["data"]["label.yaml"]
        .as_str()
        .unwrap()
        .contains("label: home\n"));
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    assert_eq!(deployment["spec"]["replicas"], 1);

    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"));
    assert_eq!(status["apiVersion"], "taas.dev/v1alpha1");
    assert_eq!(status["kind"], "TaasLabel");
    assert_eq!(
        status["status"],
        json!({
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "False", "reason": "RelayNotReady",
                            "message": "0 of 1 replica serving: the relay pod is not ready yet",
                            "lastTransitionTime": "2023-11-14T22:15:00Z", "observedGeneration": 1}],
            "endpoint": "203.0.113.7:21000",
            "relay": "taas-home-control.default.svc.cluster.local.:8080",
            "ports": {"client": 21000, "rendezvous": [20000, 20001]},
            "replicas": 1,
            "readyReplicas": 0,
        })
    );
    let event = find(&seen, Method::POST, EVENTS);
    assert_eq!(event["type"], "Normal");
    assert_eq!(event["reason"], "RelayNotReady");
    assert_eq!(event["regarding"]["name"], "home");
    assert_eq!(event["reportingController"], "taas-operator");
}

#[tokio::test]
async fn second_pass_sends_the_same_bodies_and_nothing_else() {
    let harness = Harness::new();
    let (_, first) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_fresh(),
                applies(lb_with_address, no_change),
                vec![status_write(), event()],
            ]),
        )
        .await;
    let label = with_status(&label(), &first);
    // Same answers: no status write, no event.
    let (result, second) = harness
        .reconcile(
            &label,
            script(vec![reads_existing(), applies(lb_with_address, no_change)]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(60))));
    let applied = |seen: &[Seen]| -> Vec<(String, Value)> {
        seen.iter()
            .filter(|s| s.method == Method::PATCH)
            .map(|s| (s.path.clone(), s.body.clone()))
            .take(4)
            .collect()
    };
    assert_eq!(applied(&second), applied(&first));

    // The relay becomes ready: one status write, one event, a slow requeue.
    let (result, third) = harness
        .reconcile(
            &label,
            script(vec![
                reads_existing(),
                applies(lb_with_address, relay_ready),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    let ready = ready_condition(&third);
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("Ready"))
    );
    assert_eq!(find(&third, Method::POST, EVENTS)["reason"], "Ready");
}

#[tokio::test]
async fn spec_updates_reach_the_config_map_and_roll_the_pod_only_for_port_count() {
    let harness = Harness::new();
    let (_, first) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_fresh(),
                applies(lb_with_address, no_change),
                vec![status_write(), event()],
            ]),
        )
        .await;
    let deployment_before = find(
        &first,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    )
    .clone();
    let cm_before = find(&first, Method::PATCH, &format!("{NS}/configmaps/taas-home")).clone();

    // maxParked and clientAdmission change: the ConfigMap changes, the Deployment does not.
    let mut label = with_status(&label(), &first);
    label.metadata.generation = Some(2);
    label.spec.max_parked = 4;
    label.spec.client_admission = taas_crds::ClientAdmission::Redirected;
    let (_, seen) = harness
        .reconcile(
            &label,
            script(vec![
                reads_existing(),
                applies(lb_with_address, no_change),
                vec![status_write()],
            ]),
        )
        .await;
    let cm = find(&seen, Method::PATCH, &format!("{NS}/configmaps/taas-home"));
    assert_ne!(cm, &cm_before);
    assert!(cm["data"]["label.yaml"]
        .as_str()
        .unwrap()
        .contains("maxParked: 4\n"));
    assert_eq!(
        cm["data"]["external.yaml"],
        cm_before["data"]["external.yaml"]
    );
    assert_eq!(
        find(
            &seen,
            Method::PATCH,
            &format!("{APPS}/deployments/taas-home")
        ),
        &deployment_before
    );
    // The status now observes generation 2 (same reason: no event).
    let status = find(&seen, Method::PATCH, &format!("{LABELS}/home/status"));
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(
        status["status"]["conditions"][0]["lastTransitionTime"],
        "2023-11-14T22:15:00Z"
    );

    // One more rendezvous port: the Service and the pod grow a port.
    let mut label = with_status(&label, &seen);
    label.metadata.generation = Some(3);
    label.spec.rendezvous_ports = 3;
    let (_, seen) = harness
        .reconcile(
            &label,
            script(vec![
                reads_existing(),
                applies(lb_with_address, no_change),
                vec![status_write()],
            ]),
        )
        .await;
    let service = find(&seen, Method::PATCH, &format!("{NS}/services/taas-home"));
    assert_eq!(
        service["spec"]["ports"][3],
        json!({"name": "p2", "port": 20002, "targetPort": 20002, "protocol": "TCP"})
    );
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"][10],
        "20000-20002"
    );
    let status = find(&seen, Method::PATCH, &format!("{LABELS}/home/status"));
    assert_eq!(
        status["status"]["ports"]["rendezvous"],
        json!([20000, 20001, 20002])
    );
}

#[tokio::test]
async fn a_deleted_label_makes_no_requests_and_leaves_the_routes() {
    let harness = Harness::new();
    let mut going = label();
    going.metadata.deletion_timestamp = going.metadata.creation_timestamp.clone();
    let (result, seen) = harness.reconcile(&going, vec![]).await;
    assert_eq!(result, Ok(Action::await_change()));
    assert!(seen.is_empty());

    // The routes publisher, from a cache where the label is gone (or going): an empty table.
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(
        handle,
        vec![step(
            Method::PATCH,
            "/api/v1/namespaces/taas-system/configmaps/taas-routes",
            Answer::Echo(no_change),
        )],
    ));
    let table = routes::routes(&[Arc::new(going)], &Settings::default());
    let config_map = routes::config_map(&Settings::default(), &table).unwrap();
    routes::publish(&Client::new(service, "default"), &config_map)
        .await
        .unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen[0].body["data"], json!({"routes.yaml": "{}\n"}));
    assert_eq!(seen[0].body["metadata"]["name"], "taas-routes");
}

#[tokio::test]
async fn a_foreign_service_is_never_applied_over() {
    let harness = Harness::new();
    let foreign = json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "taas-home", "namespace": "default"}});
    let (result, seen) = harness
        .reconcile(
            &label(),
            vec![
                step(
                    Method::GET,
                    &format!("{NS}/secrets/home-totp"),
                    Answer::Json(200, secret()),
                ),
                step(
                    Method::GET,
                    &format!("{NS}/services/taas-home"),
                    Answer::Json(200, foreign),
                ),
                step(
                    Method::GET,
                    &format!("{NS}/services/taas-home-control"),
                    Answer::NotFound,
                ),
                step(
                    Method::GET,
                    &format!("{APPS}/deployments/taas-home"),
                    Answer::NotFound,
                ),
                step(
                    Method::GET,
                    &format!("{NS}/configmaps/taas-home"),
                    Answer::NotFound,
                ),
                status_write(),
                event(),
            ],
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    assert_eq!(
        seen.iter().filter(|s| s.method == Method::PATCH).count(),
        1,
        "only the status"
    );
    let ready = ready_condition(&seen);
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "ForeignObject");
    assert_eq!(
        ready["message"],
        "Service taas-home already exists and is not controlled by this TaasLabel: not adopting; \
         delete or rename it"
    );
    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"];
    assert!(status.get("endpoint").is_none() && status.get("relay").is_none());
    let event = find(&seen, Method::POST, EVENTS);
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("ForeignObject"))
    );
}

#[tokio::test]
async fn a_missing_secret_is_reported_but_the_objects_are_applied() {
    let harness = Harness::new();
    let mut steps = reads_fresh();
    steps[0] = step(
        Method::GET,
        &format!("{NS}/secrets/home-totp"),
        Answer::NotFound,
    );
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                steps,
                applies(lb_with_address, no_change),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    let ready = ready_condition(&seen);
    assert_eq!(ready["reason"], "SecretMissing");
    assert_eq!(ready["message"], "Secret default/home-totp not found");
    assert_eq!(find(&seen, Method::POST, EVENTS)["type"], "Warning");

    // A Secret without the key: the same reason, and no new event for it.
    let label = with_status(&label(), &seen);
    let mut steps = reads_existing();
    let mut wrong_key = secret();
    wrong_key["data"] = json!({"other": "eA=="});
    steps[0] = step(
        Method::GET,
        &format!("{NS}/secrets/home-totp"),
        Answer::Json(200, wrong_key),
    );
    let (_, seen) = harness
        .reconcile(
            &label,
            script(vec![
                steps,
                applies(lb_with_address, no_change),
                vec![status_write()],
            ]),
        )
        .await;
    assert_eq!(
        ready_condition(&seen)["message"],
        "Secret default/home-totp has no key \"secret\""
    );
}

#[tokio::test]
async fn the_newer_of_two_labels_with_one_label_is_refused() {
    let mut harness = Harness::new();
    let mut older = label();
    older.metadata.namespace = Some("team-a".into());
    older.metadata.uid = Some("uid-older".into());
    older.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(1_600_000_000).unwrap(),
    ));
    harness.cache = vec![older, label()];
    let seen = refused_before_applying(&harness, &label()).await;
    let ready = ready_condition(&seen);
    assert_eq!(ready["reason"], "LabelConflict");
    assert_eq!(
        ready["message"],
        "LABEL \"home\" is already served by TaasLabel team-a/home (the oldest one wins)"
    );
}

#[tokio::test]
async fn node_port_uses_node_addresses_and_allocated_ports() {
    let harness = Harness::new();
    let mut label = label();
    label.spec.service.type_ = Some(taas_crds::ServiceType::NodePort);
    label.spec.client_port = Some(30443);
    let nodes = json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": [
        {"metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.10"}],
                                                "conditions": [{"type": "Ready", "status": "True"}]}},
    ]});
    let mut steps = reads_fresh();
    steps.push(step(Method::GET, "/api/v1/nodes", Answer::Json(200, nodes)));
    let (result, seen) = harness
        .reconcile(
            &label,
            script(vec![
                steps,
                applies(node_ports, relay_ready),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    let service = find(&seen, Method::PATCH, &format!("{NS}/services/taas-home"));
    assert_eq!(service["spec"]["ports"][0]["nodePort"], 30443);
    assert_eq!(
        find(&seen, Method::PATCH, &format!("{NS}/configmaps/taas-home"))["data"]["external.yaml"],
        "host: 192.168.5.10\nports:\n  20000: 32001\n  20001: 32002\n  21000: 30443\n"
    );
    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"];
    assert_eq!(status["endpoint"], "192.168.5.10:30443");
    assert_eq!(
        status["ports"],
        json!({"client": 30443, "rendezvous": [32001, 32002]})
    );
}

#[tokio::test]
async fn a_rejected_object_is_reported_for_the_user() {
    let harness = Harness::new();
    let invalid = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
                         "reason": "Invalid",
                         "message": "Service \"taas-home\" is invalid: spec.ports[0].nodePort: Invalid value: 30443: provided port is already allocated"});
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_fresh(),
                vec![
                    step(
                        Method::PATCH,
                        &format!("{NS}/services/taas-home"),
                        Answer::Json(422, invalid),
                    ),
                    status_write(),
                    event(),
                ],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    let ready = ready_condition(&seen);
    assert_eq!(ready["reason"], "ApplyRejected");
    assert!(ready["message"]
        .as_str()
        .unwrap()
        .starts_with("applying Service taas-home: Service \"taas-home\" is invalid"));
}

#[tokio::test]
async fn api_errors_back_off_exponentially() {
    let harness = Harness::new();
    let broken = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                        "reason": "InternalError", "message": "etcd is sad"});
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let steps = (0..2)
        .map(|_| {
            step(
                Method::GET,
                &format!("{NS}/secrets/home-totp"),
                Answer::Json(500, broken.clone()),
            )
        })
        .collect();
    let server = tokio::spawn(serve(handle, steps));
    let context = harness.context(Client::new(service, "default"));
    let label = Arc::new(label());
    let mut delays = Vec::new();
    for _ in 0..2 {
        let error = reconcile(label.clone(), context.clone()).await.unwrap_err();
        assert!(
            error.to_string().starts_with("reading Secret home-totp: "),
            "{error}"
        );
        delays.push(error_policy(label.clone(), &error, context.clone()));
    }
    assert_eq!(
        delays,
        [
            Action::requeue(Duration::from_secs(1)),
            Action::requeue(Duration::from_secs(2))
        ]
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_label_the_policy_does_not_allow_in_its_namespace_gets_no_objects() {
    let mut harness = Harness::new();
    harness.settings.policy =
        taas_operator::policy::TenantPolicy::from_yaml("labels: {team-a: [home]}").unwrap();
    // The label is read, then refused: no apply at all (the script has none), a status and a
    // Warning event say why.
    let seen = refused_before_applying(&harness, &label()).await;
    let ready = ready_condition(&seen);
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "LabelNotAllowed");
    assert_eq!(
        ready["message"],
        "the cluster's label policy does not let namespace default claim LABEL \"home\" \
         (allowed here: none)"
    );
    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"];
    assert!(status.get("relay").is_none(), "{status}");
    let event = find(&seen, Method::POST, EVENTS);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "LabelNotAllowed");
}

#[tokio::test]
async fn a_service_the_policy_does_not_allow_is_not_applied() {
    let mut harness = Harness::new();
    harness.settings.policy = taas_operator::policy::TenantPolicy::from_yaml(
        "services: {default: {types: [ClusterIP, NodePort], clientPort: false}}",
    )
    .unwrap();
    let seen = refused_before_applying(&harness, &label()).await; // a LoadBalancer
    let ready = ready_condition(&seen);
    assert_eq!(ready["reason"], "ServiceNotAllowed");
    assert_eq!(
        ready["message"],
        "Service type LoadBalancer is not allowed in namespace default (allowed: ClusterIP, NodePort)"
    );
}

#[tokio::test]
async fn with_a_gateway_secret_the_relay_gets_its_labels_token_and_nothing_else_shows_it() {
    let mut harness = Harness::new();
    let secret =
        taas_protocol::gateway_auth::InstallSecret::new(b"install secret for the tests 0123")
            .unwrap();
    harness.settings.gateway_secret = Some(secret.clone());
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_fresh(),
                applies(lb_with_address, no_change),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(60))));
    let token = secret.token_for("home");
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .contains(&json!({"name": "TAAS_GATEWAY_TOKEN", "value": token.expose()})),
        "{env}"
    );
    // Only the Deployment carries it: not the Services, the ConfigMap, the status or the event.
    for s in &seen {
        if s.path != format!("{APPS}/deployments/taas-home") {
            assert!(
                !s.body.to_string().contains(token.expose()),
                "{} {} shows the token",
                s.method,
                s.path
            );
        }
    }
}

#[tokio::test]
async fn secrets_are_watched_as_metadata_only() {
    use futures::StreamExt as _;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut changes = taas_operator::controller::secret_changes(&client, None).boxed();
    let poll = tokio::spawn(async move { changes.next().await.map(|r| r.map(|m| m.metadata)) });
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the Secret watch lists")
        .expect("client gone");
    assert_eq!(request.uri().path(), "/api/v1/secrets");
    let (group, resource, verb) =
        rbac_of(request.method(), request.uri().path()).expect("a resource request");
    assert!(rbac::allows(&group, &resource, verb));
    // Only metadata is asked for: the API server then sends no Secret's data.
    let accept = request.headers()["accept"].to_str().unwrap().to_string();
    assert!(
        accept.starts_with("application/json;as=PartialObjectMetadataList"),
        "{accept}"
    );
    let list = json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
        "metadata": {"resourceVersion": "5"},
        "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": "home-totp", "namespace": "default", "resourceVersion": "4"}}],
    });
    send.send_response(Response::new(Body::from(
        serde_json::to_vec(&list).unwrap(),
    )));
    let first = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap()
        .expect("a change")
        .expect("no error");
    assert_eq!(first.name.as_deref(), Some("home-totp"));
}

#[tokio::test]
async fn a_running_relay_the_policy_now_refuses_is_scaled_to_zero() {
    let mut harness = Harness::new();
    harness.settings.policy =
        taas_operator::policy::TenantPolicy::from_yaml("labels: {team-a: [home]}").unwrap();
    // The label's objects exist (made before the policy): the relay Deployment alone is
    // applied again, with no replica; nothing else is touched, nothing deleted.
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_existing(),
                vec![
                    step(
                        Method::PATCH,
                        &format!("{APPS}/deployments/taas-home"),
                        Answer::Echo(no_change),
                    ),
                    status_write(),
                    event(),
                ],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    assert_eq!(deployment["spec"]["replicas"], 0);
    assert_eq!(ready_condition(&seen)["reason"], "LabelNotAllowed");
    // Once allowed again, the usual apply brings one replica back.
    harness.settings.policy =
        taas_operator::policy::TenantPolicy::from_yaml("labels: {default: [home]}").unwrap();
    let (_, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads_existing(),
                applies(lb_with_address, no_change),
                vec![status_write(), event()],
            ]),
        )
        .await;
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    assert_eq!(deployment["spec"]["replicas"], 1);
}

/// The gateway's Service as the chart makes it for the cluster edge (`shared` 9443 and
/// `rdv-T` for 20000-20255, port == targetPort), with a load balancer address.
fn gateway_service() -> Value {
    let mut ports = vec![json!({"name": "https", "port": 443, "targetPort": "https"})];
    ports.push(json!({"name": "shared", "port": 9443, "targetPort": 9443}));
    ports.extend(
        (20000..=20255).map(|t| json!({"name": format!("rdv-{t}"), "port": t, "targetPort": t})),
    );
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "taas-gateway", "namespace": "taas-system"},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.9", "ports": ports},
           "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}})
}

/// The three applies of a label reached through the gateway: no Service of its own.
fn applies_behind_the_gateway() -> Vec<Step> {
    let mut all = applies(no_change, relay_ready);
    all.remove(0);
    all
}

#[tokio::test]
async fn in_edge_mode_a_label_without_a_service_type_is_reached_at_the_gateway() {
    let mut harness = Harness::new();
    let edge = taas_operator::edge::EdgeSettings {
        service: "taas-gateway".into(),
        shared_port: 9443,
        rendezvous: "20000-20255".parse().unwrap(),
    };
    harness.settings.edge = Some(edge.clone());
    let gateway_path = "/api/v1/namespaces/taas-system/services/taas-gateway";
    let slice = taas_operator::edge::label_slice(&label(), &edge);

    // No gateway Service yet: the objects are applied, the relay is told the Service's name,
    // and the label waits for the address.
    let mut reads = reads_fresh();
    reads.push(step(Method::GET, gateway_path, Answer::NotFound));
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads,
                applies_behind_the_gateway(),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(60))));
    assert!(!seen
        .iter()
        .any(|s| s.method == Method::PATCH && s.path == format!("{NS}/services/taas-home")));
    let external = |seen: &[Seen]| {
        find(seen, Method::PATCH, &format!("{NS}/configmaps/taas-home"))["data"]["external.yaml"]
            .clone()
    };
    assert_eq!(
        external(&seen),
        format!(
            "host: taas-gateway.taas-system.svc\nports:\n  20000: {}\n  20001: {}\n  21000: 9443\n",
            slice[0], slice[1]
        )
    );
    let condition = ready_condition(&seen);
    assert_eq!(condition["reason"], "WaitingForAddress");
    assert_eq!(
        condition["message"],
        "waiting for the gateway Service taas-gateway (the cluster edge)"
    );
    // The relay listens on its edge port, which its control Service exposes.
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains(r#""--edge","0.0.0.0:21001""#), "{args}");
    let control = find(
        &seen,
        Method::PATCH,
        &format!("{NS}/services/taas-home-control"),
    );
    assert_eq!(
        control["spec"]["ports"][1],
        json!({"name": "edge", "port": 21001, "targetPort": 21001, "protocol": "TCP"})
    );

    // With the gateway's address: the relay advertises it, the shared port and its slice.
    let mut reads = reads_fresh();
    reads.push(step(
        Method::GET,
        gateway_path,
        Answer::Json(200, gateway_service()),
    ));
    let (result, seen) = harness
        .reconcile(
            &label(),
            script(vec![
                reads,
                applies_behind_the_gateway(),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    assert_eq!(
        external(&seen),
        format!(
            "host: 203.0.113.1\nports:\n  20000: {}\n  20001: {}\n  21000: 9443\n",
            slice[0], slice[1]
        )
    );
    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"];
    assert_eq!(status["endpoint"], "203.0.113.1:9443");
    assert_eq!(
        status["ports"],
        json!({"client": 9443, "rendezvous": slice})
    );
    assert_eq!(ready_condition(&seen)["reason"], "Ready");

    // A label that asks for a Service of its own keeps it, exposed as before.
    let mut own = label();
    own.spec.service.type_ = Some(taas_crds::ServiceType::LoadBalancer);
    let (_, seen) = harness
        .reconcile(
            &own,
            script(vec![
                reads_fresh(),
                applies(lb_with_address, relay_ready),
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert!(external(&seen)
        .as_str()
        .unwrap()
        .starts_with("host: 203.0.113.7\n"));
}

fn two_replicas_one_ready(deployment: &mut Value) {
    deployment["status"] = json!({"replicas": 2, "readyReplicas": 1});
}

fn two_replicas_ready(deployment: &mut Value) {
    deployment["status"] = json!({"replicas": 2, "readyReplicas": 2});
}

/// The reads of a label reached through the gateway whose objects exist, its Deployment
/// with `replicas` as last applied.
fn reads_behind_the_gateway(replicas: u32) -> Vec<Step> {
    let mut reads = reads_existing();
    reads[1] = step(
        Method::GET,
        &format!("{NS}/services/taas-home"),
        Answer::NotFound,
    );
    let mut deployment = owned("Deployment", "apps/v1", "taas-home");
    deployment["spec"] = json!({"replicas": replicas});
    reads[3] = step(
        Method::GET,
        &format!("{APPS}/deployments/taas-home"),
        Answer::Json(200, deployment),
    );
    reads.push(step(
        Method::GET,
        "/api/v1/namespaces/taas-system/services/taas-gateway",
        Answer::Json(200, gateway_service()),
    ));
    reads
}

const BUDGETS_V1BETA1: &str = "/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets";
const BUDGETS_V1: &str = "/apis/policy/v1/namespaces/default/poddisruptionbudgets";

#[tokio::test]
async fn two_replicas_get_a_disruption_budget_in_the_served_version_and_lose_it_at_one() {
    let mut harness = Harness::new();
    harness.settings.edge = Some(taas_operator::edge::EdgeSettings {
        service: "taas-gateway".into(),
        shared_port: 9443,
        rendezvous: "20000-20255".parse().unwrap(),
    });
    let mut two = label();
    two.spec.replicas = Some(2);

    // Nobody asked the version yet: discovery says no policy/v1 (Kubernetes 1.20), so the
    // budget is applied as policy/v1beta1, after the Deployment.
    let mut budget = applies_behind_the_gateway();
    budget[2] = step(
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
        Answer::Echo(two_replicas_one_ready),
    );
    budget.push(step(Method::GET, "/apis/policy/v1", Answer::NotFound));
    budget.push(step(
        Method::PATCH,
        &format!("{BUDGETS_V1BETA1}/taas-home"),
        Answer::Echo(no_change),
    ));
    let (result, seen) = harness
        .reconcile(
            &two,
            script(vec![
                reads_behind_the_gateway(1),
                budget,
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(60))));
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );
    let pdb = find(
        &seen,
        Method::PATCH,
        &format!("{BUDGETS_V1BETA1}/taas-home"),
    );
    assert_eq!(pdb["apiVersion"], "policy/v1beta1");
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    assert_eq!(pdb["metadata"]["ownerReferences"][0]["uid"], "uid-home");
    assert_eq!(
        pdb["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "taas-operator"
    );
    // One of two ready: served, degraded.
    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"];
    assert_eq!(
        (&status["replicas"], &status["readyReplicas"]),
        (&json!(2), &json!(1))
    );
    let ready = ready_condition(&seen);
    assert_eq!(
        (
            ready["status"].as_str(),
            ready["reason"].as_str(),
            ready["message"].as_str()
        ),
        (
            Some("True"),
            Some("Degraded"),
            Some("1 of 2 replicas serving")
        )
    );

    // Both ready, on a cluster that serves policy/v1 (found at start): no discovery.
    harness.budget_version = Some(BudgetVersion::V1);
    let two = with_status(&two, &seen);
    let mut budget = applies_behind_the_gateway();
    budget[2] = step(
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
        Answer::Echo(two_replicas_ready),
    );
    budget.push(step(
        Method::PATCH,
        &format!("{BUDGETS_V1}/taas-home"),
        Answer::Echo(no_change),
    ));
    let (_, seen) = harness
        .reconcile(
            &two,
            script(vec![
                reads_behind_the_gateway(2),
                budget,
                vec![status_write(), event()],
            ]),
        )
        .await;
    assert_eq!(
        find(&seen, Method::PATCH, &format!("{BUDGETS_V1}/taas-home"))["apiVersion"],
        "policy/v1"
    );
    let ready = ready_condition(&seen);
    assert_eq!(
        (
            ready["status"].as_str(),
            ready["reason"].as_str(),
            ready["message"].as_str()
        ),
        (Some("True"), Some("Ready"), Some("2 of 2 replicas serving"))
    );

    // Back to one: the budget (ours) is deleted, by UID, before the Deployment shrinks.
    let mut one = with_status(&two, &seen);
    one.spec.replicas = Some(1);
    let mut ours = owned("PodDisruptionBudget", "policy/v1", "taas-home");
    ours["metadata"]["uid"] = json!("uid-pdb");
    let mut steps = applies_behind_the_gateway();
    steps.insert(
        2,
        step(
            Method::GET,
            &format!("{BUDGETS_V1}/taas-home"),
            Answer::Json(200, ours),
        ),
    );
    steps.insert(
        3,
        step(
            Method::DELETE,
            &format!("{BUDGETS_V1}/taas-home"),
            Answer::Json(
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
        ),
    );
    let (result, seen) = harness
        .reconcile(
            &one,
            // Ready before and after (2 of 2, 1 of 1): a new message, no event.
            script(vec![
                reads_behind_the_gateway(2),
                steps,
                vec![status_write()],
            ]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    let delete = seen.iter().find(|s| s.method == Method::DELETE).unwrap();
    assert_eq!(delete.body["preconditions"], json!({"uid": "uid-pdb"}));
    let deployment = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/deployments/taas-home"),
    );
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert!(deployment["spec"]["template"]["spec"]
        .get("topologySpreadConstraints")
        .is_none());

    // At one, as before: no budget request at all. A budget that is not ours is left alone.
    let one = with_status(&one, &seen);
    let (_, seen) = harness
        .reconcile(
            &one,
            script(vec![
                reads_behind_the_gateway(1),
                applies_behind_the_gateway(),
            ]),
        )
        .await;
    assert!(!seen.iter().any(|s| s.path.contains("poddisruptionbudgets")));
    let mut steps = applies_behind_the_gateway();
    steps.insert(
        2,
        step(
            Method::GET,
            &format!("{BUDGETS_V1}/taas-home"),
            Answer::Json(
                200,
                json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                     "metadata": {"name": "taas-home", "namespace": "default"}}),
            ),
        ),
    );
    let (result, seen) = harness
        .reconcile(&one, script(vec![reads_behind_the_gateway(2), steps]))
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    assert!(!seen.iter().any(|s| s.method == Method::DELETE));
}

fn stateful_set_two_ready(stateful_set: &mut Value) {
    stateful_set["status"] = json!({"replicas": 2, "readyReplicas": 2});
}

/// What the API server says to a DELETE that went through.
fn deleted() -> Answer {
    Answer::Json(
        200,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    )
}

/// `owned(...)` with a UID, for a delete's precondition.
fn owned_with_uid(kind: &str, api_version: &str, name: &str) -> Value {
    let mut object = owned(kind, api_version, name);
    object["metadata"]["uid"] = json!(format!("uid-{name}"));
    object
}

#[tokio::test]
async fn two_replicas_with_a_service_of_the_labels_own_get_a_stateful_set_and_a_service_each() {
    let mut harness = Harness::new();
    harness.budget_version = Some(BudgetVersion::V1);
    let mut two = label();
    two.spec.replicas = Some(2);
    let mut reads = reads_fresh();
    // Several replicas with a Service of the label's own: the StatefulSet is looked for.
    reads.insert(
        4,
        step(
            Method::GET,
            &format!("{APPS}/statefulsets/taas-home"),
            Answer::NotFound,
        ),
    );
    let first = vec![
        step(
            Method::PATCH,
            &format!("{NS}/services/taas-home-0"),
            Answer::Echo(lb_with_address),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/services/taas-home-1"),
            Answer::Echo(lb_with_address),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/services/taas-home-control"),
            Answer::Echo(cluster_ip),
        ),
        step(
            Method::PATCH,
            &format!("{NS}/configmaps/taas-home"),
            Answer::Echo(no_change),
        ),
        step(
            Method::PATCH,
            &format!("{APPS}/statefulsets/taas-home"),
            Answer::Echo(stateful_set_two_ready),
        ),
        step(
            Method::PATCH,
            &format!("{BUDGETS_V1}/taas-home"),
            Answer::Echo(no_change),
        ),
    ];
    let (result, seen) = harness
        .reconcile(
            &two,
            script(vec![reads, first, vec![status_write(), event()]]),
        )
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    let stateful_set = find(
        &seen,
        Method::PATCH,
        &format!("{APPS}/statefulsets/taas-home"),
    );
    assert_eq!(stateful_set["kind"], "StatefulSet");
    assert_eq!(stateful_set["spec"]["replicas"], 2);
    assert_eq!(stateful_set["spec"]["serviceName"], "taas-home-control");
    assert_eq!(stateful_set["spec"]["podManagementPolicy"], "Parallel");
    let env = &stateful_set["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "TAAS_POD_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "{env}"
    );
    for i in 0..2 {
        let service = find(
            &seen,
            Method::PATCH,
            &format!("{NS}/services/taas-home-{i}"),
        );
        assert_eq!(
            service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            format!("taas-home-{i}")
        );
        assert_eq!(service["metadata"]["ownerReferences"][0]["uid"], "uid-home");
    }
    // Each relay finds its own address under its pod name.
    let external: Value = serde_yaml::from_str(
        find(&seen, Method::PATCH, &format!("{NS}/configmaps/taas-home"))["data"]["external.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(external["host"], "203.0.113.7");
    assert_eq!(external["pods"]["taas-home-1"]["host"], "203.0.113.7");
    assert_eq!(external["pods"]["taas-home-0"]["ports"]["21000"], 21000);
    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/home/status"))["status"];
    assert_eq!(
        (&status["replicas"], &status["readyReplicas"]),
        (&json!(2), &json!(2))
    );
    assert!(!seen.iter().any(|s| s.method == Method::DELETE));

    // Back to one: the budget goes, the Deployment and the label's one Service come back,
    // then the StatefulSet and its pods' Services go (each ours, by UID).
    let mut one = with_status(&two, &seen);
    one.spec.replicas = Some(1);
    let mut stateful_set = owned_with_uid("StatefulSet", "apps/v1", "taas-home");
    stateful_set["spec"] = json!({"replicas": 2});
    let reads = vec![
        step(
            Method::GET,
            &format!("{NS}/secrets/home-totp"),
            Answer::Json(200, secret()),
        ),
        step(
            Method::GET,
            &format!("{NS}/services/taas-home"),
            Answer::NotFound,
        ),
        step(
            Method::GET,
            &format!("{NS}/services/taas-home-control"),
            Answer::Json(200, owned("Service", "v1", "taas-home-control")),
        ),
        step(
            Method::GET,
            &format!("{APPS}/deployments/taas-home"),
            Answer::NotFound,
        ),
        step(
            Method::GET,
            &format!("{APPS}/statefulsets/taas-home"),
            Answer::Json(200, stateful_set.clone()),
        ),
        step(
            Method::GET,
            &format!("{NS}/configmaps/taas-home"),
            Answer::Json(200, owned("ConfigMap", "v1", "taas-home")),
        ),
    ];
    let mut steps = applies(lb_with_address, relay_ready);
    let deployment = steps.pop().unwrap();
    steps.extend([
        step(
            Method::GET,
            &format!("{BUDGETS_V1}/taas-home"),
            Answer::Json(
                200,
                owned_with_uid("PodDisruptionBudget", "policy/v1", "taas-home"),
            ),
        ),
        step(
            Method::DELETE,
            &format!("{BUDGETS_V1}/taas-home"),
            deleted(),
        ),
        deployment,
        step(
            Method::GET,
            &format!("{APPS}/statefulsets/taas-home"),
            Answer::Json(200, stateful_set),
        ),
        step(
            Method::DELETE,
            &format!("{APPS}/statefulsets/taas-home"),
            deleted(),
        ),
    ]);
    for i in 0..2 {
        let name = format!("taas-home-{i}");
        steps.push(step(
            Method::GET,
            &format!("{NS}/services/{name}"),
            Answer::Json(200, owned_with_uid("Service", "v1", &name)),
        ));
        steps.push(step(
            Method::DELETE,
            &format!("{NS}/services/{name}"),
            deleted(),
        ));
    }
    let (result, seen) = harness
        .reconcile(&one, script(vec![reads, steps, vec![status_write()]]))
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));
    let deletes: Vec<(&str, &Value)> = seen
        .iter()
        .filter(|s| s.method == Method::DELETE)
        .map(|s| (s.path.as_str(), &s.body["preconditions"]["uid"]))
        .collect();
    assert_eq!(
        deletes,
        vec![
            (
                "/apis/policy/v1/namespaces/default/poddisruptionbudgets/taas-home",
                &json!("uid-taas-home")
            ),
            (
                "/apis/apps/v1/namespaces/default/statefulsets/taas-home",
                &json!("uid-taas-home")
            ),
            (
                "/api/v1/namespaces/default/services/taas-home-0",
                &json!("uid-taas-home-0")
            ),
            (
                "/api/v1/namespaces/default/services/taas-home-1",
                &json!("uid-taas-home-1")
            ),
        ]
    );
    // And at one, as before: no StatefulSet request at all.
    let one = with_status(&one, &seen);
    let (_, seen) = harness
        .reconcile(
            &one,
            script(vec![
                reads_existing(),
                applies(lb_with_address, relay_ready),
            ]),
        )
        .await;
    assert!(!seen.iter().any(|s| s.path.contains("statefulsets")));
}

#[tokio::test]
async fn two_replicas_with_a_pinned_node_port_are_refused_before_applying() {
    let harness = Harness::new();
    let mut two = label();
    two.spec.replicas = Some(2);
    two.spec.service.type_ = Some(taas_crds::ServiceType::NodePort);
    two.spec.client_port = Some(30443);
    let mut reads = reads_fresh();
    reads.insert(
        4,
        step(
            Method::GET,
            &format!("{APPS}/statefulsets/taas-home"),
            Answer::NotFound,
        ),
    );
    let nodes = json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": []});
    reads.push(step(Method::GET, "/api/v1/nodes", Answer::Json(200, nodes)));
    let (result, seen) = harness
        .reconcile(&two, script(vec![reads, vec![status_write(), event()]]))
        .await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(300))));
    let ready = ready_condition(&seen);
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("the pinned clientPort 30443 cannot be the node port of several"),
        "{ready}"
    );
}

/// A label named `name` whose children are `taas-BASE` and `taas-BASE-control`: read, applied
/// once with an address and a ready relay; returns what was sent.
async fn first_pass_of(name: &str, base: &str) -> Vec<Seen> {
    let mut l = label();
    l.metadata.name = Some(name.to_string());
    l.metadata.uid = Some(format!("uid-{base}"));
    let relay = format!("taas-{base}");
    let control = format!("taas-{base}-control");
    let steps = script(vec![
        reads_fresh_of(base),
        applies_of(base, lb_with_address, relay_ready),
        vec![
            step(
                Method::PATCH,
                &format!("{LABELS}/{name}/status"),
                Answer::Echo(whole_label),
            ),
            event(),
        ],
    ]);
    let (result, seen) = Harness::new().reconcile(&l, steps).await;
    assert_eq!(result, Ok(Action::requeue(Duration::from_secs(600))));

    // Every child is named from the base, selects by it, and is owned by the label.
    for (kind, path) in [
        ("Service", format!("{NS}/services/{relay}")),
        ("Service", format!("{NS}/services/{control}")),
        ("ConfigMap", format!("{NS}/configmaps/{relay}")),
        ("Deployment", format!("{APPS}/deployments/{relay}")),
    ] {
        let body = find(&seen, Method::PATCH, &path);
        assert_eq!(body["kind"], kind);
        assert_eq!(body["metadata"]["ownerReferences"][0]["name"], name);
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/instance"],
            base
        );
    }
    let deployment = find(&seen, Method::PATCH, &format!("{APPS}/deployments/{relay}"));
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        base
    );
    // The relay is told its TaasLabel's real name.
    let cm = find(&seen, Method::PATCH, &format!("{NS}/configmaps/{relay}"));
    assert!(cm["data"]["label.yaml"]
        .as_str()
        .unwrap()
        .contains(&format!("name: {name}\n")));

    let status = &find(&seen, Method::PATCH, &format!("{LABELS}/{name}/status"))["status"];
    assert_eq!(status["conditions"][0]["reason"], "Ready");
    assert_eq!(
        status["relay"],
        format!("{control}.default.svc.cluster.local.:8080")
    );
    seen
}

#[tokio::test]
async fn a_dotted_name_is_served_under_derived_child_names() {
    first_pass_of("automatic.home", "automatic-home-e0e054ecb8").await;
    // Its look-alike keeps its own names: the two never share children.
    first_pass_of("automatic-home", "automatic-home").await;
}

#[tokio::test]
async fn a_253_character_name_is_served_under_derived_child_names() {
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(name.len(), 253);
    first_pass_of(&name, &format!("{}-8b50ab2ca1", "a".repeat(39))).await;
}
