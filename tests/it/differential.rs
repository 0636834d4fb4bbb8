//! Differential test against real Postfix: each scripted dialogue runs twice
//! in the same test, straight into one Postfix (from 127.0.0.30) and through
//! Portcullis into the same Postfix (from 127.0.0.31). The reply codes are
//! compared reply by reply; every difference must be listed in `INTENDED`
//! with its reason, and every listed difference must still occur.
//!
//! Ignored by default because it needs Postfix; `.ci/run` installs it and
//! runs this with `--include-ignored`.

use crate::common;

use common::Gate;
use common::config::in_front_of;
use common::peers::Postfix;
use portcullis::config::{IdentityMode, Tls};
use portcullis::runtime::Stream;
use portcullis::wire::reply::parse_reply;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// One step of a dialogue.
enum Step {
    /// A command line (CRLF added); one reply.
    Cmd(Vec<u8>),
    /// Lines sent in one write (RFC 2920 pipelining); one reply each.
    Pipe(Vec<Vec<u8>>),
    /// Bytes as they are (a message with its final dot); `n` replies.
    Raw(Vec<u8>, usize),
    /// The TLS handshake, after a 220 to STARTTLS.
    Tls,
}

struct Dialogue {
    name: &'static str,
    steps: Vec<Step>,
}

fn c(line: impl AsRef<[u8]>) -> Step {
    Step::Cmd(line.as_ref().to_vec())
}

fn pipe(lines: &[&str]) -> Step {
    Step::Pipe(lines.iter().map(|l| l.as_bytes().to_vec()).collect())
}

/// A small message, dot-stuffed, with its end.
fn body() -> Step {
    Step::Raw(
        b"Subject: differential\r\n\r\n..a dot line\r\nbody\r\n.\r\n".to_vec(),
        1,
    )
}

/// MAIL, RCPT, DATA and a message.
fn txn(steps: &mut Vec<Step>) {
    steps.push(c("MAIL FROM:<a@sender.test>"));
    steps.push(c("RCPT TO:<b@example.test>"));
    steps.push(c("DATA"));
    steps.push(body());
}

fn d(name: &'static str, steps: Vec<Step>) -> Dialogue {
    Dialogue { name, steps }
}

/// A dialogue that ends with one full transaction.
fn then_txn(name: &'static str, mut steps: Vec<Step>) -> Dialogue {
    txn(&mut steps);
    steps.push(c("QUIT"));
    d(name, steps)
}

