//! The report as text and as a self-contained HTML page, both from one
//! list of sections (`Report::sections`): a new table is one line there.

use super::{Count, Day, Greylisting, Hour, Rate, Report, WhatIf, percent};
use std::fmt::Write;

/// One part of the report, in the order both outputs give them.
enum Section<'a> {
    /// Named counts (the HTML title is the same, capitalised).
    Counts(&'static str, &'a [Count]),
    WhatIf(&'a [WhatIf]),
    /// Whether the greylisted came back (after its outcomes' counts).
    CameBack(&'a Greylisting),
    Hours(&'a [Hour]),
    Days(&'a [Day]),
    /// Rejection rates by a name: (title, first column, rows).
    Rates(&'static str, &'static str, &'a [Rate]),
}

/// A period's row: when, transactions, rejected, tempfailed.
type Period<'a> = (&'a str, u64, u64, u64);

impl Report {
    fn sections(&self) -> Vec<Section<'_>> {
        use Section::*;
        vec![
            Counts("front doors (mode)", &self.modes),
            Counts("verdicts", &self.verdicts),
            Counts(
                "refused connections by reason (% of refused)",
                &self.refused_reasons,
            ),
            Counts("rejections by reason", &self.reject_reasons),
            Counts("tempfails by reason", &self.tempfail_reasons),
            Counts("SPF results", &self.spf),
            Counts("DKIM results", &self.dkim),
            Counts("DMARC results", &self.dmarc),
            Counts("antivirus (clamd)", &self.antivirus),
            Counts("scanner verdicts", &self.scanner),
            Counts("rules (enforced)", &self.rules),
            Counts("shadow rules (would have hit)", &self.shadow_rules),
            WhatIf(&self.what_if),
            Rates("by policy", "policy", &self.policies),
            Rates("by recipient domain", "domain", &self.rcpt_domains),
            Counts("reply codes", &self.codes),
            Counts("DNSBL zones", &self.dnsbl_zones),
            Counts("URL blocklist zones", &self.uribl_zones),
            Counts("listed link domains", &self.uribl_domains),
            Counts("greylisting", &self.greylisting.outcomes),
            CameBack(&self.greylisting),
            Counts("rate limits hit", &self.rate_limits),
            Hours(&self.hours),
            Days(&self.days),
            Counts("top refused client networks", &self.top_networks),
            Counts("top refused sender domains", &self.top_sender_domains),
        ]
    }

    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "transactions: {}   refused connections: {}",
            self.transactions, self.refused_connections
        );
        for s in self.sections() {
            text(&mut o, &s);
        }
        o
    }

    /// A self-contained HTML page: tables and an inline SVG chart of the
    /// rejection rate per hour, stacked by reason. No scripts, no network.
    pub fn to_html(&self) -> String {
        let mut o = String::from(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Portcullis rejection report</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>\n",
        );
        let _ = writeln!(
            o,
            "<h1>Portcullis rejection report</h1>\n<p>{} transactions, {} refused connections.</p>",
            self.transactions, self.refused_connections
        );
        self.chart(&mut o);
        for s in self.sections() {
            html(&mut o, &s);
        }
        o.push_str("</body></html>\n");
        o
    }

    /// One bar per hour, height the rejection rate, stacked by reason.
    fn chart(&self, o: &mut String) {
        let reasons: Vec<String> = self.reject_reasons.iter().map(|c| c.name.clone()).collect();
        let palette = [
            "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#1f77b4", "#2ca02c",
        ];
        let (bw, ch) = (24.0, 200.0);
        let width = 60.0 + bw * self.hours.len().max(1) as f64;
        let _ = writeln!(
            o,
            "<h2>Rejection rate per hour, by reason</h2>\n<svg width=\"{width}\" height=\"{}\" role=\"img\" aria-label=\"rejection rate per hour\">",
            ch + 45.0
        );
        let _ = writeln!(
            o,
            "<line x1=\"50\" y1=\"10\" x2=\"50\" y2=\"{}\" stroke=\"black\"/><text x=\"5\" y=\"15\" font-size=\"10\">100%</text><text x=\"5\" y=\"{}\" font-size=\"10\">0%</text>",
            ch + 10.0,
            ch + 10.0
        );
        for (i, h) in self.hours.iter().enumerate() {
            let x = 55.0 + bw * i as f64;
            let mut y = ch + 10.0;
            for (j, reason) in reasons.iter().enumerate() {
                let n = h.reasons.get(reason).copied().unwrap_or(0);
                if n == 0 || h.transactions == 0 {
                    continue;
                }
                let hgt = ch * n as f64 / h.transactions as f64;
                y -= hgt;
                let _ = writeln!(
                    o,
                    "<rect x=\"{x}\" y=\"{y:.1}\" width=\"{}\" height=\"{hgt:.1}\" fill=\"{}\"><title>{} {}: {n}</title></rect>",
                    bw - 4.0,
                    palette[j % palette.len()],
                    esc(&h.hour),
                    esc(reason)
                );
            }
            let _ = writeln!(
                o,
                "<text x=\"{x}\" y=\"{}\" font-size=\"8\">{}</text>",
                ch + 25.0,
                esc(h.hour.get(11..13).unwrap_or(""))
            );
            // The date under the first hour of each day.
            let day = h.hour.get(..10).unwrap_or("");
            if i == 0 || self.hours[i - 1].hour.get(..10) != Some(day) {
                let _ = writeln!(
                    o,
                    "<text x=\"{x}\" y=\"{}\" font-size=\"8\">{}</text>",
                    ch + 37.0,
                    esc(day)
                );
            }
        }
        let _ = writeln!(o, "</svg>\n<p>");
        for (j, reason) in reasons.iter().enumerate() {
            let _ = write!(
                o,
                "<span style=\"color:{}\">&#9632;</span> {} &nbsp; ",
                palette[j % palette.len()],
                esc(reason)
            );
        }
        let _ = writeln!(o, "</p>");
    }
}

