//! Property tests: the command parser and the DATA reader on arbitrary
//! bytes with arbitrary read splits.

use portcullis::wire::command::{Command, parse};
use portcullis::wire::data::{DataReader, write_stuffed};
use proptest::prelude::*;

/// The simplest strict reader: lines end at CRLF only; the first line that
/// is exactly "." ends the message. Returns (end offset, unstuffed content).
fn reference(input: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut pos = 0;
    let mut out = Vec::new();
    while let Some(i) = input[pos..].windows(2).position(|w| w == b"\r\n") {
        let line = &input[pos..pos + i];
        pos += i + 2;
        if line == b"." {
            return Some((pos, out));
        }
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        out.extend_from_slice(b"\r\n");
    }
    None
}

/// Feeds `input` in pieces cut at `cuts`; returns every message found, in
/// the way the session does (after an end, the rest starts a new message).
fn read_split(input: &[u8], cuts: &[usize]) -> Vec<(usize, Vec<u8>)> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut found = Vec::new();
    let mut r = DataReader::new(u64::MAX, usize::MAX);
    let mut out = Vec::new();
    let mut start_of_msg = 0;
    let mut pos = 0;
    for p in points {
        while pos < p {
            let prog = r.feed(&input[pos..p], &mut out);
            pos += prog.consumed;
            if prog.done {
                found.push((pos - start_of_msg, std::mem::take(&mut out)));
                start_of_msg = pos;
                r = DataReader::new(u64::MAX, usize::MAX);
            }
        }
    }
    found
}

fn smtpish() -> impl Strategy<Value = Vec<u8>> {
    // Bytes biased towards the ones that matter for framing.
    prop::collection::vec(
        prop_oneof![
            4 => Just(b'\r'),
            4 => Just(b'\n'),
            4 => Just(b'.'),
            1 => Just(0u8),
            6 => any::<u8>(),
        ],
        0..300,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn command_parser_never_panics_and_keeps_raw_lines(line in prop::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(cmd) = parse(&line) {
            match cmd {
                Command::Mail(m) => prop_assert_eq!(m.line, line),
                Command::Rcpt(r) => prop_assert_eq!(r.line, line),
                _ => {}
            }
        }
    }

    #[test]
    fn command_parser_on_mail_like_lines(
        verb in prop_oneof![Just("MAIL FROM:"), Just("RCPT TO:"), Just("mail from:"), Just("EHLO "), Just("HELO ")],
        rest in "[ -~]{0,80}",
    ) {
        let line = format!("{verb}{rest}");
        let _ = parse(line.as_bytes());
    }

    #[test]
    fn reader_agrees_with_the_strict_reference_for_any_split(
        input in smtpish(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let found = read_split(&input, &cuts);
        let whole = read_split(&input, &[]);
        // Splits never change anything.
        prop_assert_eq!(&found, &whole);
        // Never an end where the strict reader sees none, never a different one.
        match reference(&input) {
            None => prop_assert!(found.is_empty()),
            Some((end, content)) => {
                prop_assert!(!found.is_empty());
                prop_assert_eq!(found[0].0, end);
                let mut r = DataReader::new(u64::MAX, usize::MAX);
                let mut out = Vec::new();
                r.feed(&input, &mut out);
                if !r.anomalies.bare_newline() {
                    prop_assert_eq!(&found[0].1, &content);
                }
            }
        }
    }

    #[test]
    fn stuffing_round_trips(lines in prop::collection::vec(prop::collection::vec(any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'), 0..40), 0..30)) {
        let mut content = Vec::new();
        for l in &lines {
            content.extend_from_slice(l);
            content.extend_from_slice(b"\r\n");
        }
        let mut wire = Vec::new();
        write_stuffed(&content, |s| wire.extend_from_slice(s));
        let found = read_split(&wire, &[]);
        prop_assert_eq!(found.len(), 1, "exactly one message");
        prop_assert_eq!(found[0].0, wire.len());
        prop_assert_eq!(&found[0].1, &content);
    }
}