fn corpus() -> Vec<Dialogue> {
    let e = || c("EHLO client.test");
    let utf8_helo = "é".repeat(43); // 86 octets: 258 in xtext
    let mut v = vec![
        d(
            "ehlo_noop_rset_quit",
            vec![e(), c("NOOP"), c("RSET"), c("QUIT")],
        ),
        then_txn("helo_then_txn", vec![c("HELO client.test")]),
        then_txn(
            "commands_before_helo",
            vec![
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                c("DATA"),
                c("NOOP"),
                c("RSET"),
                e(),
            ],
        ),
        then_txn(
            "ehlo_after_mail",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                e(),
                c("RCPT TO:<b@example.test>"),
            ],
        ),
        then_txn(
            "ehlo_after_rcpt",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                e(),
                c("DATA"),
            ],
        ),
        then_txn(
            "helo_after_mail",
            vec![e(), c("MAIL FROM:<a@sender.test>"), c("HELO client.test")],
        ),
        then_txn(
            "helo_after_rcpt",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                c("HELO client.test"),
                c("RCPT TO:<b@example.test>"),
            ],
        ),
        then_txn(
            "ehlo_new_name_after_rcpt",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                c("EHLO other.client.test"),
            ],
        ),
        then_txn(
            "rset_after_mail",
            vec![e(), c("MAIL FROM:<a@sender.test>"), c("RSET")],
        ),
        then_txn(
            "rset_after_rcpt",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                c("RSET"),
                c("DATA"),
            ],
        ),
        then_txn(
            "rset_before_and_between",
            vec![e(), c("RSET"), c("NOOP"), c("RSET")],
        ),
        then_txn(
            "data_refused_then_rset",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<nobody@example.test>"),
                c("DATA"),
                c("RSET"),
            ],
        ),
        then_txn(
            "data_without_rcpt",
            vec![e(), c("MAIL FROM:<a@sender.test>"), c("DATA"), c("RSET")],
        ),
        then_txn(
            "data_refused_then_more_rcpts",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<nobody@example.test>"),
                c("DATA"),
                c("RCPT TO:<b@example.test>"),
                c("DATA"),
                body(),
                c("RSET"),
            ],
        ),
        d(
            "starttls_twice",
            vec![
                e(),
                c("STARTTLS"),
                Step::Tls,
                e(),
                c("STARTTLS"),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                c("DATA"),
                body(),
                c("QUIT"),
            ],
        ),
        then_txn(
            "starttls_before_ehlo_after_tls",
            vec![
                e(),
                c("STARTTLS"),
                Step::Tls,
                c("MAIL FROM:<a@sender.test>"),
                e(),
            ],
        ),
        // STARTTLS resets the session (RFC 3207): the transaction is gone
        // on both sides, and so is the HELO.
        then_txn(
            "starttls_mid_transaction",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("STARTTLS"),
                Step::Tls,
                c("RCPT TO:<b@example.test>"),
                e(),
                c("RCPT TO:<b@example.test>"),
            ],
        ),
        then_txn(
            "vrfy",
            vec![e(), c("VRFY b@example.test"), c("VRFY nobody")],
        ),
        then_txn("expn", vec![e(), c("EXPN staff")]),
        then_txn("etrn", vec![e(), c("ETRN example.test")]),
        then_txn("auth", vec![e(), c("AUTH PLAIN AGJvYgBzZWNyZXQ=")]),
        then_txn("help", vec![e(), c("HELP"), c("HELP MAIL")]),
        d(
            "bdat_not_offered",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                Step::Raw(b"BDAT 12 LAST\r\nSubject: x\r\n".to_vec(), 1),
                c("NOOP"),
                c("RSET"),
                c("QUIT"),
            ],
        ),
        then_txn("unknown_command", vec![e(), c("FROBNICATE now")]),
        then_txn(
            "xclient_from_client",
            vec![e(), c("XCLIENT ADDR=192.0.2.1")],
        ),
        then_txn(
            "mail_unknown_parameter",
            vec![e(), c("MAIL FROM:<a@sender.test> FOO=BAR")],
        ),
        then_txn(
            "mail_bad_size",
            vec![e(), c("MAIL FROM:<a@sender.test> SIZE=abc")],
        ),
        // Postfix keeps a refused SIZE until RSET (a quirk the gate passes on).
        then_txn(
            "mail_size_over_upstream_limit",
            vec![e(), c("MAIL FROM:<a@sender.test> SIZE=20000000"), c("RSET")],
        ),
        then_txn(
            "mail_bad_body",
            vec![e(), c("MAIL FROM:<a@sender.test> BODY=FOO")],
        ),
        then_txn(
            "mail_trailing_garbage",
            vec![e(), c("MAIL FROM:<a@sender.test>x")],
        ),
        then_txn("mail_no_domain", vec![e(), c("MAIL FROM:<nodomain@>")]),
        then_txn(
            "mail_unterminated",
            vec![e(), c("MAIL FROM:<a@sender.test")],
        ),
        then_txn("mail_address_literal", {
            let mut s = vec![e(), c("MAIL FROM:<a@[192.0.2.1]>")];
            s.push(c("RSET"));
            s
        }),
        then_txn(
            "mail_null_sender_dsn_params",
            vec![
                e(),
                c("MAIL FROM:<> RET=HDRS ENVID=abc BODY=8BITMIME"),
                c("RCPT TO:<b@example.test> NOTIFY=NEVER"),
                c("RSET"),
            ],
        ),
        then_txn(
            "rcpt_trailing_garbage",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>x"),
                c("RSET"),
            ],
        ),
        then_txn(
            "rcpt_no_domain",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<nodomain@>"),
                c("RCPT TO:<>"),
                c("RSET"),
            ],
        ),
        then_txn(
            "rcpt_literal_quoted_route_postmaster",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@[127.0.0.1]>"),
                c("RCPT TO:<\"quoted local\"@example.test>"),
                c("RCPT TO:<@relay.test,@hop.test:b@example.test>"),
                c("RCPT TO:<Postmaster>"),
                c("RCPT TO:b@example.test"),
                c("RSET"),
            ],
        ),
        then_txn(
            "rcpt_bad_domains",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@-bad.example.test>"),
                c("RCPT TO:<b@x..example.test>"),
                c("RCPT TO:<b@[300.1.1.1]>"),
                c("RCPT TO:<b@1.2.3.4>"),
                c("RSET"),
            ],
        ),
        then_txn(
            "rcpt_long_local_part",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c(format!("RCPT TO:<{}@example.test>", "l".repeat(300))),
                c("RSET"),
            ],
        ),
        then_txn(
            "rcpt_bad_notify",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test> NOTIFY=BOGUS"),
                c("RCPT TO:<b@example.test> FOO=1"),
                c("RSET"),
            ],
        ),
        then_txn(
            "nested_mail_and_rcpt_first",
            vec![
                e(),
                c("RCPT TO:<b@example.test>"),
                c("MAIL FROM:<a@sender.test>"),
                c("MAIL FROM:<a@sender.test>"),
                c("RSET"),
            ],
        ),
        then_txn(
            "pipelined_mail_fails_first",
            vec![
                e(),
                pipe(&["MAIL FROM:<nodomain@>", "RCPT TO:<b@example.test>", "DATA"]),
                c("RSET"),
            ],
        ),
        then_txn(
            "pipelined_rcpt_fails",
            vec![
                e(),
                pipe(&[
                    "MAIL FROM:<a@sender.test>",
                    "RCPT TO:<nobody@example.test>",
                    "RCPT TO:<b@example.test>",
                    "DATA",
                ]),
                body(),
            ],
        ),
        d(
            "pipelined_whole_transaction",
            vec![
                e(),
                pipe(&[
                    "MAIL FROM:<a@sender.test>",
                    "RCPT TO:<b@example.test>",
                    "RCPT TO:<c@example.test>",
                    "DATA",
                ]),
                body(),
                pipe(&["RSET", "NOOP", "QUIT"]),
            ],
        ),
        d("several_transactions", {
            let mut s = vec![e()];
            for _ in 0..3 {
                txn(&mut s);
                s.push(c("NOOP"));
            }
            s.push(c("QUIT"));
            s
        }),
        then_txn("helo_8bit_utf8_long", vec![c(format!("EHLO {utf8_helo}"))]),
        then_txn("helo_latin1", vec![c(b"EHLO caf\xe9.test".as_slice()), e()]),
        then_txn(
            "helo_long_ascii",
            vec![c(format!("EHLO {}", "h".repeat(400)))],
        ),
        then_txn(
            "helo_over_line_limit",
            vec![c(format!("EHLO {}", "h".repeat(600))), e()],
        ),
        d(
            "quit_mid_transaction",
            vec![
                e(),
                c("MAIL FROM:<a@sender.test>"),
                c("RCPT TO:<b@example.test>"),
                c("QUIT"),
            ],
        ),
    ];
    v.push(then_txn("empty_line", vec![e(), c("")]));
    v
}

