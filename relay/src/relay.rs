//! The standalone label backend ([`StandaloneBackend`]): every label in one process. The
//! front end calls it for registrations and mobile clients; it owns the labels' state
//! machines. What a registration gets is decided by `taas_protocol::registration`; this file
//! looks the label up, opens the ports and counts.
//!
//! The label map is read on the control path only (a registration, a 307); once a client is
//! accepted on q, everything happens inside its `Label`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use taas_protocol::answer::{
    Answer, ClientRequest, ConnectionAuth, Registration, DRAINING_HEADER, EXPECTED_HEADER,
    PARKED_HEADER,
};
use taas_protocol::guard::{AuthGuard, GuardLimits};
use taas_protocol::registration::{self, Decoy, NamedLabel, Terms, Verdict, RETRY_UNAVAILABLE};
use taas_protocol::sync::{lock, read, write};
use tokio::sync::Semaphore;

use crate::config::{ClientAdmission, ExternalAddress, LabelConfig, RedirectHost, RelaySettings};
use crate::data_plane::DataPlane;
use crate::frontend::LabelBackend;
use crate::handover::{self, Listeners};
use crate::label::{Label, Shared, Unavailable};
use crate::metrics::{Registered, RelayMetrics};
use crate::ports::{PortError, PortPool};

/// How long a mobile client is told to wait when no hidden server is parked.
const RETRY_NOT_PARKED: Duration = Duration::from_secs(5);
/// How long a hidden server is told to wait when it registers with a relay that is stopping:
/// short, as its successor (or another replica) may be up by then.
pub const RETRY_DRAINING: Duration = Duration::from_secs(2);
/// The body of that answer.
pub const DRAINING_BODY: &str = "relay stopping: register again\n";

/// The standalone relay's label backend: every label in one process.
pub struct StandaloneBackend {
    settings: RelaySettings,
    external: RwLock<Arc<ExternalAddress>>,
    labels: RwLock<HashMap<String, Arc<Label>>>,
    guard: AuthGuard,
    shared: Arc<Shared>,
    /// The threads the labels run on; dropped with the relay, which stops them.
    data_plane: DataPlane,
    metrics: Arc<RelayMetrics>,
    /// Checked against when the ID or label is unknown, so every refusal costs the same.
    decoy: Decoy,
    /// Set by [`StandaloneBackend::drain`]: no registration is taken, no label started.
    draining: AtomicBool,
    /// Behind gateways (`label-relay`): registration answers carry [`PARKED_HEADER`] and,
    /// while draining, [`DRAINING_HEADER`], which the gateway reads and strips.
    gateway_headers: AtomicBool,
    /// True once a successor serves ([`StandaloneBackend::stop_accepting`]): the front end
    /// closes its connections.
    closing: tokio::sync::watch::Sender<bool>,
    /// Once a successor serves: where each source redirected from now on goes, to be
    /// admitted there too ([`StandaloneBackend::send_admissions_to`]).
    admissions: Mutex<Option<std::sync::mpsc::SyncSender<(String, IpAddr)>>>,
}

impl StandaloneBackend {
    /// Fails only if the data-plane threads cannot be started.
    pub fn new(settings: RelaySettings, registry: &mut Registry) -> std::io::Result<Arc<Self>> {
        Self::with_listeners(settings, registry, Listeners::new())
    }

