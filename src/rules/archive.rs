//! What an attachment carries, without extracting anything: its type by
//! content (magic octets, `infer`: the declared Content-Type lies), and for
//! a ZIP archive its members' names and types, from the central directory
//! and the first octets of each member; tar, tar.gz and gzip attachments
//! likewise, read as a stream. Bounded in entries, octets read and
//! compression ratio: a zip bomb is a finding, not a hang.

use std::io::Read;

/// Members looked at; an archive with more is a finding (`archive_bomb`).
pub const MAX_ENTRIES: usize = 1000;
/// Octets decompressed from each member to tell its type.
const HEAD: u64 = 512;
/// Declared size over compressed size above this: a bomb.
pub const MAX_RATIO: u64 = 100;
/// Declared uncompressed total above this: a bomb.
pub const MAX_DECLARED: u64 = 1 << 30;

/// Extensions of what runs when opened (Windows, scripts, disk images).
pub const EXECUTABLE_EXTENSIONS: &[&str] = &[
    "exe", "scr", "com", "pif", "bat", "cmd", "cpl", "msi", "msp", "hta", "js", "jse", "vbs",
    "vbe", "wsf", "wsh", "ps1", "jar", "lnk", "reg", "iso", "img",
];

/// One level of an archive's contents.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub names: Vec<String>,
    /// Types by content of the members that could be read.
    pub types: Vec<String>,
    /// A member needs a password (nothing inside could be looked at).
    pub encrypted: bool,
    /// Too many members, a ratio over `MAX_RATIO`, or over `MAX_DECLARED`.
    pub bomb: bool,
}

/// The MIME type of `octets` by their magic numbers, if known.
pub fn detected_type(octets: &[u8]) -> Option<&'static str> {
    infer::get(octets).map(|t| t.mime_type())
}

/// Whether `octets` start like a ZIP archive (local header or empty archive).
pub fn looks_like_zip(octets: &[u8]) -> bool {
    octets.starts_with(b"PK\x03\x04") || octets.starts_with(b"PK\x05\x06")
}

/// The members of a ZIP archive, or None when it is not one.
pub fn zip_members(octets: &[u8]) -> Option<Contents> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(octets)).ok()?;
    let mut c = Contents {
        bomb: z.len() > MAX_ENTRIES,
        ..Contents::default()
    };
    let mut declared: u64 = 0;
    for i in 0..z.len().min(MAX_ENTRIES) {
        let Ok(e) = z.by_index_raw(i) else { continue };
        if e.is_dir() {
            continue;
        }
        let (size, packed, encrypted) = (e.size(), e.compressed_size(), e.encrypted());
        c.names.push(match e.name() {
            Ok(n) => n.into_owned(),
            Err(_) => String::from_utf8_lossy(e.name_raw()).into_owned(),
        });
        drop(e);
        declared = declared.saturating_add(size);
        if size > packed.saturating_mul(MAX_RATIO) || declared > MAX_DECLARED {
            c.bomb = true;
        }
        if encrypted {
            c.encrypted = true;
            continue;
        }
        // A bomb's members are not decompressed at all.
        if c.bomb {
            continue;
        }
        if let Ok(member) = z.by_index(i) {
            let mut head = Vec::with_capacity(HEAD as usize);
            let _ = member.take(HEAD).read_to_end(&mut head);
            if let Some(t) = detected_type(&head) {
                c.types.push(t.to_string());
            }
        }
    }
    Some(c)
}

/// Whether `octets` are a tar archive (`ustar` at offset 257) or gzip.
pub fn looks_like_tar_or_gzip(octets: &[u8]) -> bool {
    octets.get(257..262) == Some(b"ustar") || octets.starts_with(&[0x1f, 0x8b])
}

/// A reader that gives out at most `left` octets, then reports end of
/// input and remembers, in its tally, that there was more.
struct Capped<'a, R> {
    inner: R,
    left: u64,
    tally: &'a Tally,
}

/// What a `Capped` reader gave out, and whether it had more.
#[derive(Default)]
struct Tally {
    hit: std::cell::Cell<bool>,
    given: std::cell::Cell<u64>,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? > 0 {
                self.tally.hit.set(true);
            }
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        self.tally.given.set(self.tally.given.get() + n as u64);
        Ok(n)
    }
}

/// The members of a tar, tar.gz or gzip attachment, or None when it is
/// none of them. Read as a stream, never written anywhere: at most
/// `MAX_ENTRIES` members, and at most `MAX_RATIO` times the compressed
/// size (and `MAX_DECLARED`) decompressed, past which it is a bomb.
pub fn tar_or_gzip_members(octets: &[u8]) -> Option<Contents> {
    read_tar_or_gzip(octets, &Tally::default())
}

