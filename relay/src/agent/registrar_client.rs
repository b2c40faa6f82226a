//! The agent's HTTPS client of the registrar: `PUT /register/LABEL` on kept-alive TLS
//! connections, following redirects. ("Registrar" is the relay's role; this is its client.)

use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use taas_protocol::rendezvous::{self, Endpoint, MAX_BODY};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::explain::{
    chain, explain_connect, explain_connect_timeout, explain_handshake_timeout, explain_redirect,
    explain_request, explain_request_build, explain_request_timeout, explain_server_name,
    explain_status, parse_http_date, parse_retry_after, Problem, Severity,
};
use super::target::{connect_address, resolve_redirect, RedirectError, Target, MAX_REDIRECTS};
use crate::config::Algorithm;

/// TCP connect to the registrar.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake with the registrar.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// One request: sending it and reading the whole answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections kept open: the origin and the hosts a redirect chain visited.
const MAX_CONNECTIONS: usize = MAX_REDIRECTS + 1;

const USER_AGENT: &str = concat!("taas-agent/", env!("CARGO_PKG_VERSION"));

/// Who registers, and how its TOTP tokens are made.
#[derive(Clone)]
pub struct Credentials {
    pub id: String,
    pub secret: Vec<u8>,
    pub algorithm: Algorithm,
    pub digits: u32,
    pub period: u64,
}

impl Credentials {
    /// The `Authorization` value for this moment (a fresh TOTP for every request).
    fn authorization(&self) -> String {
        let now = unix_now();
        let token = crate::totp::code(&self.secret, self.algorithm, self.digits, self.period, now);
        crate::authorization::format(&self.id, &token)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A successful registration.
#[derive(Debug)]
pub struct Registered {
    /// The rendezvous ports to connect to (one, unless the relay batches).
    pub endpoints: Vec<Endpoint>,
    /// The registrar's address as connected (stands in for an unspecified HOST in the body).
    pub registrar_ip: IpAddr,
}

/// A failed registration: why, and how long the server asked us to wait.
#[derive(Debug)]
pub struct Failure {
    pub problem: Problem,
    pub retry_after: Option<Duration>,
}

impl From<Problem> for Failure {
    fn from(problem: Problem) -> Self {
        Self {
            problem,
            retry_after: None,
        }
    }
}

struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    peer_ip: IpAddr,
}

/// Registers with one registrar, reusing its connections (HTTP/1.1 keep-alive).
pub struct RegistrarClient {
    origin: Target,
    connect: Option<String>,
    tls: TlsConnector,
    connections: HashMap<(String, u16), Connection>,
}

impl RegistrarClient {
    /// `origin` is the registration URL (`…/register/LABEL`); `connect` overrides the address
    /// of its host (not of other hosts a redirect may name).
    pub fn new(origin: Target, connect: Option<String>, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            origin,
            connect,
            tls: TlsConnector::from(tls),
            connections: HashMap::new(),
        }
    }

    /// One registration for up to `count` rendezvous ports (more than 1 uses the relay's
    /// several-ports extension; a relay without it answers one), following up to
    /// `MAX_REDIRECTS` redirects.
    pub async fn register(
        &mut self,
        credentials: &Credentials,
        count: u32,
    ) -> Result<Registered, Failure> {
        let mut target = self.origin.clone();
        let mut hops = 0;
        loop {
            let authorization = credentials.authorization();
            let (response, body, peer_ip) = self.exchange(&target, &authorization, count).await?;
            let status = response.status.as_u16();
            match status {
                200 => {
                    let mut endpoints = rendezvous::parse(&body).map_err(|e| {
                        Problem::new("bad_response", Severity::Error, e.to_string())
                    })?;
                    // Never more connections than asked for, whatever the body says.
                    endpoints.truncate(count.max(1) as usize);
                    return Ok(Registered {
                        endpoints,
                        registrar_ip: peer_ip,
                    });
                }
                301 | 302 | 307 | 308 => {
                    if hops == MAX_REDIRECTS {
                        return Err(explain_redirect(&target, RedirectError::TooMany).into());
                    }
                    hops += 1;
                    let location = response
                        .headers
                        .get(header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let next = resolve_redirect(&target, location)
                        .map_err(|e| explain_redirect(&target, e))?;
                    tracing::debug!(from = %target, to = %next, status, "registration redirected");
                    target = next;
                }
                _ => {
                    let now = unix_now();
                    let header = |name| {
                        response
                            .headers
                            .get(name)
                            .and_then(|v: &HeaderValue| v.to_str().ok())
                    };
                    let retry_after =
                        header(header::RETRY_AFTER).and_then(|v| parse_retry_after(v, now));
                    let skew = header(header::DATE)
                        .and_then(parse_http_date)
                        .map(|date| date as i64 - now as i64);
                    return Err(Failure {
                        problem: explain_status(status, retry_after, skew),
                        retry_after,
                    });
                }
            }
        }
    }

    /// Sends one request to `target` on a kept-alive connection (opening one if needed) and
    /// reads the whole answer. A reused connection that turns out closed (the server's idle
    /// timeout raced us) is replaced once, silently.
    async fn exchange(
        &mut self,
        target: &Target,
        authorization: &str,
        count: u32,
    ) -> Result<(hyper::http::response::Parts, Bytes, IpAddr), Failure> {
        let key = (target.host.clone(), target.port);
        let mut reused = true;
        loop {
            if !matches!(self.connections.get(&key), Some(c) if !c.sender.is_closed()) {
                self.connections.remove(&key);
                let connection = self.open(target).await?;
                if self.connections.len() >= MAX_CONNECTIONS {
                    self.connections.clear();
                }
                self.connections.insert(key.clone(), connection);
                reused = false;
            }
            let Some(connection) = self.connections.get_mut(&key) else {
                unreachable!("inserted above");
            };
            let peer_ip = connection.peer_ip;
            let request =
                build_request(target, authorization, count).map_err(explain_request_build)?;
            let sender = &mut connection.sender;
            let exchange = async {
                sender
                    .ready()
                    .await
                    .map_err(Box::<dyn StdError + Send + Sync>::from)?;
                let response = sender.send_request(request).await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_BODY).collect().await?.to_bytes();
                Ok::<_, Box<dyn StdError + Send + Sync>>((parts, body))
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok((parts, body))) => return Ok((parts, body, peer_ip)),
                Ok(Err(error)) => {
                    self.connections.remove(&key);
                    if reused {
                        tracing::debug!(error = %chain(&*error), "kept-alive registrar connection failed; reconnecting");
                        reused = false;
                        continue;
                    }
                    return Err(explain_request(&target.authority(), &*error).into());
                }
                Err(_) => {
                    self.connections.remove(&key);
                    return Err(
                        explain_request_timeout(&target.authority(), REQUEST_TIMEOUT).into(),
                    );
                }
            }
        }
    }

    /// TCP, TLS (SNI from the URL, ALPN http/1.1), then the HTTP/1.1 handshake.
    async fn open(&self, target: &Target) -> Result<Connection, Failure> {
        let connect = if target.same_origin(&self.origin) {
            self.connect.as_deref()
        } else {
            None
        };
        let address = connect_address(connect, target);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address.as_str()))
            .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(explain_connect(&address, &error).into()),
            Err(_) => return Err(explain_connect_timeout(&address).into()),
        };
        let _ = tcp.set_nodelay(true);
        let peer_ip = tcp
            .peer_addr()
            .map_err(|error| explain_connect(&address, &error))?
            .ip();
        let server_name = ServerName::try_from(target.host.clone())
            .map_err(|_| explain_server_name(&target.host))?;
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.connect(server_name, tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return Err(explain_connect(&address, &error).into()),
            Err(_) => return Err(explain_handshake_timeout(&address).into()),
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|error| explain_request(&target.authority(), &error))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "registrar connection ended");
            }
        });
        tracing::debug!(%address, host = %target.host_header(), "connected to the registrar");
        Ok(Connection { sender, peer_ip })
    }
}