    /// [`StandaloneBackend::new`], binding the labels' client ports through `listeners`
    /// (taking over a predecessor's, `handover`).
    pub fn with_listeners(
        settings: RelaySettings,
        registry: &mut Registry,
        listeners: Arc<Listeners>,
    ) -> std::io::Result<Arc<Self>> {
        let data_plane = DataPlane::start(settings.data_threads)?;
        let metrics = Arc::new(RelayMetrics::default());
        metrics.register(registry);
        let shared = Arc::new(Shared {
            timeouts: settings.timeouts.clone(),
            limits: settings.limits.clone(),
            splice: settings.splice,
            bind_ip: settings.bind_ip,
            p_ports: PortPool::new(settings.p_ports),
            q_ports: PortPool::new(settings.q_ports),
            pairs: Arc::new(Semaphore::new(settings.limits.active_pairs)),
            client_sources: Default::default(),
            listeners,
        });
        let decoy = Decoy::new(rand::random::<[u8; 20]>().to_vec());
        Ok(Arc::new(Self {
            external: RwLock::new(Arc::new(ExternalAddress::new(settings.advertise.clone()))),
            settings,
            labels: RwLock::default(),
            guard: AuthGuard::new(GuardLimits::default()),
            shared,
            data_plane,
            metrics,
            decoy,
            draining: AtomicBool::new(false),
            gateway_headers: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
            admissions: Mutex::new(None),
        }))
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    /// The threads the labels run on (the shared port accepts on each).
    pub(crate) fn data_plane(&self) -> &DataPlane {
        &self.data_plane
    }

    /// The relay's own (not per-label) metrics.
    pub(crate) fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// Client connections open per source, all labels and entries together (from accept to
    /// close, the shared port's ClientHello phase included).
    pub fn client_sources(&self) -> &Arc<crate::sources::SourceCounts> {
        &self.shared.client_sources
    }

    /// How hidden servers and clients reach this relay now.
    pub fn external(&self) -> Arc<ExternalAddress> {
        read(&self.external).clone()
    }

    /// Changes the external address (a Service's ports or address changed): new answers use
    /// it at once; nothing running is touched.
    pub fn set_external(&self, external: ExternalAddress) {
        let mut current = write(&self.external);
        if **current != external {
            tracing::info!(host = %external.host, ports = ?external.ports, "external address changed");
            *current = Arc::new(external);
        }
    }

    /// The guard that counts failed registrations and limits token reuse.
    pub fn guard(&self) -> &AuthGuard {
        &self.guard
    }

    /// The running label, if configured.
    pub fn label(&self, name: &str) -> Option<Arc<Label>> {
        read(&self.labels).get(name).cloned()
    }

    /// Makes the running labels match `wanted`: new labels start (binding q), changed ones
    /// are updated in place, missing ones stop. Other labels' connections are not touched.
    /// Returns one line per label that could not be started or updated.
    pub fn apply(&self, wanted: &BTreeMap<String, LabelConfig>) -> Vec<String> {
        if self.is_draining() {
            // Stopping: a label reloaded now would open its ports again.
            return Vec::new();
        }
        let mut problems = Vec::new();
        let mut labels = write(&self.labels);
        labels.retain(|name, label| {
            let keep = wanted.contains_key(name);
            if !keep {
                label.close();
                self.metrics.remove_label(name);
                tracing::info!(label = %name, "label removed");
            }
            keep
        });
        for (name, config) in wanted {
            let result = match labels.get(name) {
                Some(label) if *label.config() == *config => Ok(()),
                Some(label) => {
                    tracing::info!(label = %name, "label updated");
                    label.update(config.clone())
                }
                None => self.start_label(config).map(|label| {
                    tracing::info!(label = %name, port = label.client_port(), "label added");
                    labels.insert(name.clone(), label);
                }),
            };
            if let Err(error) = result {
                problems.push(format!("label {name}: client port: {error}"));
            }
        }
        problems
    }

    fn start_label(&self, config: &LabelConfig) -> Result<Arc<Label>, PortError> {
        if let Some(port) = config.client_port {
            if self.settings.p_ports.contains(port) {
                return Err(PortError::Bind {
                    addr: std::net::SocketAddr::new(self.settings.bind_ip, port),
                    source: std::io::Error::other(format!(
                        "the pinned client port is inside the rendezvous range {}",
                        self.settings.p_ports
                    )),
                });
            }
        }
        let metrics = self.metrics.for_label(&config.label);
        Label::start(
            config.clone(),
            self.shared.clone(),
            metrics,
            self.data_plane.place(),
        )
    }

    /// Every running label, by name.
    pub fn labels(&self) -> BTreeMap<String, Arc<Label>> {
        read(&self.labels)
            .iter()
            .map(|(name, label)| (name.clone(), label.clone()))
            .collect()
    }

    /// Parked connections over every label.
    pub fn parked(&self) -> usize {
        read(&self.labels)
            .values()
            .map(|label| label.parked())
            .sum()
    }

    /// Connections parked, and registrations whose hidden server has yet to connect, over
    /// every label.
    pub fn parked_and_pending(&self) -> usize {
        read(&self.labels)
            .values()
            .map(|label| label.parked_and_pending())
            .sum()
    }

    /// Stops every label (at shutdown).
    pub fn close(&self) {
        for label in read(&self.labels).values() {
            label.close();
        }
    }

    /// From now on, registration answers carry the headers a gateway reads ([`PARKED_HEADER`],
    /// [`DRAINING_HEADER`]): set by `label-relay`, whose peers are gateways.
    pub fn answer_for_gateways(&self) {
        self.gateway_headers.store(true, Ordering::Relaxed);
    }

    /// A successor serves now (`handover`): registrations get 503 from now on, no label
    /// accepts on q any more (307s still name it: the successor accepts there), the front
    /// end closes its connections as they go idle, while parked connections and waiting
    /// clients stay, so that the clients already accepted are paired.
    /// [`StandaloneBackend::drain`] follows.
    pub fn stop_accepting(&self) {
        self.start_draining();
        self.closing.send_replace(true);
        for label in read(&self.labels).values() {
            label.stop_accepting();
        }
    }

    /// Hands client admission over to a successor that serves (`handover`): every source
    /// redirected within the admission window now, then each one redirected from now on,
    /// written to `successor` by a thread of its own until this process exits.
    pub fn send_admissions_to(&self, successor: std::os::unix::net::UnixStream) {
        let (queue, queued) = std::sync::mpsc::sync_channel(handover::ADMISSIONS_QUEUED);
        // The queue first, then the snapshot: a redirect in between is sent twice, none lost.
        *lock(&self.admissions) = Some(queue);
        let snapshot: Vec<(String, IpAddr, Duration)> = read(&self.labels)
            .iter()
            .filter(|(_, label)| label.config().client_admission == ClientAdmission::Redirected)
            .flat_map(|(name, label)| {
                label
                    .admitted()
                    .into_iter()
                    .map(move |(source, age)| (name.clone(), source, age))
            })
            .collect();
        tracing::info!(
            sources = snapshot.len(),
            "client admissions handed to the successor"
        );
        let spawned = std::thread::Builder::new()
            .name("taas-admissions".into())
            .spawn(move || handover::send_admissions(successor, snapshot, queued));
        if let Err(error) = spawned {
            tracing::warn!(%error, "client admissions not handed over");
        }
    }

    /// Clients waiting for a parked connection, all labels together.
    pub fn waiting_clients(&self) -> usize {
        read(&self.labels)
            .values()
            .map(|label| label.waiting())
            .sum()
    }

    /// The first step of a graceful stop: from now on every registration gets 503 with
    /// `Retry-After` ([`RETRY_DRAINING`]); every label closes (q and the one-shot ports stop
    /// accepting, parked connections are closed so their hidden servers register again
    /// elsewhere, waiting clients are turned away as when nothing is parked). Pairs already
    /// spliced go on ([`StandaloneBackend::active_pairs`] counts them).
    pub fn drain(&self) {
        self.start_draining();
        self.close();
    }

    /// [`StandaloneBackend::drain`] without closing the labels yet: registrations get 503
    /// (with [`DRAINING_HEADER`]), edge offers are answered LAST_RESORT while parked
    /// connections remain; the caller closes the labels (`close`) after its hold.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.set_draining(true);
    }

