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
