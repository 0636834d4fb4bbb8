//! The milter door packet by packet, with no socket: the conversation's
//! states and answers (the table in `mod.rs`), DNS checks off.

use super::conversation::{Conversation, State};
use crate::gate::ledger::TxnPhase;
use crate::gate::shared_for_tests;
use crate::wire::milter::{Command, Family, Response, action, step};

const RULES: &str = r#"rules:
  - {id: BAD_HELO, description: d, when: {helo: {exact: [bad.test]}}, action: {reject: {code: 550, enhanced: 5.7.1, text: "bad helo"}}}
  - {id: LISTED, description: d, when: {client_ip: {cidr: ["198.51.100.0/24"]}}, action: {reject: {code: 550, enhanced: 5.7.1, text: "listed here"}}}
  - {id: TRAP, description: d, when: {rcpt_local: {exact: [trap]}}, action: {reject: {code: 550, enhanced: 5.1.1, text: "no such user"}}}
  - {id: PRIZE, description: d, when: {subject: {regex: prize}}, action: {score: 5}}
"#;

fn conversation(extra: &str) -> Conversation {
    let yaml = format!(
        "hostname: gate.test\nlisten: []\nmilter: {{listen: [127.0.0.1:0], quarantine_tagged: true}}\nlimits: {{max_message_size: 2000}}\nchecks:\n  spf: {{mode: off}}\n  dkim: {{mode: off}}\n  dmarc: {{mode: off}}\n  arc: {{mode: off}}\n  iprev: {{mode: off}}\n  dnsbl: {{mode: off}}\n  thresholds: {{tag: 3}}\n{extra}"
    );
    Conversation::new(
        crate::telemetry::session_id(),
        shared_for_tests(&yaml, RULES),
    )
}

/// Sends one packet; the answers it wrote, decoded.
async fn send(c: &mut Conversation, cmd: Command) -> Vec<u8> {
    let mut out = Vec::new();
    c.handle(cmd, &mut out).await;
    out
}

fn encoded(rs: &[Response]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rs {
        r.encode(&mut out);
    }
    out
}

fn reply(text: &str) -> Response {
    Response::ReplyCode(text.as_bytes().to_vec())
}

async fn negotiate(c: &mut Conversation) {
    let offer = Command::Negotiate {
        version: 6,
        actions: action::ADD_HEADERS | action::CHANGE_HEADERS | action::QUARANTINE,
        steps: step::NO_REPLY_HEADER | step::NO_REPLY_BODY | step::NO_REPLY_EOH,
    };
    send(c, offer).await;
    assert!(c.negotiated);
}

async fn connect(c: &mut Conversation, ip: &str, helo: &str) -> Vec<u8> {
    let family = Family::Inet {
        port: 25000,
        address: ip.as_bytes().to_vec(),
    };
    let answer = send(
        c,
        Command::Connect {
            hostname: b"client.test".to_vec(),
            family,
        },
    )
    .await;
    send(c, Command::Helo(helo.as_bytes().to_vec())).await;
    answer
}

fn mail(from: &str) -> Command {
    Command::Mail(vec![format!("<{from}>").into_bytes()])
}

fn rcpt(to: &str) -> Command {
    Command::Rcpt(vec![format!("<{to}>").into_bytes()])
}

fn phase(c: &mut Conversation) -> Option<&'static str> {
    let t = c.screening()?.txn.as_ref()?;
    Some(match t.ledger.phase {
        TxnPhase::Open => "open",
        TxnPhase::Doomed { .. } => "doomed",
        TxnPhase::Broken => "broken",
    })
}

#[tokio::test]
async fn a_local_submission_is_settled_and_accepted_unchecked() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    let answer = send(
        &mut c,
        Command::Connect {
            hostname: b"localhost".to_vec(),
            family: Family::Unknown,
        },
    )
    .await;
    assert_eq!(answer, encoded(&[Response::Accept]));
    assert!(matches!(c.state, State::Settled(_)));
    // Even a HELO the rules refuse is not asked about; a MAIL (were the
    // MTA to send one) is accepted, not checked.
    send(&mut c, Command::Helo(b"bad.test".to_vec())).await;
    assert_eq!(
        send(&mut c, mail("a@x.test")).await,
        encoded(&[Response::Accept])
    );
    assert_eq!(phase(&mut c), None);
}

/// What Postfix offers: every no-reply step.
const POSTFIX_STEPS: u32 = 0x1f_ffff;

async fn negotiate_as_postfix(c: &mut Conversation) -> u32 {
    let offer = Command::Negotiate {
        version: 6,
        actions: 0x1ff,
        steps: POSTFIX_STEPS,
    };
    let answer = send(c, offer).await;
    let mut d = crate::wire::milter::Decoder::new(1 << 16);
    d.feed(&answer);
    match d.response() {
        Ok(Some(Response::Negotiate { steps, .. })) => steps,
        other => panic!("not a negotiation answer: {other:?}"),
    }
}

