//! Milter listeners (TCP or a Unix socket): each MTA connection becomes a
//! `milter::serve` task, tracked like sessions so a shutdown drains it.
//! Bounded like the SMTP side: connections in total and per address
//! (`milter.max_connections`, `max_connections_per_ip`), accepts that fail
//! back off.

use crate::config::MilterListen;
use crate::gate::Shared;
use crate::runtime::accept::AcceptHealth;
use crate::runtime::limits::{ConnectionGuard, ConnectionLimits};
use crate::runtime::shutdown::{Phase, Shutdown, ShutdownSignal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::task::TaskTracker;

/// A bound milter listener, not yet registered with a runtime: on TCP a
/// socket per connection thread (`SO_REUSEPORT`), each with its own accept
/// loop; a Unix socket has one loop (Linux spreads only TCP and UDP).
pub enum MilterListener {
    Tcp(Vec<std::net::TcpListener>),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// One accept loop's socket.
pub enum Socket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// The same, registered with the loop's runtime.
enum Live {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl MilterListener {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            MilterListener::Tcp(l) => l.first()?.local_addr().ok(),
            MilterListener::Unix(..) => None,
        }
    }

    /// As the config writes it: `127.0.0.1:8891` or `unix:/path`.
    pub fn name(&self) -> String {
        match self {
            MilterListener::Tcp(_) => self
                .local_addr()
                .map_or_else(|| "tcp".into(), |a| a.to_string()),
            MilterListener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// A socket for each accept loop, the first for the first thread.
    pub fn each_thread(self) -> Vec<Socket> {
        match self {
            MilterListener::Tcp(all) => all.into_iter().map(Socket::Tcp).collect(),
            MilterListener::Unix(l, p) => vec![Socket::Unix(l, p)],
        }
    }
}

/// The MTA's connections wait in a backlog as long as std's default.
const BACKLOG: u32 = 128;

/// Binds `l`; on TCP `threads` sockets (see `MilterListener`).
pub fn bind(l: &MilterListen, threads: usize) -> Result<MilterListener, super::ServerError> {
    match l {
        MilterListen::Tcp(addr) => {
            // Linux copies TCP_NODELAY to each accepted socket: one
            // system call per MTA connection saved.
            let options = |sock: &socket2::Socket| {
                sock.set_tcp_nodelay(true)?;
                Ok(BACKLOG)
            };
            let bound =
                super::listener::each_thread(*addr, threads, options).map_err(|source| {
                    super::ServerError::Bind {
                        addr: *addr,
                        source,
                    }
                })?;
            Ok(MilterListener::Tcp(bound))
        }
        MilterListen::Unix(path) => {
            // A socket left by an earlier run is in the way; anything else
            // at that path is not ours to remove.
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            let fail = |source| super::ServerError::BindUnix {
                path: path.clone(),
                source,
            };
            let bound = std::os::unix::net::UnixListener::bind(path).map_err(fail)?;
            bound.set_nonblocking(true).map_err(fail)?;
            // The MTA connects as its own user: read and write for our
            // group (run with the MTA's group, e.g. systemd
            // SupplementaryGroups=postfix), nothing for others.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(fail)?;
            Ok(MilterListener::Unix(bound, path.clone()))
        }
    }
}

pub async fn accept_loop(
    socket: Socket,
    shared: Arc<Shared>,
    shutdown: Arc<Shutdown>,
    tracker: TaskTracker,
    limits: Arc<ConnectionLimits>,
    health: Arc<AcceptHealth>,
) {
    let mut signal = shutdown.signal();
    // On the runtime of the thread that runs the loop.
    let registered = match socket {
        Socket::Tcp(l) => TcpListener::from_std(l).map(Live::Tcp),
        Socket::Unix(l, p) => UnixListener::from_std(l).map(|l| Live::Unix(l, p)),
    };
    let listener = match registered {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot accept milter connections");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = signal.reached(Phase::Draining) => break,
            r = accept(&listener) => r,
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                // No spare descriptor here: the MTA waits, or applies its
                // milter_default_action; the SMTP listener keeps its own.
                let wait = health.failed(&e);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        health.accepted();
        // Beyond the limits the connection is closed at once: the MTA
        // applies its milter_default_action to that one session.
        let slot = match &accepted {
            Accepted::Tcp(_, peer) => limits.acquire(peer.ip()),
            Accepted::Unix(_) => limits.acquire_local(),
        };
        let guard = match slot {
            Ok(g) => g,
            Err(r) => {
                health.refused(r.reason());
                continue;
            }
        };
        let (shared, signal) = (Arc::clone(&shared), shutdown.signal());
        match accepted {
            Accepted::Tcp(sock, _) => {
                tracker.spawn(converse(QuickAck::new(sock), shared, signal, guard));
            }
            Accepted::Unix(sock) => {
                tracker.spawn(converse(sock, shared, signal, guard));
            }
        }
    }
    if let Live::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Live) -> std::io::Result<Accepted> {
    Ok(match l {
        Live::Tcp(l) => {
            let (sock, peer) = l.accept().await?;
            Accepted::Tcp(sock, peer)
        }
        Live::Unix(l, _) => Accepted::Unix(l.accept().await?.0),
    })
}

/// One MTA connection, to its end or to the drain deadline (past it the
/// MTA applies its milter_default_action to what was in flight).
async fn converse<S>(io: S, shared: Arc<Shared>, mut signal: ShutdownSignal, _slot: ConnectionGuard)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        _ = crate::milter::serve(io, crate::telemetry::session_id(), shared) => {}
        _ = signal.reached(Phase::Abort) => {}
    }
}

/// A TCP stream that acknowledges what it read when no reply will.
/// Postfix writes a macro packet and then its command without
/// TCP_NODELAY; the macro packet gets no reply, so a delayed ACK held the
/// command back for 40 ms under Nagle's algorithm (measured: a quarter of
/// the throughput of a Unix socket). Setting TCP_QUICKACK sends the
/// pending ACK at once (the option does not stick). It is set when the
/// conversation comes back to read without having written since its last
/// read: after a read that is answered, the answer carries the ACK, and
/// an ACK of its own (a segment, and a system call) would be wasted.
struct QuickAck {
    sock: tokio::net::TcpStream,
    /// Read from, and not written to since.
    unanswered: bool,
}

impl QuickAck {
    fn new(sock: tokio::net::TcpStream) -> QuickAck {
        QuickAck {
            sock,
            unanswered: false,
        }
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.unanswered {
            let _ = socket2::SockRef::from(&self.sock).set_tcp_quickack(true);
            self.unanswered = false;
        }
        let r = std::pin::Pin::new(&mut self.sock).poll_read(cx, buf);
        if r.is_ready() {
            self.unanswered = true;
        }
        r
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.unanswered = false;
        std::pin::Pin::new(&mut self.sock).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.sock).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.sock).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An MTA connection has TCP_NODELAY from the listener (our replies
    /// are small and each is waited for), without a system call of its
    /// own.
    #[tokio::test]
    async fn mta_connections_inherit_nodelay() {
        let l = MilterListen::Tcp("127.0.0.1:0".parse().unwrap());
        let Socket::Tcp(l) = bind(&l, 1).unwrap().each_thread().remove(0) else {
            panic!("a TCP listener");
        };
        let l = TcpListener::from_std(l).unwrap();
        let mta = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let live = Live::Tcp(l);
        let Accepted::Tcp(sock, _) = accept(&live).await.unwrap() else {
            panic!("a TCP connection");
        };
        assert!(sock.nodelay().unwrap());
        assert!(!mta.nodelay().unwrap(), "not a default that proves nothing");
    }
}