/// The registration request, exactly as the steward sends it (plus a length and an agent);
/// for `count` > 1, with the several-ports extension's header.
pub fn build_request(
    target: &Target,
    authorization: &str,
    count: u32,
) -> Result<Request<Empty<Bytes>>, hyper::http::Error> {
    let mut authorization = HeaderValue::from_str(authorization)?;
    authorization.set_sensitive(true);
    let mut builder = Request::builder()
        .method(Method::PUT)
        .uri(target.path.as_str())
        .header(header::HOST, target.host_header())
        .header(header::AUTHORIZATION, authorization)
        .header(header::CONTENT_LENGTH, "0")
        .header(header::USER_AGENT, USER_AGENT);
    if count > 1 {
        builder = builder.header(taas_protocol::answer::RENDEZVOUS_COUNT_HEADER, count);
    }
    builder.body(Empty::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_shape() {
        let target = Target::registration("https://Reg.Example:8443", "home").unwrap();
        let auth = crate::authorization::format("2f40-id", "123456");
        let request = build_request(&target, &auth, 1).unwrap();
        assert_eq!(request.method(), Method::PUT);
        assert_eq!(request.uri().to_string(), "/register/home");
        let h = request.headers();
        assert_eq!(h[header::HOST], "reg.example:8443");
        assert_eq!(
            h[header::AUTHORIZATION],
            "TOTP username=\"2f40-id\", response=\"123456\""
        );
        assert!(h[header::AUTHORIZATION].is_sensitive());
        assert_eq!(h[header::CONTENT_LENGTH], "0");
        assert!(
            h.get(header::CONNECTION).is_none(),
            "keep-alive is the default"
        );
        assert!(h
            .get(taas_protocol::answer::RENDEZVOUS_COUNT_HEADER)
            .is_none());
        let batch = build_request(&target, &auth, 8).unwrap();
        assert_eq!(
            batch.headers()[taas_protocol::answer::RENDEZVOUS_COUNT_HEADER],
            "8"
        );

        let default_port = Target::registration("https://reg.example", "a.b").unwrap();
        let request = build_request(&default_port, &auth, 1).unwrap();
        assert_eq!(request.headers()[header::HOST], "reg.example");
        assert_eq!(request.uri().to_string(), "/register/a.b");
    }

    #[test]
    fn token_changes_with_the_secret_not_the_shape() {
        let credentials = Credentials {
            id: "id-1".into(),
            secret: b"12345678901234567890".to_vec(),
            algorithm: Algorithm::SHA1,
            digits: 6,
            period: 30,
        };
        let value = credentials.authorization();
        let token = value
            .strip_prefix("TOTP username=\"id-1\", response=\"")
            .and_then(|rest| rest.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{value}"));
        assert_eq!(token.len(), 6);
        assert!(token.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn error_chains() {
        let inner = std::io::Error::other("inner");
        let outer = std::io::Error::other(inner);
        assert_eq!(chain(&outer), "inner");
        let target = Target::parse("https://r.example").unwrap();
        let p = explain_request(&target.authority(), &outer);
        assert_eq!(p.kind, "http");
        assert!(p.message.contains("r.example:443"));
    }
}
