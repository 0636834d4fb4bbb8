//! What a message links to: the hosts of the URLs in its text and HTML
//! parts, for the URL blocklists (`checks::uribl`) and the `url_domain`
//! rules.
//!
//! The parts come decoded from mail-parser (quoted-printable and base64
//! undone, soft line breaks joined, charsets converted). HTML is read with
//! a tokenizer (lol_html) for the targets of `href`, `src` and `action`,
//! which are what a reader's click goes to whatever the link text says;
//! its text and the text parts go through linkify. Every candidate is
//! parsed with the `url` crate (WHATWG: IDN to punycode, `0x7f.1` style
//! addresses normalised); only http, https and ftp count, so `hxxp://`
//! defanged links never do. Bare names (`www.example.com`) count when
//! their suffix is a public one.

use std::collections::HashSet;
use std::net::IpAddr;

/// Distinct hosts kept per message, past which the rest are ignored.
const MAX_HOSTS: usize = 1000;

/// Memory the HTML tokenizer may use for one part (it buffers a tag split
/// across its input, nothing else).
const HTML_MEMORY: usize = 1 << 20;

/// The hosts a message links to, most telling first: link targets in
/// HTML, then URLs written in the text, then bare host names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Links {
    /// Lower-case host names, IDN in punycode, no trailing dot.
    pub hosts: Vec<String>,
    /// IP-literal hosts (`http://192.0.2.1/`).
    pub ips: Vec<IpAddr>,
}

/// Where a candidate was found; earlier tiers are looked up first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Target,
    Text,
    Bare,
}

impl Links {
    /// Parses `raw` and finds its links.
    pub fn parse(raw: &[u8]) -> Links {
        match mail_parser::MessageParser::default().parse(raw) {
            Some(msg) => Links::of(&msg),
            None => Links::default(),
        }
    }

    /// The links of every text and HTML part of `msg` (nested messages
    /// included).
    pub fn of(msg: &mail_parser::Message<'_>) -> Links {
        let mut found: Vec<(Tier, String)> = Vec::new();
        for part in msg.parts() {
            let html = matches!(part.kind(), mail_parser::PartKind::Html);
            let Some(text) = part.text() else { continue };
            if html {
                html_targets(&text, &mut found);
                in_text(&mail_parser::html_to_text(&text), &mut found);
            } else {
                in_text(&text, &mut found);
            }
        }
        // Stable: document order within a tier.
        found.sort_by_key(|(tier, _)| *tier);
        let mut links = Links::default();
        let mut seen = HashSet::new();
        for (_, candidate) in found {
            if links.hosts.len() + links.ips.len() >= MAX_HOSTS {
                break;
            }
            match host_of(&candidate) {
                Some(Host::Name(h)) if seen.insert(h.clone()) => links.hosts.push(h),
                Some(Host::Ip(ip)) if seen.insert(ip.to_string()) => links.ips.push(ip),
                _ => {}
            }
        }
        links
    }

    /// The registrable domains of the hosts (Public Suffix List), each once,
    /// in order: `www.example.co.uk` gives `example.co.uk`.
    pub fn domains(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.hosts
            .iter()
            .filter_map(|h| registrable(h))
            .filter(|d| seen.insert(d.clone()))
            .collect()
    }
}

/// The registrable domain of `host`, if its suffix is a known public one.
pub fn registrable(host: &str) -> Option<String> {
    let d = psl::domain(host.as_bytes())?;
    if !d.suffix().is_known() {
        return None;
    }
    std::str::from_utf8(d.as_bytes()).ok().map(str::to_string)
}

enum Host {
    Name(String),
    Ip(IpAddr),
}

