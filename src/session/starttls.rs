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
        // Anything pipelined after STARTTLS was sent in clear text: discard it
        // unanswered (CVE-2011-0411 class).
        self.rbuf.clear();
        self.rpos = 0;
        let io = std::mem::replace(
            &mut self.io,
            Box::new(tokio::io::join(tokio::io::empty(), tokio::io::sink())),
        );
        let limit = self.cfg().timeouts.command.0;
        match tokio::time::timeout(limit, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                let (_, conn) = tls.get_ref();
                self.tls = Some(TlsInfo {
                    version: conn
                        .protocol_version()
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string(),
                    cipher: conn
                        .negotiated_cipher_suite()
                        .and_then(|c| c.suite().as_str())
                        .unwrap_or("")
                        .to_string(),
                });
                self.io = Box::new(tls);
                self.end_transaction("starttls", UpReset::Close).await;
                self.helo = None;
                self.esmtp = false;
                Next::Continue
            }
            _ => Next::Close,
        }
    }
}
