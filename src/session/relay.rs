//! The upstream connection of a session: opened at the first MAIL,
//! upstream's replies relayed, failures counted.

use super::*;

impl Session {
    /// Opens the upstream connection if needed (lazily, at the first MAIL),
    /// or reopens it when the client changed its HELO name; from the pool
    /// when `pooled`.
    pub(super) async fn ensure_upstream(&mut self, pooled: bool) -> Result<(), Unavailable> {
        if self
            .upstream
            .as_ref()
            .is_some_and(|u| u.client_helo == self.helo)
        {
            return Ok(());
        }
        if let Some(old) = self.upstream.take() {
            self.shared.upstream.release(old);
        }
        let (name, reverse_name) = self.screen.client_names().await;
        let who = ClientIdentity {
            addr: self.peer.addr,
            local: self.peer.local,
            helo: self.helo.clone(),
            name,
            reverse_name,
            esmtp: self.esmtp,
        };
        match self.shared.upstream.open(&who, pooled).await {
            Ok(mut conn) => {
                conn.client_helo = self.helo.clone();
                self.upstream = Some(conn);
                Ok(())
            }
            // Upstream is up; it refused the client's HELO name: the
            // client's problem to hear about, not an upstream outage.
            Err(OpenError::Upstream(UpstreamError::Refused {
                stage: UpStage::ClientHelo,
                reply,
            })) => {
                tracing::debug!(session = %self.peer.id, reply = %reply.text(), "upstream refused the client's HELO");
                Err(Unavailable::Refused(reply))
            }
            Err(e) => {
                let stage = match &e {
                    OpenError::Upstream(u) => u.stage().as_str(),
                    OpenError::Probe(_) => "probe",
                };
                events::UpstreamFailed {
                    session: &self.peer.id,
                    stage,
                    error: &e,
                    unavailable: true,
                }
                .emit();
                Err(Unavailable::Down)
            }
        }
    }

    /// Relays upstream's reply as it is, except that a 421 (upstream closing)
    /// becomes 451: it is upstream that goes away, not this session.
    pub(super) fn relay(&mut self, r: &UpstreamReply) {
        if r.code == 421 {
            self.drop_upstream();
            for line in r.raw.split_inclusive(|&b| b == b'\n') {
                self.conn.queue_raw(b"451");
                self.conn.queue_raw(line.get(3..).unwrap_or_default());
            }
        } else {
            self.conn.queue_raw(&r.raw);
        }
    }

    pub(super) fn upstream_failed(&mut self, e: &UpstreamError) {
        events::UpstreamFailed {
            session: &self.peer.id,
            stage: e.stage().as_str(),
            error: e,
            unavailable: false,
        }
        .emit();
        self.drop_upstream();
    }

    /// Closes the upstream connection at once, without QUIT (and so without
    /// ending any DATA in progress there). A transaction in flight can no
    /// longer complete.
    pub(super) fn drop_upstream(&mut self) {
        self.upstream = None;
        if let Some(t) = self.txn.as_mut()
            && matches!(t.phase, TxnPhase::Open)
        {
            t.phase = TxnPhase::Broken;
        }
    }
}
