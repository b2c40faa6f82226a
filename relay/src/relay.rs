//! The standalone relay: every label in one process. It is the label backend the front end
//! calls for registrations and mobile clients, and it owns the labels' state machines.
//!
//! The label map is read on the control path only (a registration, a 307); once a client is
//! accepted on q, everything happens inside its `Label`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use crate::config::{ExternalAddress, LabelConfig, RedirectHost, RelaySettings};
use crate::data_plane::DataPlane;
use crate::frontend::LabelBackend;
use crate::guard::{AuthGuard, GuardLimits, IdKind};
use crate::label::{Label, Shared, Unavailable};
use crate::metrics::{Registered, RelayMetrics};
use crate::ports::{PortError, PortPool};
use crate::registrar::{Answer, ClientRequest, ConnectionAuth, Registration};
use crate::{authorization, totp};

/// How long a hidden server is told to wait when its label is full or no port is free.
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(5);
/// How long a mobile client is told to wait when no hidden server is parked.
const RETRY_NOT_PARKED: Duration = Duration::from_secs(5);

pub struct Relay {
    settings: RelaySettings,
    external: RwLock<Arc<ExternalAddress>>,
    labels: RwLock<HashMap<String, Arc<Label>>>,
    guard: AuthGuard,
    shared: Arc<Shared>,
    /// The threads the labels run on; dropped with the relay, which stops them.
    data_plane: DataPlane,
    metrics: Arc<RelayMetrics>,
    /// Checked against when the ID or label is unknown, so every refusal costs the same. Its
    /// algorithm does not matter: every check computes all of them (`totp::verify`).
    decoy: LabelConfig,
}

