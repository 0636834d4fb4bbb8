//! MAIL: the sender, the checks at MAIL, and the transaction it opens.

use super::*;

impl Session {
    pub(super) async fn mail(&mut self, m: MailCmd) -> Next {
        self.reached_mail = true;
        if self.helo.is_none() {
            return self.error(reply::NEED_HELO);
        }
        if self.txn.is_some() {
            return self.error(reply::NESTED_MAIL);
        }
        if let Some(p) = self.offer.unsupported_mail_param(&m) {
            return self
                .error(reply::PARAM_UNSUPPORTED.with_text(format!("Unsupported parameter {p}")));
        }
        let started = Instant::now();
        let verdict = match self.screen.mail(&m.address, m.size).await {
            Screened::Refused { reply, reason } => {
                // A limit, before the checks ran: no score of its own.
                self.log_mail_refused(&m, started, 0.0, &reply, &reason, "");
                self.reply(&reply);
                return Next::Continue;
            }
            Screened::Verdict(v) => v,
        };
        let score = verdict.score;
        let phase = TxnPhase::after_mail(verdict.decision, verdict.reason);
        if let TxnPhase::Doomed { .. } = phase {
            // Delayed reject: accept MAIL here (upstream never hears of it) and
            // refuse every RCPT, so the log line names sender and recipients.
            self.txn = Some(Box::new(Ledger::new(m.address, started, score, phase)));
            self.reply(&reply::MAIL_OK);
            return Next::Continue;
        }
        match self.relay_mail(&m.line).await {
            MailUp::Replied(r) => {
                self.relay(&r);
                if r.is_positive() {
                    self.txn = Some(Box::new(Ledger::new(
                        m.address,
                        started,
                        score,
                        TxnPhase::Open,
                    )));
                } else {
                    self.log_mail_refused(&m, started, score, &r, "upstream", &r.text());
                }
            }
            MailUp::Unavailable(Unavailable::Down) => {
                let r = reply::UPSTREAM_UNAVAILABLE;
                self.log_mail_refused(&m, started, score, &r, "upstream:unavailable", "");
                self.reply(&r);
            }
            MailUp::Unavailable(Unavailable::Refused(r)) => {
                self.log_mail_refused(&m, started, score, &r, "upstream:helo", &r.text());
                self.relay(&r);
            }
            MailUp::Lost(e) => {
                self.upstream_failed(&e);
                self.log_mail_refused(
                    &m,
                    started,
                    score,
                    &reply::UPSTREAM_LOST,
                    "upstream:lost",
                    &e.to_string(),
                );
                self.reply(&reply::UPSTREAM_LOST);
            }
        }
        Next::Continue
    }

    /// MAIL to upstream, on the session's connection or a new one. A pooled
    /// connection that failed at MAIL (its health check, RSET, goes in the
    /// same write) is the pool's trouble, not the client's: MAIL is tried
    /// once more on a fresh connection before answering, never on another
    /// pooled one (when upstream drops every connection after a message,
    /// the pool may hold several dead ones).
    async fn relay_mail(&mut self, line: &[u8]) -> MailUp {
        for attempt in 0..2 {
            if let Err(u) = self.ensure_upstream(attempt == 0).await {
                return MailUp::Unavailable(u);
            }
            let Some(up) = self.upstream.as_mut() else {
                return MailUp::Unavailable(Unavailable::Down);
            };
            let reused = up.reused;
            match up.mail(line).await {
                Ok(r) => return MailUp::Replied(r),
                Err(e) if reused && attempt == 0 => {
                    tracing::debug!(session = %self.peer.id, error = %e, "pooled upstream connection failed at MAIL; retrying on a fresh one");
                    self.drop_upstream();
                }
                Err(e) => return MailUp::Lost(e),
            }
        }
        MailUp::Unavailable(Unavailable::Down)
    }
}

/// How relaying a MAIL went.
enum MailUp {
    Replied(UpstreamReply),
    Unavailable(Unavailable),
    Lost(UpstreamError),
}
