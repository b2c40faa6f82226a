//! The web console of the standalone relay (`serve --console ADDR`): a table of the labels
//! with live numbers, a form to create a label, and disable / enable / delete / rotate.
//!
//! # Design, and why
//! - **One source of truth.** The console changes only the labels directory, as an operator
//!   would: creation is `provision::write_label` (what `taas-relay label new` writes),
//!   rotation `provision::rotate_secret`, disable moves the file into `disabled/` (which the
//!   directory's reader ignores, being a subdirectory), enable moves it back, delete removes
//!   it. The relay's own reload (`label_source::watch`) then applies the change to that label
//!   alone, with no restart, exactly as for a hand edit. After a change the console waits
//!   (bounded) until the relay shows it, so the next page is already right.
//! - **The numbers are the relay's state**, read from `StandaloneBackend` and each label's
//!   `LabelMetrics` handles (parked, active pairs, 401s/429s, bytes each way, and the last
//!   registration's time and source, kept beside them), never scraped from `/metrics`.
//! - **Pure parts apart from I/O**: [`form`] (bounded urlencoded parsing, the creation form's
//!   checks, field by field), [`security`] (sessions, CSRF tokens, origin and host checks,
//!   the login token, the headers), [`model`] (the table's rows), [`html`] (pages rendered to
//!   strings, every value escaped). This file is the server; [`files`] the file moves.
//! - **Safe by construction.** Every change is a POST that must carry the session's CSRF
//!   token (an HMAC of the session id under a key made at start, compared in constant time)
//!   in a hidden field, the session id coming from a `SameSite=Strict`, `HttpOnly` cookie;
//!   `Sec-Fetch-Site` and `Origin`, when sent, must say this console. Sessions are signed
//!   cookies, so a stranger cannot grow any state here. A console without a login token
//!   listens on loopback only and answers only its own `Host` names (a rebinding page's name
//!   is refused). A non-loopback console needs `--console-token-file`: a login form trades
//!   the token (compared in constant time) for a session cookie, and it is served over TLS
//!   with the relay's certificate (the cookie is then `Secure`). Every answer carries the CSP
//!   (no inline script or style: live updates are `/console.js`), `nosniff`,
//!   `Referrer-Policy: no-referrer` and `Cache-Control: no-store`. A secret is rendered once,
//!   in the answer to its creation or rotation, and never again: the table and the JSON hold
//!   none, and nothing here logs a form, a cookie or a token.
//! - **A stranger may reach the port**: connections are capped overall and per source, the
//!   TLS handshake and each request head have deadlines (the front end's), a body is bounded
//!   ([`MAX_BODY`]) and has its own deadline, as on the front end.

pub mod files;
pub mod form;
pub mod html;
pub mod model;
pub mod security;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use self::form::{CreateForm, FieldErrors};
use self::html::Header;
use self::model::{Action, Row};
use self::security::{Keys, LoginToken, Session};
use crate::label_source::{normalize_label, LabelSet};
use crate::metrics::Registered;
use crate::provision::{self, NewLabel, ProvisionError};
use crate::relay::StandaloneBackend;
use crate::run::StartError;
use crate::sources::{SourceCounts, SourceKey};
use crate::tls::CertFiles;

/// Where `--demo` puts the console: the original provisioning page's address.
pub const DEMO_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8893);
/// Largest request body (a form is well under it).
pub const MAX_BODY: usize = 16 * 1024;
/// Largest request head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Console connections open at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Console connections one source (an IPv4 address or an IPv6 /64) may hold.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// Longest wait for the relay to show a change before the answer is sent anyway.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Largest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// `serve --console`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleOptions {
    pub addr: SocketAddr,
    /// `--console-token-file`: required for a non-loopback address.
    pub token_file: Option<PathBuf>,
}