/// (dialogue, reply index, Postfix's code, ours, why). Every other reply
/// must carry the same code both ways.
const INTENDED: &[(&str, usize, &str, &str, &str)] = &[
    (
        "vrfy",
        3,
        "550",
        "252",
        "VRFY is answered 252 by the gate (RFC 5321 3.5.3), never passed on: no address harvesting",
    ),
    (
        "xclient_from_client",
        2,
        "550",
        "502",
        "XCLIENT from clients is never honoured nor passed on (502)",
    ),
    (
        "mail_bad_body",
        2,
        "555",
        "501",
        "a known parameter with a bad value is a syntax error (501); Postfix says 555",
    ),
    (
        "help",
        2,
        "500",
        "214",
        "we answer HELP (RFC 5321 4.1.1.8); Postfix does not implement it",
    ),
    (
        "help",
        3,
        "500",
        "214",
        "we answer HELP (RFC 5321 4.1.1.8); Postfix does not implement it",
    ),
    (
        "expn",
        2,
        "500",
        "502",
        "EXPN is recognised and not implemented (502); Postfix does not know it (500)",
    ),
    (
        "etrn",
        2,
        "459",
        "502",
        "a gate keeps no queue to run: ETRN is not implemented",
    ),
    (
        "auth",
        2,
        "503",
        "502",
        "AUTH is not offered on port 25 (502); Postfix without SASL says 503",
    ),
    (
        "bdat_not_offered",
        4,
        "250",
        "502",
        "CHUNKING is not offered: BDAT is refused and its chunk is read as commands",
    ),
    (
        "bdat_not_offered",
        5,
        "250",
        "500",
        "the BDAT chunk's bytes, read as a command line",
    ),
    (
        "bdat_not_offered",
        7,
        "221",
        "250",
        "replies shifted by the extra one above: QUIT is still answered, one reply later",
    ),
    (
        "helo_latin1",
        1,
        "500",
        "501",
        "a HELO name that is not UTF-8 is a bad argument (501); Postfix says 500",
    ),
    (
        "helo_over_line_limit",
        1,
        "250",
        "500",
        "command lines are limited to 512 octets (RFC 5321 4.5.3.1.4); Postfix takes 2048",
    ),
    (
        "rcpt_long_local_part",
        3,
        "250",
        "501",
        "local part over 64 octets (RFC 5321 4.5.3.1.1) refused; Postfix takes it",
    ),
];

