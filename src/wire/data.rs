//! The DATA reader: strict end-of-data (`CRLF.CRLF` only), dot-unstuffing,
//! size limit, and flags for bare CR/LF, NUL and overlong lines. Output is the
//! message with canonical CRLF line ends; `write_stuffed` frames it again for
//! upstream, so no client byte sequence can end a message early there.

/// What the reader noticed about the message's framing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Anomalies {
    pub bare_lf: bool,
    pub bare_cr: bool,
    pub nul: bool,
    pub long_line: bool,
}

impl Anomalies {
    pub fn bare_newline(&self) -> bool {
        self.bare_lf || self.bare_cr
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    LineStart,
    LineStartDot,
    LineStartDotCr,
    InLine,
    InLineCr,
}

/// Incremental DATA reader. Feed it whatever the socket returns.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    /// Content bytes produced so far (counted even when not stored).
    size: u64,
    limit: u64,
    max_line: usize,
    line_len: usize,
    storing: bool,
    pub anomalies: Anomalies,
}

/// Result of one `feed`: how much input was used and whether the end was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub consumed: usize,
    pub done: bool,
}

impl DataReader {
    /// `limit`: content bytes kept at most; `max_line`: longest text line
    /// (without CRLF) before `long_line` is flagged.
    pub fn new(limit: u64, max_line: usize) -> DataReader {
        DataReader {
            state: State::LineStart,
            size: 0,
            limit,
            max_line,
            line_len: 0,
            storing: true,
            anomalies: Anomalies::default(),
        }
    }

    /// Content size in bytes, counting what was discarded.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True when the message grew beyond `limit`.
    pub fn oversized(&self) -> bool {
        self.size > self.limit
    }

    /// Keep reading to the end but store nothing more (size or memory refusal).
    pub fn stop_storing(&mut self) {
        self.storing = false;
    }

    pub fn is_storing(&self) -> bool {
        self.storing
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.size > self.limit {
            self.storing = false;
        }
        if self.storing {
            out.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        self.emit(out, b"\r\n");
        self.line_len = 0;
    }

    fn text(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.line_len += bytes.len();
        if self.line_len > self.max_line {
            self.anomalies.long_line = true;
        }
        self.emit(out, bytes);
    }

    /// Consumes bytes of `input` up to and including the end-of-data line,
    /// appending unstuffed content to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let p = self.scan(input, out);
        // Only bytes of this message count: a NUL in pipelined commands after
        // the terminator is not the message's (found by the fuzzer).
        if memchr::memchr(0, &input[..p.consumed]).is_some() {
            self.anomalies.nul = true;
        }
        p
    }

    fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::InLine => {
                    // Fast path: copy the run of ordinary bytes in one go.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    if run > 0 {
                        self.text(out, &input[i..i + run]);
                        i += run;
                        continue;
                    }
                    i += 1;
                    if b == b'\r' {
                        self.state = State::InLineCr;
                    } else {
                        // Bare LF: a line break in the content, never a line
                        // start for end-of-data purposes.
                        self.anomalies.bare_lf = true;
                        self.end_line(out);
                    }
                }
                State::InLineCr => {
                    if b == b'\n' {
                        i += 1;
                        self.end_line(out);
                        self.state = State::LineStart;
                    } else {
                        // Bare CR: likewise a break, not a line start.
                        self.anomalies.bare_cr = true;
                        self.end_line(out);
                        self.state = State::InLine;
                    }
                }
                State::LineStart => {
                    if b == b'.' {
                        i += 1;
                        self.state = State::LineStartDot;
                    } else {
                        self.state = State::InLine;
                    }
                }
                State::LineStartDot => {
                    if b == b'\r' {
                        i += 1;
                        self.state = State::LineStartDotCr;
                    } else {
                        // The leading dot was stuffing: drop it.
                        self.state = State::InLine;
                    }
                }
                State::LineStartDotCr => {
                    if b == b'\n' {
                        return Progress {
                            consumed: i + 1,
                            done: true,
                        };
                    }
                    // ".\r" then something else: the dot was stuffing, the CR is bare.
                    self.state = State::InLineCr;
                }
            }
        }
        Progress {
            consumed: input.len(),
            done: false,
        }
    }
}

/// Frames canonical message content for the wire: dot-stuffs every line that
/// starts with `.` and appends the `.CRLF` terminator. `sink` gets slices in
/// order, so large runs are passed through without copying.
pub fn write_stuffed<'a>(content: &'a [u8], mut sink: impl FnMut(&'a [u8])) {
    stuff_lines(content, &mut sink);
    sink(b".\r\n");
}

/// Dot-stuffs whole lines (`content` starts at a line start) without the
/// terminator; a missing final CRLF is added.
pub fn stuff_lines<'a>(content: &'a [u8], mut sink: impl FnMut(&'a [u8])) {
    for piece in Stuffed::new(content) {
        sink(piece);
    }
}

