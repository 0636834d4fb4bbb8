//! The conversation's state (the table in `mod.rs`) and the dispatch of
//! each packet to its stage.

use super::headers::Assembled;
use super::txn::Txn;
use crate::checks::Screen;
use crate::gate::Shared;
use crate::wire::milter::{Command, Response, VERSION, action, stage, step};
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

/// The actions we ask for: our header fields, deleting forged ones, and
/// (with `quarantine_tagged`) holding tagged messages.
const ACTIONS: u32 = action::ADD_HEADERS | action::CHANGE_HEADERS | action::QUARANTINE;

/// Steps the MTA need not wait for our reply to, and header values with
/// their leading space (exactly what DKIM signed). We refuse at RCPT and
/// at the end of the message; a refusal reached at CONNECT or MAIL is
/// given at each RCPT, as Postfix's own `smtpd_delay_reject` does with its
/// restrictions (unless `reject_at: connect` asks for a connect refusal at
/// once), and HELO never refuses by itself. Each step not waited for
/// saves the MTA a round trip.
pub const STEPS: u32 = step::NO_REPLY_CONNECT
    | step::NO_REPLY_HELO
    | step::NO_REPLY_MAIL
    | step::NO_REPLY_HEADER
    | step::NO_REPLY_EOH
    | step::NO_REPLY_BODY
    | step::NO_REPLY_DATA
    | step::NO_REPLY_UNKNOWN
    | step::HEADER_LEADING_SPACE;

pub struct Conversation {
    pub(super) shared: Arc<Shared>,
    /// The MTA connection's id (each SMTP session gets its own).
    pub(super) id: crate::telemetry::SessionId,
    /// What was agreed: the steps the MTA will not wait for, and ours.
    pub(super) steps: u32,
    pub(super) actions: u32,
    pub(super) macros: Macros,
    /// The SMTP session the MTA holds now.
    pub(super) state: State,
    /// The option negotiation is done (until then a short deadline).
    pub(super) negotiated: bool,
}

/// Where the SMTP session stands (see the table in `mod.rs`).
pub(super) enum State {
    /// No SMTP session: before the first CONNECT, and after QUIT_NC.
    Idle,
    /// Nothing more to check in this session: a local submission
    /// (accepted) or a client refused at connect. The answer is given at
    /// CONNECT, or, when the MTA does not wait there, at each MAIL.
    Settled(Response),
    /// An SMTP session being screened.
    Screening(Box<Client>),
}

/// One SMTP session the MTA holds.
pub(super) struct Client {
    pub(super) id: crate::telemetry::SessionId,
    pub(super) rt: Arc<crate::gate::Snapshot>,
    pub(super) screen: Screen,
    pub(super) ip: IpAddr,
    pub(super) helo: String,
    pub(super) tls: Option<(String, String)>,
    pub(super) txn: Option<Txn>,
    /// The refusal of this transaction's MAIL (logged then), for each
    /// RCPT: the MTA may not have waited for it at MAIL.
    pub(super) mail_refused: Option<Response>,
}

/// What to do after a packet.
pub(super) enum Flow {
    Go,
    Quit,
}

impl Conversation {
    pub fn new(id: crate::telemetry::SessionId, shared: Arc<Shared>) -> Conversation {
        Conversation {
            shared,
            id,
            steps: 0,
            actions: 0,
            macros: Macros::default(),
            state: State::Idle,
            negotiated: false,
        }
    }

