//! Accepting connections: the accept loop, an incoming PROXY header,
//! admission against the connection limits, and the session task with its
//! hard deadline.

use super::*;

/// How long the spare descriptor waits for a client to take, and for the
/// client to take its 421.
const SPARE_ACCEPT: Duration = Duration::from_millis(10);

/// SO_SNDBUF of a client connection (the kernel doubles it).
const CLIENT_SEND_BUFFER: usize = 32 * 1024;

/// Binds with our own backlog: the default (128) overflows under bursts and
/// leaves clients waiting for SYN-ACK retransmits.
///
/// The client sockets' options are set here, once: Linux copies a
/// listening socket's TCP_NODELAY and SO_SNDBUF to every socket it
/// accepts, which saves two system calls per connection. We only ever
/// write replies to a client (a pipelined batch's are a few KiB; a TLS
/// handshake's certificate chain a few more): a small send buffer keeps
/// what a client that never reads can make the kernel hold for it small,
/// and its stall is seen sooner.
///
/// `n` sockets on the same address, one per connection thread
/// (`SO_REUSEPORT`; with port 0 the others take the first one's port).
pub(super) fn bind(l: &Listen, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    each_thread(l.addr, n, |sock| {
        sock.set_tcp_nodelay(true)?;
        sock.set_send_buffer_size(CLIENT_SEND_BUFFER)?;
        Ok(l.backlog)
    })
}

/// `n` listening sockets on `addr` (`SO_REUSEPORT`), each set up by
/// `options`, which gives the backlog. Not yet registered with a runtime:
/// each accept loop does that on its own thread.
pub(super) fn each_thread(
    addr: SocketAddr,
    n: usize,
    options: impl Fn(&socket2::Socket) -> std::io::Result<u32>,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut all: Vec<std::net::TcpListener> = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let at = match all.first() {
            Some(first) => first.local_addr()?,
            None => addr,
        };
        let sock = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        let backlog = options(&sock)?;
        sock.bind(&at.into())?;
        sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
        sock.set_nonblocking(true)?;
        all.push(sock.into());
    }
    Ok(all)
}