const CONN_LIMIT: &str =
    "  rate_limits: [{name: conn, key: client_address, rate: 1/1m, count: connections}]\n";

/// Where Postfix offers it, CONNECT, HELO and MAIL are not waited for
/// (three round trips fewer per session): nothing is written for them,
/// and a refusal reached at CONNECT or MAIL is given at each RCPT, as
/// `smtpd_delay_reject` would.
#[tokio::test]
async fn connect_helo_and_mail_are_not_waited_for_and_their_refusals_come_at_rcpt() {
    let mut c = conversation(CONN_LIMIT);
    let steps = negotiate_as_postfix(&mut c).await;
    assert_ne!(steps & step::NO_REPLY_CONNECT, 0);
    assert_ne!(steps & step::NO_REPLY_HELO, 0);
    assert_ne!(steps & step::NO_REPLY_MAIL, 0);
    // Not the step that answers them.
    assert_eq!(steps & step::NO_REPLY_RCPT, 0);

    assert!(
        connect(&mut c, "192.0.2.7", "mx.sender.test")
            .await
            .is_empty()
    );
    assert!(matches!(c.state, State::Screening(_)));
    assert!(send(&mut c, mail("a@x.test")).await.is_empty());
    assert_eq!(phase(&mut c), Some("open"));
    assert_eq!(
        send(&mut c, rcpt("b@y.test")).await,
        encoded(&[Response::Continue])
    );
    // A MAIL refused (its declared size): nothing said at MAIL, the
    // refusal at each RCPT, until the transaction ends.
    send(&mut c, Command::Abort).await;
    let too_big = Command::Mail(vec![b"<a@x.test>".to_vec(), b"SIZE=5000".to_vec()]);
    assert!(send(&mut c, too_big).await.is_empty());
    assert_eq!(phase(&mut c), None);
    for to in ["b@y.test", "c@y.test"] {
        let answer = send(&mut c, rcpt(to)).await;
        assert!(
            String::from_utf8_lossy(&answer).contains("552 5.3.4"),
            "{answer:?}"
        );
    }
    send(&mut c, Command::Abort).await;
    assert!(send(&mut c, mail("a@x.test")).await.is_empty());
    assert_eq!(
        send(&mut c, rcpt("b@y.test")).await,
        encoded(&[Response::Continue])
    );
    assert!(send(&mut c, Command::QuitNewConnection).await.is_empty());

    // Over its connection rate: nothing at CONNECT, HELO or MAIL; the 421
    // at each RCPT.
    assert!(
        connect(&mut c, "192.0.2.7", "mx.sender.test")
            .await
            .is_empty()
    );
    assert!(matches!(c.state, State::Settled(_)));
    for _ in 0..2 {
        assert!(send(&mut c, mail("a@x.test")).await.is_empty());
        let answer = send(&mut c, rcpt("b@y.test")).await;
        assert!(
            String::from_utf8_lossy(&answer).contains("421 4.7.0"),
            "{answer:?}"
        );
        assert_eq!(phase(&mut c), None);
    }
    // The next session starts afresh.
    assert!(send(&mut c, Command::QuitNewConnection).await.is_empty());
    assert!(
        connect(&mut c, "192.0.2.8", "mx.other.test")
            .await
            .is_empty()
    );
    assert!(send(&mut c, mail("a@x.test")).await.is_empty());
    assert_eq!(
        send(&mut c, rcpt("b@y.test")).await,
        encoded(&[Response::Continue])
    );
}

