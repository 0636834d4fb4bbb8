//! The HTTP listener for monitoring, on hyper: `/metrics` (Prometheus
//! text), `/healthz` (the process answers), `/readyz` (this instance
//! should get mail: 503 with the reasons otherwise) and `/` (the status
//! page). GET and HEAD; query strings and absolute-form targets are read as
//! HTTP says (only the path routes). Bounded: header size and time, a
//! connection's lifetime, and how many connections are served at once, in
//! all and per address (past them an old one is evicted by a new one, so
//! idle connections cannot blind it).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
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
/// How long a new connection waits for an evicted one to close. Eviction
/// only wakes the evicted task; until it runs, its descriptor is still
/// open, and under a reconnect flood hundreds were (up to 800 descriptors
/// for 256 connections). Waiting for it keeps the bound a bound; it takes
/// microseconds unless the runtime is starved, and past this the new
/// connection is closed instead.
const EVICTED_CLOSE_WAIT: Duration = Duration::from_secs(1);

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

/// Serves at most `max` connections, a quarter of them per address; past
/// either, a new connection evicts an old one (see `Open::admit`), so idle
/// or slow connections can never lock a health check or a scrape out (a
/// request is served within milliseconds of its head). A connection holds
/// one of `max` permits until its descriptor is closed, so evicted but not
/// yet closed connections count too; a sixteenth of them is kept for those,
/// so that a new connection waits for one to close only when many are.
/// (Waiting at every eviction doubled a health check's wait under a flood
/// of 2,000 reconnecting connections.)
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    status: Arc<dyn Status>,
    watch: Arc<dyn AcceptWatch>,
    max: usize,
) {
    let open = Arc::new(Mutex::new(Open::default()));
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    let served = (max - max / 16).max(1);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(accepted) => {
                watch.accepted();
                watch.restore_spare();
                accepted
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
        let (id, evicted) = lock(&open).admit(peer.ip(), served);
        let permit =
            match tokio::time::timeout(EVICTED_CLOSE_WAIT, Arc::clone(&permits).acquire_owned())
                .await
            {
                Ok(Ok(permit)) => permit,
                // The evicted did not close within the wait (a starved
                // runtime): this connection is closed instead.
                _ => {
                    lock(&open).remove(id);
                    continue;
                }
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
            lock(&open).remove(id);
            drop(permit);
            // A descriptor is free now: keep it as the spare, if that was
            // given out.
            watch.restore_spare();
        });
    }
}

/// The connections being served, oldest first, each with the sender that
/// evicts it when dropped, and which of them each address holds.
#[derive(Default)]
struct Open {
    next: u64,
    conns: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    by_ip: HashMap<IpAddr, BTreeSet<u64>>,
}

impl Open {
    /// Takes in a connection from `ip`. An address at its share loses its
    /// own oldest connection; when all `max` are taken, the address holding
    /// the most loses its oldest. So a flood of connections, even one that
    /// reconnects as fast as it is dropped, evicts only its own, and a
    /// scraper or health checker from another address keeps its one.
    fn admit(&mut self, ip: IpAddr, max: usize) -> (u64, oneshot::Receiver<()>) {
        let share = (max / 4).max(1);
        if self.by_ip.get(&ip).is_some_and(|c| c.len() >= share) {
            self.evict_oldest_of(ip);
        } else if self.conns.len() >= max
            && let Some(heaviest) = self
                .by_ip
                .iter()
                .max_by_key(|(_, c)| c.len())
                .map(|(ip, _)| *ip)
        {
            self.evict_oldest_of(heaviest);
        }
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        self.conns.insert(self.next, (ip, tx));
        self.by_ip.entry(ip).or_default().insert(self.next);
        (self.next, rx)
    }

    fn evict_oldest_of(&mut self, ip: IpAddr) {
        if let Some(id) = self.by_ip.get(&ip).and_then(|c| c.first().copied()) {
            self.remove(id);
        }
    }

    /// Forgets a connection (dropping its sender evicts it if it runs).
    fn remove(&mut self, id: u64) {
        let Some((ip, _)) = self.conns.remove(&id) else {
            return;
        };
        if let Some(c) = self.by_ip.get_mut(&ip) {
            c.remove(&id);
            if c.is_empty() {
                self.by_ip.remove(&ip);
            }
        }
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
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    // Room in the accept queue for a flood of connections, so that a
    // health check's SYN is not dropped (and retried a second later).
    sock.listen(BACKLOG)
}

/// The kernel's accept queue (capped by net.core.somaxconn).
const BACKLOG: u32 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn evicted(rx: &mut oneshot::Receiver<()>) -> bool {
        rx.try_recv() == Err(oneshot::error::TryRecvError::Closed)
    }

    #[test]
    fn a_flood_evicts_its_own_and_the_heaviest_address_pays() {
        let mut o = Open::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let (probe, mut probe_rx) = o.admit(c, 8);
        // The share is 2 of 8: a's third evicts a's first.
        let (_, mut a1) = o.admit(a, 8);
        let (_, mut a2) = o.admit(a, 8);
        let (_, _a3) = o.admit(a, 8);
        assert!(evicted(&mut a1));
        assert!(!evicted(&mut a2));
        // Full, and a and b keep coming: c's one connection stays.
        let mut rxs = Vec::new();
        for _ in 0..50 {
            rxs.push(o.admit(a, 8).1);
            rxs.push(o.admit(b, 8).1);
        }
        assert!(!evicted(&mut probe_rx));
        assert!(o.conns.contains_key(&probe));
        assert!(o.conns.len() <= 8);
        o.remove(probe);
        assert!(!o.by_ip.contains_key(&c));
    }
}
