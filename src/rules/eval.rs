//! Evaluation: a stage's rules over the facts. A target's regexes run on
//! first use: a set all at once, regexes run one by one each when a leaf
//! first asks for it (a rule whose first condition fails never runs the
//! regexes of its others).

use super::engine::*;
use super::input::Input;
use super::model::{RuleMode, Stage};
use std::sync::atomic::Ordering;

/// Regex results for one evaluation, computed per target on first use.
struct Matches<'a, 'f> {
    sets: &'a [Patterns],
    /// By slot; None until a leaf of the target asked.
    done: Vec<Option<Slot<'f>>>,
}

/// One target's values and what is known of its patterns over them.
struct Slot<'f> {
    values: Vec<&'f str>,
    /// By pattern: None until it ran.
    known: Vec<Option<bool>>,
}

impl<'f> Slot<'f> {
    fn new(patterns: &Patterns, values: Vec<&'f str>) -> Slot<'f> {
        let known = if values.is_empty() {
            vec![Some(false); patterns.len()]
        } else if let Patterns::Set(_) = patterns {
            // One scan answers every pattern of a set.
            let mut any = vec![false; patterns.len()];
            for v in &values {
                patterns.mark(v, &mut any);
            }
            any.into_iter().map(Some).collect()
        } else {
            vec![None; patterns.len()]
        };
        Slot { values, known }
    }

    fn hit(&mut self, patterns: &Patterns, i: usize) -> bool {
        match self.known.get(i) {
            Some(Some(b)) => *b,
            Some(None) => {
                let b = patterns.any_match(i, &self.values);
                self.known[i] = Some(b);
                b
            }
            None => false,
        }
    }
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
    pub fn evaluate<'f>(&self, stage: Stage, facts: &'f Input<'f>) -> Vec<Hit> {
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
                    metric: &r.metric,
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

fn eval<'f>(n: &Node, f: &'f Input<'f>, m: &mut Matches<'_, 'f>) -> bool {
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
                // Each pattern runs at most once per evaluation; later
                // leaves asking for it only look the result up.
                if m.done.len() < m.sets.len() {
                    m.done.resize_with(m.sets.len(), || None);
                }
                let (Some(set), Some(done)) = (m.sets.get(*slot), m.done.get_mut(*slot)) else {
                    return false;
                };
                let s = done.get_or_insert_with(|| Slot::new(set, values(t, f)));
                idx.iter().any(|i| s.hit(set, *i))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn regex_leaf(i: usize) -> Node {
        Node::Match(
            Target::Helo,
            Leaf::Regex {
                slot: 0,
                idx: vec![i],
            },
        )
    }

    /// Regexes run one by one run only when a leaf needs them: the
    /// second condition of an `all` whose first failed never runs.
    #[test]
    fn a_pattern_runs_only_when_a_leaf_needs_it() {
        let sets = [Patterns::Each(vec![
            Regex::new("^mx").unwrap(),
            Regex::new(r"\.example$").unwrap(),
        ])];
        let input = Input {
            helo: Some("mail.example"),
            ..Input::default()
        };
        let mut m = Matches {
            sets: &sets,
            done: Vec::new(),
        };
        let rule = Node::All(vec![regex_leaf(0), regex_leaf(1)]);
        assert!(!eval(&rule, &input, &mut m));
        let known = &m.done[0].as_ref().unwrap().known;
        assert_eq!(known, &[Some(false), None], "the second never ran");
        // Another rule asks for the second: it runs once, the first is
        // looked up.
        let rule = Node::Any(vec![regex_leaf(0), regex_leaf(1)]);
        assert!(eval(&rule, &input, &mut m));
        let known = &m.done[0].as_ref().unwrap().known;
        assert_eq!(known, &[Some(false), Some(true)]);
    }

    /// A set answers all its patterns in one scan, as before.
    #[test]
    fn a_set_is_scanned_once_for_all_its_patterns() {
        let patterns: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let sets = [Patterns::new(&patterns).unwrap()];
        assert!(matches!(sets[0], Patterns::Set(_)));
        let input = Input {
            helo: Some("bad"),
            ..Input::default()
        };
        let mut m = Matches {
            sets: &sets,
            done: Vec::new(),
        };
        assert!(eval(&regex_leaf(3), &input, &mut m));
        let known = &m.done[0].as_ref().unwrap().known;
        assert_eq!(
            known,
            &[Some(true), Some(true), Some(false), Some(true), Some(false)]
        );
    }
}