/// The console's options from its flags: `--console ADDR|off` (unset: off, or [`DEMO_ADDR`]
/// with `--demo`) and `--console-token-file`.
pub fn from_flags(
    console: Option<&str>,
    demo: bool,
    token_file: Option<PathBuf>,
) -> Result<Option<ConsoleOptions>, String> {
    let addr = match console.map(str::trim) {
        None | Some("") => demo.then_some(DEMO_ADDR),
        Some("off") => None,
        Some(addr) => Some(
            addr.parse()
                .map_err(|_| format!("--console {addr:?}: expected ADDR:PORT or off"))?,
        ),
    };
    Ok(addr.map(|addr| ConsoleOptions { addr, token_file }))
}

/// A console checked and bound, not serving yet ([`prepare`]).
pub struct Prepared {
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<LoginToken>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Checks the console's options and binds it: a non-loopback address without a token file
/// is refused; a non-loopback console is served over TLS with `tls` (the relay's
/// certificate).
pub fn prepare(
    options: Option<&ConsoleOptions>,
    tls: &Arc<rustls::ServerConfig>,
    bind: impl FnOnce(SocketAddr) -> Result<(TcpListener, SocketAddr), StartError>,
) -> Result<Option<Prepared>, StartError> {
    let Some(options) = options else {
        return Ok(None);
    };
    let loopback = options.addr.ip().to_canonical().is_loopback();
    let token = match &options.token_file {
        None if !loopback => {
            return Err(StartError::Config(format!(
                "--console {}: a console on a non-loopback address needs authentication: give \
                 --console-token-file (TAAS_CONSOLE_TOKEN_FILE), or listen on 127.0.0.1",
                options.addr
            )))
        }
        None => None,
        Some(path) => {
            let read = std::fs::File::open(path).and_then(|file| {
                use std::io::Read;
                let mut content = Vec::new();
                file.take(MAX_TOKEN_FILE).read_to_end(&mut content)?;
                Ok(content)
            });
            let content = read.map_err(|e| {
                StartError::Config(format!("--console-token-file {}: {e}", path.display()))
            })?;
            Some(LoginToken::from_file_content(&content).map_err(|e| {
                StartError::Config(format!("--console-token-file {}: {e}", path.display()))
            })?)
        }
    };
    // Bound by the caller, through the relay's listener registry (`handover`).
    let (listener, addr) = bind(options.addr)?;
    Ok(Some(Prepared {
        listener,
        addr,
        token,
        tls: (!loopback).then(|| tls.clone()),
    }))
}

/// What the console reads and changes.
pub struct Context {
    pub relay: Arc<StandaloneBackend>,
    /// The labels directory.
    pub labels: PathBuf,
    /// The directory's labels as last loaded (and which file each came from).
    pub from_dir: tokio::sync::watch::Receiver<LabelSet>,
    pub cert: CertFiles,
    /// The front end's address (its port goes into the agent's command).
    pub frontend: SocketAddr,
}

impl Prepared {
    /// Where the console listens (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until the future is dropped.
    pub async fn serve(self, context: Context) {
        let timeouts = context.relay.settings().timeouts.clone();
        let console = Arc::new(Console {
            keys: Keys::generate(),
            token: self.token,
            tls: self.tls.is_some(),
            addr: self.addr,
            head_timeout: timeouts.keep_alive,
            body_timeout: timeouts.request_body,
            changes: tokio::sync::Mutex::new(()),
            context,
        });
        let scheme = if console.tls { "https" } else { "http" };
        tracing::info!(addr = %self.addr, "console listening on {scheme}://{}/", self.addr);
        let acceptor = self.tls.map(TlsAcceptor::from);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let per_source = Arc::new(SourceCounts::default());
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "console connection limit reached; closing");
                continue;
            };
            let Some(source_slot) =
                per_source.try_acquire_owned(SourceKey::of(peer.ip()), MAX_CONNECTIONS_PER_SOURCE)
            else {
                tracing::debug!(%peer, "console connections per source reached; closing");
                continue;
            };
            let (console, acceptor) = (console.clone(), acceptor.clone());
            let handshake_timeout = timeouts.handshake;
            tokio::spawn(async move {
                let _slots = (slot, source_slot);
                match acceptor {
                    None => console.serve_connection(TokioIo::new(stream), peer).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls)) => console.serve_connection(TokioIo::new(tls), peer).await,
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "console TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "console TLS handshake timed out"),
                        }
                    }
                }
            });
        }
    }
}