/// `tar_or_gzip_members`, with what was decompressed counted in `tally`.
fn read_tar_or_gzip(octets: &[u8], tally: &Tally) -> Option<Contents> {
    if octets.starts_with(&[0x1f, 0x8b]) {
        let cap = (octets.len() as u64)
            .saturating_mul(MAX_RATIO)
            .min(MAX_DECLARED);
        let mut gz = flate2::read::GzDecoder::new(octets);
        let name = gz
            .header()
            .and_then(|h| h.filename())
            .map(|n| String::from_utf8_lossy(n).into_owned());
        let mut head = Vec::with_capacity(HEAD as usize);
        (&mut gz).take(HEAD).read_to_end(&mut head).ok()?;
        if head.get(257..262) == Some(b"ustar") {
            let rest = Capped {
                inner: std::io::Cursor::new(head).chain(gz),
                left: cap,
                tally,
            };
            let mut c = tar_entries(rest);
            c.bomb |= tally.hit.get();
            return Some(c);
        }
        // One compressed file: its name (when the header has it) and type,
        // and its size by decompressing it, within the cap.
        let mut c = Contents::default();
        c.names.extend(name);
        c.types.extend(detected_type(&head).map(str::to_string));
        let mut rest = Capped {
            inner: gz,
            left: cap,
            tally,
        };
        let _ = std::io::copy(&mut rest, &mut std::io::sink());
        c.bomb = tally.hit.get();
        return Some(c);
    }
    if octets.get(257..262) != Some(b"ustar") {
        return None;
    }
    Some(tar_entries(octets))
}

/// The entries of a tar stream: names, declared sizes, types by content.
fn tar_entries(stream: impl Read) -> Contents {
    let mut c = Contents::default();
    let mut archive = tar::Archive::new(stream);
    let Ok(entries) = archive.entries() else {
        return c;
    };
    let mut declared: u64 = 0;
    for (i, entry) in entries.enumerate() {
        if i >= MAX_ENTRIES {
            c.bomb = true;
            break;
        }
        // A damaged or cut stream ends the listing; what was read counts.
        let Ok(entry) = entry else { break };
        if entry.header().entry_type().is_dir() {
            continue;
        }
        declared = declared.saturating_add(entry.header().size().unwrap_or(0));
        if declared > MAX_DECLARED {
            c.bomb = true;
            break;
        }
        if let Ok(path) = entry.path() {
            c.names.push(path.to_string_lossy().into_owned());
        }
        let mut head = Vec::with_capacity(HEAD as usize);
        let _ = entry.take(HEAD).read_to_end(&mut head);
        c.types.extend(detected_type(&head).map(str::to_string));
    }
    c
}

