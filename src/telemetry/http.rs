//! The HTTP listener for monitoring, on hyper: `/metrics` (Prometheus
//! text), `/healthz` (the process answers), `/readyz` (this instance
//! should get mail: 503 with the reasons otherwise) and `/` (the status
//! page). GET and HEAD; query strings and absolute-form targets are read as
//! HTTP says (only the path routes). Bounded: header size and time, a
//! connection's lifetime, and how many connections are served at once (the
//! oldest evicted by a new one, so idle connections cannot blind it).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

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
/// How long a client has to send a request head, on a new connection or
/// between keep-alive requests: an idle or slowloris connection is gone
/// after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A keep-alive connection (Prometheus keeps one) is closed after this; the
/// scraper simply opens another.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// What the HTTP listener reports about its accepts, and the descriptor it
/// keeps for the moment there are none (see `runtime::accept`).
pub trait AcceptWatch: Send + Sync {
    /// An accept failed; how long to wait before the next.
    fn failed(&self, e: &std::io::Error) -> Duration;
    fn accepted(&self);
    /// Whether `e` says the process is out of descriptors.
    fn out_of_descriptors(&self, e: &std::io::Error) -> bool;
    /// Gives back the spare descriptor; false if there is none.
    fn release_spare(&self) -> bool;
    fn restore_spare(&self);
}

/// Serves at most `max` connections; when full, a new one evicts the
/// oldest, so idle or slow connections can never lock a health check or a
/// scrape out (a request is served within milliseconds of its head).
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    status: Arc<dyn Status>,
    watch: Arc<dyn AcceptWatch>,
    max: usize,
) {
    let open = Arc::new(Mutex::new(Open::default()));
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => {
                watch.accepted();
                watch.restore_spare();
                sock
            }
            Err(e) => {
                let wait = watch.failed(&e);
                // The spare descriptor takes the next request. (Not an
                // eviction: at EMFILE accept fails even with nothing
                // waiting, and would evict what it just accepted.)
                if watch.out_of_descriptors(&e) && watch.release_spare() {
                    continue;
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let (id, evicted) = {
            let mut o = lock(&open);
            if o.conns.len() >= max {
                o.evict_oldest();
            }
            o.next += 1;
            let (tx, rx) = oneshot::channel::<()>();
            let id = o.next;
            o.conns.insert(id, tx);
            (id, rx)
        };
        let (handle, status, open) = (handle.clone(), Arc::clone(&status), Arc::clone(&open));
        let watch = Arc::clone(&watch);
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
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {}
                _ = evicted => {}
            }
            lock(&open).conns.remove(&id);
            // A descriptor is free now: keep it as the spare, if that was
            // given out.
            watch.restore_spare();
        });
    }
}

/// The connections being served, oldest first, each with the sender that
/// evicts it when dropped.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Open {
    fn evict_oldest(&mut self) {
        self.conns.pop_first();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
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