struct Console {
    context: Context,
    keys: Keys,
    token: Option<LoginToken>,
    tls: bool,
    addr: SocketAddr,
    head_timeout: Duration,
    body_timeout: Duration,
    /// One change at a time: two creations of one label, or a rotation racing a delete,
    /// must not interleave.
    changes: tokio::sync::Mutex<()>,
}

type Answer = Response<Full<Bytes>>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const JS: &str = include_str!("console.js");
const CSS: &str = include_str!("console.css");

/// A notice shown after a change (by code in the URL, so no text can be injected).
fn notice_text(code: &str, label: &str) -> Option<String> {
    let what = match code {
        "disabled" => "disabled: the relay no longer serves it (its file is in disabled/)",
        "enabled" => "enabled: the relay serves it again",
        "deleted" => "deleted: its file is gone and the relay no longer serves it",
        _ => return None,
    };
    Some(format!("Label {label} {what}."))
}

impl Console {
    async fn serve_connection<I>(self: Arc<Self>, io: I, peer: SocketAddr)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let console = self.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let console = console.clone();
            async move {
                let (method, path) = (request.method().clone(), request.uri().path().to_string());
                let answer = console.answer(request).await;
                // Path only: no query, no header, no body ever reaches the log.
                tracing::debug!(%peer, %method, path = %path.chars().take(200).collect::<String>(),
                    status = answer.status().as_u16(), "console request");
                Ok::<_, Infallible>(answer)
            }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.head_timeout)
            .max_buf_size(MAX_HEAD)
            .max_headers(64)
            .serve_connection(io, service)
            .await;
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "console connection ended with an error");
        }
    }

    /// The page header for a session whose CSRF token is `csrf`.
    fn page_header<'a>(&self, csrf: &'a str) -> Header<'a> {
        if self.token.is_some() {
            Header::LogOut { csrf }
        } else {
            Header::Open
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Answer {
        let (parts, body) = request.into_parts();
        let text = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let host = text(header::HOST).or_else(|| parts.uri.authority().map(|a| a.to_string()));
        if !security::host_allowed(host.as_deref(), self.addr, self.token.is_some()) {
            return respond(
                StatusCode::MISDIRECTED_REQUEST,
                "text/plain; charset=utf-8",
                "this console answers only to its own address\n".into(),
            );
        }
        let path = parts.uri.path().to_string();
        match (&parts.method, path.as_str()) {
            (&Method::GET, "/console.js") => {
                return respond(StatusCode::OK, "text/javascript; charset=utf-8", JS.into())
            }
            (&Method::GET, "/console.css") => {
                return respond(StatusCode::OK, "text/css; charset=utf-8", CSS.into())
            }
            // Browsers ask for it unprompted; there is none.
            (&Method::GET, "/favicon.ico") => {
                return respond(StatusCode::NO_CONTENT, "image/x-icon", String::new())
            }
            _ => {}
        }
        let now = unix_now();
        let cookie = text(header::COOKIE);
        let session = cookie
            .as_deref()
            .and_then(|c| security::cookie(c, security::COOKIE))
            .and_then(|value| self.keys.session(value, now));

        if parts.method == Method::POST {
            // The body first (bounded in size and time), then the origin and the token.
            if body.size_hint().lower() > MAX_BODY as u64 {
                return closing(respond(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain; charset=utf-8",
                    "request body too large\n".into(),
                ));
            }
            let read = Limited::new(body, MAX_BODY).collect();
            let body = match tokio::time::timeout(self.body_timeout, read).await {
                Ok(Ok(collected)) => collected.to_bytes(),
                Ok(Err(_)) => {
                    return closing(respond(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "text/plain; charset=utf-8",
                        "request body too large\n".into(),
                    ))
                }
                Err(_) => {
                    return closing(respond(
                        StatusCode::REQUEST_TIMEOUT,
                        "text/plain; charset=utf-8",
                        "request body not received in time\n".into(),
                    ))
                }
            };
            let scheme = if self.tls { "https" } else { "http" };
            let own_origin = format!("{scheme}://{}", host.as_deref().unwrap_or(""));
            let (fetch_site, origin) = (
                text(header::HeaderName::from_static("sec-fetch-site")),
                text(header::ORIGIN),
            );
            if let Some(why) =
                security::cross_site(fetch_site.as_deref(), origin.as_deref(), &own_origin)
            {
                tracing::info!(?why, ?fetch_site, ?origin, %own_origin,
                    "console: cross-site request refused");
                return forbidden("This request came from another site. Nothing was changed.");
            }
            let Ok(fields) = form::parse(&body) else {
                return respond_html(
                    StatusCode::BAD_REQUEST,
                    html::error_page("Bad request", "The form could not be read."),
                );
            };
            let Some(session) = session else {
                return forbidden(
                    "No valid session (the console's cookie is missing or expired): reload the \
                     page and try again. Nothing was changed.",
                );
            };
            let presented = fields
                .get(security::CSRF_FIELD)
                .map(String::as_str)
                .unwrap_or("");
            if !self.keys.csrf_ok(&session, presented) {
                tracing::info!("console: request without a valid CSRF token refused");
                return forbidden(
                    "The form's security token is missing or wrong: reload the page and try \
                     again. Nothing was changed.",
                );
            }
            if path == "/login" {
                return self.login(&fields, now);
            }
            if self.token.is_some() && !session.authenticated {
                return forbidden("Log in first. Nothing was changed.");
            }
            if path == "/logout" {
                let mut answer = see_other("/login");
                set_header(
                    &mut answer,
                    header::SET_COOKIE,
                    &security::clear_cookie(self.tls),
                );
                return answer;
            }
            return self.change(&path, &fields, &session).await;
        }

        if parts.method != Method::GET && parts.method != Method::HEAD {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "GET or POST\n".into(),
            );
        }
        // A GET without a session gets one (authenticated at once where no token is needed).
        let (session, new_cookie) = match session {
            Some(session) => (session, None),
            None => {
                let session = self.keys.new_session(self.token.is_none(), now);
                let value = self.keys.cookie_value(&session);
                (session, Some(security::set_cookie(&value, self.tls)))
            }
        };
        let mut answer = if path == "/login" {
            if session.authenticated {
                see_other("/")
            } else {
                respond_html(
                    StatusCode::OK,
                    html::login_page(None, &self.keys.csrf_token(&session)),
                )
            }
        } else if self.token.is_some() && !session.authenticated {
            if path == "/labels.json" {
                respond(
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    "{\"error\":\"log in first\"}\n".into(),
                )
            } else {
                see_other("/login")
            }
        } else {
            self.view(&path, parts.uri.query().unwrap_or(""), &session)
        };
        if let Some(cookie) = new_cookie {
            set_header(&mut answer, header::SET_COOKIE, &cookie);
        }
        answer
    }

    fn login(&self, fields: &BTreeMap<String, String>, now: u64) -> Answer {
        let Some(token) = &self.token else {
            return see_other("/");
        };
        let presented = fields.get("token").map(String::as_str).unwrap_or("");
        if !token.matches(presented) {
            tracing::info!("console: login with a wrong token");
            let session = self.keys.new_session(false, now);
            let mut answer = respond_html(
                StatusCode::UNAUTHORIZED,
                html::login_page(Some("Wrong token."), &self.keys.csrf_token(&session)),
            );
            let value = self.keys.cookie_value(&session);
            set_header(
                &mut answer,
                header::SET_COOKIE,
                &security::set_cookie(&value, self.tls),
            );
            return answer;
        }
        // A new session id at login: a session planted before it is worth nothing after.
        let session = self.keys.new_session(true, now);
        let value = self.keys.cookie_value(&session);
        let mut answer = see_other("/");
        set_header(
            &mut answer,
            header::SET_COOKIE,
            &security::set_cookie(&value, self.tls),
        );
        answer
    }

    /// The rows of the table, from the relay's state now.
    fn rows(&self) -> Vec<Row> {
        let set = self.context.from_dir.borrow().clone();
        let serving: Vec<model::Serving> = self
            .context
            .relay
            .labels()
            .into_iter()
            .map(|(name, label)| {
                let m = label.metrics();
                model::Serving {
                    label: name,
                    id: label.config().id.clone(),
                    parked: label.parked() as u64,
                    active_pairs: u64::try_from(m.active_pairs.get()).unwrap_or(0),
                    last_registration: m.last_registration(),
                    unauthorized: m.registrations(Registered::Unauthorized),
                    rate_limited: m.registrations(Registered::RateLimited),
                    bytes_to_server: m.bytes_to_server.get(),
                    bytes_to_client: m.bytes_to_client.get(),
                }
            })
            .collect();
        let disabled = files::list_disabled(&self.context.labels);
        model::rows(&serving, &set.sources, &disabled, &self.context.labels)
    }

    fn view(&self, path: &str, query: &str, session: &Session) -> Answer {
        let csrf = self.keys.csrf_token(session);
        let header = self.page_header(&csrf);
        if path == "/" {
            let fields = form::parse(query.as_bytes()).unwrap_or_default();
            let notice = match (fields.get("notice"), fields.get("label")) {
                (Some(code), Some(label)) => normalize_label(label)
                    .ok()
                    .and_then(|label| notice_text(code, &label)),
                _ => None,
            };
            let rows = self.rows();
            let page = html::main_page(
                &rows,
                notice.as_deref(),
                &CreateForm::default(),
                &FieldErrors::new(),
                None,
                &csrf,
                header,
            );
            return respond_html(StatusCode::OK, page);
        }
        if path == "/labels.json" {
            let body = serde_json::json!({ "labels": self.rows() }).to_string();
            return respond(StatusCode::OK, "application/json", body);
        }
        // /labels/LABEL/confirm?action=ACTION
        if let Some(label) = path
            .strip_prefix("/labels/")
            .and_then(|rest| rest.strip_suffix("/confirm"))
        {
            let fields = form::parse(query.as_bytes()).unwrap_or_default();
            let action = fields.get("action").and_then(|a| Action::parse(a));
            if let (Ok(label), Some(action)) = (normalize_label(label), action) {
                return respond_html(
                    StatusCode::OK,
                    html::confirm_page(&label, action, &csrf, header),
                );
            }
        }
        respond_html(
            StatusCode::NOT_FOUND,
            html::error_page("Not found", "There is no such page."),
        )
    }

    /// A POST that changes something (CSRF already checked).
    async fn change(
        &self,
        path: &str,
        fields: &BTreeMap<String, String>,
        session: &Session,
    ) -> Answer {
        let _one_at_a_time = self.changes.lock().await;
        if path == "/labels" {
            return self.create(fields, session).await;
        }
        let Some((label, action)) = path
            .strip_prefix("/labels/")
            .and_then(|rest| rest.rsplit_once('/'))
            .and_then(|(label, action)| {
                Some((normalize_label(label).ok()?, Action::parse(action)?))
            })
        else {
            return respond_html(
                StatusCode::NOT_FOUND,
                html::error_page("Not found", "There is no such action."),
            );
        };
        let labels = self.context.labels.clone();
        let own = model::own_file(&self.context.from_dir.borrow().sources, &label)
            .map(|p| p.to_path_buf());
        let disabled = {
            let (dir, l) = (labels.clone(), label.clone());
            tokio::task::spawn_blocking(move || files::disabled_file(&dir, &l))
                .await
                .ok()
                .flatten()
        };
        let conflict = |why: &str| {
            respond_html(
                StatusCode::CONFLICT,
                html::error_page(
                    "Not done",
                    &format!("Label {label}: {why}. Nothing was changed."),
                ),
            )
        };
        let relay = self.context.relay.clone();
        let name = label.clone();
        let (result, done): (
            Result<(), files::FileError>,
            Box<dyn Fn() -> bool + Send + Sync>,
        ) = match action {
            Action::Disable => {
                let Some(file) = own else {
                    return conflict("it is not served from a file of its own");
                };
                let r = blocking(move || files::disable(&labels, &file)).await;
                (r, Box::new(move || relay.label(&name).is_none()))
            }
            Action::Enable => {
                let Some(file) = disabled else {
                    return conflict("it is not disabled (or its file holds other labels)");
                };
                let r = blocking(move || files::enable(&labels, &file)).await;
                (r, Box::new(move || relay.label(&name).is_some()))
            }
            Action::Delete => {
                let Some(file) = own.or(disabled) else {
                    return conflict("it is not in a file of its own");
                };
                let r = blocking(move || files::delete(&file)).await;
                (r, Box::new(move || relay.label(&name).is_none()))
            }
            Action::Rotate => {
                let Some(file) = own else {
                    return conflict("it is not served from a file of its own");
                };
                return self.rotate(&label, file, session).await;
            }
        };
        if let Err(error) = result {
            tracing::warn!(label = %label, action = action.as_str(), %error, "console: change failed");
            return conflict(&error.to_string());
        }
        tracing::info!(label = %label, action = action.as_str(), "console: label changed");
        self.wait_applied(done).await;
        let code = match action {
            Action::Disable => "disabled",
            Action::Enable => "enabled",
            _ => "deleted",
        };
        see_other(&format!("/?notice={code}&label={label}"))
    }

    /// Waits (bounded) until the relay shows a change, woken by each reload.
    async fn wait_applied(&self, done: Box<dyn Fn() -> bool + Send + Sync>) {
        let mut reloads = self.context.from_dir.clone();
        let wait = async {
            while !done() {
                tokio::select! {
                    _ = reloads.changed() => {}
                    // The reload is applied just after it is published: look again shortly.
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        };
        let _ = tokio::time::timeout(APPLY_WAIT, wait).await;
    }

    /// What `label new` would be told for this relay.
    fn new_label(&self, id: String, label: String) -> NewLabel {
        let settings = self.context.relay.settings();
        let port = self.context.frontend.port();
        NewLabel {
            id,
            label,
            namespace: taas_crds::manifest::DEFAULT_NAMESPACE.into(),
            registrar: settings.registrar.clone(),
            domain: settings.domain.clone(),
            relay_url: if port == 443 {
                format!("https://{}", settings.registrar)
            } else {
                format!("https://{}:{port}", settings.registrar)
            },
            ca_file: Some(self.context.cert.cert.clone()),
            direct: false,
            options: Default::default(),
        }
    }

    async fn create(&self, fields: &BTreeMap<String, String>, session: &Session) -> Answer {
        let typed = CreateForm::from_fields(fields);
        let bad = |errors: FieldErrors, general: Option<&str>| {
            let csrf = self.keys.csrf_token(session);
            let header = self.page_header(&csrf);
            respond_html(
                StatusCode::BAD_REQUEST,
                html::main_page(&self.rows(), None, &typed, &errors, general, &csrf, header),
            )
        };
        let valid = match typed.validate() {
            Ok(valid) => valid,
            Err(errors) => return bad(errors, None),
        };
        let (dir, name) = (self.context.labels.clone(), valid.label.clone());
        let taken = self.context.relay.label(&valid.label).is_some()
            || self
                .context
                .from_dir
                .borrow()
                .labels
                .contains_key(&valid.label)
            || tokio::task::spawn_blocking(move || files::disabled_file(&dir, &name).is_some())
                .await
                .unwrap_or(true);
        if taken {
            let mut errors = FieldErrors::new();
            errors.insert(
                "label",
                format!(
                    "label {:?} exists already (served or disabled)",
                    valid.label
                ),
            );
            return bad(errors, None);
        }
        let mut new = self.new_label(valid.id.clone(), valid.label.clone());
        new.direct = valid.direct;
        new.options = valid.options;
        let dir = self.context.labels.clone();
        let made = blocking(move || read_back(provision::write_label(&dir, &new)?)).await;
        let (provisioned, content) = match made {
            Ok(made) => made,
            Err(ProvisionError::Exists { .. }) => {
                let mut errors = FieldErrors::new();
                errors.insert(
                    "label",
                    format!("a file for label {:?} exists already", valid.label),
                );
                return bad(errors, None);
            }
            Err(ProvisionError::Invalid(why)) => return bad(FieldErrors::new(), Some(&why)),
            Err(error) => {
                tracing::warn!(label = %valid.label, %error, "console: cannot write the label file");
                return bad(FieldErrors::new(), Some(&format!("Not created: {error}")));
            }
        };
        tracing::info!(label = %valid.label, "console: label created");
        let mut downloads = vec![html::Download {
            name: format!("{}.yaml", valid.label),
            content,
            what: "the label file, for `taas-agent --label-file` and `kubectl apply -f`",
        }];
        if valid.steward {
            match self.steward_file(&valid.id, &valid.label, &provisioned.secret_b32) {
                Ok(download) => downloads.push(download),
                Err(why) => tracing::warn!(label = %valid.label, "console: no steward file: {why}"),
            }
        }
        let name = valid.label.clone();
        let relay = self.context.relay.clone();
        self.wait_applied(Box::new(move || relay.label(&name).is_some()))
            .await;
        self.secret_answer(
            "Label created",
            &valid.label,
            &valid.id,
            &provisioned,
            &downloads,
            session,
        )
    }

    /// The original steward's provisioning file (`<ID>.js`) for a new label.
    fn steward_file(
        &self,
        id: &str,
        label: &str,
        secret_b32: &str,
    ) -> Result<html::Download, String> {
        let settings = self.context.relay.settings();
        let secret = crate::totp::decode_secret(secret_b32).map_err(|e| e.to_string())?;
        let ca_pem = std::fs::read(&self.context.cert.cert).map_err(|e| e.to_string())?;
        let text = provision::steward_file(&provision::StewardParams {
            id: id.into(),
            label: label.into(),
            domain: settings.domain.clone(),
            registrar: settings.registrar.clone(),
            secret,
            hostname: settings.advertise.clone(),
            port: self.context.frontend.port(),
            ca_pem: Some(ca_pem),
        });
        let safe: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok(html::Download {
            name: format!("{safe}.js"),
            content: text.into_bytes(),
            what: "the original steward's provisioning file, for its db/ directory",
        })
    }

    async fn rotate(&self, label: &str, file: PathBuf, session: &Session) -> Answer {
        let id = self
            .context
            .relay
            .label(label)
            .map(|l| l.config().id.clone())
            .unwrap_or_default();
        let new = self.new_label(id.clone(), label.to_string());
        let rotated = blocking(move || read_back(provision::rotate_secret(&file, &new)?)).await;
        let (provisioned, content) = match rotated {
            Ok(rotated) => rotated,
            Err(error) => {
                tracing::warn!(label = %label, %error, "console: rotation failed");
                return respond_html(
                    StatusCode::CONFLICT,
                    html::error_page(
                        "Not done",
                        &format!("Label {label}: {error}. Nothing was changed."),
                    ),
                );
            }
        };
        tracing::info!(label = %label, "console: secret rotated");
        let secret = crate::totp::decode_secret(&provisioned.secret_b32).unwrap_or_default();
        let (relay, name) = (self.context.relay.clone(), label.to_string());
        self.wait_applied(Box::new(move || {
            relay
                .label(&name)
                .is_some_and(|l| l.config().secret == secret)
        }))
        .await;
        let file_name = provisioned
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("{label}.yaml"));
        let downloads = [html::Download {
            name: file_name,
            content,
            what: "the label file with the new secret, for the hidden server's agent",
        }];
        self.secret_answer(
            "Secret rotated",
            label,
            &id,
            &provisioned,
            &downloads,
            session,
        )
    }

    fn secret_answer(
        &self,
        heading: &str,
        label: &str,
        id: &str,
        provisioned: &provision::Provisioned,
        downloads: &[html::Download],
        session: &Session,
    ) -> Answer {
        let qr = html::qr_svg(&provisioned.uri).unwrap_or_default();
        let csrf = self.keys.csrf_token(session);
        let header = self.page_header(&csrf);
        let page = html::secret_page(
            &html::Secret {
                heading,
                label,
                id,
                file: &provisioned.path.display().to_string(),
                secret_b32: &provisioned.secret_b32,
                uri: &provisioned.uri,
                qr_svg: &qr,
                agent_command: &provisioned.agent_command,
                downloads,
            },
            header,
        );
        respond_html(StatusCode::OK, page)
    }
}