/// A section as text: titled columns, left out when empty.
fn text(o: &mut String, s: &Section<'_>) {
    match s {
        Section::Counts(title, v) => {
            if v.is_empty() {
                return;
            }
            let _ = writeln!(o, "\n{title}");
            for c in *v {
                let _ = writeln!(o, "  {:<40} {:>8} {:>7.2}%", c.name, c.count, c.rate);
            }
        }
        Section::WhatIf(v) => {
            if v.is_empty() {
                return;
            }
            let _ = writeln!(
                o,
                "\nwhat if enforced (record-mode checks and shadow rules, each alone)\n  {:<40} {:>8} {:>8} {:>9} {:>18}",
                "", "fired", "reject", "tempfail", "otherwise accepted"
            );
            for w in *v {
                let _ = writeln!(
                    o,
                    "  {:<40} {:>8} {:>8} {:>9} {:>18}",
                    w.name, w.fired, w.would_reject, w.would_tempfail, w.otherwise_accepted
                );
                if !w.top_sender_domains.is_empty() {
                    let _ = writeln!(
                        o,
                        "      would hit: {}; networks {}",
                        list(&w.top_sender_domains, |s| s.to_string()),
                        list(&w.top_networks, |s| s.to_string())
                    );
                }
            }
        }
        Section::CameBack(g) => {
            if g.greylisted > 0 {
                let _ = writeln!(
                    o,
                    "  greylisted client/sender pairs: {}, came back and passed: {} ({:.1}%), never retried: {}",
                    g.greylisted, g.came_back, g.came_back_rate, g.never_retried
                );
            }
        }
        Section::Hours(hours) => {
            text_periods(o, "per hour (UTC)", &hour_rows(hours));
        }
        // One day says nothing the hours did not.
        Section::Days(days) if days.len() > 1 => {
            text_periods(o, "per day (UTC)", &day_rows(days));
        }
        Section::Days(_) => {}
        // Nothing to compare with one policy.
        Section::Rates(title, _, rows)
            if rows.len() > 1 || rows.iter().any(|r| r.name != "(gate)") =>
        {
            text_periods(o, title, &rate_rows(rows));
        }
        Section::Rates(..) => {}
    }
}