async fn read_reply(io: &mut Box<dyn Stream>, buf: &mut Vec<u8>) -> String {
    loop {
        if let Ok(Some((r, used))) = parse_reply(buf) {
            buf.drain(..used);
            return r.code.to_string();
        }
        let mut tmp = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(15), io.read(&mut tmp)).await {
            Err(_) => return "timeout".into(),
            Ok(Ok(0)) | Ok(Err(_)) => return "closed".into(),
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Plays a dialogue and returns every reply code, the greeting first.
async fn play(addr: SocketAddr, from: &str, dialogue: &Dialogue) -> Vec<String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut io: Box<dyn Stream> = Box::new(sock.connect(addr).await.unwrap());
    let mut buf = Vec::new();
    let mut codes = vec![read_reply(&mut io, &mut buf).await];
    for step in &dialogue.steps {
        match step {
            Step::Cmd(line) => {
                let mut l = line.clone();
                l.extend_from_slice(b"\r\n");
                let _ = io.write_all(&l).await;
                codes.push(read_reply(&mut io, &mut buf).await);
            }
            Step::Pipe(lines) => {
                let mut l = Vec::new();
                for line in lines {
                    l.extend_from_slice(line);
                    l.extend_from_slice(b"\r\n");
                }
                let _ = io.write_all(&l).await;
                for _ in lines {
                    codes.push(read_reply(&mut io, &mut buf).await);
                }
            }
            Step::Raw(bytes, n) => {
                let _ = io.write_all(bytes).await;
                for _ in 0..*n {
                    codes.push(read_reply(&mut io, &mut buf).await);
                }
            }
            Step::Tls => {
                if codes.last().map(String::as_str) != Some("220") {
                    codes.push("no-tls".into());
                    break;
                }
                let config = tokio_rustls::rustls::ClientConfig::builder()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(common::AnyCert))
                    .with_no_client_auth();
                let name =
                    tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, io)
                    .await
                    .expect("TLS handshake");
                io = Box::new(tls);
                buf.clear();
            }
        }
        if codes.last().is_some_and(|c| c == "closed") {
            break;
        }
    }
    codes
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs Postfix (installed by .ci/run)"]
async fn dialogues_answer_as_postfix_does() {
    let dir = std::env::temp_dir().join(format!("portcullis-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    // A site's ordinary settings: HELO required, TLS offered, one unknown
    // user refused at RCPT.
    let pf = Postfix::start_with(
        "diff",
        &format!(
            "smtpd_helo_required = yes\n\
             smtpd_tls_security_level = may\n\
             smtpd_tls_cert_file = {}\n\
             smtpd_tls_key_file = {}\n\
             smtpd_recipient_restrictions = check_recipient_access inline:{{ {{ nobody@example.test = 550 5.1.1 User unknown }} }}\n\
             message_size_limit = 10240000\n\
             smtpd_authorized_xclient_hosts = 127.0.0.1\n",
            cert.display(),
            key.display()
        ),
    );
    let mut cfg = in_front_of(pf.port, IdentityMode::Xclient);
    cfg.tls = Some(Tls {
        cert: cert.clone(),
        key: key.clone(),
    });
    let gate = Gate::start_config(cfg).await;
    let direct: SocketAddr = format!("127.0.0.1:{}", pf.port).parse().unwrap();
    let corpus = corpus();
    assert!(corpus.len() >= 40, "{} dialogues", corpus.len());
    let intended = INTENDED;
    let mut seen = vec![false; intended.len()];
    let mut unexplained = Vec::new();
    let mut table = String::new();
    for dialogue in &corpus {
        let theirs = play(direct, "127.0.0.30", dialogue).await;
        let ours = play(gate.addr, "127.0.0.31", dialogue).await;
        table.push_str(&format!(
            "{:<40} postfix {}\n{:<40} gate    {}\n",
            dialogue.name,
            theirs.join(" "),
            "",
            ours.join(" ")
        ));
        for i in 0..theirs.len().max(ours.len()) {
            let (t, o) = (
                theirs.get(i).map_or("-", String::as_str),
                ours.get(i).map_or("-", String::as_str),
            );
            if t == o {
                continue;
            }
            match intended
                .iter()
                .position(|x| x.0 == dialogue.name && x.1 == i && x.2 == t && x.3 == o)
            {
                Some(k) => seen[k] = true,
                None => unexplained.push(format!(
                    "{} reply {i}: postfix {t}, gate {o}",
                    dialogue.name
                )),
            }
        }
    }
    println!("{table}");
    let stale: Vec<_> = intended
        .iter()
        .zip(&seen)
        .filter(|(_, s)| !**s)
        .map(|(i, _)| format!("{} reply {}", i.0, i.1))
        .collect();
    assert!(
        unexplained.is_empty() && stale.is_empty(),
        "unexplained differences: {unexplained:#?}\nlisted but not seen: {stale:#?}\n{table}"
    );
}
