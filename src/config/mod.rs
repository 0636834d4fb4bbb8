//! Configuration: load -> parse -> validate. The sections (serde structs
//! with their defaults) are in `sections.rs` and `checks.rs`, the checks
//! of values in `validate.rs`, the errors (`file:line:column: key`) in
//! `error.rs`; `reload` plans what a reload may change.
//!
//! Every key has a default, unknown keys are errors, and every error names
//! `file:line:column` and the key path. The reference file `portcullis.yaml`
//! at the top of the repository is also the embedded default.

mod checks;
mod error;
pub mod reload;
mod sections;
mod units;
mod validate;

pub use checks::{
    Action, Allow, AntivirusConfig, ArcConfig, ChecksConfig, DkimConfig, DmarcConfig, DnsConfig,
    DnsblConfig, GreylistConfig, GreylistWhen, IprevConfig, MessageRules, Mode, Overrun, Rate,
    RateCount, RateKey, RateLimit, RejectAt, ReputationConfig, ReturnFilter, ScannerConfig,
    ScannerKind, SpfConfig, Thresholds, UriblConfig, Zone, ZoneType,
};
pub use error::ConfigError;
pub use sections::*;
pub use units::{Bytes, Secs, parse_size};

use crate::yaml;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The annotated reference config, embedded as the default.
pub const DEFAULT_CONFIG: &str = include_str!("../../portcullis.yaml");

/// Where the Debian package installs the config: what the verbs read when
/// no `--config` (or `PORTCULLIS_CONFIG`) names one.
pub const INSTALLED_CONFIG: &str = "/etc/portcullis/portcullis.yaml";

/// The config file to read when none was named: the installed one when
/// there is one, else None (the embedded default).
pub fn installed_path() -> Option<PathBuf> {
    let p = Path::new(INSTALLED_CONFIG);
    p.exists().then(|| p.to_path_buf())
}

/// Config files are small; anything larger is not one (`/dev/zero`).
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Reads a text file of at most `limit` bytes: a regular file only, so
/// that a device or a FIFO cannot be read until memory runs out.
pub fn read_text(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    let mut text = String::new();
    f.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(text)
}

/// A config file read for `check`: every problem found, and the config
/// (with the defaults in force where an entry was in error) so that what
/// depends on it (the rules directory) can be checked in the same run.
pub struct Checked {
    pub config: Option<Config>,
    pub errors: Vec<ConfigError>,
}

impl Checked {
    /// The config when nothing is wrong with it; else its one error, or
    /// all of them.
    pub fn into_result(self) -> Result<Config, ConfigError> {
        let Checked { config, mut errors } = self;
        match (config, errors.len()) {
            (Some(c), 0) => Ok(c),
            (_, 1) => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }
}

impl Config {
    /// Loads and validates a config file; `None` means the embedded default.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_checked(path).into_result()
    }

    /// Loads a config file and finds every problem in it.
    pub fn load_checked(path: Option<&Path>) -> Checked {
        match path {
            Some(p) => {
                let text = match read_text(p, MAX_CONFIG_FILE) {
                    Ok(t) => t,
                    Err(source) => {
                        return Checked {
                            config: None,
                            errors: vec![ConfigError::Io {
                                path: p.display().to_string(),
                                source,
                            }],
                        };
                    }
                };
                let mut checked = Self::parse_checked(&text, p);
                if let Some(c) = &mut checked.config {
                    c.resolve_paths(p.parent().unwrap_or(Path::new(".")));
                }
                checked
            }
            None => Self::parse_checked(DEFAULT_CONFIG, Path::new("<embedded portcullis.yaml>")),
        }
    }