impl Relay {
    /// Fails only if the data-plane threads cannot be started.
    pub fn new(settings: RelaySettings, registry: &mut Registry) -> std::io::Result<Arc<Self>> {
        let data_plane = DataPlane::start(settings.data_threads)?;
        let metrics = Arc::new(RelayMetrics::default());
        metrics.register(registry);
        let shared = Arc::new(Shared {
            timeouts: settings.timeouts.clone(),
            limits: settings.limits.clone(),
            bind_ip: settings.bind_ip,
            p_ports: PortPool::new(settings.p_ports),
            q_ports: PortPool::new(settings.q_ports),
            pairs: Arc::new(Semaphore::new(settings.limits.active_pairs)),
            client_sources: Default::default(),
        });
        let decoy = LabelConfig {
            label: String::new(),
            id: String::new(),
            secret: rand::random::<[u8; 20]>().to_vec(),
            algorithm: Default::default(),
            period: 30,
            max_parked: 1,
            source_pinning: true,
            proxy_protocol: Default::default(),
            client_port: None,
            client_admission: Default::default(),
            server_speaks_first: false,
        };
        Ok(Arc::new(Self {
            external: RwLock::new(Arc::new(ExternalAddress::new(settings.advertise.clone()))),
            settings,
            labels: RwLock::default(),
            guard: AuthGuard::new(GuardLimits::default()),
            shared,
            data_plane,
            metrics,
            decoy,
        }))
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    /// How hidden servers and clients reach this relay now.
    pub fn external(&self) -> Arc<ExternalAddress> {
        self.external
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the external address (a Service's ports or address changed): new answers use
    /// it at once; nothing running is touched.
    pub fn set_external(&self, external: ExternalAddress) {
        let mut current = self.external.write().unwrap_or_else(|e| e.into_inner());
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
        self.labels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Makes the running labels match `wanted`: new labels start (binding q), changed ones
    /// are updated in place, missing ones stop. Other labels' connections are not touched.
    /// Returns one line per label that could not be started or updated.
    pub fn apply(&self, wanted: &BTreeMap<String, LabelConfig>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut labels = self.labels.write().unwrap_or_else(|e| e.into_inner());
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

    /// Stops every label (at shutdown).
    pub fn close(&self) {
        for label in self
            .labels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            label.close();
        }
    }

    fn refuse(
        &self,
        label: Option<&Label>,
        source: IpAddr,
        id: &str,
        kind: IdKind,
        now: Instant,
    ) -> Answer {
        self.guard.record_failure(source, id, kind, now);
        match label {
            Some(label) => label.metrics().registered(Registered::Unauthorized),
            None => self.metrics.rejected("unauthorized"),
        }
        Answer::unauthorized()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LabelBackend for Relay {
    type Connection = ConnectionAuth;

    async fn register(&self, request: Registration<'_>, connection: &ConnectionAuth) -> Answer {
        self.register_now(request, connection)
    }

    async fn client(&self, request: ClientRequest<'_>) -> Answer {
        self.redirect_now(request)
    }
}

impl Relay {
    /// A registration, answered without waiting on anything.
    fn register_now(&self, request: Registration<'_>, connection: &ConnectionAuth) -> Answer {
        let Some(header) = request.authorization else {
            self.metrics.rejected("no_authorization");
            return Answer::unauthorized();
        };
        let credentials = match authorization::parse(header) {
            Ok(credentials) => credentials,
            Err(error) => {
                tracing::debug!(source = %request.source, %error, "malformed Authorization");
                self.metrics.rejected("bad_request");
                return Answer::bad_request();
            }
        };
        let now = Instant::now();
        let id = credentials.username.as_str();
        let label = self.label(request.label);
        if let Some(retry_after) = self.guard.blocked(request.source, id, now) {
            match &label {
                Some(label) => label.metrics().registered(Registered::RateLimited),
                None => self.metrics.rejected("rate_limited"),
            }
            return Answer::too_many(retry_after);
        }
        // Unknown label, a label of another ID and a wrong token all do the same work and get
        // the same answer.
        let authorised = label
            .as_ref()
            .map(|label| (label.clone(), label.config()))
            .filter(|(_, config)| config.id == id);
        let checked = authorised
            .as_ref()
            .map_or(&self.decoy, |(_, config)| &**config);
        let step = totp::verify(
            &checked.secret,
            checked.algorithm,
            checked.period,
            &credentials.response,
            unix_now(),
        );
        // Kept apart so that failures for made-up IDs cannot evict a guessed ID's count.
        let kind = match authorised {
            Some(_) => IdKind::Configured,
            None => IdKind::Unknown,
        };
        let (Some((label, config)), Some(step)) = (authorised, step) else {
            return self.refuse(label.as_deref(), request.source, id, kind, now);
        };
        // A full label is said before the token is spent, so that the hidden server's retry
        // later is not refused for reusing it too often.
        let room = label.room();
        if room == 0 {
            label.metrics().registered(Registered::Unavailable);
            return Answer::unavailable(RETRY_UNAVAILABLE);
        }
        // The several-ports extension asks for up to `count`; never more than the label has
        // room for, so that no token use is spent on a port that cannot be granted.
        let wanted = request.count.min(u32::try_from(room).unwrap_or(u32::MAX));
        let on_this_connection = connection.has(id);
        let granted = match self.guard.admit_many(
            id,
            step,
            request.source,
            u32::try_from(config.max_parked).unwrap_or(u32::MAX),
            config.source_pinning,
            on_this_connection,
            wanted,
            now,
        ) {
            Ok(granted) => granted,
            Err(refusal) => {
                tracing::info!(label = %label.name(), source = %request.source, %refusal, "token refused");
                return self.refuse(Some(&label), request.source, id, IdKind::Configured, now);
            }
        };
        connection.add(id);
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
        tracing::debug!(label = %label.name(), source = %request.source, ?ports, "registered");
        let external = self.external();
        if request.count == 1 {
            // Without the extension: exactly the original's answer.
            return Answer::rendezvous(&external.host, external.port(ports[0]));
        }
        let ports: Vec<u16> = ports.iter().map(|&p| external.port(p)).collect();
        Answer::rendezvous_many(&external.host, &ports)
    }

    /// A mobile client's request, answered without waiting on anything.
    fn redirect_now(&self, request: ClientRequest<'_>) -> Answer {
        let Some(label) = self.label(request.label) else {
            return Answer::not_found();
        };
        match label.redirect(request.source) {
            Some(port) => {
                let external = self.external();
                let host = match self.settings.redirect_host {
                    RedirectHost::Requested => request.host,
                    RedirectHost::Advertise => external.host.as_str(),
                };
                Answer::redirect(host, external.port(port), request.path_and_query)
            }
            None => Answer::unavailable(RETRY_NOT_PARKED),
        }
    }
}
