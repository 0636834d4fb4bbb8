//! What `run` would fail on that the config file alone cannot tell, for
//! `check`: files and directories (always), and the listen addresses
//! (only when asked: on a host where the gate runs they are its own).

use crate::config::{Config, MilterListen};
use std::net::SocketAddr;
use std::path::Path;

/// The certificate and key, and the directories of the log file, the
/// state file and the milter's Unix sockets. One line per problem.
pub fn preflight(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(t) = &cfg.tls
        && let Err(e) = super::tls::acceptor(&t.cert, &t.key)
    {
        problems.push(format!("tls: {e}"));
    }
    let mut dir_of = |key: &str, file: &Path| {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            problems.push(format!(
                "{key}: the directory {} does not exist",
                dir.display()
            ));
        }
    };
    if let Some(f) = &cfg.log.file {
        dir_of("log.file", f);
    }
    if let Some(f) = &cfg.state.file {
        dir_of("state.file", f);
    }
    for (i, m) in cfg.milter.listen.iter().enumerate() {
        if let MilterListen::Unix(p) = m {
            dir_of(&format!("milter.listen[{i}]"), p);
        }
    }
    problems
}

/// Binds every TCP listen address (`check --bind`) without listening,
/// with SO_REUSEADDR, so two checks do not fail each other. An address
/// in use names the process that holds it when this user may see it: a
/// running Portcullis is expected there (not a problem), anything else is.
pub fn bind_test(cfg: &Config) -> Vec<String> {
    let addrs = cfg
        .listen
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listen[{i}].addr"), l.addr))
        .chain(
            cfg.metrics
                .listen
                .map(|a| ("metrics.listen".to_string(), a)),
        )
        .chain(
            cfg.milter
                .listen
                .iter()
                .enumerate()
                .filter_map(|(i, m)| match m {
                    MilterListen::Tcp(a) => Some((format!("milter.listen[{i}]"), *a)),
                    MilterListen::Unix(_) => None,
                }),
        );
    let mut problems = Vec::new();
    for (key, addr) in addrs {
        if addr.port() == 0 {
            continue;
        }
        let Err(e) = try_bind(addr) else { continue };
        if e.kind() != std::io::ErrorKind::AddrInUse {
            problems.push(format!("{key}: cannot listen on {addr}: {e}"));
            continue;
        }
        match listener_owner(addr) {
            Some(owner) if owner == "portcullis" => {}
            Some(owner) => problems.push(format!(
                "{key}: {addr} is in use by {owner}, not Portcullis"
            )),
            None => problems.push(format!(
                "{key}: {addr} is in use (by a process this user cannot see)"
            )),
        }
    }
    problems
}

fn try_bind(addr: SocketAddr) -> std::io::Result<()> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

/// The command name (`/proc/PID/comm`) of the process listening on
/// `addr`, from /proc/net/tcp{,6} and the processes' descriptors.
fn listener_owner(addr: SocketAddr) -> Option<String> {
    let inodes = listening_inodes(addr);
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                && inodes.iter().any(|i| i == inode)
            {
                let comm = std::fs::read_to_string(proc.path().join("comm")).ok()?;
                return Some(comm.trim().to_string());
            }
        }
    }
    None
}

/// Inodes of the listening sockets bound to `addr`'s port on its address
/// or on the wildcard of its family (either holds the address).
fn listening_inodes(addr: SocketAddr) -> Vec<String> {
    const LISTEN: &str = "0A";
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let Ok(text) = std::fs::read_to_string(table) else {
        return Vec::new();
    };
    let port = format!("{:04X}", addr.port());
    let wanted = [proc_hex(addr.ip()), proc_hex(unspecified(addr))];
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (ip, p) = f.get(1)?.split_once(':')?;
            (p == port && f.get(3) == Some(&LISTEN) && wanted.iter().any(|w| w == ip))
                .then(|| f.get(9).map(|s| s.to_string()))?
        })
        .collect()
}

fn unspecified(addr: SocketAddr) -> std::net::IpAddr {
    if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    }
}

/// An address as /proc/net/tcp writes it: each 32-bit word in host
/// (little-endian) order, in hex.
fn proc_hex(ip: std::net::IpAddr) -> String {
    let bytes: Vec<u8> = match ip {
        std::net::IpAddr::V4(v) => v.octets().to_vec(),
        std::net::IpAddr::V6(v) => v.octets().to_vec(),
    };
    bytes
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_proc_net_tcp_does() {
        // /proc/net/tcp on little-endian x86: 127.0.0.1 is 0100007F.
        if cfg!(target_endian = "little") {
            assert_eq!(proc_hex("127.0.0.1".parse().unwrap()), "0100007F");
            assert_eq!(
                proc_hex("::1".parse().unwrap()),
                "00000000000000000000000001000000"
            );
        }
    }

    #[test]
    fn the_owner_of_a_listening_socket_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let owner = listener_owner(addr).expect("our own socket is visible to us");
        // The test binary's name, as the kernel shortens it.
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(owner, me.trim());
    }
}
