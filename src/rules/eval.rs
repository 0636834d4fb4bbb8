//! Evaluation: a stage's rules over the facts, each target's regex set run
//! once per value, on first use.

use super::engine::*;
use super::input::Input;
use super::model::{RuleMode, Stage};
use std::sync::atomic::Ordering;

/// Regex results for one evaluation, computed per target on first use.
struct Matches<'a> {
    sets: &'a [Patterns],
    /// By slot; empty until the target's patterns ran.
    done: Vec<Option<Vec<bool>>>,
}

impl Compiled {
    pub fn empty() -> Compiled {
        Compiled {
            rules: Vec::new(),
            sets: Vec::new(),
            dnsbl_zones: Default::default(),
            uribl_zones: Default::default(),
            dnsbl_any: false,
            uses_links: false,
            headers_read: Vec::new(),
        }
    }

    /// Rules of `stage` that match `facts`, in order; an enforced `accept`
    /// stops the evaluation (the remaining rules are skipped).
    pub fn evaluate(&self, stage: Stage, facts: &Input<'_>) -> Vec<Hit> {
        let mut m = Matches {
            sets: &self.sets,
            done: Vec::new(),
        };
        let mut hits = Vec::new();
        for r in self.rules.iter().filter(|r| r.stage == stage) {
            if eval(&r.cond, facts, &mut m) {
                r.hits.fetch_add(1, Ordering::Relaxed);
                let shadow = r.mode == RuleMode::Shadow;
                crate::telemetry::events::RuleHit {
                    rule: &r.id,
                    shadow,
                }
                .emit();
                hits.push(std::sync::Arc::clone(&r.hit));
                if !shadow && r.action == RuleAction::Accept {
                    break;
                }
            }
        }
        hits
    }
}

fn values<'f>(t: &Target, f: &'f Input<'f>) -> Vec<&'f str> {
    let domain = |a: &'f str| a.rsplit_once('@').map(|(_, d)| d);
    let local = |a: &'f str| a.rsplit_once('@').map(|(l, _)| l);
    match t {
        Target::Reverse => f.reverse.into_iter().collect(),
        Target::Helo => f.helo.into_iter().collect(),
        Target::MailFrom => f.mail_from.into_iter().collect(),
        Target::MailDomain => f.mail_from.and_then(domain).into_iter().collect(),
        Target::Rcpt => f.rcpts.clone(),
        Target::RcptLocal => f.rcpts.iter().filter_map(|r| local(r)).collect(),
        Target::RcptDomain => f.rcpts.iter().filter_map(|r| domain(r)).collect(),
        Target::Header(name) => f
            .message
            .map(|m| {
                m.headers
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
                    .collect()
            })
            .unwrap_or_default(),
        Target::Subject => f
            .message
            .and_then(|m| m.subject.as_deref())
            .into_iter()
            .collect(),
        Target::Body => f
            .message
            .map(|m| m.body.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::AttachmentName => f
            .message
            .map(|m| m.attachment_names.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::AttachmentType => f
            .message
            .map(|m| m.attachment_types.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::ArchiveName => f
            .message
            .map(|m| m.archive_names.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::UrlDomain => f
            .message
            .map(|m| m.links.hosts.iter().map(String::as_str).collect())
            .unwrap_or_default(),
        Target::ArchiveType => f
            .message
            .map(|m| m.archive_types.iter().map(String::as_str).collect())
            .unwrap_or_default(),
    }
}

fn eval(n: &Node, f: &Input<'_>, m: &mut Matches<'_>) -> bool {
    match n {
        Node::All(v) => v.iter().all(|n| eval(n, f, m)),
        Node::Any(v) => v.iter().any(|n| eval(n, f, m)),
        Node::Not(n) => !eval(n, f, m),
        Node::Ip(nets) => f.ip.is_some_and(|ip| nets.contains(ip)),
        Node::Tls(b) => f.tls == *b,
        Node::Attachment(fact, want) => {
            let have = f.message.is_some_and(|m| match fact {
                AttachmentFact::EncryptedArchive => m.encrypted_archive,
                AttachmentFact::ArchiveBomb => m.archive_bomb,
                AttachmentFact::DoubleExtension => m.double_extension,
            });
            have == *want
        }
        Node::Number(Number::Size, c) => f.size.is_some_and(|s| c.matches(s)),
        Node::Number(Number::RcptCount, c) => c.matches(f.rcpt_count as u64),
        Node::Check(kind, words) => {
            let have: Vec<&str> = match kind {
                CheckKind::Spf => vec![f.spf],
                CheckKind::Dkim => vec![f.dkim],
                // `fail:reject` matches `fail` and `fail:reject`.
                CheckKind::Dmarc => vec![f.dmarc, f.dmarc.split(':').next().unwrap_or("")],
                CheckKind::Iprev => vec![f.iprev],
                CheckKind::Greylist => vec![f.greylist],
                // `virus:NAME` and `skipped:size` match `virus`, `skipped`.
                CheckKind::Antivirus => vec![f.antivirus.split(':').next().unwrap_or("")],
                CheckKind::Dnsbl => f.dnsbl.clone(),
                CheckKind::Uribl => f.uribl.clone(),
                // `rspamd:7.50:add_header`, `rspamd:error`, `rspamd:skipped:size`.
                CheckKind::Scanner => {
                    let mut parts = f.scanner.split(':').skip(1);
                    match (parts.next(), parts.next()) {
                        (Some(w @ ("error" | "skipped")), _) => vec![w],
                        (Some(_), Some(action)) => vec![action],
                        _ => Vec::new(),
                    }
                }
            };
            if matches!(kind, CheckKind::Dnsbl | CheckKind::Uribl)
                && words.iter().any(|w| w == "any")
            {
                return !have.is_empty();
            }
            have.iter()
                .any(|h| !h.is_empty() && words.iter().any(|w| w.eq_ignore_ascii_case(h)))
        }
        Node::Match(t, leaf) => match leaf {
            Leaf::Exact { set, case } => values(t, f).iter().any(|v| {
                // Lower-case ASCII (most values) is looked up as it is.
                let lower = v.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase());
                if *case || lower {
                    set.contains(*v)
                } else {
                    set.contains(&v.to_lowercase())
                }
            }),
            Leaf::Domain(ds) => values(t, f).iter().any(|v| {
                let v = match t {
                    Target::MailFrom | Target::Rcpt => v.rsplit_once('@').map_or(*v, |(_, d)| d),
                    _ => v,
                };
                ds.matches(v)
            }),
            Leaf::Regex { slot, idx } => {
                // Each target's patterns run once per evaluation; later
                // leaves of the same target only look the result up.
                if m.done.len() < m.sets.len() {
                    m.done.resize(m.sets.len(), None);
                }
                let Some(done) = m.done.get_mut(*slot) else {
                    return false;
                };
                let hits = done.get_or_insert_with(|| {
                    let vals = values(t, f);
                    match m.sets.get(*slot) {
                        Some(set) if !vals.is_empty() => {
                            let mut any = vec![false; set.len()];
                            for v in &vals {
                                set.mark(v, &mut any);
                            }
                            any
                        }
                        _ => Vec::new(),
                    }
                });
                idx.iter().any(|i| hits.get(*i).copied().unwrap_or(false))
            }
        },
    }
}
