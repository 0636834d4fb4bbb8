//! One MTA connection: option negotiation, then for each SMTP session the
//! MTA holds (several when it reuses the connection) connect, HELO and
//! transactions, every packet answered from the screen as the proxy
//! session would answer the same command.
//!
//! A verdict at MAIL is delivered at each RCPT (delayed reject, as in
//! proxy mode), so the log line names sender and recipients. A message
//! is rebuilt from its header fields and body chunks, held within the
//! memory budget and the size limit, and checked at its end: refused
//! with our reply, or accepted with our header fields inserted at the
//! top and forged Authentication-Results fields deleted.

use super::headers::{Assembled, fields_of};
use crate::checks::pool::SharedMessage;
use crate::checks::{Hold, Screen, Screened, Stage};
use crate::gate::ledger::{self, Ending, Ledger, Refusal, Said};
use crate::gate::{Door, Runtime, Shared, refused_connection};
use crate::runtime::limits::Held;
use crate::telemetry::Verdict;
use crate::verdict::Decision;
use crate::wire::milter::{Command, Decoder, Family, Response, VERSION, action, step};
use crate::wire::reply::{self, Reply};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read size: a body chunk is at most 64 KiB.
const READ: usize = 64 * 1024;
/// Read size while the MTA is quiet (a command or macro packet).
const IDLE_READ: usize = 512;
/// A connection quiet this long gives its buffers back.
const BUSY: Duration = Duration::from_secs(1);

/// The actions we ask for: our header fields, deleting forged ones, and
/// (with `quarantine_tagged`) holding tagged messages.
const ACTIONS: u32 = action::ADD_HEADERS | action::CHANGE_HEADERS | action::QUARANTINE;

/// Steps the MTA need not wait for our reply to (we refuse only at
/// connect, HELO, MAIL, RCPT and the end of the message), and header
/// values with their leading space (exactly what DKIM signed).
const STEPS: u32 = step::NO_REPLY_HEADER
    | step::NO_REPLY_EOH
    | step::NO_REPLY_BODY
    | step::NO_REPLY_DATA
    | step::NO_REPLY_UNKNOWN
    | step::HEADER_LEADING_SPACE;

pub struct Conversation {
    shared: Arc<Shared>,
    /// The MTA connection's id (each SMTP session gets its own).
    id: String,
    /// What was agreed: the steps the MTA will not wait for, and ours.
    steps: u32,
    actions: u32,
    macros: HashMap<Vec<u8>, Vec<u8>>,
    client: Option<Client>,
    /// The option negotiation is done (until then a short deadline).
    negotiated: bool,
}

/// One SMTP session the MTA holds.
struct Client {
    id: String,
    rt: Arc<Runtime>,
    screen: Screen,
    ip: IpAddr,
    helo: String,
    tls: Option<(String, String)>,
    /// Nothing more to ask (a local submission, or refused at connect):
    /// the MTA was told to accept or refuse the rest itself.
    settled: bool,
    txn: Option<Txn>,
}

/// One transaction, MAIL to the end of the message.
struct Txn {
    /// Sender, recipients and refusals, score: what the log line says.
    ledger: Ledger,
    /// A verdict reached at MAIL, delivered at each RCPT.
    doomed: Option<(Reply, String)>,
    message: Assembled,
    /// The message's size, and whether it is kept within the size limit
    /// and the memory budget (past either, it is read on but not kept).
    hold: Hold,
}

/// What to do after a packet.
enum Flow {
    Go,
    Quit,
}

impl Conversation {
    pub fn new(id: String, shared: Arc<Shared>) -> Conversation {
        Conversation {
            shared,
            id,
            steps: 0,
            actions: 0,
            macros: HashMap::new(),
            client: None,
            negotiated: false,
        }
    }

