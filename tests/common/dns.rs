//! An authoritative DNS server in-process (hickory-server) on 127.0.0.1,
//! with test zones built from records, counting every query it answers.

use hickory_server::Server;
pub use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, PTR, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// Record data in test-friendly form.
#[derive(Clone)]
pub enum Rd {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Txt(Vec<String>),
    Ptr(String),
}

/// (name, ttl, data); `name` is fully qualified.
pub type Rec = (String, u32, Rd);

pub fn a(name: &str, ip: &str) -> Rec {
    (name.into(), 300, Rd::A(ip.parse().unwrap()))
}
pub fn txt(name: &str, text: &str) -> Rec {
    // Long TXT data is split into 255-byte strings, as zone files do.
    let parts = text
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    (name.into(), 300, Rd::Txt(parts))
}
pub fn ptr(name: &str, target: &str) -> Rec {
    (name.into(), 300, Rd::Ptr(target.into()))
}
pub fn aaaa(name: &str, ip: &str) -> Rec {
    (name.into(), 300, Rd::Aaaa(ip.parse().unwrap()))
}

struct Counting {
    catalog: Catalog,
    log: Arc<Mutex<Vec<String>>>,
    /// Names (lower case, fully qualified) answered with an error code.
    fail: Vec<(String, ResponseCode)>,
    /// Names answered only after this long (a slow zone).
    slow: Vec<(String, std::time::Duration)>,
}

#[async_trait::async_trait]
impl RequestHandler for Counting {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if let Ok(info) = request.request_info() {
            let name = info.query.name().to_string().to_ascii_lowercase();
            self.log
                .lock()
                .unwrap()
                .push(format!("{name} {}", info.query.query_type()));
            if let Some((_, wait)) = self.slow.iter().find(|(n, _)| *n == name) {
                tokio::time::sleep(*wait).await;
            }
            if let Some((_, code)) = self.fail.iter().find(|(n, _)| *n == name) {
                let response = MessageResponseBuilder::new(&request.queries, None)
                    .error_msg(&request.metadata, *code);
                return response_handle
                    .send_response(response)
                    .await
                    .expect("send the DNS error answer");
            }
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

pub struct FakeDns {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _server: Arc<tokio::sync::Mutex<Server<Counting>>>,
}

impl FakeDns {
    /// Serves `records` from zones `origins` (each gets an SOA with a
    /// 300 s negative TTL).
    pub async fn start(origins: &[&str], records: Vec<Rec>) -> FakeDns {
        Self::start_failing(origins, records, &[]).await
    }

    /// Like `start`, but every query for a name in `fail` (fully
    /// qualified) is answered with its error code (SERVFAIL, REFUSED).
    pub async fn start_failing(
        origins: &[&str],
        records: Vec<Rec>,
        fail: &[(&str, ResponseCode)],
    ) -> FakeDns {
        Self::start_full(origins, records, fail, &[]).await
    }

    /// Like `start`, but queries for a name in `slow` (fully qualified)
    /// are answered only after its delay.
    pub async fn start_slow(
        origins: &[&str],
        records: Vec<Rec>,
        slow: &[(&str, std::time::Duration)],
    ) -> FakeDns {
        Self::start_full(origins, records, &[], slow).await
    }

    async fn start_full(
        origins: &[&str],
        records: Vec<Rec>,
        fail: &[(&str, ResponseCode)],
        slow: &[(&str, std::time::Duration)],
    ) -> FakeDns {
        let mut zones: BTreeMap<String, InMemoryZoneHandler> = BTreeMap::new();
        for o in origins {
            let origin = Name::from_str(o).unwrap();
            let mut z =
                InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
            let soa = SOA::new(
                Name::from_str(&format!("ns.{o}")).unwrap(),
                Name::from_str(&format!("hostmaster.{o}")).unwrap(),
                1,
                3600,
                600,
                86400,
                300,
            );
            z.upsert_mut(Record::from_rdata(origin, 300, RData::SOA(soa)), 1);
            zones.insert(o.to_string(), z);
        }
        for (name, ttl, rd) in records {
            let n = Name::from_str(&name).unwrap();
            let origin = origins
                .iter()
                .filter(|o| name.ends_with(*o))
                .max_by_key(|o| o.len())
                .unwrap_or_else(|| panic!("no zone for {name}"));
            let data = match rd {
                Rd::A(ip) => RData::A(A(ip)),
                Rd::Aaaa(ip) => RData::AAAA(AAAA(ip)),
                Rd::Txt(parts) => RData::TXT(TXT::new(parts)),
                Rd::Ptr(t) => RData::PTR(PTR(Name::from_str(&t).unwrap())),
            };
            zones
                .get_mut(*origin)
                .unwrap()
                .upsert_mut(Record::from_rdata(n, ttl, data), 1);
        }
        let mut catalog = Catalog::new();
        for (o, z) in zones {
            catalog.upsert(
                LowerName::from(Name::from_str(&o).unwrap()),
                vec![Arc::new(z)],
            );
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut server = Server::new(Counting {
            catalog,
            log: Arc::clone(&log),
            fail: fail
                .iter()
                .map(|(n, c)| (n.to_ascii_lowercase(), *c))
                .collect(),
            slow: slow
                .iter()
                .map(|(n, d)| (n.to_ascii_lowercase(), *d))
                .collect(),
        });
        server.register_socket(socket);
        FakeDns {
            addr,
            log,
            _server: Arc::new(tokio::sync::Mutex::new(server)),
        }
    }

    /// Every query answered so far, as "name TYPE".
    pub fn queries(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// How many queries asked for `name` (any type).
    pub fn count(&self, name: &str) -> usize {
        let name = name.to_ascii_lowercase();
        self.queries()
            .iter()
            .filter(|q| q.split(' ').next() == Some(name.as_str()))
            .count()
    }
}

/// A nameserver that never answers: every query times out.
pub async fn silent_dns() -> (SocketAddr, tokio::net::UdpSocket) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    (s.local_addr().unwrap(), s)
}

/// bl.test with its RFC 5782 self-test entry (127.0.0.2) and one listed
/// client, 127.0.0.3; everything else under test. is NXDOMAIN.
pub async fn bl_test() -> FakeDns {
    FakeDns::start(
        &["test."],
        vec![
            a("2.0.0.127.bl.test.", "127.0.0.2"),
            a("3.0.0.127.bl.test.", "127.0.0.2"),
        ],
    )
    .await
}
