//! Arbitrary bytes, split at an arbitrary point, into the DATA reader: never
//! panics, the split changes nothing, and what it yields round-trips through
//! the dot-stuffing writer to the same content with a single end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::wire::data::{DataReader, write_stuffed};

fuzz_target!(|input: (u16, &[u8])| {
    let (cut, bytes) = input;
    let cut = cut as usize % (bytes.len() + 1);
    let mut whole = Vec::new();
    let mut r = DataReader::new(u64::MAX, 998);
    let p = r.feed(bytes, &mut whole);

    let mut split = Vec::new();
    let mut r2 = DataReader::new(u64::MAX, 998);
    let p1 = r2.feed(&bytes[..cut], &mut split);
    let consumed = if p1.done {
        p1.consumed
    } else {
        cut + r2.feed(&bytes[cut..], &mut split).consumed
    };
    assert_eq!(split, whole);
    assert_eq!(consumed, p.consumed);
    assert_eq!(r.anomalies, r2.anomalies);

    if p.done {
        let mut wire = Vec::new();
        write_stuffed(&whole, |s| wire.extend_from_slice(s));
        let mut back = Vec::new();
        let mut r3 = DataReader::new(u64::MAX, usize::MAX);
        let q = r3.feed(&wire, &mut back);
        assert!(q.done && q.consumed == wire.len(), "one message, ending exactly at its end");
        assert_eq!(back, whole);
        assert!(!r3.anomalies.bare_newline());
    }
});