    /// Serves the MTA until it quits, goes silent past `milter.timeout`
    /// (before the option negotiation: `milter.negotiate_timeout` from
    /// connecting), or sends what is not the protocol.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self, mut io: S) {
        let cfg = Arc::clone(&self.shared.runtime().cfg);
        let wait = cfg.milter.timeout.0;
        // An MTA reads its replies at once; one that does not is cut off
        // as a client would be.
        let write_limit = cfg.timeouts.write.0;
        let negotiate_by = tokio::time::Instant::now() + cfg.milter.negotiate_timeout.0;
        let mut decoder = Decoder::new(cfg.milter.max_packet.as_usize());
        // Not zeroed: read_buf fills it (a fresh 64 KiB memset per MTA
        // connection was 3% of the profile). Small while the MTA is quiet,
        // grown while it sends a message.
        let mut buf = Vec::new();
        let mut want = IDLE_READ;
        let mut out = Vec::new();
        let why = 'conversation: loop {
            loop {
                match decoder.command() {
                    Ok(Some(c)) => {
                        if let Flow::Quit = self.handle(c, &mut out).await {
                            let _ = write(&mut io, &out, write_limit).await;
                            break 'conversation "quit";
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(milter = %self.id, error = %e, "milter protocol error; closing");
                        break 'conversation "protocol";
                    }
                }
            }
            if !out.is_empty() {
                if !write(&mut io, &out, write_limit).await {
                    break "disconnect";
                }
                out.clear();
            }
            let until = if self.negotiated {
                tokio::time::Instant::now() + wait
            } else {
                negotiate_by
            };
            buf.clear();
            buf.reserve(want);
            let quick = until.min(tokio::time::Instant::now() + BUSY);
            let read = match tokio::time::timeout_at(quick, io.read_buf(&mut buf)).await {
                Ok(r) => Ok(r),
                Err(_) => {
                    // Quiet: an idle MTA connection keeps no large buffer.
                    if buf.capacity() > IDLE_READ {
                        buf = Vec::with_capacity(IDLE_READ);
                    }
                    out = Vec::new();
                    decoder.shrink();
                    want = IDLE_READ;
                    tokio::time::timeout_at(until, io.read_buf(&mut buf)).await
                }
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => break "disconnect",
                Err(_) if !self.negotiated => break "negotiate_timeout",
                Err(_) => break "timeout",
                Ok(Ok(n)) => {
                    if n >= want {
                        want = (want * 8).min(READ);
                    }
                    decoder.feed(&buf);
                }
            }
        };
        if why == "negotiate_timeout" {
            tracing::info!(milter = %self.id, "no option negotiation in time; closing");
        }
        self.end_client(why);
    }

    async fn handle(&mut self, c: Command, out: &mut Vec<u8>) -> Flow {
        let answer = match c {
            Command::Negotiate {
                version,
                actions,
                steps,
            } => {
                self.actions = ACTIONS & actions;
                self.steps = STEPS & steps;
                self.negotiated = true;
                Some(Response::Negotiate {
                    version: VERSION.min(version),
                    actions: self.actions,
                    steps: self.steps,
                })
            }
            Command::Macros { pairs, .. } => {
                self.macros.extend(pairs);
                None
            }
            Command::Connect { family, .. } => Some(self.connect(family).await),
            Command::Helo(name) => Some(self.helo(&name)),
            Command::Mail(args) => Some(self.mail(&args).await),
            Command::Rcpt(args) => Some(self.rcpt(&args).await),
            Command::Data => self.unless(step::NO_REPLY_DATA),
            Command::Header { name, value } => {
                let leading = self.steps & step::HEADER_LEADING_SPACE != 0;
                self.keep(|m| m.header(&name, &value, leading));
                self.unless(step::NO_REPLY_HEADER)
            }
            Command::EndOfHeaders => {
                self.keep(Assembled::end_of_headers);
                self.unless(step::NO_REPLY_EOH)
            }
            Command::Body(chunk) => {
                self.keep(|m| m.body(&chunk));
                self.unless(step::NO_REPLY_BODY)
            }
            Command::EndOfMessage(chunk) => {
                self.keep(|m| m.body(&chunk));
                for r in self.end_of_message().await {
                    r.encode(out);
                }
                return Flow::Go;
            }
            Command::Abort => {
                self.abandon("rset");
                None
            }
            Command::Quit => return Flow::Quit,
            Command::QuitNewConnection => {
                self.end_client("quit");
                self.macros.clear();
                None
            }
            Command::Unknown(_) => self.unless(step::NO_REPLY_UNKNOWN),
        };
        if let Some(r) = answer {
            r.encode(out);
        }
        Flow::Go
    }

    /// Continue, unless the MTA was told not to wait for a reply here.
    fn unless(&self, no_reply: u32) -> Option<Response> {
        (self.steps & no_reply == 0).then_some(Response::Continue)
    }

    fn macro_value(&self, name: &str) -> Option<String> {
        self.macros
            .get(name.as_bytes())
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    async fn connect(&mut self, family: Family) -> Response {
        self.end_client("quit");
        let rt = self.shared.runtime();
        let ip = match &family {
            Family::Inet { address, .. } | Family::Inet6 { address, .. } => {
                let a = String::from_utf8_lossy(address);
                a.trim_start_matches("IPv6:").parse::<IpAddr>().ok()
            }
            Family::Unix { .. } | Family::Unknown => None,
        };
        let local = ip.is_none();
        let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let screen = Screen::new(Arc::clone(&rt.engine), Arc::clone(&rt.rules), ip, false);
        let mut client = Client {
            id: crate::telemetry::session_id(),
            rt,
            screen,
            ip,
            helo: String::new(),
            tls: None,
            settled: local,
            txn: None,
        };
        if local {
            // A local submission (sendmail(1), non_smtpd_milters): no client
            // to check.
            self.client = Some(client);
            return Response::Accept;
        }
        let refused = match client.screen.admit().await {
            Some(r) => Some(r),
            None => client.screen.refuse_at_connect().await,
        };
        let answer = match refused {
            Some((r, reason)) => {
                refused_connection(Door::Milter, &client.id, ip, &r, &reason);
                client.settled = true;
                reply_code(&r)
            }
            None => Response::Continue,
        };
        self.client = Some(client);
        answer
    }

    fn helo(&mut self, name: &[u8]) -> Response {
        let tls = self
            .macro_value("{tls_version}")
            .map(|v| (v, self.macro_value("{cipher}").unwrap_or_default()));
        let Some(c) = self.client.as_mut().filter(|c| !c.settled) else {
            return Response::Continue;
        };
        c.helo = String::from_utf8_lossy(name).into_owned();
        c.screen.helo(&c.helo);
        c.screen.tls(tls.is_some());
        c.tls = tls;
        Response::Continue
    }

    async fn mail(&mut self, args: &[Vec<u8>]) -> Response {
        self.abandon("rset");
        let authenticated = self.macro_value("{auth_authen}").is_some();
        let Some(c) = self.client.as_mut().filter(|c| !c.settled) else {
            return Response::Continue;
        };
        if authenticated {
            c.screen.allow_client();
        }
        let sender = address(args.first().map_or(&[][..], Vec::as_slice));
        let size = args.iter().skip(1).find_map(|a| {
            let a = String::from_utf8_lossy(a);
            let (k, v) = a.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE")
                .then(|| v.parse::<u64>().ok())?
        });
        let started = Instant::now();
        let verdict = match c.screen.mail(&sender, size).await {
            Screened::Refused { reply, reason } => {
                let t = Txn::new(sender, started, 0.0, &self.shared, &c.rt);
                record(
                    c,
                    &t,
                    Verdict::from_code(reply.code),
                    Stage::Mail,
                    &reply,
                    &reason,
                );
                return reply_code(&reply);
            }
            Screened::Verdict(v) => v,
        };
        let mut t = Txn::new(sender, started, verdict.score, &self.shared, &c.rt);
        if let Decision::Reject(r) | Decision::Tempfail(r) = verdict.decision {
            t.doomed = Some((r, verdict.reason));
        }
        c.txn = Some(t);
        Response::Continue
    }

    async fn rcpt(&mut self, args: &[Vec<u8>]) -> Response {
        let Some(c) = self.client.as_mut().filter(|c| !c.settled) else {
            return Response::Continue;
        };
        let Some(t) = c.txn.as_mut() else {
            return Response::Continue;
        };
        let rcpt = address(args.first().map_or(&[][..], Vec::as_slice));
        let refusal = match &t.doomed {
            Some(doom) => Some(doom.clone()),
            None => c.screen.rcpt(&rcpt).await,
        };
        match refusal {
            Some((r, reason)) => {
                let answer = reply_code(&r);
                t.ledger.last_refusal = Some(Refusal::ours(&r, reason));
                answer
            }
            None => {
                t.ledger.rcpts += 1;
                c.screen.rcpt_accepted(&rcpt);
                Response::Continue
            }
        }
    }

    /// Adds to the message being received, within the size limit and the
    /// memory budget (past either, it is read on but not kept).
    fn keep(&mut self, add: impl FnOnce(&mut Assembled)) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let Some(t) = c.txn.as_mut() else {
            return;
        };
        if !t.hold.keeping() {
            // Not kept, but counted: the log line gives the message's size.
            let mut unkept = Assembled::default();
            add(&mut unkept);
            t.hold.grew(t.hold.size() + unkept.len() as u64, 0);
            return;
        }
        add(&mut t.message);
        if !t
            .hold
            .grew(t.message.len() as u64, t.message.bytes.capacity())
        {
            t.message = Assembled::default();
        }
    }

    /// The end of the message: our verdict, and on acceptance the header
    /// edits, then the final reply.
    async fn end_of_message(&mut self) -> Vec<Response> {
        let (actions, leading) = (self.actions, self.steps & step::HEADER_LEADING_SPACE != 0);
        let queue_id = self.macro_value("i");
        let Some(c) = self.client.as_mut().filter(|c| !c.settled) else {
            return vec![Response::Continue];
        };
        let Some(mut t) = c.txn.take() else {
            return vec![Response::Continue];
        };
        let parse = c.screen.facts().rules.has_stage(Stage::Data);
        t.hold
            .before_checks(parse, t.message.bytes.capacity(), t.message.len());
        let local = match (&t.doomed, t.hold.refusal()) {
            (Some((r, reason)), _) => Some((r.clone(), reason.clone())),
            (None, Some((r, reason))) => Some((r, reason.to_string())),
            (None, None) => None,
        };
        if let Some((r, reason)) = local {
            record(c, &t, Verdict::from_code(r.code), Stage::Data, &r, &reason);
            return vec![reply_code(&r)];
        }
        let mut fields = std::mem::take(&mut t.message);
        let reservation = t.hold.take_reservation();
        let held = Arc::new(Held::new(std::mem::take(&mut fields.bytes), reservation));
        let checked = c.screen.data(&(Arc::clone(&held) as SharedMessage)).await;
        t.ledger.score = checked.outcome.score;
        let reason = checked.outcome.reason.clone();
        match checked.outcome.decision {
            Decision::Reject(r) | Decision::Tempfail(r) => {
                record(c, &t, Verdict::from_code(r.code), Stage::Data, &r, &reason);
                vec![reply_code(&r)]
            }
            d => {
                let mut edits = Vec::new();
                if actions & action::CHANGE_HEADERS != 0 {
                    // From the last, so that deleting one does not renumber
                    // the next.
                    for range in checked.remove.iter().rev() {
                        if let Some((name, index)) = fields.field_at(range.start) {
                            edits.push(Response::ChangeHeader {
                                index,
                                name,
                                value: Vec::new(),
                            });
                        }
                    }
                }
                if actions & action::ADD_HEADERS != 0 {
                    for (i, (name, value)) in
                        fields_of(&checked.headers, leading).into_iter().enumerate()
                    {
                        edits.push(Response::InsertHeader {
                            index: u32::try_from(i).unwrap_or(u32::MAX),
                            name,
                            value,
                        });
                    }
                }
                if d == Decision::Tag
                    && c.rt.cfg.milter.quarantine_tagged
                    && actions & action::QUARANTINE != 0
                {
                    let why = format!("Portcullis: {reason}");
                    edits.push(Response::Quarantine(why.into_bytes()));
                }
                edits.push(Response::Continue);
                let verdict = if d == Decision::Tag {
                    Verdict::Tag
                } else {
                    Verdict::Accept
                };
                let queue_id = queue_id.unwrap_or_default();
                record_queued(c, &t, verdict, Stage::Data, &reply::OK, &reason, &queue_id);
                edits
            }
        }
    }

    /// Ends the open transaction without a final reply: logged as what its
    /// refusals were, or abandoned for `why`.
    fn abandon(&mut self, why: &str) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let Some(t) = c.txn.take() else {
            return;
        };
        t.ledger.record_abandoned(&c.client(), why, t.hold.size());
    }

    fn end_client(&mut self, why: &str) {
        self.abandon(why);
        self.client = None;
    }
}

