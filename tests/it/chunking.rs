//! BDAT towards upstream (RFC 3030): when upstream offers CHUNKING the
//! message goes as one `BDAT <size> LAST` chunk, byte for byte what DATA
//! would have delivered; upstream's refusals and failures reach the
//! client as with DATA, and nothing is lost or delivered twice.

use crate::common;

use common::config::test_config;
use common::{Client, FakeMta, Gate, Script, message, verbs};

/// Dots, 8-bit text, a forged Authentication-Results field of ours (to be
/// removed: the message then goes in several parts) and no final CRLF.
fn awkward() -> Vec<u8> {
    let long = "x".repeat(998);
    format!(
        "Authentication-Results: gate.test; spf=pass smtp.mailfrom=a@sender.test\r\n\
         From: a@sender.test\r\nTo: b@example.test\r\nSubject: dots\r\n\r\n\
         .leading dot\r\n..two dots\r\n.\r\nmid . dot\r\n{long}\r\nnaïve café\r\nlast"
    )
    .into_bytes()
}

/// The BDAT commands upstream received, with their sizes.
fn bdat_sizes(mta: &FakeMta) -> Vec<usize> {
    mta.commands()
        .iter()
        .filter_map(|c| c.strip_prefix("BDAT "))
        .map(|rest| {
            assert!(rest.ends_with(" LAST"), "one chunk, the last: {rest}");
            rest.trim_end_matches(" LAST").parse().unwrap()
        })
        .collect()
}

#[tokio::test]
async fn the_message_goes_as_one_chunk_byte_for_byte() {
    let mta = FakeMta::start(Script::default().with_chunking()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let sent = awkward();
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &sent)
        .await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as FAKE"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(mta.count("DATA"), 0, "{:?}", mta.commands());
    assert_eq!(bdat_sizes(&mta), vec![stored[0].data.len()]);
    let (ours, theirs) = common::split_ours(&stored[0].data);
    assert!(
        ours.starts_with("Authentication-Results: gate.test; none\r\n"),
        "{ours}"
    );
    // Our forged field is gone, the rest arrives as sent (dots unstuffed by
    // nobody: BDAT carries them as they are), with the final CRLF that DATA
    // would have added.
    let forged_end = sent.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    let mut expected = sent[forged_end..].to_vec();
    expected.extend_from_slice(b"\r\n");
    assert_eq!(
        String::from_utf8_lossy(&theirs),
        String::from_utf8_lossy(&expected)
    );

    // The same message by DATA (the config turns BDAT off) arrives the same.
    let dot = FakeMta::start(Script::default().with_chunking()).await;
    let mut cfg = test_config(dot.addr);
    cfg.upstream.chunking = false;
    let gate = Gate::start_config(cfg).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail("a@sender.test", &["b@example.test"], &sent)
        .await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(dot.count("BDAT"), 0);
    assert_eq!(dot.count("DATA"), 1);
    assert_eq!(dot.stored()[0].data, stored[0].data);
}

#[tokio::test]
async fn a_message_larger_than_one_write_and_several_in_a_session() {
    let mta = FakeMta::start(Script::default().with_chunking()).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    // 300 KB of lines, some starting with a dot: several writes of the chunk.
    let body: String = (0..3000)
        .map(|i| format!(".{i:05} {}\r\n", "y".repeat(90)))
        .collect();
    let big = message("big", &body);
    for i in 0..3 {
        let r = c
            .send_mail("a@sender.test", &["b@example.test"], &big)
            .await;
        assert!(r.starts_with("250"), "message {i}: {r}");
    }
    c.cmd("QUIT", "221").await;
    let stored = mta.stored();
    assert_eq!(stored.len(), 3);
    assert_eq!(
        bdat_sizes(&mta),
        stored.iter().map(|s| s.data.len()).collect::<Vec<_>>()
    );
    for s in &stored {
        let (_, theirs) = common::split_ours(&s.data);
        assert_eq!(theirs, big);
    }
}

#[tokio::test]
async fn a_refused_chunk_is_relayed_and_the_next_transaction_starts_clean() {
    // Upstream refuses the first message after its chunk (as Postfix does
    // for content its cleanup rejects), then takes the next.
    let mut script = Script::default()
        .with_chunking()
        .reply("dot", "554 5.7.1 Message content rejected");
    script.faults = Some(1);
    let mta = FakeMta::start(script).await;
    let gate = Gate::start(mta.addr).await;
    let mut c = Client::hello(gate.addr).await;
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            &message("one", "x\r\n"),
        )
        .await;
    assert!(r.starts_with("554 5.7.1 Message content rejected"), "{r}");
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@example.test"],
            &message("two", "y\r\n"),
        )
        .await;
    assert!(r.starts_with("250"), "{r}");
    let stored = mta.stored();
    assert_eq!(stored.len(), 1);
    assert!(
        String::from_utf8_lossy(&stored[0].data).contains("<two@sender.test>"),
        "the second message"
    );
    // RFC 3030 leaves the refused transaction failed but not ended: RSET
    // ends it before the next MAIL.
    let mut transaction = verbs(&mta.commands());
    transaction.retain(|v| ["MAIL", "RCPT", "BDAT", "RSET"].contains(&v.as_str()));
    assert_eq!(
        transaction,
        ["MAIL", "RCPT", "BDAT", "RSET", "MAIL", "RCPT", "BDAT"]
    );
}

#[tokio::test]
async fn upstream_lost_during_or_after_the_chunk_is_a_4xx_and_nothing_is_lost() {
    for stage in ["body", "dot"] {
        let mut script = Script::default().with_chunking().drop_at(stage);
        script.faults = Some(1);
        let mta = FakeMta::start(script).await;
        let gate = Gate::start(mta.addr).await;
        let mut c = Client::hello(gate.addr).await;
        let big = message("lost", &format!("{}\r\n", "z".repeat(500)).repeat(400));
        let r = c
            .send_mail("a@sender.test", &["b@example.test"], &big)
            .await;
        assert!(r.starts_with("451"), "{stage}: {r}");
        assert!(mta.stored().is_empty(), "{stage}");
        // The client retries, as a 4xx tells it to: delivered once.
        let mut c = Client::hello(gate.addr).await;
        let r = c
            .send_mail("a@sender.test", &["b@example.test"], &big)
            .await;
        assert!(r.starts_with("250"), "{stage}: {r}");
        assert_eq!(mta.stored().len(), 1, "{stage}");
    }
}
