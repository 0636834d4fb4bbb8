//! Property tests of the milter codec: every packet either side can send
//! decodes to itself after encoding; arbitrary bytes never panic the
//! decoder; any split of the stream gives the same packets; and a length
//! over the limit is refused before the packet is buffered.

use portcullis::wire::milter::{Command, Decoder, Family, MilterError, Response};
use proptest::prelude::*;

/// Bytes without NUL (the protocol's strings end at one).
fn text() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(1u8..=255, 0..40)
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![
        Just(Family::Unknown),
        text().prop_map(|path| Family::Unix { path }),
        (any::<u16>(), text()).prop_map(|(port, address)| Family::Inet { port, address }),
        (any::<u16>(), text()).prop_map(|(port, address)| Family::Inet6 { port, address }),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    let args = || proptest::collection::vec(text(), 1..4);
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(version, actions, steps)| {
            Command::Negotiate {
                version,
                actions,
                steps,
            }
        }),
        (
            any::<u8>(),
            proptest::collection::vec((text(), text()), 0..4)
        )
            .prop_map(|(stage, pairs)| Command::Macros { stage, pairs }),
        (text(), family()).prop_map(|(hostname, family)| Command::Connect { hostname, family }),
        text().prop_map(Command::Helo),
        args().prop_map(Command::Mail),
        args().prop_map(Command::Rcpt),
        Just(Command::Data),
        (text(), text()).prop_map(|(name, value)| Command::Header { name, value }),
        Just(Command::EndOfHeaders),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Command::Body),
        proptest::collection::vec(any::<u8>(), 0..30).prop_map(Command::EndOfMessage),
        Just(Command::Abort),
        Just(Command::Quit),
        Just(Command::QuitNewConnection),
        text().prop_map(Command::Unknown),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec((any::<u32>(), text()), 0..8)
        )
            .prop_map(|(version, actions, steps, macros)| Response::Negotiate {
                version,
                actions,
                steps,
                macros: macros.into_iter().map(|(s, n)| (s, n.into())).collect(),
            }),
        Just(Response::Continue),
        Just(Response::Accept),
        Just(Response::Reject),
        Just(Response::Tempfail),
        Just(Response::Discard),
        Just(Response::Progress),
        text().prop_map(Response::ReplyCode),
        (text(), text()).prop_map(|(name, value)| Response::AddHeader { name, value }),
        (any::<u32>(), text(), text()).prop_map(|(index, name, value)| Response::InsertHeader {
            index,
            name,
            value
        }),
        (any::<u32>(), text(), text()).prop_map(|(index, name, value)| Response::ChangeHeader {
            index,
            name,
            value
        }),
        text().prop_map(Response::Quarantine),
        (any::<u32>(), text()).prop_map(|(stage, macros)| Response::SetMacros { stage, macros }),
    ]
}

/// Feeds `wire` cut at `cuts`, taking every command after each piece.
fn commands_split(wire: &[u8], cuts: &[usize]) -> Vec<Result<Command, MilterError>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort_unstable();
    let mut d = Decoder::new(1 << 16);
    let (mut got, mut pos) = (Vec::new(), 0);
    for p in points {
        d.feed(&wire[pos..p]);
        pos = p;
        loop {
            match d.command() {
                Ok(Some(c)) => got.push(Ok(c)),
                Ok(None) => break,
                Err(e) => {
                    got.push(Err(e));
                    return got;
                }
            }
        }
    }
    got
}

proptest! {
    #[test]
    fn commands_round_trip(cs in proptest::collection::vec(command(), 1..8),
                           cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
        let mut wire = Vec::new();
        for c in &cs {
            c.encode(&mut wire);
        }
        let got = commands_split(&wire, &cuts);
        let want: Vec<Result<Command, MilterError>> = cs.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn responses_round_trip(rs in proptest::collection::vec(response(), 1..8), cut in any::<usize>()) {
        let mut wire = Vec::new();
        for r in &rs {
            r.encode(&mut wire);
        }
        let cut = cut % (wire.len() + 1);
        let mut d = Decoder::new(1 << 16);
        let mut got = Vec::new();
        d.feed(&wire[..cut]);
        while let Some(r) = d.response().unwrap() {
            got.push(r);
        }
        d.feed(&wire[cut..]);
        while let Some(r) = d.response().unwrap() {
            got.push(r);
        }
        prop_assert_eq!(got, rs);
        prop_assert_eq!(d.pending(), 0);
    }

    /// Arbitrary bytes: no panic, and the split changes nothing.
    #[test]
    fn arbitrary_bytes_in_any_split(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                                    cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
        let whole = commands_split(&bytes, &[]);
        let split = commands_split(&bytes, &cuts);
        prop_assert_eq!(whole, split);
        let mut d = Decoder::new(1 << 16);
        d.feed(&bytes);
        while let Ok(Some(_)) = d.response() {}
    }

    /// A length over the limit is an error as soon as its 4 octets are in,
    /// whatever follows, and nothing of it is kept waiting.
    #[test]
    fn an_oversized_length_is_refused_at_once(len in 1001u32.., rest in proptest::collection::vec(any::<u8>(), 0..50)) {
        let mut d = Decoder::new(1000);
        d.feed(&len.to_be_bytes());
        d.feed(&rest);
        let refused = matches!(d.command(), Err(MilterError::TooLarge(..)));
        prop_assert!(refused);
    }
}
