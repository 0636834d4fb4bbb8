//! The check engine. Every check is one `Check` in its own file, with
//! hooks per stage that default to doing nothing; a hook reads the `Facts`
//! known so far and adds `Finding`s (what it found and what that leads to).
//! `Screen` runs them for one client, stage by stage, without any I/O of
//! its own; `verdict::decide` turns the findings into one decision.
//!
//! Adding a check: a file here with a type that implements `Check`, and
//! one line in `Engine::new`. The order there is the order they run in,
//! and later checks see the results of earlier ones (DMARC reads SPF and
//! DKIM; the rules read everything).

pub mod antivirus;
mod arc;
mod auth_results;
mod client_name;
mod daemon;
mod dkim;
mod dmarc;
pub mod dnsbl;
pub mod greylist;
mod hold;
mod iprev;
mod limits;
pub mod policy;
pub mod pool;
pub mod rate_limits;
pub mod reputation;
mod rules;
pub mod scanner;
mod screen;
mod spf;
pub mod uribl;

pub use hold::Hold;

pub use screen::{DataChecks, Screen, Screened};

use crate::config::{ChecksConfig, Config, Mode, Thresholds};
use crate::dns::Dns;
use crate::rules::RuleSet;
use crate::rules::links::Links;
use crate::rules::policy::{Lists, Policy};
use crate::state::Store;
use crate::verdict::Finding;
use crate::wire::identity::DnsName;
use crate::wire::reply::Reply;
use dnsbl::{Dnsbl, ZoneOutcome};
use mail_auth::{ArcOutput, AuthenticatedMessage, DkimOutput, DmarcOutput, IprevOutput, SpfOutput};
use pool::SharedMessage;
use std::future::Future;
use std::net::IpAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

pub use crate::wire::stage::Stage;

/// A lookup running in a task of its own, whose answer is kept apart from
/// the task: the task (sized for the resolver's future, a KiB or two) is
/// freed as soon as it answers, not when the session gets round to
/// reading the answer, which for a client that idles may be never. A
/// lookup the cache answers at once needs no task (nor the thread
/// wake-up that spawning one costs): its answer is kept here.
pub enum Lookup<T> {
    Ready(Option<Box<T>>),
    Running(tokio::sync::oneshot::Receiver<T>),
}

impl<T: Send + 'static> Lookup<T> {
    pub fn spawn(work: impl Future<Output = T> + Send + 'static) -> Lookup<T> {
        use futures_util::FutureExt;
        let mut work = Box::pin(work);
        if let Some(answer) = (&mut work).now_or_never() {
            return Lookup::Ready(Some(Box::new(answer)));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // The session may have ended: then nobody wants the answer.
            let _ = tx.send(work.await);
        });
        Lookup::Running(rx)
    }
}

impl<T> Future for Lookup<T> {
    /// None: the lookup's task ended without an answer (it panicked), or
    /// the answer was taken already.
    type Output = Option<T>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Lookup::Ready(answer) => std::task::Poll::Ready(answer.take().map(|a| *a)),
            Lookup::Running(rx) => Pin::new(rx).poll(cx).map(Result::ok),
        }
    }
}

/// What a hook returns: it has added its findings when it resolves.
pub type Hook<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A hook with nothing to do. Boxing a future of size zero does not
/// allocate; `std::future::ready(())` is not one (it holds an
/// `Option<()>`, a byte), and cost 20 allocations a message in the
/// milter with the checks off.
pub fn done<'a>() -> Hook<'a> {
    Box::pin(Done)
}

/// A future that is ready at once and holds nothing.
struct Done;

impl Future for Done {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::task::Poll::Ready(())
    }
}

