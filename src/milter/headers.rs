//! The message as the checks read it, rebuilt from the pieces the MTA
//! sends (header fields one by one, then body chunks), and our header
//! edits in the MTA's terms (fields to insert, fields to delete by name
//! and occurrence).

/// What a message kept starts with: room for a usual header block at
/// once, not a dozen reallocations as it grows field by field.
pub const HEADER_BLOCK: usize = 1024;

/// A message put together from milter packets: `name:value` fields with
/// CRLF line ends, the empty line, the body as sent.
#[derive(Default)]
pub struct Assembled {
    pub bytes: Vec<u8>,
    /// Where each header field starts, and its name's length.
    fields: Vec<(usize, usize)>,
}

impl Assembled {
    /// One header field. `leading_space`: the value kept the space after
    /// the colon (negotiated), so it is exactly as sent; else a space is
    /// put back, as the MTA took it away. Line breaks in a folded value
    /// become CRLF.
    ///
    /// The name is found again in the message (no copy of its own).
    pub fn header(&mut self, name: &[u8], value: &[u8], leading_space: bool) {
        self.fields.push((self.bytes.len(), name.len()));
        self.bytes.extend_from_slice(name);
        self.bytes.push(b':');
        if !leading_space {
            self.bytes.push(b' ');
        }
        let mut prev = 0u8;
        for &b in value {
            if b == b'\n' && prev != b'\r' {
                self.bytes.push(b'\r');
            }
            self.bytes.push(b);
            prev = b;
        }
        self.bytes.extend_from_slice(b"\r\n");
    }

    pub fn end_of_headers(&mut self) {
        self.bytes.extend_from_slice(b"\r\n");
    }

    pub fn body(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The field starting at `offset`: its name and which one of that
    /// name it is (from 1, names compared without case), as the MTA
    /// counts for a change. `message`: these bytes, once handed over to
    /// the checks.
    pub fn field_at(&self, message: &[u8], offset: usize) -> Option<(Vec<u8>, u32)> {
        let name_of = |&(at, len): &(usize, usize)| message.get(at..at + len);
        let i = self.fields.iter().position(|(at, _)| *at == offset)?;
        let name = name_of(&self.fields[i])?;
        let nth = self.fields[..=i]
            .iter()
            .filter(|f| name_of(f).is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .count();
        Some((name.to_vec(), u32::try_from(nth).unwrap_or(u32::MAX)))
    }
}

/// Our header block (`Name: value` lines, CRLF, folded lines starting
/// with white space) as fields for the MTA: folds as bare newlines (the
/// MTA writes its own line ends), the space after the colon kept when
/// the MTA keeps it on its side.
pub fn fields_of(block: &str, leading_space: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for line in block.split("\r\n").filter(|l| !l.is_empty()) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = out.last_mut() {
                value.push(b'\n');
                value.extend_from_slice(line.as_bytes());
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = if leading_space {
            value
        } else {
            value.strip_prefix(' ').unwrap_or(value)
        };
        out.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_rebuilt_as_sent() {
        let mut m = Assembled::default();
        m.header(b"From", b" a@b.test", true);
        m.header(b"Subject", b" folded\n\tline", true);
        m.header(b"X-Other", b"no space", false);
        m.end_of_headers();
        m.body(b"body\r\n");
        assert_eq!(
            m.bytes,
            b"From: a@b.test\r\nSubject: folded\r\n\tline\r\nX-Other: no space\r\n\r\nbody\r\n"
        );
    }

    #[test]
    fn fields_are_counted_by_name_without_case() {
        let mut m = Assembled::default();
        m.header(b"Authentication-Results", b" a", true);
        m.header(b"Subject", b" s", true);
        let second = m.len();
        m.header(b"authentication-results", b" b", true);
        let bytes = &m.bytes;
        assert_eq!(
            m.field_at(bytes, second),
            Some((b"authentication-results".to_vec(), 2))
        );
        assert_eq!(
            m.field_at(bytes, 0),
            Some((b"Authentication-Results".to_vec(), 1))
        );
        assert_eq!(m.field_at(bytes, 3), None);
    }

    #[test]
    fn our_block_becomes_fields() {
        let block = "Authentication-Results: gate.test;\r\n\tspf=pass\r\nX-Spam-Score: 1.0\r\n";
        assert_eq!(
            fields_of(block, false),
            vec![
                (
                    b"Authentication-Results".to_vec(),
                    b"gate.test;\n\tspf=pass".to_vec()
                ),
                (b"X-Spam-Score".to_vec(), b"1.0".to_vec()),
            ]
        );
        assert_eq!(fields_of(block, true)[1].1, b" 1.0");
    }
}
