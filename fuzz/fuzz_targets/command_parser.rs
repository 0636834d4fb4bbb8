//! Arbitrary bytes as a command line: never panics; a parsed MAIL/RCPT
//! keeps its raw line exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::wire::command::{Command, parse};

fuzz_target!(|line: &[u8]| {
    if let Ok(cmd) = parse(line) {
        match cmd {
            Command::Mail(m) => assert_eq!(m.line, line),
            Command::Rcpt(r) => assert_eq!(r.line, line),
            _ => {}
        }
    }
});