    /// Whether [`StandaloneBackend::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Pairs holding a slot of the relay-wide pair limit: spliced, or a client about to be
    /// paired (such a client is turned away at once once the labels are closed).
    pub fn active_pairs(&self) -> usize {
        self.settings
            .limits
            .active_pairs
            .saturating_sub(self.shared.pairs.available_permits())
    }
}

/// What a registration gets while the relay drains.
fn draining_answer() -> Answer {
    let mut answer = Answer::unavailable(RETRY_DRAINING);
    answer
        .headers
        .push(("content-type", "text/plain".to_string()));
    answer.body = DRAINING_BODY.to_string();
    // The agent's next try opens a new connection, which reaches the successor after a
    // hand-over (`handover`), not this relay again over its kept-alive one.
    answer.headers.push(("connection", "close".to_string()));
    answer
}

/// How lately a label's hidden server must have registered for a gateway to be told, on a
/// GET that finds nothing parked, that one is expected ([`EXPECTED_HEADER`]).
pub const EXPECTED_WITHIN: Duration = Duration::from_secs(60);

/// Whether a hidden server that last registered at `last` is expected back within moments
/// (at `now`). A registration stamped in the future (the clock stepped back) counts as recent.
pub fn hidden_server_expected(last: Option<SystemTime>, now: SystemTime) -> bool {
    last.is_some_and(|at| {
        now.duration_since(at)
            .map_or(true, |ago| ago < EXPECTED_WITHIN)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LabelBackend for StandaloneBackend {
    type Connection = ConnectionAuth;

    async fn register(&self, request: Registration<'_>, connection: &ConnectionAuth) -> Answer {
        let for_gateways = self.gateway_headers.load(Ordering::Relaxed);
        if self.is_draining() {
            // Before the token is looked at: a gateway tries another replica on this answer.
            self.metrics.rejected("draining");
            let mut answer = draining_answer();
            if for_gateways {
                answer.headers.push((DRAINING_HEADER, "1".to_string()));
            }
            return answer;
        }
        let label_name = request.label;
        let mut answer = self.register_now(request, connection);
        if for_gateways {
            if let Some(label) = self.label(label_name) {
                let count = label.parked_and_pending();
                answer.headers.push((PARKED_HEADER, count.to_string()));
            }
        }
        answer
    }

    async fn client(&self, request: ClientRequest<'_>) -> Answer {
        let label_name = request.label;
        let mut answer = self.redirect_now(request);
        if answer.status == 503 && self.gateway_headers.load(Ordering::Relaxed) {
            let last = self
                .label(label_name)
                .and_then(|label| label.metrics().last_registration())
                .map(|(at, _)| at);
            if hidden_server_expected(last, SystemTime::now()) {
                answer.headers.push((EXPECTED_HEADER, "1".to_string()));
            }
        }
        answer
    }

    fn closing(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.closing.subscribe())
    }
}

/// A label as the registration decision sees it: its configuration at the time of the request.
struct Named {
    label: Arc<Label>,
    config: Arc<LabelConfig>,
}

impl NamedLabel for Named {
    fn terms(&self) -> Terms<'_> {
        let config = &*self.config;
        Terms {
            id: &config.id,
            secret: &config.secret,
            algorithm: config.algorithm,
            period: config.period,
            max_parked: config.max_parked,
            source_pinning: config.source_pinning,
        }
    }

    fn room(&self) -> usize {
        self.label.room()
    }
}

impl StandaloneBackend {
    /// A registration, answered without waiting on anything: `taas_protocol::registration`
    /// decides, this opens the ports and counts.
    fn register_now(&self, request: Registration<'_>, connection: &ConnectionAuth) -> Answer {
        let named = self.label(request.label).map(|label| Named {
            config: label.config(),
            label,
        });
        let label = named.as_ref().map(|named| &named.label);
        let verdict = registration::decide(
            &self.guard,
            &self.decoy,
            &request,
            named.as_ref().map(|named| named as &dyn NamedLabel),
            connection,
            unix_now(),
            Instant::now(),
        );
        let granted = match verdict {
            Verdict::Open(granted) => granted,
            refused => {
                self.count_refusal(&refused, label.map(|label| &**label), &request);
                return refused
                    .answer()
                    .expect("every verdict but Open has its answer");
            }
        };
        let label = label.expect("only a configured label's registration is admitted");
        let mut ports = Vec::with_capacity(granted as usize);
        let mut refused = None;
        for _ in 0..granted {
            match label.open_rendezvous(request.source) {
                Ok(port) => ports.push(port),
                Err(error) => {
                    refused = Some(error);
                    break;
                }
            }
        }
        if ports.is_empty() {
            label.metrics().registered(Registered::Unavailable);
            match refused {
                Some(error @ Unavailable::LabelFull(_)) => {
                    tracing::debug!(label = %label.name(), %error, "registration refused")
                }
                Some(error) => {
                    tracing::warn!(label = %label.name(), %error, "registration refused")
                }
                None => {}
            }
            return Answer::unavailable(RETRY_UNAVAILABLE);
        }
        for _ in &ports {
            label.metrics().registered(Registered::Ok);
        }
        label.metrics().registered_from(request.source);
        tracing::debug!(label = %label.name(), source = %request.source, ?ports, "registered");
        let external = self.external();
        if request.count == 1 {
            // Without the extension: exactly the original's answer.
            return Answer::rendezvous(&external.host, external.port(ports[0]));
        }
        let ports: Vec<u16> = ports.iter().map(|&p| external.port(p)).collect();
        Answer::rendezvous_many(&external.host, &ports)
    }

    /// Counts (and logs) a registration that gets no port: on its label when the label
    /// exists, whatever the ID, else relay-wide.
    fn count_refusal(&self, verdict: &Verdict, label: Option<&Label>, request: &Registration<'_>) {
        let (registered, rejected) = match verdict {
            Verdict::Challenge => (None, "no_authorization"),
            Verdict::Malformed(error) => {
                tracing::debug!(source = %request.source, %error, "malformed Authorization");
                (None, "bad_request")
            }
            Verdict::RateLimited(_) => (Some(Registered::RateLimited), "rate_limited"),
            Verdict::Unauthorized => (Some(Registered::Unauthorized), "unauthorized"),
            Verdict::TokenRefused(refusal) => {
                if let Some(label) = label {
                    tracing::info!(label = %label.name(), source = %request.source, %refusal, "token refused");
                }
                (Some(Registered::Unauthorized), "unauthorized")
            }
            Verdict::Full => (Some(Registered::Unavailable), "unavailable"),
            Verdict::Open(_) => return,
        };
        match (registered, label) {
            (Some(registered), Some(label)) => label.metrics().registered(registered),
            _ => self.metrics.rejected(rejected),
        }
    }

    /// A mobile client's request, answered without waiting on anything.
    fn redirect_now(&self, request: ClientRequest<'_>) -> Answer {
        let Some(label) = self.label(request.label) else {
            return Answer::not_found();
        };
        match label.redirect(request.source) {
            Some(q) => {
                if label.config().client_admission == ClientAdmission::Redirected {
                    if let Some(successor) = &*lock(&self.admissions) {
                        // Full (a flood) or gone: that client is refused on q and asks again.
                        let _ = successor
                            .try_send((label.name().to_string(), request.source.to_canonical()));
                    }
                }
                let external = self.external();
                let (host, port) = match self.settings.redirect_host {
                    // The shared port routes by the name the client asked for; a label whose
                    // server speaks first cannot be named there and keeps its q.
                    RedirectHost::Requested => match self.settings.shared_port {
                        Some(shared) if !label.config().server_speaks_first => {
                            (request.host, shared)
                        }
                        _ => (request.host, q),
                    },
                    // An address without the label's name: nothing to route by, so q.
                    RedirectHost::Advertise => (external.host.as_str(), q),
                };
                Answer::redirect(host, external.port(port), request.path_and_query)
            }
            None => Answer::unavailable(RETRY_NOT_PARKED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_server_is_expected_only_within_a_minute_of_its_last_registration() {
        let now = SystemTime::now();
        assert!(!hidden_server_expected(None, now));
        assert!(hidden_server_expected(Some(now), now));
        let almost = now - EXPECTED_WITHIN + Duration::from_millis(1);
        assert!(hidden_server_expected(Some(almost), now));
        assert!(!hidden_server_expected(Some(now - EXPECTED_WITHIN), now));
        // The clock stepped back since: still recent.
        assert!(hidden_server_expected(
            Some(now + Duration::from_secs(5)),
            now
        ));
    }
}
