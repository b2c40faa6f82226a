//! `taas-relay serve --demo`: the whole path on one machine, with nothing to set up. A "demo"
//! label is added in memory (not written to the labels directory), a tiny HTTPS page plays
//! the hidden server, and an in-process agent keeps connections parked in front of it. A
//! newcomer then fetches `https://demo.<domain>:PORT/` with curl or a browser.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::agent::{Agent, AgentConfig, Trust};
use crate::config::LabelConfig;
use crate::run::standalone::Standalone;
use crate::run::Tasks;

pub const DEMO_LABEL: &str = "demo";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo label: {0}")]
    Label(String),
    #[error("demo page: {0}")]
    Page(#[from] std::io::Error),
    #[error("demo page TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("demo agent: {0}")]
    Agent(#[from] crate::agent::AgentError),
}

/// The running demo; dropping it stops the page and the agent.
pub struct Demo {
    /// What a mobile client asks for.
    pub url: String,
    _tasks: Tasks,
}

/// Adds the demo label to `relay`, starts the page and the agent, and prints how to try it.
pub async fn start(relay: &Standalone) -> Result<Demo, DemoError> {
    let settings = relay.relay.settings();
    let config = LabelConfig {
        label: DEMO_LABEL.into(),
        id: "demo".into(),
        secret: crate::provision::generate_secret(),
        algorithm: Default::default(),
        period: 30,
        max_parked: 8,
        source_pinning: true,
        proxy_protocol: Default::default(),
        client_port: None,
        client_admission: Default::default(),
        server_speaks_first: false,
        direct: false,
    };
    let problems = relay.add_label(config.clone());
    if !problems.is_empty() {
        return Err(DemoError::Label(problems.join("; ")));
    }

    // The page plays a hidden server with its own TLS (here it reuses the relay's generated
    // certificate, which covers demo.<domain>; the relay itself never terminates this TLS).
    let page = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let page_addr = page.local_addr()?;
    let page_tls = crate::tls::server_config(&relay.cert)?;
    let mut tasks = Tasks::new(None);
    tasks.spawn(serve_page(page, page_tls));

    let port = relay.frontend.port();
    let registrar_url = format!("https://{}:{port}", settings.registrar);
    let mut agent_config = AgentConfig::from_label(registrar_url, &config, page_addr.to_string());
    agent_config.connect = Some(relay.frontend.to_string());
    agent_config.trust = Trust::PemFile(relay.cert.cert.clone());
    agent_config.parked = 4;
    let agent = Agent::new(agent_config)?;
    tasks.spawn(async move {
        if let Err(error) = agent.run(std::future::pending()).await {
            tracing::error!(%error, "demo agent stopped");
        }
    });

    let url = format!("https://{DEMO_LABEL}.{}:{port}/", settings.domain);
    let cert = std::path::absolute(&relay.cert.cert).unwrap_or_else(|_| relay.cert.cert.clone());
    let console = relay
        .console
        .map(|addr| {
            let scheme = if addr.ip().is_loopback() {
                "http"
            } else {
                "https"
            };
            format!("The console (labels, create a label): {scheme}://{addr}/\n")
        })
        .unwrap_or_default();
    println!(
        "\nDemo ready: a built-in hidden server is parked under the label \"{DEMO_LABEL}\".\n\
         Fetch its page through the relay (TLS end to end, after one 307):\n\n\
         \x20 curl -L --cacert {cert} {url}\n\n\
         or open {url} in a browser (the certificate is self-signed: trust {cert}, or accept it).\n\
         {console}Stop with Ctrl-C.\n",
        cert = cert.display(),
    );
    Ok(Demo { url, _tasks: tasks })
}

async fn serve_page(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await
            else {
                return;
            };
            let service =
                hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(page(&request))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn page<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>TAAS demo</title></head>\n\
         <body><h1>Hello from a hidden server</h1>\n\
         <p>This page came from a server that accepts no inbound connections. Its agent dialled \
         out to the relay and parked connections there; the relay redirected you (307) to the \
         label's client port and spliced your connection onto one of them. TLS runs end to end \
         between you and this server.</p>\n<p>You asked for <code>{}</code>.</p>\n</body></html>\n",
        html_escape(path)
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
