//! Free ports; waiting: for a condition, for a gate process to listen; child
//! processes killed at the end of a test.

use std::net::SocketAddr;

use std::time::Duration;

use tokio::net::TcpStream;

/// Polls `f` until true or 5 s pass.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// Waits (up to 20 s) until a gate started as a process listens on
/// `port` on 127.0.0.1; its address.
pub async fn listening(port: u16) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(std::time::Instant::now() < until, "not listening on {addr}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    addr
}

/// A child process killed when the test ends, passed or not.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