/// `invoice.pdf.exe`: an executable extension after another short one, the
/// classic disguise.
pub fn double_extension(name: &str) -> bool {
    let lower = name.trim().to_ascii_lowercase();
    let mut parts = lower.rsplit('.');
    let (Some(last), Some(before), Some(_stem)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    EXECUTABLE_EXTENSIONS.contains(&last)
        && (2..=4).contains(&before.len())
        && before.bytes().all(|b| b.is_ascii_alphanumeric())
        && !EXECUTABLE_EXTENSIONS.contains(&before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use zip::unstable::write::FileOptionsExt;
    use zip::write::SimpleFileOptions;

    /// A Windows executable's first octets.
    const PE: &[u8] = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00";

    fn zip_of(files: &[(&str, &[u8])], method: zip::CompressionMethod) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut out);
        for (name, data) in files {
            w.start_file(
                *name,
                SimpleFileOptions::default().compression_method(method),
            )
            .unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
        out.into_inner()
    }

    #[test]
    fn an_executable_inside_a_zip_is_named_and_typed() {
        let z = zip_of(
            &[("readme.txt", b"hello"), ("invoice.pdf.exe", PE)],
            zip::CompressionMethod::Deflated,
        );
        assert!(looks_like_zip(&z));
        let c = zip_members(&z).unwrap();
        assert_eq!(c.names, ["readme.txt", "invoice.pdf.exe"]);
        assert!(
            c.types
                .iter()
                .any(|t| t.contains("msdownload") || t.contains("executable")),
            "{c:?}"
        );
        assert!(!c.encrypted && !c.bomb);
    }

    #[test]
    fn a_high_ratio_or_many_entries_is_a_bomb_found_at_once() {
        // 50 MB of zeros deflate to about 50 KB: a ratio of 1000.
        let zeros = vec![0u8; 50 << 20];
        let z = zip_of(&[("zeros.bin", &zeros)], zip::CompressionMethod::Deflated);
        let start = std::time::Instant::now();
        let c = zip_members(&z).unwrap();
        assert!(c.bomb, "{c:?}");
        assert!(c.types.is_empty(), "a bomb's member is not decompressed");
        assert!(
            start.elapsed() < std::time::Duration::from_millis(500),
            "{:?}",
            start.elapsed()
        );
        let many: Vec<(String, Vec<u8>)> = (0..MAX_ENTRIES + 5)
            .map(|i| (format!("f{i}"), Vec::new()))
            .collect();
        let refs: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let c = zip_members(&zip_of(&refs, zip::CompressionMethod::Stored)).unwrap();
        assert!(c.bomb);
        assert_eq!(c.names.len(), MAX_ENTRIES);
    }

    #[test]
    fn an_encrypted_member_is_a_fact() {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut out);
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_deprecated_encryption(b"infected")
            .unwrap();
        w.start_file("payload.exe", opts).unwrap();
        w.write_all(PE).unwrap();
        w.finish().unwrap();
        let c = zip_members(&out.into_inner()).unwrap();
        assert!(c.encrypted, "{c:?}");
        assert_eq!(c.names, ["payload.exe"]);
        assert!(c.types.is_empty());
    }

    #[test]
    fn not_a_zip_is_none() {
        assert!(zip_members(b"PK\x03\x04 but broken").is_none());
        assert!(zip_members(b"plain text").is_none());
    }

    #[test]
    fn double_extensions() {
        for yes in ["invoice.pdf.exe", "Scan.JPG.scr", "a.doc.js"] {
            assert!(double_extension(yes), "{yes}");
        }
        for no in [
            "setup.exe",
            "archive.tar.gz",
            "report.pdf",
            "a.exe.exe",
            "x.verylong.exe",
        ] {
            assert!(!double_extension(no), "{no}");
        }
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8], name: Option<&str>) -> Vec<u8> {
        let mut g = flate2::GzBuilder::new();
        if let Some(n) = name {
            g = g.filename(n);
        }
        let mut e = g.write(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn tar_and_tar_gz_members_are_named_and_typed() {
        let t = tar_of(&[("notes.txt", b"hello"), ("bin/setup.exe", PE)]);
        for octets in [t.clone(), gzip(&t, Some("bundle.tar"))] {
            assert!(looks_like_tar_or_gzip(&octets));
            let c = tar_or_gzip_members(&octets).unwrap();
            assert_eq!(c.names, ["notes.txt", "bin/setup.exe"]);
            assert!(
                c.types
                    .iter()
                    .any(|t| t == "application/vnd.microsoft.portable-executable"),
                "{:?}",
                c.types
            );
            assert!(!c.bomb);
        }
    }

    #[test]
    fn a_gzip_file_is_named_and_typed() {
        let c = tar_or_gzip_members(&gzip(PE, Some("update.exe"))).unwrap();
        assert_eq!(c.names, ["update.exe"]);
        assert_eq!(c.types, ["application/vnd.microsoft.portable-executable"]);
        assert!(!c.bomb);
        assert!(tar_or_gzip_members(b"plain text").is_none());
    }

    #[test]
    fn gzip_and_tar_bombs_are_found_within_bounds() {
        // 50 MB of zeros gzip to about 50 KB: decompression stops at 100
        // times that. Its cost is what it decompresses (streamed, never
        // kept), so that is what is bounded here; a wall-clock bound flaked
        // on a busy CI machine.
        let zeros = vec![0u8; 50 << 20];
        for octets in [
            gzip(&zeros, Some("zeros.bin")),
            gzip(&tar_of(&[("zeros.bin", &zeros)]), None),
        ] {
            let tally = Tally::default();
            let c = read_tar_or_gzip(&octets, &tally).unwrap();
            assert!(c.bomb, "{} octets", octets.len());
            let cap = octets.len() as u64 * MAX_RATIO;
            assert!(cap < zeros.len() as u64 / 5, "{cap}");
            // The tar's header block is read before the cap starts.
            assert!(
                tally.given.get() <= cap + HEAD,
                "{} octets decompressed from {}",
                tally.given.get(),
                octets.len()
            );
        }
        let many: Vec<(String, Vec<u8>)> = (0..MAX_ENTRIES + 5)
            .map(|i| (format!("f{i}.txt"), b"x".to_vec()))
            .collect();
        let refs: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let c = tar_or_gzip_members(&tar_of(&refs)).unwrap();
        assert!(c.bomb);
        assert_eq!(c.names.len(), MAX_ENTRIES);
    }
}
