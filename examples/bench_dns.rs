//! A small authoritative DNS server for the load benchmark (benches/load.sh):
//! three DNSBL zones that list nobody but their RFC 5782 test entries, two
//! URL blocklist zones (uri1.test, uri2.test) likewise, and an SPF record
//! for the benchmark's sender domain. Loopback only.
//!   cargo run --example bench_dns -- 127.0.0.1:15353

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use std::str::FromStr;
use std::sync::Arc;

fn zone(origin: &str, records: Vec<(&str, RData)>) -> InMemoryZoneHandler {
    let o = Name::from_str(origin).unwrap();
    let mut z = InMemoryZoneHandler::empty(o.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        Name::from_str(&format!("ns.{origin}")).unwrap(),
        Name::from_str(&format!("hostmaster.{origin}")).unwrap(),
        1,
        3600,
        600,
        86400,
        3600,
    );
    z.upsert_mut(Record::from_rdata(o, 3600, RData::SOA(soa)), 1);
    for (name, data) in records {
        z.upsert_mut(
            Record::from_rdata(Name::from_str(name).unwrap(), 3600, data),
            1,
        );
    }
    z
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:15353".into());
    let mut catalog = Catalog::new();
    for bl in ["bl1.test.", "bl2.test.", "bl3.test."] {
        let z = zone(
            bl,
            vec![(
                &format!("2.0.0.127.{bl}"),
                RData::A(A("127.0.0.2".parse().unwrap())),
            )],
        );
        catalog.upsert(
            LowerName::from(Name::from_str(bl).unwrap()),
            vec![Arc::new(z)],
        );
    }
    for uri in ["uri1.test.", "uri2.test."] {
        let z = zone(
            uri,
            vec![(
                &format!("test.{uri}"),
                RData::A(A("127.0.0.8".parse().unwrap())),
            )],
        );
        catalog.upsert(
            LowerName::from(Name::from_str(uri).unwrap()),
            vec![Arc::new(z)],
        );
    }
    let spf = RData::TXT(TXT::new(vec!["v=spf1 ip4:127.0.0.0/8 -all".into()]));
    let z = zone("example.test.", vec![("example.test.", spf)]);
    catalog.upsert(
        LowerName::from(Name::from_str("example.test.").unwrap()),
        vec![Arc::new(z)],
    );
    let mut server = Server::new(catalog);
    server.register_socket(tokio::net::UdpSocket::bind(&addr).await.unwrap());
    println!("serving on {addr}");
    let _ = server.block_until_done().await;
}