/// Runs blocking file work off the async workers.
/// The label file just written (created or rotated) with its bytes, read back for the
/// one-time page's download (blocking: call it inside [`blocking`]).
fn read_back(
    provisioned: provision::Provisioned,
) -> Result<(provision::Provisioned, Vec<u8>), ProvisionError> {
    let content = std::fs::read(&provisioned.path).map_err(|error| ProvisionError::Io {
        path: provisioned.path.clone(),
        error,
    })?;
    Ok((provisioned, content))
}

async fn blocking<T: Send + 'static, E: Send + 'static + From<std::io::Error>>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(E::from(std::io::Error::other(e.to_string()))),
    }
}

impl From<std::io::Error> for files::FileError {
    fn from(error: std::io::Error) -> Self {
        Self::Io {
            path: PathBuf::new(),
            error,
        }
    }
}

impl From<std::io::Error> for ProvisionError {
    fn from(error: std::io::Error) -> Self {
        Self::Io {
            path: PathBuf::new(),
            error,
        }
    }
}

fn set_header(answer: &mut Answer, name: header::HeaderName, value: &str) {
    if let Ok(value) = header::HeaderValue::from_str(value) {
        answer.headers_mut().append(name, value);
    }
}

/// An answer with the console's headers on it.
fn respond(status: StatusCode, content_type: &str, body: String) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(body)));
    *answer.status_mut() = status;
    set_header(&mut answer, header::CONTENT_TYPE, content_type);
    // Nothing here is worth a cache, and one page holds a secret.
    set_header(&mut answer, header::CACHE_CONTROL, "no-store");
    for (name, value) in security::HEADERS {
        set_header(&mut answer, header::HeaderName::from_static(name), value);
    }
    answer
}

