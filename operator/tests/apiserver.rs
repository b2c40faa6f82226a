//! End to end against a REAL Kubernetes API server (kube-apiserver + etcd +
//! kube-controller-manager v1.20, built from Debian's sources by `scripts/k8s/`), with RBAC
//! on and the operator running under the chart's own ServiceAccount and ClusterRole.
//!
//! No kubelet runs here, so no pod ever starts: the label's relay is started as a local
//! process from exactly the configuration the operator produced (its ConfigMap, its
//! Deployment's arguments, the Secret), and the gateway likewise from the routes ConfigMap;
//! a registration and a mobile client then go through them. A load balancer is played by
//! patching the Service's `status.loadBalancer`, as a cloud controller would.
//!
//! Needs `scripts/k8s/build-kubernetes.sh` and `scripts/k8s/tools.sh` to have run (the test
//! script does both; the binaries are cached outside the clone), so these tests are a tier of
//! their own: they run only with `TAAS_TEST_APISERVER=1`, which `scripts/test.sh` sets. Without
//! it each says in one line that it was skipped and how to run it; with it they never skip:
//! `apiserver.sh` builds Kubernetes if it is missing, and a build or start that fails fails
//! them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(60);
const NS: &str = "taas-system";

/// The opt-in of this tier (see the module docs).
const OPT_IN: &str = "TAAS_TEST_APISERVER";

