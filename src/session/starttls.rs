//! STARTTLS: the TLS handshake and the session reset it implies.

use super::*;

impl Session {
    pub(super) async fn starttls(&mut self) -> Next {
        let Some(acceptor) = self.rt.tls.clone() else {
            return self.error(reply::NOT_IMPLEMENTED);
        };
        if self.tls.is_some() {
            return self.error(reply::TLS_ALREADY);
        }
        self.reply(&reply::READY_TLS);
        if self.flush().await != Flushed::Done {
            return Next::Close;
        }
        // Anything pipelined after STARTTLS was sent in clear text: it is
        // discarded unanswered (CVE-2011-0411 class).
        let limit = self.cfg().timeouts.command.0;
        match self.conn.upgrade(acceptor, limit).await {
            Some(info) => {
                self.tls = Some(Box::new(info));
                self.screen.tls(true);
                self.end_transaction("starttls", UpReset::Close).await;
                self.helo = None;
                self.screen.helo("");
                self.esmtp = false;
                Next::Continue
            }
            None => Next::Close,
        }
    }
}
