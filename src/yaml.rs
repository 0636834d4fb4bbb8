//! The one module that talks to `serde_yaml` (archived upstream), so that a
//! later swap to a maintained fork touches this file only.

use serde::de::DeserializeOwned;
use std::fmt;
use std::path::Path;

/// A YAML document that failed to load, located as `file:line:column`.
#[derive(Debug, thiserror::Error)]
pub struct YamlError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path of the offending value (`upstream.timeouts.connect`).
    pub path: String,
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() && self.path != "." {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Parses `text` (read from `file`) into `T`, reporting the location and the
/// key path of the first error.
pub fn parse<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, YamlError> {
    parse_once(text, file)
}

/// What [`parse_all`] found: every error it could reach, and the value
/// read with the offending entries left out (their defaults in force), for
/// the checks that come after parsing.
pub struct Parsed<T> {
    pub value: Option<T>,
    pub errors: Vec<YamlError>,
    /// Lines (1-based) left out to get past an error.
    pub skipped: Vec<usize>,
}

/// At most this many errors of one file; a file with more is not a config.
const MAX_ERRORS: usize = 20;

/// Parses `text` into `T` and reports every error, not only the first, as
/// `nginx -t` would if it could: each time serde stops, the entry it stopped
/// at (its line and the lines indented under it) is left out and the text
/// parsed again, so the administrator fixes a file in one run. Line numbers
/// stay those of the file. A field then reported missing that the file does
/// have was left out with an error's block: not reported again.
pub fn parse_all<T: DeserializeOwned>(text: &str, file: &Path) -> Parsed<T> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    let mut errors: Vec<YamlError> = Vec::new();
    let mut skipped = Vec::new();
    loop {
        let attempt = lines.join("\n");
        match parse_once::<T>(&attempt, file) {
            Ok(v) => {
                return Parsed {
                    value: Some(v),
                    errors,
                    skipped,
                };
            }
            Err(e) => {
                let follow_on = !errors.is_empty() && is_follow_on(&e, text);
                // The same problem found again after leaving a line out
                // (serde places some, like a duplicate key, at the map).
                let again = errors
                    .iter()
                    .any(|p| p.line == e.line || (p.path == e.path && p.message == e.message));
                if !follow_on && !again {
                    errors.push(e);
                }
                let last = errors.last().map(|e| e.line).unwrap_or(0);
                if follow_on || again || errors.len() >= MAX_ERRORS || last == 0 {
                    return Parsed {
                        value: None,
                        errors,
                        skipped,
                    };
                }
                skipped.extend(leave_out(&mut lines, last - 1));
            }
        }
    }
}

/// A missing field that the file does name: the block it was in was left out.
fn is_follow_on(e: &YamlError, text: &str) -> bool {
    let Some(field) = e
        .message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
    else {
        return false;
    };
    text.lines().any(|l| {
        l.trim_start()
            .trim_start_matches("- ")
            .starts_with(&format!("{field}:"))
    })
}

/// Blanks line `at` (0-based) and the lines indented deeper under it, and
/// returns their 1-based numbers.
fn leave_out(lines: &mut [&str], at: usize) -> Vec<usize> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let Some(first) = lines.get(at) else {
        return Vec::new();
    };
    let depth = indent(first);
    let mut gone = vec![at + 1];
    lines[at] = "";
    for (i, l) in lines.iter_mut().enumerate().skip(at + 1) {
        if !l.trim().is_empty() && indent(l) <= depth {
            break;
        }
        if !l.trim().is_empty() {
            gone.push(i + 1);
        }
        *l = "";
    }
    gone
}

fn parse_once<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, YamlError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = inner
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        let mut message = inner.to_string();
        // serde_yaml appends " at line L column C"; we print it up front already.
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        // ...and may prefix part of the key path, which we print in full.
        if let Some((head, tail)) = message.split_once(": ")
            && !head.contains(' ')
            && path.starts_with(head)
        {
            message = tail.to_string();
        }
        YamlError {
            file: file.display().to_string(),
            line,
            column,
            path,
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Read by serde only: what is tested is which errors it finds.
    struct Doc {
        name: String,
        #[serde(default)]
        inner: Inner,
        #[serde(default)]
        count: u32,
    }

    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        a: u32,
        b: BTreeMap<String, u32>,
    }

    #[test]
    fn every_error_of_a_file_is_found() {
        let text =
            "name: x\ninner:\n  a: nope\n  c: 1\n  b:\n    k: 2\ncount: -1\nextra:\n  deep: 1\n";
        let p: Parsed<Doc> = parse_all(text, Path::new("t.yaml"));
        let lines: Vec<usize> = p.errors.iter().map(|e| e.line).collect();
        assert_eq!(
            lines,
            [3, 4, 7, 8],
            "{:?}",
            p.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        );
        assert!(p.errors[1].to_string().contains("unknown field `c`"));
        let v = p.value.expect("the rest parses");
        assert_eq!(v.inner.b.get("k"), Some(&2));
        assert_eq!(p.skipped, [3, 4, 7, 8, 9]);
    }

    #[test]
    fn a_left_out_block_does_not_report_its_fields_missing() {
        let text = "bogus: 1\n";
        let p: Parsed<Doc> = parse_all(text, Path::new("t.yaml"));
        // The one real error: `name` is missing (and `bogus` unknown first).
        assert_eq!(
            p.errors.len(),
            2,
            "{:?}",
            p.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        );
        let text = "name:\n  oops: 1\n";
        let p: Parsed<Doc> = parse_all(text, Path::new("t.yaml"));
        assert_eq!(p.errors.len(), 1);
        // A duplicate key is reported once, not once per line left out.
        let text = "name: a\ninner:\n  a: 1\n  b: {}\n  a: 2\n";
        let p: Parsed<Doc> = parse_all(text, Path::new("t.yaml"));
        assert_eq!(
            p.errors.len(),
            1,
            "{:?}",
            p.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        );
        assert!(p.errors[0].message.contains("duplicate field `a`"));
    }
}