/// One check. The stages run in the order of the dialogue: `start` when
/// the client connects (begin lookups, do not wait), `connect` when the
/// connection's verdict is wanted (before the greeting with `reject_at:
/// connect`, else at the first MAIL), then `mail`, each `rcpt`, `data`.
/// The verdict on everything before RCPT is given at MAIL (a delayed
/// reject, as Postfix's `smtpd_delay_reject`), so that the log names the
/// sender and the recipients. So there is no HELO hook: the HELO name is a
/// fact (`Client::helo`) that the MAIL stage judges (SPF of the HELO
/// identity, HELO rules), and no DNS work is spent on clients that never
/// send MAIL.
pub trait Check: Send + Sync {
    /// Runs for allow-listed clients and senders too (size and count limits).
    fn always(&self) -> bool {
        false
    }

    /// Does nothing at any stage with its config (its mode is off). The
    /// engine leaves it out rather than call each of its stages for every
    /// message, some with a boxed future. A policy cannot turn on a check
    /// the gate has off (`Policies::modes_of_checks_off`).
    fn off(&self) -> bool {
        false
    }

    /// The client connected: start lookups in the background.
    fn start(&self, _client: &Client, _pending: &mut Pending) {}

    /// Whether to serve the client at all, before the greeting (counting
    /// connections); a refusal goes in `refuse_now`.
    fn admit<'a>(&'a self, _f: &'a mut Facts) -> Hook<'a> {
        done()
    }

    /// The connection's own findings (the client's address and name).
    fn connect<'a>(&'a self, _f: &'a mut Facts) -> Hook<'a> {
        done()
    }

    fn mail<'a>(&'a self, _f: &'a mut Facts) -> Hook<'a> {
        done()
    }

    /// One recipient, in `f.txn.rcpt`; findings that refuse apply to it alone.
    fn rcpt<'a>(&'a self, _f: &'a mut Facts) -> Hook<'a> {
        done()
    }

    /// The whole message. The check outlives the message's parse (`'m`):
    /// results that borrow from both (DKIM, ARC) go into `m`.
    fn data<'a, 'm: 'a>(&'m self, _f: &'a mut Facts, _m: &'a mut Message<'m>) -> Hook<'a> {
        done()
    }
}

/// What is known of the client. Filled at connect, HELO and STARTTLS, and
/// when the lookups started at connect have finished.
#[derive(Debug, Clone)]
pub struct Client {
    pub ip: IpAddr,
    pub tls: bool,
    pub helo: String,
    /// Allow-listed: no checks but the limits.
    pub allowed: bool,
    /// Its address passed the DNSBL lookups lately (reputation): they are
    /// not made again.
    pub dnsbl_known_good: bool,
    /// The DNSBL answers for the client's address.
    pub dnsbl: Vec<ZoneOutcome>,
    /// Its zones' scores sum to `checks.dnsbl.allow_threshold` or less (a
    /// DNS allow list): no greeting test, no greylisting.
    pub dns_allowed: bool,
    /// PTR with forward confirmation, when iprev is on.
    /// (Boxed, as `names`: every idle session holds a `Client`.)
    pub iprev: Option<Box<IprevOutput>>,
    /// XCLIENT NAME and REVERSE_NAME; the first is the verified name.
    pub names: Option<Box<(DnsName, DnsName)>>,
}

impl Client {
    /// The verified reverse name, once the lookup has finished.
    pub fn reverse(&self) -> Option<&str> {
        self.names.as_deref().and_then(|(name, _)| name.known())
    }
}

/// Lookups started at connect and awaited when a stage needs them.
#[derive(Default)]
pub struct Pending {
    pub dnsbl: Option<Lookup<Vec<ZoneOutcome>>>,
    /// PTR plus forward confirmation: for iprev and for upstream.
    pub iprev: Option<Lookup<IprevOutput>>,
    /// Keep the iprev result as a check result (not only the names).
    pub iprev_is_check: bool,
}

/// One transaction: the envelope so far and what the checks found.
#[derive(Debug, Clone, Default)]
pub struct TxnFacts {
    pub sender: String,
    pub declared_size: Option<u64>,
    /// Recipients accepted so far.
    pub rcpts: Vec<String>,
    /// At RCPT: the recipient being checked.
    pub rcpt: String,
    /// The message's size, at DATA.
    pub size: Option<u64>,
    pub spf_helo: Option<SpfOutput>,
    pub spf_mail: Option<SpfOutput>,
    pub found: Found,
    /// The recipients' policy, once the first recipient chose it (None:
    /// the gate's).
    pub policy: Option<Arc<Policy>>,
}

