//! The `/metrics`, `/healthz` and `/readyz` endpoint, on its own plain-HTTP listener so that
//! scraping never competes with a process's real work (the relay's front end, the
//! operator's reconciles). `/readyz` follows a readiness flag the process sets once it
//! serves, and clears to drain before it stops.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Serves `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz`
/// (200 once `ready` is set) until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: Arc<AtomicBool>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                // Out of fds or similar: back off instead of spinning.
                tracing::warn!(%error, "metrics listener accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = answer(&request, &registry, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
        });
    }
}

fn answer<B>(
    request: &Request<B>,
    registry: &Registry,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                );
            }
            let mut response = text(StatusCode::OK, body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    fn request(method: &str, path: &str) -> String {
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn metrics_health_and_readiness_follow_the_registry_and_the_flag() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        counter.inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(serve(listener, Arc::new(registry), ready.clone()));

        let metrics = get(addr, &request("GET", "/metrics")).await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(
            metrics.contains("application/openmetrics-text"),
            "{metrics}"
        );
        assert!(metrics.contains("things_total 1"), "{metrics}");
        assert!(get(addr, &request("GET", "/healthz"))
            .await
            .starts_with("HTTP/1.1 200"));
        let unready = get(addr, &request("GET", "/readyz")).await;
        assert!(unready.starts_with("HTTP/1.1 503"), "{unready}");
        ready.store(true, Ordering::Relaxed);
        let now_ready = get(addr, &request("GET", "/readyz")).await;
        assert!(now_ready.starts_with("HTTP/1.1 200"), "{now_ready}");
        ready.store(false, Ordering::Relaxed);
        assert!(get(addr, &request("GET", "/readyz"))
            .await
            .starts_with("HTTP/1.1 503"));
        assert!(get(addr, &request("GET", "/nope"))
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, &request("POST", "/metrics"))
            .await
            .starts_with("HTTP/1.1 405"));
        task.abort();
    }
}