    /// Answers one packet (into `out`, nothing where the MTA was told not
    /// to wait).
    ///
    /// Most packets are answered at once; the four that run checks
    /// (connect, MAIL, RCPT, the end of the message) each await a boxed
    /// future of their own. A future is as large as its largest state, and
    /// each packet's was made and moved whole: 3.5 KB allocated and copied
    /// for every macro, header or DATA packet when this whole function was
    /// boxed per packet.
    pub(super) async fn handle(&mut self, c: Command, out: &mut Vec<u8>) -> Flow {
        let answer = match c {
            Command::Negotiate {
                version,
                actions,
                steps,
            } => Some(self.negotiate(version, actions, steps)),
            Command::Macros { pairs, .. } => {
                for (name, value) in &pairs {
                    self.macros.set(name, value);
                }
                None
            }
            Command::Connect { family, .. } => {
                let r = Box::pin(self.connect(family)).await;
                self.unless_with(step::NO_REPLY_CONNECT, r)
            }
            Command::Helo(name) => {
                self.helo(&name);
                self.unless(step::NO_REPLY_HELO)
            }
            Command::Mail(args) => {
                let r = Box::pin(self.mail(&args)).await;
                self.unless_with(step::NO_REPLY_MAIL, r)
            }
            Command::Rcpt(args) => Some(Box::pin(self.rcpt(&args)).await),
            Command::Data => self.unless(step::NO_REPLY_DATA),
            Command::Header { name, value } => self.header(&name, &value),
            Command::EndOfHeaders => {
                self.keep(Assembled::end_of_headers);
                self.unless(step::NO_REPLY_EOH)
            }
            Command::Body(chunk) => self.body(&chunk),
            Command::EndOfMessage(chunk) => {
                self.keep(|m| m.body(&chunk));
                for r in Box::pin(self.end_of_message()).await {
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
                self.end_session("quit");
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

    /// A piece of the body (the connection lends it from its read buffer).
    pub(super) fn body(&mut self, chunk: &[u8]) -> Option<Response> {
        self.keep(|m| m.body(chunk));
        self.unless(step::NO_REPLY_BODY)
    }

    /// A header field (lent as a body chunk is).
    pub(super) fn header(&mut self, name: &[u8], value: &[u8]) -> Option<Response> {
        let leading = self.leading_space();
        self.keep(|m| m.header(name, value, leading));
        self.unless(step::NO_REPLY_HEADER)
    }

    /// The options: what we want of what the MTA offers.
    fn negotiate(&mut self, version: u32, actions: u32, steps: u32) -> Response {
        let mut wanted = STEPS;
        if self.shared.snapshot().engine.cfg.reject_at == crate::config::RejectAt::Connect {
            wanted &= !step::NO_REPLY_CONNECT;
        }
        self.actions = ACTIONS & actions;
        self.steps = wanted & steps;
        self.negotiated = true;
        // Where the MTA lets us name the macros we want, it sends only
        // those: fewer to send, parse and store for every message.
        let macros = if actions & action::SET_MACROS != 0 {
            self.actions |= action::SET_MACROS;
            Macros::WANTED_AT
                .iter()
                .map(|(stage, names)| (*stage, Cow::Borrowed(names.as_bytes())))
                .collect()
        } else {
            Vec::new()
        };
        Response::Negotiate {
            version: VERSION.min(version),
            actions: self.actions,
            steps: self.steps,
            macros,
        }
    }

    /// Continue, unless the MTA was told not to wait for a reply here.
    fn unless(&self, no_reply: u32) -> Option<Response> {
        self.unless_with(no_reply, Response::Continue)
    }

    /// `answer`, unless the MTA was told not to wait for a reply here.
    fn unless_with(&self, no_reply: u32, answer: Response) -> Option<Response> {
        (self.steps & no_reply == 0).then_some(answer)
    }

    /// Header values come with their leading space (as DKIM signed them).
    pub(super) fn leading_space(&self) -> bool {
        self.steps & step::HEADER_LEADING_SPACE != 0
    }

    pub(super) fn macro_value(&self, name: &str) -> Option<String> {
        self.macros
            .get(name)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The session being screened, if there is one.
    pub(super) fn screening(&mut self) -> Option<&mut Client> {
        match &mut self.state {
            State::Screening(c) => Some(c),
            State::Idle | State::Settled(_) => None,
        }
    }
}

/// The MTA's macros this gate reads; any others it sends are dropped.
#[derive(Debug, Default)]
pub(super) struct Macros([Option<Vec<u8>>; Macros::NAMES.len()]);

impl Macros {
    const NAMES: [&'static str; 4] = ["i", "{tls_version}", "{cipher}", "{auth_authen}"];

    /// What to ask for at each stage (with `action::SET_MACROS`): the queue
    /// ID for the log at the end of the message, TLS at HELO, the SASL
    /// login at MAIL. Every stage names one, even where it is never defined
    /// (the queue ID at CONNECT): Postfix sends its own default list for a
    /// stage whose list is empty.
    const WANTED_AT: [(u32, &'static str); 7] = [
        (stage::CONNECT, "i"),
        (stage::HELO, "{tls_version} {cipher}"),
        (stage::MAIL, "i {auth_authen}"),
        (stage::RCPT, "i"),
        (stage::DATA, "i"),
        (stage::END_OF_HEADERS, "i"),
        (stage::END_OF_MESSAGE, "i"),
    ];

    /// One of a stage's macros: it replaces an earlier value (they last
    /// for the SMTP session, as the MTA defines them), in the room the
    /// earlier one had.
    pub(super) fn set(&mut self, name: &[u8], value: &[u8]) {
        if let Some(i) = Self::NAMES.iter().position(|n| n.as_bytes() == name) {
            let kept = self.0[i].get_or_insert_with(Vec::new);
            kept.clear();
            kept.extend_from_slice(value);
        }
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        debug_assert!(Self::NAMES.contains(&name), "{name} is never kept");
        let i = Self::NAMES.iter().position(|n| *n == name)?;
        self.0[i].as_deref()
    }

    /// How many values are held.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.0.iter().flatten().count()
    }

    pub(super) fn clear(&mut self) {
        *self = Macros::default();
    }
}

#[cfg(test)]
mod tests {
    use super::Macros;

    /// A name kept is asked for at some stage, and a name asked for is
    /// kept: the two tables must not drift apart.
    #[test]
    fn the_names_kept_are_the_names_asked_for() {
        let asked: Vec<&str> = Macros::WANTED_AT
            .iter()
            .flat_map(|(_, names)| names.split(' '))
            .collect();
        for name in Macros::NAMES {
            assert!(asked.contains(&name), "{name} is kept but never asked for");
        }
        for name in &asked {
            assert!(
                Macros::NAMES.contains(name),
                "{name} is asked for but never kept"
            );
        }
    }
}