/// The host of one candidate, if it is a web link.
fn host_of(candidate: &str) -> Option<Host> {
    let c = candidate.trim();
    let has_scheme = c.split_once(':').is_some_and(|(s, _)| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.')
    }) && !c.starts_with("//");
    let url = if has_scheme {
        url::Url::parse(c).ok()?
    } else {
        // `//host/path`, or a bare `www.example.com/x`.
        let rest = c.trim_start_matches('/');
        url::Url::parse(&format!("http://{rest}")).ok()?
    };
    if !matches!(url.scheme(), "http" | "https" | "ftp") {
        return None;
    }
    match url.host()? {
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.');
            // A bare word or a made-up suffix is not a host worth a lookup.
            psl::suffix(d.as_bytes())
                .filter(|s| s.is_known() && d.contains('.'))
                .map(|_| Host::Name(d.to_string()))
        }
        url::Host::Ipv4(ip) => Some(Host::Ip(IpAddr::V4(ip))),
        url::Host::Ipv6(ip) => Some(Host::Ip(IpAddr::V6(ip))),
    }
}

/// URLs and bare names in plain text.
fn in_text(text: &str, out: &mut Vec<(Tier, String)>) {
    let mut finder = linkify::LinkFinder::new();
    finder.kinds(&[linkify::LinkKind::Url]);
    finder.url_must_have_scheme(false);
    for link in finder.links(text) {
        let s = link.as_str();
        let tier = if s.contains("://") {
            Tier::Text
        } else {
            Tier::Bare
        };
        out.push((tier, s.to_string()));
    }
}