fn respond_html(status: StatusCode, page: String) -> Answer {
    respond(status, "text/html; charset=utf-8", page)
}

fn closing(mut answer: Answer) -> Answer {
    set_header(&mut answer, header::CONNECTION, "close");
    answer
}

fn forbidden(why: &str) -> Answer {
    respond_html(StatusCode::FORBIDDEN, html::error_page("Forbidden", why))
}

fn see_other(location: &str) -> Answer {
    let mut answer = respond(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        String::new(),
    );
    set_header(&mut answer, header::LOCATION, location);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_flag_is_off_by_default_and_on_with_the_demo() {
        assert_eq!(from_flags(None, false, None), Ok(None));
        assert_eq!(from_flags(Some("off"), true, None), Ok(None));
        assert_eq!(
            from_flags(None, true, None),
            Ok(Some(ConsoleOptions {
                addr: DEMO_ADDR,
                token_file: None
            }))
        );
        let options = from_flags(Some("0.0.0.0:9000"), false, Some("t".into()))
            .unwrap()
            .unwrap();
        assert_eq!(options.addr, "0.0.0.0:9000".parse().unwrap());
        assert!(from_flags(Some("nope"), false, None).is_err());
    }

    #[test]
    fn notices_are_chosen_by_code_only() {
        assert!(notice_text("disabled", "home").unwrap().contains("home"));
        assert_eq!(notice_text("<script>", "home"), None);
    }
}
