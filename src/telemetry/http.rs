//! The HTTP listener for monitoring, on hyper: `/metrics` (Prometheus
//! text), `/healthz` (the process answers), `/readyz` (this instance
//! should get mail: 503 with the reasons otherwise) and `/` (the status
//! page). GET and HEAD; query strings and absolute-form targets are read as
//! HTTP says (only the path routes). Bounded: header size and time, a
//! connection's lifetime, and how many connections are served at once.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// One readiness condition as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// What the status page and `/readyz` show, gathered when asked for.
pub trait Status: Send + Sync {
    fn html(&self) -> String;
    fn readiness(&self) -> Vec<Probe>;
}

/// Request head limit (hyper's smallest allowed read buffer).
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send a request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A keep-alive connection (Prometheus keeps one) is closed after this; the
/// scraper simply opens another.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

pub async fn serve(listener: TcpListener, handle: PrometheusHandle, status: Arc<dyn Status>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (handle, status) = (handle.clone(), Arc::clone(&status));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(&req, &handle, status.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(MAX_REQUEST)
                .serve_connection(TokioIo::new(sock), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

/// The response to one request. HEAD gets GET's head (hyper sends no body).
fn respond<B>(
    req: &Request<B>,
    handle: &PrometheusHandle,
    status: &dyn Status,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n".into());
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => with_type(
            text(StatusCode::OK, handle.render()),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let probes = status.readiness();
            let ready = probes.iter().all(|p| p.ok);
            let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
            for p in &probes {
                let mark = if p.ok { "ok" } else { "FAIL" };
                body.push_str(&format!("{mark} {}: {}\n", p.name, p.detail));
            }
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, body)
        }
        "/" => with_type(
            text(StatusCode::OK, status.html()),
            "text/html; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // Health answers are about now; no proxy or browser may keep them.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn with_type(mut r: Response<Full<Bytes>>, ctype: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