pub(super) async fn accept_loop(
    listener: std::net::TcpListener,
    conf: Listen,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    shutdown: Arc<Shutdown>,
    tracker: TaskTracker,
    health: Arc<AcceptHealth>,
) {
    let mut signal = shutdown.signal();
    let conf = Arc::new(conf);
    // On the runtime of the thread that runs the loop.
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %conf.addr, error = %e, "cannot accept");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = signal.reached(Phase::Draining) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                health.accepted();
                health.spare.restore();
                // On this thread, as its socket is.
                tracker.spawn(connection(
                    sock,
                    peer,
                    Arc::clone(&conf),
                    Arc::clone(&shared),
                    Arc::clone(&limits),
                    shutdown.signal(),
                ));
            }
            Err(e) => {
                let wait = health.failed(&e);
                // Out of descriptors: the spare one takes the next client,
                // which hears 421 instead of waiting in the backlog.
                // (At EMFILE accept fails even with nothing waiting: then
                // the spare is taken back at once.)
                if descriptors::exhausted(&e) && health.spare.release() {
                    if let Ok(Ok((sock, peer))) =
                        tokio::time::timeout(SPARE_ACCEPT, listener.accept()).await
                    {
                        tracker.spawn(out_of_descriptors(sock, peer, Arc::clone(&health)));
                        continue;
                    }
                    health.spare.restore();
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A client taken with the spare descriptor: 421 (within a moment; a
/// client that does not read it is not waited for), and the descriptor
/// taken back.
async fn out_of_descriptors(mut sock: TcpStream, peer: SocketAddr, health: Arc<AcceptHealth>) {
    let id = crate::telemetry::session_id();
    let r = reply::OUT_OF_DESCRIPTORS;
    refuse(
        &mut sock,
        &id,
        peer.ip(),
        &r,
        "limit:descriptors",
        SPARE_ACCEPT,
    )
    .await;
    drop(sock);
    health.spare.restore();
}

async fn refuse(
    sock: &mut TcpStream,
    id: &str,
    ip: std::net::IpAddr,
    r: &Reply,
    reason: &str,
    limit: Duration,
) {
    let mut out = Vec::new();
    r.write_to(&mut out);
    let _ = tokio::time::timeout(limit, async {
        let _ = sock.write_all(&out).await;
        let _ = sock.shutdown().await;
    })
    .await;
    refused_connection(Door::Proxy, id, ip, r, reason);
}

/// One client connection, from accept to close. What it holds while the
/// session lasts is the session's own future (every idle client costs
/// that); the steps before it (a PROXY header, refusals) are boxed, so
/// their state is gone once the session starts. Not an `async fn`: one
/// would keep its six arguments for the task's whole life (about 100
/// bytes), though `admit` takes them at the start.
fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    conf: Arc<Listen>,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    signal: shutdown::ShutdownSignal,
) -> impl Future<Output = ()> + Send + 'static {
    let admit = Box::pin(admit(sock, peer, conf, shared, limits, signal));
    async move {
        let Some(Admitted {
            session,
            guard,
            id,
            hard,
        }) = admit.await
        else {
            return;
        };
        let deadline = tokio::time::timeout(hard, session.run()).await.is_err();
        drop(guard);
        ConnectionClosed {
            session: &id,
            deadline,
        }
        .emit();
    }
}

/// A client let in: its session, its place in the connection limits, its
/// id, and the backstop for the session's deadline.
struct Admitted {
    session: Box<Session>,
    guard: crate::runtime::limits::ConnectionGuard,
    id: crate::telemetry::SessionId,
    hard: Duration,
}

/// The steps before the session: socket options, the PROXY header, the
/// connection limits. None: the client was refused (and told).
async fn admit(
    mut sock: TcpStream,
    peer: SocketAddr,
    conf: Arc<Listen>,
    shared: Arc<Shared>,
    limits: Arc<ConnectionLimits>,
    signal: shutdown::ShutdownSignal,
) -> Option<Admitted> {
    // Socket options come from the listener (see `bind`).
    let id = crate::telemetry::session_id();
    let wait = shared.snapshot().cfg.timeouts.command.0;
    // The address the client reached: the listener's own unless it listens
    // on every address (one system call saved per connection).
    let local = if conf.addr.ip().is_unspecified() || conf.addr.port() == 0 {
        match sock.local_addr() {
            Ok(a) => a,
            Err(_) => return None,
        }
    } else {
        conf.addr
    };
    let (client, local, initial) = if conf.proxy_protocol {
        if !Config::is_trusted_proxy(&conf, peer.ip().to_canonical()) {
            refuse(
                &mut sock,
                &id,
                peer.ip(),
                &reply::PROXY_REFUSED,
                "proxy:untrusted",
                wait,
            )
            .await;
            return None;
        }
        match proxy_header::read(&mut sock, wait).await {
            Ok(p) => (
                p.source.unwrap_or(peer),
                p.destination.unwrap_or(local),
                p.rest,
            ),
            Err(e) => {
                tracing::info!(session = %id, proxy = %peer, error = %e, "bad PROXY header");
                refuse(
                    &mut sock,
                    &id,
                    peer.ip(),
                    &reply::PROXY_REFUSED,
                    "proxy:invalid",
                    wait,
                )
                .await;
                return None;
            }
        }
    } else {
        (peer, local, Vec::new())
    };
    let guard = match limits.acquire(client.ip()) {
        Ok(g) => {
            ConnectionOpened.emit();
            g
        }
        Err(r) => {
            refuse(
                &mut sock,
                &id,
                client.ip(),
                &reply::TOO_MANY_CONNECTIONS,
                r.reason(),
                wait,
            )
            .await;
            return None;
        }
    };
    let peer = Peer {
        id,
        addr: client,
        local,
    };
    // The session watches its deadline at every read and write; this is
    // the backstop for anything else it might wait on.
    let hard = shared.snapshot().cfg.timeouts.session.0 + SESSION_GRACE;
    Some(Admitted {
        session: Box::new(Session::new(Box::new(sock), peer, shared, signal, initial)),
        guard,
        id,
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options `bind` sets on the listener reach each accepted socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let conf: Listen =
            serde_json::from_str(r#"{"addr": "127.0.0.1:0"}"#).expect("a listen entry");
        let l = bind(&conf, 1).unwrap().remove(0);
        let l = TcpListener::from_std(l).unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (sock, _) = l.accept().await.unwrap();
        assert!(sock.nodelay().unwrap());
        assert!(
            !client.nodelay().unwrap(),
            "not a default that proves nothing"
        );
        // The kernel doubles what is asked for.
        let sndbuf = socket2::SockRef::from(&sock).send_buffer_size().unwrap();
        assert_eq!(sndbuf, 2 * CLIENT_SEND_BUFFER);
        let default = socket2::SockRef::from(&client).send_buffer_size().unwrap();
        assert_ne!(default, sndbuf);
    }

    /// One socket per connection thread on the same address (port 0: the
    /// first one's), and the kernel spreads connections over them.
    #[tokio::test]
    async fn each_thread_gets_a_socket_on_the_same_port() {
        let all = each_thread("127.0.0.1:0".parse().unwrap(), 3, |_| Ok(64)).unwrap();
        let port = all[0].local_addr().unwrap().port();
        assert!(all.iter().all(|l| l.local_addr().unwrap().port() == port));
        let all: Vec<TcpListener> = all
            .into_iter()
            .map(|l| TcpListener::from_std(l).unwrap())
            .collect();
        let mut clients = Vec::new();
        for _ in 0..60 {
            clients.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        // Each socket's backlog, drained.
        let mut per_socket = Vec::new();
        for l in &all {
            let mut n = 0;
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), l.accept()).await
            {
                n += 1;
            }
            per_socket.push(n);
        }
        assert_eq!(per_socket.iter().sum::<usize>(), 60, "{per_socket:?}");
        assert!(
            per_socket.iter().filter(|n| **n > 0).count() > 1,
            "spread over the sockets: {per_socket:?}"
        );
    }

    /// What each idle connection holds: its task's future (the session's
    /// state machine included) and the session. Measured at 10,000 and
    /// 5,216 bytes (debug build) before the session's states were boxed
    /// and its transaction parts made lazy; 1,080 and 704 after; 896 and
    /// 512 once `connection` stopped keeping its arguments, the session's
    /// rare parts (TLS, iprev, client names) were boxed and its id kept
    /// inline. Tokio allocates a task in multiples of 128 bytes with about
    /// 100 of its own: under 920 bytes the task is 1 KiB instead of 1.25;
    /// at 512 bytes the session fits jemalloc's 512-byte class (640 next).
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let shared = crate::gate::shared_for_tests(
            "hostname: gate.test\nlisten: [{addr: 127.0.0.1:0}]\nupstream: {addr: 127.0.0.1:2525}\n",
            "rules: []\n",
        );
        let conf = Arc::new(shared.snapshot().cfg.listen[0].clone());
        let limits = Arc::clone(&shared.limits);
        let shutdown = shutdown::Shutdown::new();
        let (s, l) = crate::session::for_tests(Arc::clone(&shared), shutdown.signal()).await;
        let addr = l.local_addr().unwrap();
        let sock = TcpStream::connect(addr).await.unwrap();
        let session = std::mem::size_of_val(&s);
        println!("session: {session} bytes");
        assert!(session <= 512, "session is {session} bytes");
        let run = Box::new(s).run();
        println!("session.run future: {} bytes", std::mem::size_of_val(&run));
        drop(run);
        let mut sock3 = TcpStream::connect(addr).await.unwrap();
        let ph = proxy_header::read(&mut sock3, Duration::from_secs(1));
        println!("proxy header read: {} bytes", std::mem::size_of_val(&ph));
        drop(ph);
        let fut = connection(sock, addr, conf, shared, limits, shutdown.signal());
        let size = std::mem::size_of_val(&fut);
        println!("connection future: {size} bytes");
        assert!(size <= 920, "connection future is {size} bytes");
    }
}
