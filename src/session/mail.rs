//! MAIL: the sender, the checks at MAIL, and the transaction it opens.

use super::*;

impl Session {
    /// What the rules can see of this session and its transaction now.
    pub(super) fn facts(&self) -> Facts<'_> {
        Facts {
            ip: Some(self.peer.addr.ip()),
            reverse: self.conn_checks.reverse(),
            helo: self.helo.as_deref(),
            mail_from: self.txn.as_ref().map(|t| t.mail.address.as_str()),
            rcpt_count: self.txn.as_ref().map_or(0, |t| t.rcpts),
            tls: self.tls.is_some(),
            ..Facts::default()
        }
    }

    pub(super) fn envelope(&self) -> Envelope<'_> {
        Envelope {
            client: self.peer.addr,
            helo: self.helo.as_deref(),
            mail_from: self.txn.as_ref().map(|t| t.mail.address.as_str()),
            declared_size: self.txn.as_ref().and_then(|t| t.mail.size),
            rcpts: self.txn.as_ref().map_or(0, |t| t.rcpts),
            message: None,
        }
    }

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
        let outcome = {
            let mut env = self.envelope();
            env.mail_from = Some(&m.address);
            env.declared_size = m.size;
            self.rt.checks.run(Stage::Mail, &env).await
        };
        if let Outcome::Refuse { reply, reason } = outcome {
            // Refused before the checks ran: no score of its own.
            self.log_mail_refused(&m, started, 0.0, &reply, reason, "");
            self.reply(&reply);
            return Next::Continue;
        }
        let checker = Arc::clone(&self.checker);
        let helo = self.helo.clone().unwrap_or_default();
        let rules = Arc::clone(&self.rules);
        let (checks, verdict) = checker
            .at_mail(
                &mut self.conn_checks,
                &rules,
                self.tls.is_some(),
                &helo,
                &m.address,
            )
            .await;
        let score = verdict.score;
        if let Decision::Reject(reply) | Decision::Tempfail(reply) = verdict.decision {
            // Delayed reject: accept MAIL here (upstream never hears of it) and
            // refuse every RCPT, so the log line names sender and recipients.
            let phase = TxnPhase::Doomed {
                reply,
                reason: verdict.reason,
            };
            self.txn = Some(Txn::new(m, started, checks, score, phase));
            self.reply(&reply::MAIL_OK);
            return Next::Continue;
        }
        match self.ensure_upstream().await {
            Ok(()) => {}
            Err(Unavailable::Down) => {
                let r = reply::UPSTREAM_UNAVAILABLE;
                self.log_mail_refused(&m, started, score, &r, "upstream:unavailable", "");
                self.reply(&r);
                return Next::Continue;
            }
            Err(Unavailable::Refused(r)) => {
                self.log_mail_refused(&m, started, score, &r, "upstream:helo", &r.text());
                self.relay(&r);
                return Next::Continue;
            }
        }
        let Some(up) = self.upstream.as_mut() else {
            return Next::Continue;
        };
        match up.mail(&m.line).await {
            Ok(r) => {
                self.relay(&r);
                if r.is_positive() {
                    self.txn = Some(Txn::new(m, started, checks, score, TxnPhase::Open));
                } else {
                    self.log_mail_refused(&m, started, score, &r, "upstream", &r.text());
                }
            }
            Err(e) => {
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
}