/// A transaction's facts, allocated on first change: a client that never
/// sends MAIL (most of a flood) costs no room for them. Reads before then
/// see an empty transaction.
#[derive(Debug, Clone, Default)]
pub struct LazyTxn(Option<Box<TxnFacts>>);

static NO_TXN: std::sync::LazyLock<TxnFacts> = std::sync::LazyLock::new(TxnFacts::default);

impl LazyTxn {
    pub fn new(t: TxnFacts) -> LazyTxn {
        LazyTxn(Some(Box::new(t)))
    }

    /// Starts over with `t`, reusing the room of the last transaction.
    pub fn set(&mut self, t: TxnFacts) {
        match &mut self.0 {
            Some(b) => **b = t,
            None => self.0 = Some(Box::new(t)),
        }
    }
}

impl std::ops::Deref for LazyTxn {
    type Target = TxnFacts;
    fn deref(&self) -> &TxnFacts {
        self.0.as_deref().unwrap_or(&NO_TXN)
    }
}

impl std::ops::DerefMut for LazyTxn {
    fn deref_mut(&mut self) -> &mut TxnFacts {
        self.0.get_or_insert_with(Box::default)
    }
}

/// What the checks found so far in a transaction.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub findings: Vec<Finding>,
    /// The check results for the log line and the rules.
    pub log: CheckLog,
    /// Headers added by rules (`add_header`).
    pub add_headers: Vec<String>,
    /// No further checks run (allow-listed client or sender, or an
    /// enforced `accept` rule).
    pub skipped: bool,
    /// Refuse this command now, before any verdict (limits, rate limits),
    /// with the reason for the log.
    pub refuse_now: Option<(Reply, String)>,
}

/// The check results for the transaction log line (kept with the line).
pub use crate::telemetry::CheckLog;

/// Everything known about one client and its current transaction: what
/// the checks read and add to.
#[derive(Clone)]
pub struct Facts {
    pub client: Client,
    pub txn: LazyTxn,
    /// The rules this client's session started with.
    pub rules: Arc<RuleSet>,
}

/// The message at the end of DATA, parsed once for every check.
pub struct Message<'m> {
    /// For work handed to the rule pool.
    pub shared: &'m SharedMessage,
    pub parsed: &'m AuthenticatedMessage<'m>,
    pub from: String,
    pub from_domain: String,
    pub dkim: Vec<DkimOutput<'m>>,
    pub dmarc: Option<DmarcOutput>,
    pub arc: Option<ArcOutput<'m>>,
    /// Our header block (Authentication-Results first).
    pub headers: String,
    /// Forged Authentication-Results fields to drop.
    pub remove: Vec<Range<usize>>,
    /// What the message links to, found once for the URL blocklists and
    /// the rules.
    pub links: Option<Arc<Links>>,
}

impl Message<'_> {
    /// The message's links, found on first use.
    pub fn links(&mut self) -> Arc<Links> {
        let raw: &[u8] = (**self.shared).as_ref();
        Arc::clone(
            self.links
                .get_or_insert_with(|| Arc::new(Links::parse(raw))),
        )
    }
}

/// The checks of one configuration, shared by all sessions.
pub struct Engine {
    pub cfg: ChecksConfig,
    pub hostname: String,
    pub dns: Arc<Dns>,
    pub dnsbl: Arc<Dnsbl>,
    /// The URL blocklists' zones (domain and address zones).
    pub uribl: Arc<Dnsbl>,
    /// What earlier connections showed (None: reputation off).
    pub reputation: Option<reputation::Reputation>,
    /// The gate's block list (`checks.block`).
    pub block: Lists,
    /// Where allow and block entries written by a panel are read (None:
    /// `checks.allow.store` is off).
    pub lists_store: Option<Arc<Store>>,
    checks: Vec<Box<dyn Check>>,
}