/// Whether the API-server tier runs: `TAAS_TEST_APISERVER` set, and neither empty nor `0`.
/// If not, says so in one line written past the test harness's output capture, so that the
/// skip shows in `cargo test`'s output.
fn opted_in(test: &str) -> bool {
    let value = std::env::var_os(OPT_IN);
    if value.is_some_and(|v| !v.is_empty() && v != "0") {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: skipped (needs a Kubernetes build); to run it: \
         bash scripts/k8s/build-kubernetes.sh && \
         {OPT_IN}=1 cargo test -p taas-operator --test apiserver (scripts/test.sh does both)"
    );
    false
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running API server in a private directory; torn down on drop, even when a test fails.
struct ApiServer {
    dir: tempfile::TempDir,
    admin: PathBuf,
    tools: PathBuf,
}

impl ApiServer {
    fn up() -> Self {
        let tools = run_script("scripts/k8s/tools.sh", &[]);
        let dir = tempfile::Builder::new()
            .prefix("taas-k8s-")
            .tempdir()
            .unwrap();
        let dir_arg = dir.path().to_str().unwrap().to_string();
        run_script("scripts/k8s/apiserver.sh", &["up", &dir_arg]);
        let admin = dir.path().join("admin.kubeconfig");
        Self {
            dir,
            admin,
            tools: PathBuf::from(tools.trim()),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig authenticating as a ServiceAccount (to run the operator with its RBAC).
    fn service_account(&self, namespace: &str, name: &str) -> PathBuf {
        let out = self.dir().join(format!("{namespace}-{name}.kubeconfig"));
        run_script(
            "scripts/k8s/apiserver.sh",
            &[
                "sa-kubeconfig",
                self.dir().to_str().unwrap(),
                namespace,
                name,
                out.to_str().unwrap(),
            ],
        );
        out
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut command = Command::new(self.tools.join("kubectl"));
        command
            .env("KUBECONFIG", &self.admin)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// kubectl that must succeed; returns stdout.
    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A merge patch of `kind/name` in `namespace`, which must succeed.
    fn merge_patch(&self, kind: &str, name: &str, namespace: &str, patch: &str) {
        self.ok(
            &[
                "patch",
                kind,
                name,
                "-n",
                namespace,
                "--type=merge",
                "-p",
                patch,
            ],
            None,
        );
    }

    /// A merge patch of the status of `kind/name` in `namespace` (what a controller other
    /// than the operator writes), which must succeed.
    fn merge_patch_status(&self, kind: &str, name: &str, namespace: &str, patch: &str) {
        let args = ["patch", kind, name, "-n", namespace, "--subresource=status"];
        self.ok(&[&args[..], &["--type=merge", "-p", patch]].concat(), None);
    }

    fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        let out = self.kubectl(&all, None);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Waits (bounded) until `kubectl get ARGS` returns an object for which `check` holds.
    fn wait(&self, what: &str, args: &[&str], check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(value) = self.get(args) {
                if check(&value) {
                    return value;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.get(args)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn helm_template(&self, extra: &[&str]) -> String {
        let out = Command::new(self.tools.join("helm"))
            .env("HOME", self.dir())
            .args([
                "template",
                "taas",
                repo().join("charts/taas").to_str().unwrap(),
                "--namespace",
                NS,
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/k8s/apiserver.sh"))
            .args(["down", self.dir().to_str().unwrap()])
            .output();
    }
}

fn run_script(script: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn condition<'a>(label: &'a Value, kind: &str) -> Option<&'a Value> {
    label["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn ready_reason(label: &Value) -> String {
    condition(label, "Ready")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The operator binary, under the given kubeconfig, with `extra` flags.
fn start_operator(kubeconfig: &Path, log: &Path, extra: &[&str]) -> Process {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_taas-operator"))
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .args(["--operator-namespace", NS, "--metrics", "127.0.0.1:0"])
        .args([
            "--registrar",
            "taas-registrar.localhost",
            "--domain",
            "taas.localhost",
        ])
        .args(["--user-fix-requeue", "5"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Process(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What a kubelet would report: the relay Deployment's pod is ready.
fn mark_relay_ready(k8s: &ApiServer, namespace: &str, name: &str) {
    mark_relays_ready(k8s, namespace, name, 1, 1);
}

/// What a kubelet would report for a Deployment of `replicas` pods, `ready` of them ready.
fn mark_relays_ready(k8s: &ApiServer, namespace: &str, name: &str, replicas: u32, ready: u32) {
    let patch = format!(
        r#"{{"status":{{"replicas":{replicas},"readyReplicas":{ready},"availableReplicas":{ready},"updatedReplicas":{replicas}}}}}"#
    );
    k8s.merge_patch_status("deployment", name, namespace, &patch);
}

/// What a cloud controller would do: give the Service a load-balancer address.
fn give_address(k8s: &ApiServer, namespace: &str, name: &str, ip: &str) {
    let patch = format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{ip}"}}]}}}}}}"#);
    k8s.merge_patch_status("service", name, namespace, &patch);
}

/// The relay the Deployment describes, started here: its ConfigMap and Secret written to
/// local files, its arguments taken from the Deployment (paths and control port adapted).
fn start_relay_from_cluster(
    k8s: &ApiServer,
    namespace: &str,
    name: &str,
    work: &Path,
) -> (Process, SocketAddr) {
    let deployment = k8s
        .get(&["deployment", name, "-n", namespace])
        .expect("deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let configmap = k8s
        .get(&["configmap", name, "-n", namespace])
        .expect("configmap");
    let label_dir = work.join("label");
    let secret_dir = work.join("secret");
    std::fs::create_dir_all(&label_dir).unwrap();
    std::fs::create_dir_all(&secret_dir).unwrap();
    for (key, value) in configmap["data"].as_object().unwrap() {
        std::fs::write(label_dir.join(key), value.as_str().unwrap()).unwrap();
    }
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let secret_name = volumes
        .iter()
        .find_map(|v| v["secret"]["secretName"].as_str())
        .expect("the Secret is mounted");
    let secret = k8s
        .get(&["secret", secret_name, "-n", namespace])
        .expect("secret");
    for (key, value) in secret["data"].as_object().unwrap() {
        let bytes = base64_decode(value.as_str().unwrap());
        std::fs::write(secret_dir.join(key), bytes).unwrap();
    }
    let control: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let adapted: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("/etc/taas/label", label_dir.to_str().unwrap())
                .replace("/etc/taas/secret", secret_dir.to_str().unwrap())
                .replace("0.0.0.0:8080", &control.to_string())
                .replace("0.0.0.0:9464", "off")
        })
        .collect();
    // The container's environment too (the gateway token, log settings).
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect();
    let child = Command::new(relay_bin())
        .args(&adapted)
        .envs(env)
        .arg("--reload-interval")
        .arg("0.2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    wait_port(control);
    (Process(child), control)
}

fn relay_bin() -> PathBuf {
    // Built by `cargo test --workspace` (same target directory as this test).
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("taas-relay");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p taas-relay` (or test the workspace)",
        bin.display()
    );
    bin
}

fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// The gateway, started here with the routes the operator published (the relay's in-cluster
/// address replaced by where the test runs it) and the install secret (as the chart gives
/// it: an environment variable naming the mounted file).
fn start_gateway(
    k8s: &ApiServer,
    work: &Path,
    relays: &BTreeMap<String, SocketAddr>,
    gateway_secret: &Path,
) -> (Process, SocketAddr) {
    let routes = k8s
        .get(&["configmap", "taas-routes", "-n", NS])
        .expect("routes ConfigMap");
    let mut text = routes["data"]["routes.yaml"].as_str().unwrap().to_string();
    for (in_cluster, local) in relays {
        text = text.replace(in_cluster, &local.to_string());
    }
    std::fs::write(work.join("routes.yaml"), text).unwrap();
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = Command::new(relay_bin())
        .current_dir(work)
        .env("TAAS_GATEWAY_SECRET_FILE", gateway_secret)
        .args([
            "gateway",
            "--metrics",
            "off",
            "--listen",
            &listen.to_string(),
        ])
        .args(["--routes-file", "routes.yaml", "--reload-interval", "0.2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("gateway.log")).unwrap())
        .spawn()
        .unwrap();
    wait_port(listen);
    (Process(child), listen)
}

/// curl against the gateway (the registrar name resolved to it); returns (status, headers, body).
fn curl(gateway: SocketAddr, work: &Path, args: &[&str], url: &str) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(work.join(".taas/relay-cert.pem"))
        .arg("--connect-to")
        .arg(format!("::{gateway}"))
        .args(["-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (
        code.trim().parse().unwrap_or(0),
        head.to_string(),
        body.to_string(),
    )
}

fn totp_now(secret_b32: &str) -> String {
    let secret = taas_protocol::totp::decode_secret(secret_b32).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    taas_protocol::totp::code(&secret, taas_crds::Algorithm::SHA1, 6, 30, now)
}

/// Applies the CRD from crds/ and waits until it is established. kubectl's client-side check
/// knows 1.20's schema, which predates CEL rules; the server itself drops them (TOOLING.md), so
/// the committed file goes unchanged without it.
fn apply_crd(k8s: &ApiServer) {
    let crd = repo().join("crds/taaslabels.yaml");
    k8s.ok(
        &["apply", "--validate=false", "-f", crd.to_str().unwrap()],
        None,
    );
    k8s.wait("CRD established", &["crd", "taaslabels.taas.dev"], |crd| {
        crd["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
    });
}

fn count(k8s: &ApiServer, kind: &str, selector: &str) -> usize {
    k8s.get(&[kind, "-A", "-l", selector])
        .map(|v| v["items"].as_array().map_or(0, |a| a.len()))
        .unwrap_or(0)
}

#[test]
fn the_operator_against_a_real_api_server() {
    if !opted_in("the_operator_against_a_real_api_server") {
        return;
    }
    std::env::set_var(
        "TAAS_K8S_CONTROLLERS",
        "*,-deployment,-replicaset,-statefulset",
    );
    let k8s = ApiServer::up();
    let work = k8s.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // The CRD from crds/, and the chart's own ServiceAccount and RBAC for the operator.
    apply_crd(&k8s);
    k8s.ok(&["create", "namespace", NS], None);
    let rbac = k8s.helm_template(&[
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        "--show-only",
        "templates/operator-rbac.yaml",
    ]);
    k8s.ok(&["apply", "-f", "-"], Some(&rbac));
    let operator_kubeconfig = k8s.service_account(NS, "taas-operator");
    // The install secret the chart would generate, in a file as the chart mounts it.
    let gateway_secret = work.join("gateway-secret");
    std::fs::write(
        &gateway_secret,
        "an-install-secret-of-the-test-0123456789\n",
    )
    .unwrap();
    let secret_flag = ["--gateway-secret-file", gateway_secret.to_str().unwrap()];
    let mut operator = start_operator(
        &operator_kubeconfig,
        &work.join("operator-1.log"),
        &secret_flag,
    );

    // The example label: children appear, with node ports allocated by the real server.
    let example = std::fs::read_to_string(repo().join("examples/label.yaml")).unwrap();
    k8s.ok(&["apply", "-f", "-"], Some(&example));
    let service = k8s.wait(
        "the label's Service",
        &["service", "taas-home", "-n", "default"],
        |_| true,
    );
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(ports.iter().all(|p| p["protocol"] == "TCP"));
    k8s.wait(
        "the Deployment",
        &["deployment", "taas-home", "-n", "default"],
        |_| true,
    );
    k8s.wait(
        "the control Service",
        &["service", "taas-home-control", "-n", "default"],
        |_| true,
    );
    let label = k8s.wait(
        "WaitingForAddress",
        &["taaslabel", "home", "-n", "default"],
        |l| ready_reason(l) == "WaitingForAddress",
    );
    assert_eq!(condition(&label, "Ready").unwrap()["status"], "False");

    // A load balancer address arrives; then the relay pod is ready: Ready, with the endpoint.
    give_address(&k8s, "default", "taas-home", "127.0.0.1");
    k8s.wait(
        "RelayNotReady",
        &["taaslabel", "home", "-n", "default"],
        |l| ready_reason(l) == "RelayNotReady" && l["status"]["endpoint"] == "127.0.0.1:21000",
    );
    mark_relay_ready(&k8s, "default", "taas-home");
    let label = k8s.wait("Ready", &["taaslabel", "home", "-n", "default"], |l| {
        ready_reason(l) == "Ready"
    });
    assert_eq!(
        label["status"]["observedGeneration"],
        label["metadata"]["generation"]
    );
    let printed = k8s.ok(&["get", "taaslabels", "-n", "default"], None);
    assert!(
        printed.contains("ENDPOINT") && printed.contains("127.0.0.1:21000"),
        "{printed}"
    );

    // The relay and the gateway as the cluster would run them; a hidden server registers
    // through the gateway, a mobile client follows the 307.
    // The relay's pod carries the token of its LABEL, derived from the install secret.
    let deployment = k8s
        .get(&["deployment", "taas-home", "-n", "default"])
        .unwrap();
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
    let token = taas_protocol::gateway_auth::InstallSecret::from_file(&gateway_secret)
        .unwrap()
        .token_for("home");
    assert!(
        env.contains(&format!(
            r#"{{"name":"TAAS_GATEWAY_TOKEN","value":"{}"}}"#,
            token.expose()
        )),
        "{env}"
    );
    let (_relay, control) =
        start_relay_from_cluster(&k8s, "default", "taas-home", &work.join("relay"));
    // Routes name the relay fully qualified (no DNS search path applies).
    let routes_relay = "taas-home-control.default.svc.cluster.local.:8080".to_string();
    let (_gateway, gateway) = start_gateway(
        &k8s,
        &work,
        &BTreeMap::from([(routes_relay, control)]),
        &gateway_secret,
    );
    let secret_b32 = {
        let secret = k8s.get(&["secret", "home-totp", "-n", "default"]).unwrap();
        let key = secret["data"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        String::from_utf8(base64_decode(&key))
            .unwrap()
            .trim()
            .to_string()
    };
    let id = label["spec"]["id"].as_str().unwrap().to_string();
    let authorization = format!(
        "Authorization: TOTP username=\"{id}\", response=\"{}\"",
        totp_now(&secret_b32)
    );
    let (status, _, body) = curl(
        gateway,
        &work,
        &["-X", "PUT", "-H", &authorization],
        "https://taas-registrar.localhost/register/home",
    );
    assert_eq!(status, 200, "{body}");
    let p: SocketAddr = body.trim().parse().expect("HOST:PORT");
    assert_eq!(
        p.ip().to_string(),
        "127.0.0.1",
        "the load balancer's address"
    );
    let mut hidden = std::net::TcpStream::connect(p).unwrap();
    let (status, head, _) = curl(gateway, &work, &[], "https://home.taas.localhost/hello?x=1");
    let deadline = Instant::now() + PATIENCE;
    let mut status = status;
    let mut head = head;
    while status == 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        (status, head, _) = curl(gateway, &work, &[], "https://home.taas.localhost/hello?x=1");
    }
    assert_eq!(status, 307, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("location: https://home.taas.localhost:21000/hello?x=1"),
        "{head}"
    );
    let mut client = std::net::TcpStream::connect("127.0.0.1:21000").unwrap();
    use std::io::Read;
    client.write_all(b"phone to home").unwrap();
    let mut got = [0u8; 13];
    hidden.set_read_timeout(Some(PATIENCE)).unwrap();
    hidden.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"phone to home");

    // A spec change: observedGeneration and the children follow (no new objects).
    k8s.merge_patch(
        "taaslabel",
        "home",
        "default",
        r#"{"spec":{"maxParked":5}}"#,
    );
    k8s.wait(
        "observedGeneration follows",
        &["taaslabel", "home", "-n", "default"],
        |l| {
            l["status"]["observedGeneration"] == l["metadata"]["generation"]
                && l["metadata"]["generation"] != 1
        },
    );
    k8s.wait(
        "the ConfigMap follows",
        &["configmap", "taas-home", "-n", "default"],
        |c| {
            c["data"]["label.yaml"]
                .as_str()
                .is_some_and(|t| t.contains("maxParked: 5"))
        },
    );

    // The Secret goes: Ready=False with a clear reason.
    k8s.ok(&["delete", "secret", "home-totp", "-n", "default"], None);
    let label = k8s.wait(
        "SecretMissing",
        &["taaslabel", "home", "-n", "default"],
        |l| ready_reason(l) == "SecretMissing",
    );
    let message = condition(&label, "Ready").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("home-totp"), "{message}");
    k8s.ok(&["apply", "-f", "-"], Some(&example));

    // The operator restarts mid-way (a second label applied while it is down): it converges
    // with no duplicate objects.
    drop(operator);
    let second = example
        .replace("name: home-totp", "name: lab-totp")
        .replace("name: home", "name: lab")
        .replace("label: home", "label: lab");
    k8s.ok(&["apply", "-f", "-"], Some(&second));
    operator = start_operator(
        &operator_kubeconfig,
        &work.join("operator-2.log"),
        &secret_flag,
    );
    k8s.wait(
        "the second label's Deployment",
        &["deployment", "taas-lab", "-n", "default"],
        |_| true,
    );
    assert_eq!(
        count(
            &k8s,
            "deployments",
            "app.kubernetes.io/managed-by=taas-operator"
        ),
        2
    );
    assert_eq!(
        count(
            &k8s,
            "services",
            "app.kubernetes.io/managed-by=taas-operator"
        ),
        4
    );
    // One ConfigMap per label, plus the routes ConfigMap if it carries the label too.
    let configmaps = count(
        &k8s,
        "configmaps",
        "app.kubernetes.io/managed-by=taas-operator",
    );
    assert!((2..=3).contains(&configmaps), "{configmaps} ConfigMaps");

    // Deleting a label: its children go (garbage collection by owner reference), and the
    // routes drop it.
    k8s.ok(&["delete", "taaslabel", "lab", "-n", "default"], None);
    let deadline = Instant::now() + PATIENCE;
    while k8s
        .get(&["deployment", "taas-lab", "-n", "default"])
        .is_some()
        || k8s.get(&["service", "taas-lab", "-n", "default"]).is_some()
    {
        assert!(
            Instant::now() < deadline,
            "children of a deleted label remain"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    k8s.wait(
        "routes without lab",
        &["configmap", "taas-routes", "-n", NS],
        |c| {
            c["data"]["routes.yaml"]
                .as_str()
                .is_some_and(|t| t.contains("home") && !t.contains("lab:"))
        },
    );

    dotted_and_longest_names_are_served(&k8s);
    several_replicas_with_a_service_of_the_labels_own_get_one_each(&k8s);

    // 200 labels at once: all Ready. Report the time and the operator's peak RSS.
    k8s.ok(&["create", "namespace", "many"], None);
    let mut manifests = String::from(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: shared-totp, namespace: many}\nstringData: {secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP}\n",
    );
    for i in 0..200 {
        manifests.push_str(&format!(
            "---\napiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {{name: l{i}, namespace: many}}\n\
             spec: {{id: id-{i}, label: many-{i}, secretRef: {{name: shared-totp, key: secret}}, service: {{type: ClusterIP}}, rendezvousPorts: 2}}\n"
        ));
    }
    let started = Instant::now();
    k8s.ok(&["apply", "-f", "-"], Some(&manifests));
    // The operator's part: every label's children applied.
    let deadline = Instant::now() + Duration::from_secs(300);
    let names = loop {
        let deployments = k8s.get(&["deployments", "-n", "many"]).unwrap();
        let names: Vec<String> = deployments["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
            .collect();
        if names.len() == 200 {
            break names;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 200 relays applied",
            names.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let applied = started.elapsed();
    // The kubelet's part, played here: every relay pod ready (8 patches at a time).
    std::thread::scope(|scope| {
        for chunk in names.chunks(25) {
            let k8s = &k8s;
            scope.spawn(move || {
                for name in chunk {
                    mark_relay_ready(k8s, "many", name);
                }
            });
        }
    });
    loop {
        let labels = k8s.get(&["taaslabels", "-n", "many"]).unwrap();
        let ready = labels["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| ready_reason(l) == "Ready")
            .count();
        if ready == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ready} of 200 labels Ready"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = started.elapsed();
    let rss = peak_rss_kib(operator.0.id());
    let report = format!(
        "200 labels: children applied in {:.1} s, all Ready in {:.1} s (relay readiness set by the test); operator peak RSS {} KiB\n",
        applied.as_secs_f64(),
        took.as_secs_f64(),
        rss
    );
    eprint!("{report}");
    std::fs::write(repo().join("target/operator-200-labels.txt"), report).ok();
}

/// TaasLabels named with dots and with 253 characters (valid object names) get valid child
/// objects under derived names (`taas_operator::names::child_base`) and become Ready.
fn dotted_and_longest_names_are_served(k8s: &ApiServer) {
    let longest = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    let labels = [
        ("automatic.home", "automatic-home-e0e054ecb8"),
        (
            longest.as_str(),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-8b50ab2ca1",
        ),
    ];
    let mut manifests = String::from(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: dotted-totp, namespace: default}\n\
         stringData: {secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP}\n",
    );
    for (i, (name, base)) in labels.iter().enumerate() {
        assert_eq!(taas_operator::names::child_base(name), *base);
        manifests.push_str(&format!(
            "---\napiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{id: id-dotted-{i}, label: dotted-{i}, secretRef: {{name: dotted-totp}}, service: {{type: ClusterIP}}, rendezvousPorts: 2}}\n"
        ));
    }
    k8s.ok(&["apply", "-f", "-"], Some(&manifests));
    for (name, base) in labels {
        let relay = format!("taas-{base}");
        let control = format!("taas-{base}-control");
        k8s.wait("the Service", &["service", &relay, "-n", "default"], |_| {
            true
        });
        k8s.wait(
            "the control Service",
            &["service", &control, "-n", "default"],
            |_| true,
        );
        k8s.wait(
            "the ConfigMap",
            &["configmap", &relay, "-n", "default"],
            |_| true,
        );
        k8s.wait(
            "the Deployment",
            &["deployment", &relay, "-n", "default"],
            |_| true,
        );
        mark_relay_ready(k8s, "default", &relay);
        let label = k8s.wait("Ready", &["taaslabel", name, "-n", "default"], |l| {
            ready_reason(l) == "Ready"
        });
        assert_eq!(
            label["status"]["relay"],
            format!("{control}.default.svc.cluster.local.:8080")
        );
    }
    k8s.wait(
        "routes with the derived names",
        &["configmap", "taas-routes", "-n", NS],
        |c| {
            c["data"]["routes.yaml"].as_str().is_some_and(|t| {
                labels
                    .iter()
                    .all(|(_, base)| t.contains(&format!("taas-{base}-control.default.svc")))
            })
        },
    );
}

/// Two replicas of a label with a Service of its own: a StatefulSet, one Service per pod
/// (selecting that pod alone), each pod's address in the external file under its name; back
/// at one, the Deployment and the label's one Service return and the rest goes.
fn several_replicas_with_a_service_of_the_labels_own_get_one_each(k8s: &ApiServer) {
    let manifests = "apiVersion: v1\nkind: Secret\nmetadata: {name: pods-totp, namespace: default}\n\
         stringData: {secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP}\n\
         ---\napiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {name: pods, namespace: default}\n\
         spec: {id: id-pods, label: pods, secretRef: {name: pods-totp}, service: {type: ClusterIP}, rendezvousPorts: 2, replicas: 2}\n";
    k8s.ok(&["apply", "-f", "-"], Some(manifests));
    let set = k8s.wait(
        "the StatefulSet",
        &["statefulset", "taas-pods", "-n", "default"],
        |_| true,
    );
    assert_eq!(set["spec"]["replicas"], 2);
    assert_eq!(set["spec"]["serviceName"], "taas-pods-control");
    let mut ips = Vec::new();
    for i in 0..2 {
        let name = format!("taas-pods-{i}");
        let service = k8s.wait(
            "a pod's Service",
            &["service", &name, "-n", "default"],
            |_| true,
        );
        assert_eq!(
            service["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            name.as_str()
        );
        ips.push(service["spec"]["clusterIP"].as_str().unwrap().to_string());
    }
    let config = k8s.wait(
        "each pod's address",
        &["configmap", "taas-pods", "-n", "default"],
        |c| {
            c["data"]["external.yaml"]
                .as_str()
                .is_some_and(|t| t.contains("taas-pods-1"))
        },
    );
    let external: serde_yaml::Value =
        serde_yaml::from_str(config["data"]["external.yaml"].as_str().unwrap()).unwrap();
    for (i, ip) in ips.iter().enumerate() {
        assert_eq!(
            external["pods"][format!("taas-pods-{i}").as_str()]["host"].as_str(),
            Some(ip.as_str())
        );
    }
    assert!(k8s
        .get(&["deployment", "taas-pods", "-n", "default"])
        .is_none());
    assert!(k8s
        .get(&["service", "taas-pods", "-n", "default"])
        .is_none());
    let patch =
        r#"{"status":{"replicas":2,"readyReplicas":2,"currentReplicas":2,"updatedReplicas":2}}"#;
    k8s.merge_patch_status("statefulset", "taas-pods", "default", patch);
    k8s.wait("2 of 2", &["taaslabel", "pods", "-n", "default"], |l| {
        ready_reason(l) == "Ready"
            && condition(l, "Ready").unwrap()["message"] == "2 of 2 replicas serving"
            && l["status"]["endpoint"] == format!("{}:21000", ips[0]).as_str()
    });

    // Back to one.
    k8s.merge_patch("taaslabel", "pods", "default", r#"{"spec":{"replicas":1}}"#);
    k8s.wait(
        "the Deployment",
        &["deployment", "taas-pods", "-n", "default"],
        |d| d["spec"]["replicas"] == 1,
    );
    k8s.wait(
        "the label's Service",
        &["service", "taas-pods", "-n", "default"],
        |_| true,
    );
    let deadline = Instant::now() + PATIENCE;
    for gone in [
        ["statefulset", "taas-pods"],
        ["service", "taas-pods-0"],
        ["service", "taas-pods-1"],
    ] {
        while k8s.get(&[gone[0], gone[1], "-n", "default"]).is_some() {
            assert!(Instant::now() < deadline, "{gone:?} is still there");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Edge mode (`--edge-service`): a label without `spec.service.type` gets no Service of its
/// own; its relay listens on its edge port, exposed by its control Service; it is reached at
/// the gateway Service's address (waiting until there is one), on the shared port and its slice
/// of the shared rendezvous ports, which the routes carry for the gateway.
#[test]
fn the_operator_in_edge_mode_against_a_real_api_server() {
    if !opted_in("the_operator_in_edge_mode_against_a_real_api_server") {
        return;
    }
    std::env::set_var("TAAS_K8S_CONTROLLERS", "*,-deployment,-replicaset");
    let k8s = ApiServer::up();
    let work = k8s.dir().join("work");
    std::fs::create_dir_all(&work).unwrap();
    apply_crd(&k8s);
    k8s.ok(&["create", "namespace", NS], None);
    // The chart's RBAC and gateway Service (a short range keeps the test quick); the real API
    // server checks the Service's ports.
    let edge_values = ["--set", "edge.rendezvousPorts.count=16"];
    let mut show = vec![
        "--show-only",
        "templates/operator-serviceaccount.yaml",
        "--show-only",
        "templates/operator-rbac.yaml",
        "--show-only",
        "templates/gateway-service.yaml",
    ];
    show.extend_from_slice(&edge_values);
    k8s.ok(&["apply", "-f", "-"], Some(&k8s.helm_template(&show)));
    let operator_kubeconfig = k8s.service_account(NS, "taas-operator");
    let _operator = start_operator(
        &operator_kubeconfig,
        &work.join("operator.log"),
        &[
            "--edge-service",
            "taas-gateway",
            "--edge-shared-port",
            "9443",
            "--edge-rendezvous-ports",
            "20000-20015",
        ],
    );

    let manifests = "apiVersion: v1\nkind: Secret\nmetadata: {name: edge-totp, namespace: default}\n\
                     stringData: {secret: JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP}\n---\n\
                     apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {name: edge, namespace: default}\n\
                     spec: {id: id-edge, label: edge, direct: true, secretRef: {name: edge-totp}, rendezvousPorts: 3}\n";
    k8s.ok(&["apply", "-f", "-"], Some(manifests));

    // The relay and its control Service, with the edge port; no Service of its own.
    let deployment = k8s.wait(
        "the Deployment",
        &["deployment", "taas-edge", "-n", "default"],
        |_| true,
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].to_string();
    assert!(args.contains(r#""--edge","0.0.0.0:21001""#), "{args}");
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "edge" && p["containerPort"] == 21001),
        "{}",
        container["ports"]
    );
    let control = k8s.wait(
        "the control Service",
        &["service", "taas-edge-control", "-n", "default"],
        |_| true,
    );
    assert!(
        control["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "edge" && p["port"] == 21001 && p["targetPort"] == 21001),
        "{}",
        control["spec"]["ports"]
    );
    let label = k8s.wait(
        "WaitingForAddress",
        &["taaslabel", "edge", "-n", "default"],
        |l| ready_reason(l) == "WaitingForAddress",
    );
    assert!(
        condition(&label, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("load balancer"),
        "{label}"
    );
    assert!(k8s
        .get(&["service", "taas-edge", "-n", "default"])
        .is_none());

    // The slice: 3 consecutive ports of 20000-20015 from the label's offset, wrapping.
    let edge = taas_operator::edge::EdgeSettings {
        service: "taas-gateway".into(),
        shared_port: 9443,
        rendezvous: "20000-20015".parse().unwrap(),
    };
    let slice = taas_operator::edge::slice("default", "edge", 3, edge.rendezvous);
    let routes = k8s.wait(
        "the route with the edge fields",
        &["configmap", "taas-routes", "-n", NS],
        |c| {
            c["data"]["routes.yaml"]
                .as_str()
                .is_some_and(|t| t.contains("edge:\n"))
        },
    );
    let routes: serde_yaml::Value =
        serde_yaml::from_str(routes["data"]["routes.yaml"].as_str().unwrap()).unwrap();
    let route = &routes["edge"];
    assert_eq!(
        route["edge"].as_str(),
        Some("taas-edge-control.default.svc.cluster.local.:21001")
    );
    assert_eq!(route["direct"].as_bool(), Some(true));
    let rendezvous: Vec<u64> = route["rendezvous"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(
        rendezvous,
        slice.iter().map(|&t| u64::from(t)).collect::<Vec<_>>()
    );

    // The gateway's load balancer gets its address: the operator (watching that Service)
    // tells the relay, without any change to the label.
    give_address(&k8s, NS, "taas-gateway", "127.0.0.2");
    let label = k8s.wait(
        "RelayNotReady at the gateway's address",
        &["taaslabel", "edge", "-n", "default"],
        |l| ready_reason(l) == "RelayNotReady" && l["status"]["endpoint"] == "127.0.0.2:9443",
    );
    assert_eq!(
        label["status"]["ports"]["rendezvous"],
        serde_json::json!(slice)
    );
    let config_map = k8s.wait(
        "external.yaml at the gateway's address",
        &["configmap", "taas-edge", "-n", "default"],
        |c| {
            c["data"]["external.yaml"]
                .as_str()
                .is_some_and(|t| t.starts_with("host: 127.0.0.2\n"))
        },
    );
    assert_eq!(
        config_map["data"]["external.yaml"],
        format!(
            "host: 127.0.0.2\nports:\n  20000: {}\n  20001: {}\n  20002: {}\n  21000: 9443\n",
            slice[0], slice[1], slice[2]
        )
    );
    mark_relay_ready(&k8s, "default", "taas-edge");
    k8s.wait("Ready", &["taaslabel", "edge", "-n", "default"], |l| {
        ready_reason(l) == "Ready"
    });

    several_replicas_get_a_disruption_budget_until_back_to_one(&k8s);
}

/// `spec.replicas` on a real (1.20) API server: the CRD's bounds, and a label through the
/// gateway going to two replicas (a `policy/v1beta1` budget, the only version 1.20 serves)
/// and back to one (no budget).
fn several_replicas_get_a_disruption_budget_until_back_to_one(k8s: &ApiServer) {
    let with_replicas = |n: &str| {
        format!(
            "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {{name: bounds, namespace: default}}\n\
             spec: {{id: id-bounds, label: bounds, secretRef: {{name: edge-totp}}, replicas: {n}}}\n"
        )
    };
    for ok in ["1", "2", "16"] {
        k8s.ok(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&with_replicas(ok)),
        );
    }
    for bad in ["0", "17"] {
        let out = k8s.kubectl(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&with_replicas(bad)),
        );
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && error.contains("spec.replicas"),
            "replicas {bad}: {error}"
        );
    }

    let budget = [
        "poddisruptionbudgets.v1beta1.policy",
        "taas-edge",
        "-n",
        "default",
    ];
    assert!(k8s.get(&budget).is_none());
    k8s.merge_patch("taaslabel", "edge", "default", r#"{"spec":{"replicas":2}}"#);
    let deployment = k8s.wait(
        "two replicas",
        &["deployment", "taas-edge", "-n", "default"],
        |d| d["spec"]["replicas"] == 2,
    );
    assert_eq!(
        deployment["spec"]["strategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"],
        "ScheduleAnyway"
    );
    let pdb = k8s.wait("the disruption budget", &budget, |_| true);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    assert_eq!(pdb["metadata"]["ownerReferences"][0]["name"], "edge");

    // One of two ready: still served; both: Ready.
    mark_relays_ready(k8s, "default", "taas-edge", 2, 1);
    let label = k8s.wait("Degraded", &["taaslabel", "edge", "-n", "default"], |l| {
        ready_reason(l) == "Degraded"
    });
    let ready = condition(&label, "Ready").unwrap();
    assert_eq!(
        (&ready["status"], &ready["message"]),
        (
            &serde_json::json!("True"),
            &serde_json::json!("1 of 2 replicas serving")
        )
    );
    assert_eq!(
        (
            &label["status"]["replicas"],
            &label["status"]["readyReplicas"]
        ),
        (&serde_json::json!(2), &serde_json::json!(1))
    );
    mark_relays_ready(k8s, "default", "taas-edge", 2, 2);
    k8s.wait("2 of 2", &["taaslabel", "edge", "-n", "default"], |l| {
        ready_reason(l) == "Ready"
            && condition(l, "Ready").unwrap()["message"] == "2 of 2 replicas serving"
    });
    // The printer columns show them.
    let table = k8s.ok(&["get", "taaslabel", "edge", "-n", "default"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "LABEL", "ID", "ENDPOINT", "READY", "SERVING", "REPLICAS", "AGE"],
        "{table}"
    );

    // Back to one: the budget goes, the Deployment shrinks.
    k8s.merge_patch("taaslabel", "edge", "default", r#"{"spec":{"replicas":1}}"#);
    k8s.wait(
        "one replica",
        &["deployment", "taas-edge", "-n", "default"],
        |d| d["spec"]["replicas"] == 1,
    );
    let deadline = Instant::now() + PATIENCE;
    while k8s.get(&budget).is_some() {
        assert!(Instant::now() < deadline, "the budget is still there");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn helm(k8s: &ApiServer, args: &[&str]) -> Output {
    Command::new(k8s.tools.join("helm"))
        .env("HOME", k8s.dir())
        .env("KUBECONFIG", &k8s.admin)
        .args(args)
        .output()
        .unwrap()
}

fn helm_ok(k8s: &ApiServer, args: &[&str]) -> String {
    let out = helm(k8s, args);
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn names(k8s: &ApiServer, kind: &str, namespace: &str) -> Vec<String> {
    k8s.get(&[kind, "-n", namespace])
        .and_then(|v| {
            v["items"].as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["metadata"]["name"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[test]
fn the_chart_installs_upgrades_and_uninstalls_on_a_real_api_server() {
    if !opted_in("the_chart_installs_upgrades_and_uninstalls_on_a_real_api_server") {
        return;
    }
    let k8s = ApiServer::up();
    let chart = repo().join("charts/taas");
    let chart = chart.to_str().unwrap();
    // 1.20 has no CEL: the chart leaves the rules out below 1.25 by itself; nor endPort: the
    // NetworkPolicies (on by default) list the relay's ports one by one there. The label
    // policy lets namespace "default" claim LABEL "home" only.
    helm_ok(
        &k8s,
        &[
            "install",
            "taas",
            chart,
            "-n",
            NS,
            "--create-namespace",
            "--wait=false",
            "--set-json",
            r#"labelPolicy.namespaces={"default":["home"]}"#,
        ],
    );
    k8s.wait("CRD established", &["crd", "taaslabels.taas.dev"], |crd| {
        crd["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
    });
    let deployments = names(&k8s, "deployments", NS);
    assert!(
        deployments.contains(&"taas-operator".to_string()),
        "{deployments:?}"
    );
    assert!(
        deployments.contains(&"taas-gateway".to_string()),
        "{deployments:?}"
    );
    assert!(names(&k8s, "services", NS).contains(&"taas-gateway".to_string()));
    assert!(names(&k8s, "serviceaccounts", NS).contains(&"taas-operator".to_string()));
    let policies = names(&k8s, "networkpolicies", NS);
    assert!(
        policies.contains(&"taas-relays".to_string()),
        "{policies:?}"
    );

    // The install secret: generated once, mounted into the gateway and the operator.
    let install_secret = |k8s: &ApiServer| -> Vec<u8> {
        let secret = k8s
            .get(&["secret", "taas-gateway-auth", "-n", NS])
            .expect("the gateway auth Secret");
        base64_decode(secret["data"]["secret"].as_str().unwrap())
    };
    let generated = install_secret(&k8s);
    assert_eq!(
        generated.len(),
        48,
        "{:?}",
        String::from_utf8_lossy(&generated)
    );
    let work = k8s.dir().join("chart-work");
    std::fs::create_dir_all(&work).unwrap();
    let secret_file = work.join("gateway-secret");
    std::fs::write(&secret_file, &generated).unwrap();
    // The operator as its Deployment runs it: its policy file and its secret file.
    let operator_deployment = k8s.get(&["deployment", "taas-operator", "-n", NS]).unwrap();
    let container = &operator_deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--policy-file=/etc/taas/policy/policy.yaml")
            && args.contains(&"--cluster-domain=cluster.local"),
        "{args:?}"
    );
    assert!(
        container["env"].to_string().contains(
            r#"{"name":"TAAS_GATEWAY_SECRET_FILE","value":"/etc/taas/gateway-auth/secret"}"#
        ),
        "{}",
        container["env"]
    );
    let policy = k8s
        .get(&["configmap", "taas-operator-policy", "-n", NS])
        .unwrap();
    let policy_file = work.join("policy.yaml");
    std::fs::write(
        &policy_file,
        policy["data"]["policy.yaml"].as_str().unwrap(),
    )
    .unwrap();

    let example = std::fs::read_to_string(repo().join("examples/label.yaml")).unwrap();
    // A squatter in another namespace, first: the policy does not let it claim "home".
    k8s.ok(&["create", "namespace", "squat"], None);
    let squatter = example.replace("namespace: default", "namespace: squat");
    k8s.ok(&["apply", "-f", "-"], Some(&squatter));
    k8s.ok(&["apply", "-f", "-"], Some(&example));

    // The operator under the chart's ServiceAccount: it reconciles with no `forbidden`.
    let log = k8s.dir().join("operator.log");
    let kubeconfig = k8s.service_account(NS, "taas-operator");
    let operator = start_operator(
        &kubeconfig,
        &log,
        &[
            "--gateway-secret-file",
            secret_file.to_str().unwrap(),
            "--policy-file",
            policy_file.to_str().unwrap(),
        ],
    );
    k8s.wait(
        "the label reconciled",
        &["taaslabel", "home", "-n", "default"],
        |l| l["status"]["observedGeneration"] == l["metadata"]["generation"],
    );
    let refused = k8s.wait(
        "the squatter refused",
        &["taaslabel", "home", "-n", "squat"],
        |l| ready_reason(l) == "LabelNotAllowed",
    );
    assert!(
        condition(&refused, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("namespace squat"),
        "{refused}"
    );
    assert!(k8s
        .get(&["deployment", "taas-home", "-n", "squat"])
        .is_none());
    let relay = k8s
        .wait(
            "the relay Deployment",
            &["deployment", "taas-home", "-n", "default"],
            |_| true,
        )
        .to_string();
    let token = taas_protocol::gateway_auth::InstallSecret::new(&generated)
        .unwrap()
        .token_for("home");
    assert!(
        relay.contains(token.expose()),
        "no gateway token in {relay}"
    );
    let routes = k8s.wait(
        "the routes published",
        &["configmap", "taas-routes", "-n", NS],
        |c| {
            c["data"]["routes.yaml"]
                .as_str()
                .is_some_and(|t| t.contains("home"))
        },
    );
    assert!(
        routes["data"]["routes.yaml"]
            .as_str()
            .unwrap()
            .contains("relay: taas-home-control.default.svc.cluster.local.:8080"),
        "{routes}"
    );
    drop(operator);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.to_ascii_lowercase().contains("forbidden"),
        "the operator was refused something:\n{text}"
    );
    assert!(
        !text.contains(token.expose()) && !text.contains(std::str::from_utf8(&generated).unwrap()),
        "the operator logged a secret:\n{text}"
    );

    // An upgrade with changed values rolls out. The cluster edge's ports are then node ports
    // too (one number everywhere): pinned node ports must be free, and the Services made so
    // far hold node ports the API server picked at random, so the test picks a free window.
    // The HTTPS port is pinned in it too: left to the API server, the update once asked for
    // a node port the Service itself still held ("provided port is already allocated").
    let (shared, first) = free_node_port_window(&k8s, 2 + EDGE_NODE_PORTS);
    let https = first + EDGE_NODE_PORTS;
    let (shared, first, count, https) = (
        format!("edge.sharedPort={shared}"),
        format!("edge.rendezvousPorts.first={first}"),
        format!("edge.rendezvousPorts.count={EDGE_NODE_PORTS}"),
        format!("gateway.service.nodePort={https}"),
    );
    helm_ok(
        &k8s,
        &[
            "upgrade",
            "taas",
            chart,
            "-n",
            NS,
            "--wait=false",
            "--set",
            "gateway.service.type=NodePort",
            "--set",
            &shared,
            "--set",
            &first,
            "--set",
            &count,
            "--set",
            &https,
            "--set",
            "operator.leaderElection.enabled=true",
        ],
    );
    let gateway = k8s.get(&["service", "taas-gateway", "-n", NS]).unwrap();
    assert_eq!(gateway["spec"]["type"], "NodePort");
    // The install secret survives the upgrade (running relays keep their tokens).
    assert_eq!(install_secret(&k8s), generated);
    let operator_deployment = k8s.get(&["deployment", "taas-operator", "-n", NS]).unwrap();
    let args = operator_deployment["spec"]["template"]["spec"]["containers"][0].to_string();
    assert!(args.contains("leader-elect"), "{args}");

    // Uninstall: everything of the release goes but the CRD and the labels.
    helm_ok(&k8s, &["uninstall", "taas", "-n", NS, "--wait=false"]);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left: Vec<String> = [
            "deployments",
            "services",
            "serviceaccounts",
            "roles",
            "rolebindings",
        ]
        .iter()
        .flat_map(|kind| {
            names(&k8s, kind, NS)
                .into_iter()
                .map(move |n| format!("{kind}/{n}"))
        })
        .filter(|n| {
            n.starts_with("deployments/taas")
                || n.starts_with("services/taas")
                || n == "serviceaccounts/taas-operator"
                || n == "serviceaccounts/taas-gateway"
        })
        .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left after uninstall: {left:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let roles = k8s.ok(
        &["get", "clusterroles,clusterrolebindings", "-o", "name"],
        None,
    );
    assert!(!roles.contains("taas"), "cluster RBAC left: {roles}");
    assert!(
        k8s.get(&["crd", "taaslabels.taas.dev"]).is_some(),
        "the CRD is kept"
    );
    // So is the install secret (helm.sh/resource-policy: keep): a reinstall reuses it, and
    // the relays that outlive the release keep their tokens.
    assert_eq!(install_secret(&k8s), generated);
    assert!(
        k8s.get(&["taaslabel", "home", "-n", "default"]).is_some(),
        "labels are kept"
    );
}

/// Rendezvous ports of the chart test's NodePort upgrade.
const EDGE_NODE_PORTS: u16 = 16;

/// The first `len` consecutive node ports (default range 30000-32767) that no Service holds
/// now, as (first, first + 1): the shared client port and the start of the rendezvous range.
fn free_node_port_window(k8s: &ApiServer, len: u16) -> (u16, u16) {
    let services = k8s.get(&["services", "-A"]).expect("services");
    let taken: std::collections::BTreeSet<u64> = services["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["spec"]["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["nodePort"].as_u64())
        .collect();
    let first = (30000u16..=32767 - len)
        .find(|&p| (p..p + len).all(|q| !taken.contains(&u64::from(q))))
        .expect("a free window of node ports");
    (first, first + 1)
}
