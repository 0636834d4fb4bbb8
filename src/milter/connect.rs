//! CONNECT and HELO: admission and the connect checks, then the name the
//! client gave and its TLS.

use super::conversation::{Client, Conversation, State};
use super::txn::reply_code;
use crate::checks::Screen;
use crate::gate::{Door, refused_connection};
use crate::wire::milter::{Family, Response};
use std::net::IpAddr;
use std::sync::Arc;

impl Conversation {
    /// A new SMTP session: `Screening`, or `Settled` for a local
    /// submission (accepted unchecked) or a client refused at connect.
    /// The answer is for CONNECT; `Settled` keeps it for MAIL too.
    pub(super) async fn connect(&mut self, family: Family) -> Response {
        self.end_session("quit");
        let ip = match &family {
            Family::Inet { address, .. } | Family::Inet6 { address, .. } => {
                let a = String::from_utf8_lossy(address);
                a.trim_start_matches("IPv6:").parse::<IpAddr>().ok()
            }
            Family::Unix { .. } | Family::Unknown => None,
        };
        let Some(ip) = ip else {
            // A local submission (sendmail(1), non_smtpd_milters): no client
            // to check.
            self.state = State::Settled(Response::Accept);
            return Response::Accept;
        };
        let rt = self.shared.snapshot();
        let screen = Screen::new(Arc::clone(&rt.engine), Arc::clone(&rt.rules), ip, false);
        let mut client = Client {
            id: crate::telemetry::session_id(),
            rt,
            screen,
            ip,
            helo: String::new(),
            tls: None,
            txn: None,
            mail_refused: None,
        };
        let refused = match client.screen.admit().await {
            Some(r) => Some(r),
            None => client.screen.refuse_at_connect().await,
        };
        match refused {
            Some((r, reason)) => {
                refused_connection(Door::Milter, &client.id, ip, &r, &reason);
                let answer = reply_code(&r);
                self.state = State::Settled(answer.clone());
                answer
            }
            None => {
                self.state = State::Screening(Box::new(client));
                Response::Continue
            }
        }
    }

    pub(super) fn helo(&mut self, name: &[u8]) {
        let tls = self
            .macro_value("{tls_version}")
            .map(|v| (v, self.macro_value("{cipher}").unwrap_or_default()));
        let Some(c) = self.screening() else {
            return;
        };
        c.helo = String::from_utf8_lossy(name).into_owned();
        c.screen.helo(&c.helo);
        c.screen.tls(tls.is_some());
        c.tls = tls;
    }
}
