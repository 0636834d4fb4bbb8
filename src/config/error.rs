//! What a config that does not load says: every problem, each with
//! `file:line:column` and its key path.

use crate::yaml::YamlError;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(#[from] YamlError),
    #[error("{file}:{line}:{column}: {key}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// Several problems, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

/// Finds the line and column of the last segment of a dotted key path, for
/// errors found after parsing. Falls back to 1:1.
pub(super) fn locate_key(text: &str, key: &str) -> (usize, usize) {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = last.split('[').next().unwrap_or(last);
    let needle = format!("{last}:");
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start().trim_start_matches("- ");
        if t.starts_with(&needle) {
            return (i + 1, line.len() - t.len() + 1);
        }
    }
    // Flow style: `log: {level: verbose}`, `- {name: x, rate: 1/1h}`.
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for (at, _) in line.match_indices(&needle) {
            if line[..at].ends_with(['{', ' ', ',']) {
                return (i + 1, at + 1);
            }
        }
    }
    (1, 1)
}