impl Txn {
    fn new(sender: String, started: Instant, score: f64, shared: &Shared, rt: &Runtime) -> Txn {
        let max_size = rt.cfg.limits.max_message_size.0;
        Txn {
            ledger: Ledger::new(sender, started, score),
            doomed: None,
            message: Assembled::default(),
            hold: Hold::new(max_size, &shared.budget),
        }
    }
}

/// A path as the MTA sends it (`<a@b>`), without the brackets.
fn address(arg: &[u8]) -> String {
    let s = String::from_utf8_lossy(arg);
    s.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// Our reply, as the MTA will send it to the client.
fn reply_code(r: &Reply) -> Response {
    let mut text = Vec::new();
    r.write_to(&mut text);
    while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        text.pop();
    }
    Response::ReplyCode(text)
}

/// The transaction's log line, as the proxy writes it, with `mode=milter`.
fn record(c: &Client, t: &Txn, verdict: Verdict, stage: Stage, r: &Reply, reason: &str) {
    record_queued(c, t, verdict, stage, r, reason, "");
}

/// `record`, with the MTA's queue id (its `i` macro) for an accepted message.
fn record_queued(
    c: &Client,
    t: &Txn,
    verdict: Verdict,
    stage: Stage,
    r: &Reply,
    reason: &str,
    queue_id: &str,
) {
    t.ledger.record(
        &c.client(),
        &Ending {
            verdict,
            stage,
            said: &Said::from(r),
            reason,
            upstream: "",
            queue_id,
            size: t.hold.size(),
        },
    );
}

impl Client {
    /// This SMTP session's client, for its transactions' log lines.
    fn client(&self) -> ledger::Client<'_> {
        ledger::Client {
            door: Door::Milter,
            session: &self.id,
            ip: self.ip,
            helo: &self.helo,
            tls: self.tls.as_ref().map(|(v, c)| (v.as_str(), c.as_str())),
            screen: &self.screen,
        }
    }
}

/// Writes within `wait`; false when the MTA did not take it.
async fn write<S: AsyncWrite + Unpin>(io: &mut S, out: &[u8], wait: Duration) -> bool {
    matches!(
        tokio::time::timeout(wait, io.write_all(out)).await,
        Ok(Ok(()))
    )
}