/// The targets of links, images, frames and forms in an HTML part.
fn html_targets(html: &str, out: &mut Vec<(Tier, String)>) {
    use lol_html::{HtmlRewriter, MemorySettings, Settings, element};
    let found = std::cell::RefCell::new(Vec::new());
    let take = |value: Option<String>| {
        if let Some(v) = value {
            // Entities in an attribute (`&#104;ttp://`) are decoded first.
            let v = if v.contains('&') {
                mail_parser::html_to_text(&v)
            } else {
                v
            };
            found.borrow_mut().push((Tier::Target, v));
        }
    };
    {
        let settings = Settings::new()
            .append_element_content_handler(element!(
                "a[href], area[href], link[href], base[href]",
                |el| {
                    take(el.get_attribute("href"));
                    Ok(())
                }
            ))
            .append_element_content_handler(element!(
                "img[src], iframe[src], frame[src], embed[src], source[src], script[src]",
                |el| {
                    take(el.get_attribute("src"));
                    Ok(())
                }
            ))
            .append_element_content_handler(element!("form[action]", |el| {
                take(el.get_attribute("action"));
                Ok(())
            }))
            .with_memory_settings(MemorySettings::new().with_max_allowed_memory_usage(HTML_MEMORY));
        let mut rewriter = HtmlRewriter::new(settings, |_: &[u8]| {});
        // Past the memory bound the tokenizer stops; what it found so far counts.
        if rewriter.write(html.as_bytes()).is_ok() {
            let _ = rewriter.end();
        }
    }
    out.extend(found.into_inner());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(raw: &str) -> Links {
        Links::parse(raw.as_bytes())
    }

    #[test]
    fn text_urls_and_bare_names() {
        let l = links(
            "Subject: x\r\n\r\nSee https://Shop.Example.COM/a?b=1 and www.bare.example.org today.\r\nNot a host: readme.txt, nor foo.invalidtld.\r\n",
        );
        assert_eq!(l.hosts, ["shop.example.com", "www.bare.example.org"]);
        assert_eq!(l.domains(), ["example.com", "example.org"]);
    }

    #[test]
    fn html_targets_come_before_the_text_and_differ_from_it() {
        let raw = "Subject: x\r\nContent-Type: text/html\r\n\r\n<p>Your bank: <a href=\"https://evil.example.net/login\">https://www.mybank.example.com</a></p><img src='http://pixel.example.org/p.gif'>\r\n";
        let l = links(raw);
        assert_eq!(
            l.hosts,
            [
                "evil.example.net",
                "pixel.example.org",
                "www.mybank.example.com"
            ]
        );
    }

    #[test]
    fn quoted_printable_and_base64_are_decoded_and_split_urls_joined() {
        // A URL cut by quoted-printable's soft line break.
        let qp = "Subject: x\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<a href=3D\"https://split.exam=\r\nple.com/path\">here</a>\r\n";
        assert_eq!(links(qp).hosts, ["split.example.com"]);
        use base64::Engine;
        let b64 =
            base64::engine::general_purpose::STANDARD.encode("Visit http://b64.example.net/x now");
        let raw = format!(
            "Subject: x\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n"
        );
        assert_eq!(links(&raw).hosts, ["b64.example.net"]);
    }

    #[test]
    fn multipart_parts_are_all_read() {
        let raw = "Subject: x\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhttp://plain.example.com\r\n--b\r\nContent-Type: text/html\r\n\r\n<a href=\"http://html.example.com\">x</a>\r\n--b--\r\n";
        assert_eq!(links(raw).hosts, ["html.example.com", "plain.example.com"]);
    }

    #[test]
    fn idn_and_punycode_become_one_ascii_form() {
        let l = links(
            "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhttp://bücher.example/ and http://xn--bcher-kva.example/ and https://müller.co.uk/\r\n",
        );
        // `.example` is reserved, not public: only the .co.uk name counts.
        assert_eq!(l.hosts, ["xn--mller-kva.co.uk"]);
        assert_eq!(l.domains(), ["xn--mller-kva.co.uk"]);
        let l = links(
            "Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhttp://bücher.de/ and http://xn--bcher-kva.de/x\r\n",
        );
        assert_eq!(l.hosts, ["xn--bcher-kva.de"]);
    }

    #[test]
    fn defanged_and_foreign_schemes_never_count() {
        let l = links(
            "Subject: x\r\n\r\nhxxp://evil.example.com/ and hxxps://evil2.example.com and evil3[.]example[.]com and mailto:a@evil4.example.com and javascript:alert(1)\r\n",
        );
        assert!(l.hosts.is_empty(), "{l:?}");
    }

    #[test]
    fn ip_literals_and_entities() {
        let raw = "Subject: x\r\nContent-Type: text/html\r\n\r\n<a href=\"http://192.0.2.7/x\">a</a><a href=\"http://0xC0.0.2.8/\">b</a><a href=\"&#104;ttp://entity.example.com/\">c</a><a href=\"/relative\">d</a><a href=\"#top\">e</a>\r\n";
        let l = links(raw);
        assert_eq!(
            l.ips,
            [
                "192.0.2.7".parse::<IpAddr>().unwrap(),
                "192.0.2.8".parse().unwrap()
            ]
        );
        assert_eq!(l.hosts, ["entity.example.com"]);
    }

    #[test]
    fn registrable_domains_follow_the_public_suffix_list() {
        assert_eq!(
            registrable("a.b.example.co.uk").as_deref(),
            Some("example.co.uk")
        );
        assert_eq!(
            registrable("user.github.io").as_deref(),
            Some("user.github.io")
        );
        assert_eq!(registrable("co.uk"), None);
        assert_eq!(registrable("host.localdomain"), None);
    }

    #[test]
    fn a_megabyte_of_html_is_read_quickly_and_bounded() {
        let mut html = String::from("Subject: x\r\nContent-Type: text/html\r\n\r\n<html><body>");
        let mut i = 0;
        while html.len() < 1 << 20 {
            html.push_str(&format!(
                "<p>Offer {i}: <a href=\"https://h{i}.example{}.com/p?q={i}\">see https://t{i}.example.org</a></p>\r\n",
                i % 3000
            ));
            i += 1;
        }
        let t = std::time::Instant::now();
        let l = links(&html);
        let took = t.elapsed();
        assert_eq!(l.hosts.len(), MAX_HOSTS);
        assert!(
            l.hosts[0].starts_with("h0.example0.com"),
            "{:?}",
            &l.hosts[..3]
        );
        // Unoptimised test build on a shared machine: generous, but a
        // regex backtracking or a quadratic step would be far past it.
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    }
}