/// The pieces of `content` framed for the wire, produced lazily: runs of
/// the content between dot lines, the stuffing dots, and a final CRLF when
/// the content lacks one. Nothing is collected, so a message of dot lines
/// costs no more to relay than any other.
pub struct Stuffed<'a> {
    content: &'a [u8],
    pos: usize,
    /// A stuffing dot is due before the next run.
    dot: bool,
    /// The content's end has been passed on.
    ended: bool,
    /// The final CRLF has been passed on (or was not needed).
    closed: bool,
}

static LINE_DOT: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n."));

impl<'a> Stuffed<'a> {
    pub fn new(content: &'a [u8]) -> Stuffed<'a> {
        Stuffed {
            content,
            pos: 0,
            dot: content.first() == Some(&b'.'),
            ended: false,
            closed: content.is_empty() || content.ends_with(b"\r\n"),
        }
    }
}

impl<'a> Iterator for Stuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.dot {
            self.dot = false;
            return Some(b".");
        }
        if !self.ended {
            let rest = &self.content[self.pos..];
            if let Some(hit) = LINE_DOT.find(rest) {
                self.pos += hit + 2;
                self.dot = true;
                return Some(&rest[..hit + 2]);
            }
            self.ended = true;
            self.pos = self.content.len();
            if !rest.is_empty() {
                return Some(rest);
            }
        }
        if !self.closed {
            self.closed = true;
            return Some(b"\r\n");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> (Vec<u8>, Progress, Anomalies) {
        let mut r = DataReader::new(1 << 20, 998);
        let mut out = Vec::new();
        let p = r.feed(input, &mut out);
        (out, p, r.anomalies)
    }

    fn stuffed(content: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_stuffed(content, |s| v.extend_from_slice(s));
        v
    }

    #[test]
    fn strict_end_and_unstuffing() {
        let (out, p, a) = read_all(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n");
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(
            p,
            Progress {
                consumed: 24,
                done: true
            }
        );
        assert_eq!(a, Anomalies::default());
    }

    #[test]
    fn empty_message_and_leading_dot() {
        let (out, p, _) = read_all(b".\r\n");
        assert!(out.is_empty() && p.done);
        let (out, p, _) = read_all(b"..a\r\n.\r\n");
        assert_eq!(out, b".a\r\n");
        assert!(p.done);
    }

    #[test]
    fn look_alikes_do_not_end_data() {
        for seq in [
            &b"a\n.\nb"[..],
            b"a\n.\rb",
            b"a\r.\nb",
            b"a\r.\rb",
            b"a\n.\r\nb",
            b"a\r.\r\nb",
            b"a\r\n.\rb",
            b"a\r\n\x00.\r\nb",
            b"a\r\n.\r\r\nb",
        ] {
            let (_, p, a) = read_all(seq);
            assert!(!p.done, "{seq:?} ended DATA");
            assert!(a.bare_newline() || a.nul, "{seq:?} not flagged");
        }
    }

    #[test]
    fn split_anywhere_gives_the_same_result() {
        let input = b"From: a\r\n\r\n..x\r\nline\n.\r\nbare\r.\r\n.\r\nNEXT";
        let (whole, p, a) = read_all(input);
        for cut in 0..input.len() {
            let mut r = DataReader::new(1 << 20, 998);
            let mut out = Vec::new();
            let p1 = r.feed(&input[..cut], &mut out);
            let p2 = if p1.done {
                p1
            } else {
                let q = r.feed(&input[cut..], &mut out);
                Progress {
                    consumed: cut + q.consumed,
                    done: q.done,
                }
            };
            assert_eq!(out, whole, "cut at {cut}");
            assert_eq!(p2, p);
            assert_eq!(r.anomalies, a);
        }
    }

    #[test]
    fn nul_after_the_end_is_not_the_messages() {
        // Reduced from a cargo-fuzz crash: a NUL in what follows the dot.
        let (_, p, a) = read_all(b"x\r\n.\r\nNOOP\x00\r\n");
        assert!(p.done);
        assert!(!a.nul);
        let (_, _, a) = read_all(b"x\x00\r\n.\r\n");
        assert!(a.nul);
    }

    #[test]
    fn size_limit_keeps_reading_to_the_end() {
        let mut r = DataReader::new(10, 998);
        let mut out = Vec::new();
        let p = r.feed(b"0123456789abcdef\r\n.\r\n", &mut out);
        assert!(p.done && r.oversized());
        assert!(out.len() <= 10);
    }

    #[test]
    fn long_lines_flagged() {
        let mut line = vec![b'x'; 999];
        line.extend_from_slice(b"\r\n.\r\n");
        let (_, p, a) = read_all(&line);
        assert!(p.done && a.long_line);
        let (_, _, a) = read_all(&line[1..]);
        assert!(!a.long_line);
    }

    #[test]
    fn stuffing_round_trips() {
        for content in [
            &b""[..],
            b".\r\n",
            b"a\r\n.\r\n..\r\nb\r\n",
            b".lead\r\nmid\r\n.end\r\n",
        ] {
            let wire = stuffed(content);
            let (back, p, _) = read_all(&wire);
            assert!(p.done);
            assert_eq!(p.consumed, wire.len());
            assert_eq!(back, content);
        }
        assert_eq!(stuffed(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
    }
}