impl Engine {
    /// The checks of `cfg`, in the order they run.
    pub fn new(cfg: &Config, dns: Arc<Dns>, store: Arc<Store>) -> Engine {
        let c = &cfg.checks;
        let dnsbl = Arc::new(Dnsbl::new(&c.dnsbl.zones, Arc::clone(&dns)));
        let uribl = Arc::new(Dnsbl::new(&c.uribl.all_zones(), Arc::clone(&dns)));
        let host = cfg.hostname.clone();
        let reputation = reputation::Reputation::new(&c.reputation, Arc::clone(&store));
        let lists_store = c.allow.store.then(|| Arc::clone(&store));
        let mut checks: Vec<Box<dyn Check>> = vec![
            Box::new(limits::Limits::new(&cfg.limits)),
            Box::new(rate_limits::RateLimits::new(
                &c.rate_limits,
                Arc::clone(&store),
            )),
            Box::new(dnsbl::DnsblCheck::new(&c.dnsbl, Arc::clone(&dnsbl))),
            Box::new(iprev::Iprev::new(&c.iprev, Arc::clone(&dns))),
            Box::new(spf::Spf::new(
                &c.spf,
                &host,
                &c.allow.forwarders,
                Arc::clone(&dns),
            )),
            Box::new(dkim::Dkim::new(c, Arc::clone(&dns))),
            Box::new(dmarc::Dmarc::new(&c.dmarc, Arc::clone(&dns))),
            Box::new(arc::ArcCheck::new(
                &c.arc,
                &c.allow.arc_sealers,
                Arc::clone(&dns),
            )),
            Box::new(greylist::Greylist::new(&c.greylist, &c.thresholds, store)),
            // Before the rules, which may read their verdicts.
            Box::new(antivirus::Antivirus::new(&c.antivirus)),
            Box::new(uribl::Uribl::new(&c.uribl, &host, Arc::clone(&uribl))),
            Box::new(scanner::Scanner::new(&c.scanner)),
            Box::new(rules::RuleCheck::new(&c.message_rules)),
            Box::new(auth_results::AuthResults::new(c, &host)),
        ];
        checks.retain(|c| !c.off());
        Engine {
            cfg: c.clone(),
            hostname: host,
            dns,
            dnsbl,
            uribl,
            reputation,
            block: Lists::from_config(&c.block.senders, &c.block.clients, "checks.block"),
            lists_store,
            checks,
        }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.cfg.thresholds
    }

    /// Whether any check asks DNS (and so its nameservers are worth checking).
    pub fn uses_dns(&self) -> bool {
        let c = &self.cfg;
        [
            c.spf.mode,
            c.dkim.mode,
            c.dmarc.mode,
            c.arc.mode,
            c.iprev.mode,
        ]
        .iter()
        .any(|m| *m != Mode::Off)
            || (c.dnsbl.mode != Mode::Off && !self.dnsbl.zones.is_empty())
            || (c.uribl.mode != Mode::Off && !self.uribl.zones.is_empty())
    }
}

#[cfg(test)]
mod lookup_tests {
    use super::{Lookup, done};

    #[tokio::test]
    async fn an_answer_ready_at_once_needs_no_task_and_others_get_one() {
        let cached = Lookup::spawn(async { 7 });
        assert!(matches!(cached, Lookup::Ready(Some(_))));
        assert_eq!(cached.await, Some(7));
        let queried = Lookup::spawn(async {
            tokio::task::yield_now().await;
            8
        });
        assert!(matches!(queried, Lookup::Running(_)));
        assert_eq!(queried.await, Some(8));
    }

    /// A hook with nothing to do is boxed without an allocation: its
    /// future has no size (a boxed `std::future::ready(())` has one).
    #[tokio::test]
    async fn a_hook_with_nothing_to_do_allocates_nothing() {
        let hook = done();
        assert_eq!(std::mem::size_of_val(&*hook), 0);
        hook.await;
    }
}