fn rate_rows(rows: &[Rate]) -> Vec<Period<'_>> {
    rows.iter()
        .map(|r| (r.name.as_str(), r.transactions, r.rejected, r.tempfailed))
        .collect()
}

fn text_periods(o: &mut String, title: &str, rows: &[Period<'_>]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\n{title:<20} transactions  rejected  tempfailed  reject rate"
    );
    for (when, t, r, tf) in rows {
        let _ = writeln!(
            o,
            "  {:<18} {:>12} {:>9} {:>11} {:>11.2}%",
            when,
            t,
            r,
            tf,
            percent(*r, *t)
        );
    }
}

/// A section as HTML: a heading and a table, empty or not.
fn html(o: &mut String, s: &Section<'_>) {
    match s {
        Section::Counts(title, v) => {
            let _ = writeln!(
                o,
                "<h2>{}</h2>\n<table><tr><th>name</th><th>count</th><th>% of transactions</th></tr>",
                esc(&capitalised(title))
            );
            for c in *v {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
                    esc(&c.name),
                    c.count,
                    c.rate
                );
            }
            let _ = writeln!(o, "</table>");
        }
        Section::WhatIf(v) => {
            if v.is_empty() {
                return;
            }
            let _ = writeln!(
                o,
                "<h2>What if enforced (record-mode checks and shadow rules, each alone)</h2>\n<table><tr><th>name</th><th>fired</th><th>would reject</th><th>would tempfail</th><th>otherwise accepted</th><th>would hit (sender domains)</th><th>networks</th></tr>"
            );
            for w in *v {
                let _ = writeln!(
                    o,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&w.name),
                    w.fired,
                    w.would_reject,
                    w.would_tempfail,
                    w.otherwise_accepted,
                    list(&w.top_sender_domains, esc),
                    list(&w.top_networks, esc)
                );
            }
            let _ = writeln!(o, "</table>");
        }
        Section::CameBack(g) => {
            if g.greylisted > 0 {
                let _ = writeln!(
                    o,
                    "<p>Greylisted client/sender pairs: {}; came back and passed: {} ({:.1}%); never retried: {}</p>",
                    g.greylisted, g.came_back, g.came_back_rate, g.never_retried
                );
            }
        }
        Section::Hours(hours) => {
            html_periods(o, "Per hour", "UTC", &hour_rows(hours));
        }
        Section::Days(days) => {
            html_periods(o, "Per day", "UTC", &day_rows(days));
        }
        Section::Rates(title, column, rows) => {
            html_periods(o, &capitalised(title), column, &rate_rows(rows));
        }
    }
}

fn html_periods(o: &mut String, title: &str, column: &str, rows: &[Period<'_>]) {
    let _ = writeln!(
        o,
        "<h2>{title}</h2>\n<table><tr><th>{column}</th><th>transactions</th><th>rejected</th><th>tempfailed</th><th>reject rate %</th></tr>"
    );
    for (when, t, r, tf) in rows {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{t}</td><td>{r}</td><td>{tf}</td><td>{:.2}</td></tr>",
            esc(when),
            percent(*r, *t)
        );
    }
    let _ = writeln!(o, "</table>");
}

fn hour_rows(hours: &[Hour]) -> Vec<Period<'_>> {
    hours
        .iter()
        .map(|h| (h.hour.as_str(), h.transactions, h.rejected, h.tempfailed))
        .collect()
}

fn day_rows(days: &[Day]) -> Vec<Period<'_>> {
    days.iter()
        .map(|d| (d.day.as_str(), d.transactions, d.rejected, d.tempfailed))
        .collect()
}

/// `name count, name count`, each name as `show` gives it.
fn list(v: &[Count], show: impl Fn(&str) -> String) -> String {
    v.iter()
        .map(|c| format!("{} {}", show(&c.name), c.count))
        .collect::<Vec<_>>()
        .join(", ")
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