/// `reject_at: connect` asks for the refusal before the greeting: CONNECT
/// is then waited for and answered (HELO still is not).
#[tokio::test]
async fn reject_at_connect_keeps_connect_answered() {
    let mut c = conversation(&format!("  reject_at: connect\n{CONN_LIMIT}"));
    let steps = negotiate_as_postfix(&mut c).await;
    assert_eq!(steps & step::NO_REPLY_CONNECT, 0);
    assert_ne!(steps & step::NO_REPLY_HELO, 0);
    assert_eq!(
        connect(&mut c, "192.0.2.7", "mx.sender.test").await,
        encoded(&[Response::Continue])
    );
    assert!(send(&mut c, Command::QuitNewConnection).await.is_empty());
    let answer = connect(&mut c, "192.0.2.7", "mx.sender.test").await;
    assert!(
        String::from_utf8_lossy(&answer).contains("421 4.7.0"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_refusal_at_mail_is_answered_at_mail_and_opens_no_transaction() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    assert_eq!(
        connect(&mut c, "192.0.2.1", "mx.sender.test").await,
        encoded(&[Response::Continue])
    );
    assert!(matches!(c.state, State::Screening(_)));
    assert_eq!(phase(&mut c), None);
    // The declared size is over the limit: refused now, not at RCPT.
    let too_big = Command::Mail(vec![b"<a@x.test>".to_vec(), b"SIZE=5000".to_vec()]);
    let answer = send(&mut c, too_big).await;
    assert!(
        String::from_utf8_lossy(&answer).contains("552 5.3.4"),
        "{answer:?}"
    );
    assert_eq!(phase(&mut c), None);
    // A rule's refusal (the HELO) waits for the recipients instead.
    send(&mut c, Command::Helo(b"bad.test".to_vec())).await;
    assert_eq!(
        send(&mut c, mail("a@x.test")).await,
        encoded(&[Response::Continue])
    );
    assert_eq!(phase(&mut c), Some("doomed"));
    assert_eq!(
        send(&mut c, rcpt("b@y.test")).await,
        encoded(&[reply("550 5.7.1 bad helo")])
    );
}

#[tokio::test]
async fn a_verdict_at_mail_is_delivered_at_each_rcpt() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    connect(&mut c, "198.51.100.7", "mx.sender.test").await;
    assert_eq!(
        send(&mut c, mail("a@x.test")).await,
        encoded(&[Response::Continue])
    );
    assert_eq!(phase(&mut c), Some("doomed"));
    for to in ["b@y.test", "c@y.test"] {
        assert_eq!(
            send(&mut c, rcpt(to)).await,
            encoded(&[reply("550 5.7.1 listed here")])
        );
    }
    // ABORT ends it; the next MAIL is judged (and doomed) again.
    send(&mut c, Command::Abort).await;
    assert_eq!(phase(&mut c), None);
    send(&mut c, mail("a@x.test")).await;
    assert_eq!(phase(&mut c), Some("doomed"));
}

#[tokio::test]
async fn an_open_transaction_checks_each_recipient() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    connect(&mut c, "192.0.2.1", "mx.sender.test").await;
    send(&mut c, mail("a@x.test")).await;
    assert_eq!(phase(&mut c), Some("open"));
    assert_eq!(
        send(&mut c, rcpt("trap@y.test")).await,
        encoded(&[reply("550 5.1.1 no such user")])
    );
    assert_eq!(
        send(&mut c, rcpt("b@y.test")).await,
        encoded(&[Response::Continue])
    );
    let rcpts = c
        .screening()
        .and_then(|s| s.txn.as_ref())
        .map(|t| t.ledger.rcpts);
    assert_eq!(rcpts, Some(1));
}

async fn message(c: &mut Conversation, subject: &str, body: &[u8]) -> Vec<u8> {
    send(c, mail("a@x.test")).await;
    send(c, rcpt("b@y.test")).await;
    // Agreed: no reply to header fields, end of headers and body chunks.
    let header = Command::Header {
        name: b"Subject".to_vec(),
        value: format!(" {subject}").into_bytes(),
    };
    assert!(send(c, header).await.is_empty());
    assert!(send(c, Command::EndOfHeaders).await.is_empty());
    assert!(send(c, Command::Body(body.to_vec())).await.is_empty());
    send(c, Command::EndOfMessage(Vec::new())).await
}

#[tokio::test]
async fn a_tagged_message_is_accepted_with_our_header_fields_and_quarantined() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    connect(&mut c, "192.0.2.1", "mx.sender.test").await;
    let out = message(&mut c, "you won a prize", b"hello\r\n").await;
    let text = String::from_utf8_lossy(&out);
    // Inserted fields ('i'), the quarantine ('q') with our reason, then
    // continue ('c') as the last packet.
    assert!(text.contains("X-Spam-Flag"), "{text}");
    assert!(text.contains("Portcullis: rule:PRIZE"), "{text}");
    assert!(out.ends_with(&encoded(&[Response::Continue])), "{text}");
    assert_eq!(phase(&mut c), None);
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_counted_not_kept_and_refused() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    connect(&mut c, "192.0.2.1", "mx.sender.test").await;
    send(&mut c, mail("a@x.test")).await;
    send(&mut c, rcpt("b@y.test")).await;
    send(&mut c, Command::EndOfHeaders).await;
    for _ in 0..4 {
        send(&mut c, Command::Body(vec![b'x'; 1000])).await;
    }
    let t = c
        .screening()
        .and_then(|s| s.txn.as_ref())
        .map(|t| (t.hold.size(), t.message.len()));
    let (size, kept) = t.unwrap_or_default();
    assert!(size >= 4000, "the size counts what was not kept: {size}");
    assert_eq!(kept, 0, "nothing is kept past the limit");
    let out = send(&mut c, Command::EndOfMessage(Vec::new())).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("552 5.3.4"), "{text}");
}

