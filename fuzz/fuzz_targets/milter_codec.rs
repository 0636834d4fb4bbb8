//! Arbitrary bytes into the milter decoder, split at an arbitrary point:
//! never panics, the split changes nothing, and every packet it yields
//! encodes back to bytes that decode to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::wire::milter::{Command, Decoder, Response};

fn commands(parts: &[&[u8]]) -> (Vec<Command>, bool) {
    let mut d = Decoder::new(1 << 16);
    let mut got = Vec::new();
    for p in parts {
        d.feed(p);
        loop {
            match d.command() {
                Ok(Some(c)) => got.push(c),
                Ok(None) => break,
                Err(_) => return (got, true),
            }
        }
    }
    (got, false)
}

fuzz_target!(|input: (u16, &[u8])| {
    let (cut, bytes) = input;
    let cut = cut as usize % (bytes.len() + 1);
    let whole = commands(&[bytes]);
    let split = commands(&[&bytes[..cut], &bytes[cut..]]);
    assert_eq!(whole, split);
    for c in &whole.0 {
        let mut wire = Vec::new();
        c.encode(&mut wire);
        let (again, failed) = commands(&[&wire]);
        assert!(!failed);
        assert_eq!(again.as_slice(), std::slice::from_ref(c));
    }
    let mut d = Decoder::new(1 << 16);
    d.feed(bytes);
    while let Ok(Some(r)) = d.response() {
        let mut wire = Vec::new();
        r.encode(&mut wire);
        let mut e = Decoder::new(1 << 16);
        e.feed(&wire);
        assert_eq!(e.response(), Ok(Some::<Response>(r)));
    }
});