    /// Parses and validates config text read from `file`.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Self::parse_checked(text, file).into_result()
    }

    /// Parses config text and reports every problem: each entry serde
    /// refuses, then the checks of values on what parsed. A check of a
    /// section that had an entry left out is not reported: it would judge
    /// the default put in its place.
    pub fn parse_checked(text: &str, file: &Path) -> Checked {
        let parsed = yaml::parse_all::<Config>(text, file);
        let broken: Vec<String> = parsed
            .errors
            .iter()
            .map(|e| parent_key(&e.path).to_string())
            .collect();
        let mut errors: Vec<ConfigError> =
            parsed.errors.into_iter().map(ConfigError::Yaml).collect();
        if let Some(cfg) = &parsed.value {
            errors.extend(cfg.validate(text, file).into_iter().filter(|e| match e {
                ConfigError::Invalid { key, .. } => {
                    !broken.iter().any(|b| key.starts_with(b.as_str()))
                }
                _ => true,
            }));
        }
        Checked {
            config: parsed.value,
            errors,
        }
    }

    /// Relative paths in a config file mean "beside the config file", not
    /// "in whatever directory the gate was started from" (systemd: `/`).
    fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(r) = &mut self.rules_dir {
            fix(r);
        }
        self.config_dir = Some(dir.to_path_buf());
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert);
            fix(&mut t.key);
        }
        if let Some(f) = &mut self.log.file {
            fix(f);
        }
        if let Some(ca) = &mut self.upstream.tls_ca {
            fix(ca);
        }
    }

    /// The rules directory, and whether the config named it (then it
    /// must exist): `rules_dir`, else `rules` beside the config file, else
    /// (the embedded default) `rules` in the working directory.
    pub fn rules_dir(&self) -> (PathBuf, bool) {
        match (&self.rules_dir, &self.config_dir) {
            (Some(d), _) => (d.clone(), true),
            (None, Some(dir)) => (dir.join("rules"), false),
            (None, None) => (PathBuf::from("rules"), false),
        }
    }

    /// The name we use in EHLO towards upstream.
    pub fn upstream_helo(&self) -> &str {
        self.upstream.helo_name.as_deref().unwrap_or(&self.hostname)
    }

    /// True when `ip` may send a PROXY header on listener `l`.
    pub fn is_trusted_proxy(l: &Listen, ip: IpAddr) -> bool {
        l.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// The entry holding a key: `checks.dnsbl.zones[0]` of
/// `checks.dnsbl.zones[0].action`, `listen` of `listen[1]`; a top-level
/// key is its own.
fn parent_key(key: &str) -> &str {
    match key.rfind(['.', '[']) {
        Some(end) if end > 0 => &key[..end],
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.yaml"))
    }

    #[test]
    fn embedded_default_loads() {
        let c = Config::load(None).expect("embedded config is valid");
        assert_eq!(c.listen[0].addr, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.upstream.addr, "127.0.0.1:25".parse().unwrap());
        assert_eq!(c.limits.max_message_size, Bytes(25 << 20));
    }

    #[test]
    fn unknown_key_is_an_error_with_location_and_path() {
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream:\n  addr: 127.0.0.1:2\n  timeouts:\n    conect: 5s\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t.yaml:6:5: upstream.timeouts"), "{e}");
        assert!(e.contains("unknown field `conect`"), "{e}");
    }

    #[test]
    fn bad_duration_and_size_are_located() {
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream: {addr: 127.0.0.1:2}\ntimeouts:\n  command: soon\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("t.yaml:5:3: timeouts.command: invalid duration \"soon\""),
            "{e}"
        );
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream: {addr: 127.0.0.1:2}\nlimits:\n  max_message_size: 25Mib\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("t.yaml:5:") && e.contains("limits.max_message_size"),
            "{e}"
        );
    }

    #[test]
    fn semantic_errors_are_located() {
        let e = parse(
            "hostname: mx.test\nlisten: [{addr: 127.0.0.1:1}]\nupstream: {addr: 127.0.0.1:2}\nlimits:\n  max_recipients: 0\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "t.yaml:5:3: limits.max_recipients: must be at least 1");
        let e = parse(
            "hostname: mx.test\nlisten:\n  - addr: 127.0.0.1:1\n    proxy_protocol: true\nupstream: {addr: 127.0.0.1:2}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("t.yaml:4:5: listen[0].proxy_protocol"), "{e}");
    }

    #[test]
    fn identity_spellings() {
        for (s, want) in [
            ("auto", IdentityMode::Auto),
            ("xclient", IdentityMode::Xclient),
            ("proxy-v1", IdentityMode::ProxyV1),
            ("proxy-v2", IdentityMode::ProxyV2),
            ("none", IdentityMode::None),
        ] {
            let c = parse(&format!(
                "hostname: mx.test\nlisten: [{{addr: 127.0.0.1:1}}]\nupstream: {{addr: 127.0.0.1:2, client_identity: {s}}}\n"
            ))
            .unwrap();
            assert_eq!(c.upstream.client_identity, want);
        }
    }
}