#[tokio::test]
async fn quit_new_connection_ends_the_session_and_forgets_the_macros() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    send(
        &mut c,
        Command::Macros {
            stage: b'C',
            pairs: vec![(b"{tls_version}".to_vec(), b"TLSv1.3".to_vec())],
        },
    )
    .await;
    connect(&mut c, "192.0.2.1", "mx.sender.test").await;
    send(&mut c, mail("a@x.test")).await;
    assert_eq!(phase(&mut c), Some("open"));
    assert!(send(&mut c, Command::QuitNewConnection).await.is_empty());
    assert!(matches!(c.state, State::Idle));
    assert!(c.macro_value("{tls_version}").is_none());
}

/// The actions we take and the macro lists we ask for, when the MTA offers
/// `actions` and every step.
async fn offered(actions: u32) -> (u32, Vec<(u32, std::borrow::Cow<'static, [u8]>)>) {
    let mut c = conversation("");
    let offer = Command::Negotiate {
        version: 6,
        actions,
        steps: POSTFIX_STEPS,
    };
    let answer = send(&mut c, offer).await;
    let mut d = crate::wire::milter::Decoder::new(1 << 16);
    d.feed(&answer);
    match d.response() {
        Ok(Some(Response::Negotiate {
            actions, macros, ..
        })) => (actions, macros),
        other => panic!("not a negotiation answer: {other:?}"),
    }
}

/// Offered by Postfix (`SMFIF_SETSYMLIST`), we name the macros we read,
/// and name some macro at every stage: an empty list would bring the
/// MTA's own default list for that stage.
#[tokio::test]
async fn the_macros_read_are_the_only_ones_asked_for() {
    let (actions, macros) = offered(0x1ff).await;
    assert_ne!(actions & action::SET_MACROS, 0);
    let at = |s: u32| -> Vec<String> {
        let (_, names) = macros.iter().find(|(stage, _)| *stage == s).unwrap();
        String::from_utf8_lossy(names)
            .split(' ')
            .map(str::to_string)
            .collect()
    };
    use crate::wire::milter::stage;
    assert_eq!(at(stage::HELO), ["{tls_version}", "{cipher}"]);
    assert!(at(stage::MAIL).contains(&"{auth_authen}".to_string()));
    assert_eq!(at(stage::END_OF_MESSAGE), ["i"]);
    let mut stages: Vec<u32> = macros.iter().map(|(s, _)| *s).collect();
    stages.sort();
    assert_eq!(stages, (0..=6).collect::<Vec<u32>>());
    for (_, names) in &macros {
        assert!(!names.is_empty());
    }

    // An MTA that does not offer it gets no lists (and sends all it has).
    let (actions, macros) = offered(action::ADD_HEADERS | action::CHANGE_HEADERS).await;
    assert_eq!(actions & action::SET_MACROS, 0);
    assert!(macros.is_empty());
}

/// Macros the gate does not read are dropped as they arrive; the ones it
/// reads are kept and replaced by later values.
#[tokio::test]
async fn only_the_macros_read_are_kept() {
    let mut c = conversation("");
    negotiate(&mut c).await;
    let pairs = |p: &[(&str, &str)]| -> Vec<(Vec<u8>, Vec<u8>)> {
        p.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    };
    send(
        &mut c,
        Command::Macros {
            stage: b'M',
            pairs: pairs(&[
                ("j", "mx.example.test"),
                ("{mail_addr}", "a@x.test"),
                ("i", "Q1"),
                ("{auth_authen}", "alice"),
            ]),
        },
    )
    .await;
    send(
        &mut c,
        Command::Macros {
            stage: b'E',
            pairs: pairs(&[("i", "Q2"), ("{rcpt_addr}", "b@y.test")]),
        },
    )
    .await;
    assert_eq!(c.macro_value("i").as_deref(), Some("Q2"));
    assert_eq!(c.macro_value("{auth_authen}").as_deref(), Some("alice"));
    assert_eq!(c.macros.kept(), 2);
}

/// Most packets (macros, HELO, DATA, each header) are answered without
/// awaiting anything, and a packet's future is made and moved whole: the
/// dispatch is small, and each of the four that run checks boxes only its
/// own. Before, the dispatch was boxed per packet at 3,472 bytes (debug
/// build), sized for the connect stage's checks.
#[tokio::test]
async fn a_packet_s_future_is_small_unless_it_runs_checks() {
    let mut c = conversation("");
    let mut out = Vec::new();
    let dispatch = std::mem::size_of_val(&c.handle(Command::Data, &mut out));
    println!("dispatch {dispatch} bytes");
    assert!(dispatch <= 256, "the dispatch is {dispatch} bytes");
}
