//! What the man pages say beyond the command line's own definition (which
//! `clap_mangen` renders): FILES, SIGNALS, EXIT STATUS, ENVIRONMENT,
//! EXAMPLES and SEE ALSO, in roff. `portcullis(8)` and `portcullis-run(8)`
//! are the daemon's (section 8); the verbs that read a config or a log
//! offline are commands (section 1).

/// The man section of `portcullis` (`""`) or of one of its subcommands.
pub fn section(sub: &str) -> &'static str {
    match sub {
        "" | "run" => "8",
        _ => "1",
    }
}

/// Every page's SEE ALSO: the other pages and the installed documents.
fn see_also(sub: &str) -> String {
    let mut pages: Vec<String> = ["", "run", "check", "stats", "explain", "replay", "trace"]
        .iter()
        .filter(|s| **s != sub)
        .map(|s| {
            let name = if s.is_empty() {
                "portcullis".to_string()
            } else {
                format!("portcullis\\-{s}")
            };
            format!("\\fB{name}\\fR({})", section(s))
        })
        .collect();
    pages.push("\\fBpostconf\\fR(5)".into());
    pages.push("\\fBjournalctl\\fR(1)".into());
    format!(
        ".SH \"SEE ALSO\"\n{}\n.PP\n\\fI{DOC}/README.md\\fR: set-up in front of Postfix or Exim, as a milter, the log line, metrics, greylisting and rate limits.\n.br\n\\fI{DOC}/rules.md\\fR: writing rules.\n.br\n\\fI{DOC}/portcullis.yaml.reference\\fR: every config key, with its default.\n",
        pages.join(",\n")
    )
}

const DOC: &str = "/usr/share/doc/portcullis";

const FILES: &str = r#".SH FILES
.TP
\fI/etc/portcullis/portcullis.yaml\fR
The config. \fBrun\fR, \fBcheck\fR and \fBexplain\fR read it when no \fB\-\-config\fR is given and \fBPORTCULLIS_CONFIG\fR is not set (without it: the embedded default, which is the reference file). Relative paths in it are relative to its directory.
.TP
\fI/etc/portcullis/rules/\fR
The rule files (\fI*.yaml\fR, loaded in name order) and their lists (\fIlists/*.txt\fR): \fBrules_dir\fR, by default \fIrules/\fR beside the config file. Reloaded when they change and on SIGHUP.
.TP
\fI/var/lib/portcullis/state.jsonl\fR
Greylisting, rate-limit and reputation state of the embedded store (\fBstate.file\fR), saved at shutdown and read at start.
.TP
\fI/var/log/portcullis/\fR
For \fBlog.file\fR, when set. Unset (as shipped), the log goes to standard output: under systemd, the journal (\fBjournalctl \-u portcullis \-o short\-iso\fR).
.TP
\fI/lib/systemd/system/portcullis.service\fR
The unit: \fBportcullis check \-\-no\-probe\fR, then \fBportcullis run\fR as the \fBportcullis\fR user; \fBsystemctl reload\fR sends SIGHUP.
"#;

const SIGNALS: &str = r#".SH SIGNALS
.TP
\fBSIGHUP\fR
Reopen the log file (for logrotate), reload the rules, then reload the config file (keys that need a restart are logged by name and keep their running values) and the TLS certificate. A file that does not load changes nothing; the error is logged.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, let transactions in flight finish within \fBtimeouts.shutdown\fR, save the state file, and exit 0.
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBPORTCULLIS_CONFIG\fR
The config file, when \fB\-\-config\fR is not given.
.TP
\fBJOURNAL_STREAM\fR
Set by systemd when standard output is the journal: log lines then carry no time of their own (the journal's is used) and start with their syslog priority, so \fBjournalctl \-p warning\fR works.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR: READY=1 once every listener is bound, RELOADING=1 around reloads, STOPPING=1, and watchdog pings.
"#;

/// The sections of one page after its options.
pub fn extra(sub: &str) -> String {
    let body = match sub {
        "" => format!(
            "{FILES}{SIGNALS}.SH \"EXIT STATUS\"\nSee each command's page: 0 on success, 1 on an error.\n{ENVIRONMENT}.SH EXAMPLES\n.nf\nportcullis check && systemctl reload portcullis\njournalctl \\-u portcullis \\-o short\\-iso \\-\\-since today | portcullis stats\nportcullis explain \\-\\-ip 192.0.2.1 \\-\\-helo mx.example.net \\-\\-from a@example.net \\-\\-rcpt b@example.org\njournalctl \\-u portcullis \\-o short\\-iso | portcullis trace 4XyZ1234\n.fi\n"
        ),
        "run" => format!(
            "{FILES}{SIGNALS}.SH \"EXIT STATUS\"\n.TP\n0\nStopped by SIGTERM or SIGINT after draining.\n.TP\n1\nThe config or the rules do not load, an address cannot be bound, or upstream answers but cannot be told the client's address (no XCLIENT, no PROXY protocol).\n{ENVIRONMENT}.SH EXAMPLES\n.nf\nportcullis run \\-\\-config /etc/portcullis/portcullis.yaml\nsystemctl reload portcullis     # SIGHUP\n.fi\n"
        ),
        "check" => format!(
            "{FILES}.SH \"EXIT STATUS\"\n.TP\n0\nThe config and the rules load; warnings may have been printed.\n.TP\n1\nAt least one error, each printed on standard error.\n{ENVIRONMENT}.SH EXAMPLES\n.nf\nportcullis check && systemctl reload portcullis\nportcullis check \\-\\-config new.yaml \\-\\-bind\n.fi\n"
        ),
        "stats" => 
            ".SH \"EXIT STATUS\"\n0 with a report; 1 when the input holds no Portcullis log line or a file cannot be read.\n.SH EXAMPLES\n.nf\njournalctl \\-u portcullis \\-o short\\-iso \\-\\-since today | portcullis stats\nportcullis stats \\-\\-since 24h /var/log/portcullis/gate.log*\nportcullis stats \\-\\-json gate.log | jq .reject_reasons\nportcullis stats \\-\\-html report.html gate.log\n.fi\n.PP\nRead the journal with \\fB\\-o short\\-iso\\fR (or \\fBshort\\fR): \\fB\\-o cat\\fR drops the time of lines written to the journal.\n"
            .to_string(),
        "explain" => format!(
            "{FILES}.SH \"EXIT STATUS\"\n0 with the explanation; 1 when the config does not load or the message cannot be read.\n{ENVIRONMENT}.SH EXAMPLES\n.nf\nportcullis explain \\-\\-ip 192.0.2.1 \\-\\-helo mx.example.net \\-\\-from a@example.net \\-\\-rcpt b@example.org \\-\\-message spam.eml\n.fi\n"
        ),
        "replay" => format!(
            "{FILES}.SH \"EXIT STATUS\"\n0 when every path was read (messages that could not be judged are reported on their line and counted); 1 when the config does not load or a path cannot be read.\n{ENVIRONMENT}.SH EXAMPLES\n.nf\nportcullis replay \\-\\-no\\-dns ~/Maildir\nportcullis replay \\-\\-log /var/log/portcullis/gate.log /var/mail/archive.mbox\n.fi\n"
        ),
        "trace" => ".SH \"EXIT STATUS\"\n0 with the session's lines; 1 when the id is in no line.\n.SH EXAMPLES\n.nf\njournalctl \\-u portcullis \\-o short\\-iso | portcullis trace 6b0d751000001e\nportcullis trace 4XyZ1234 /var/log/portcullis/gate.log*\n.fi\n".to_string(),
        _ => String::new(),
    };
    body + &see_also(sub)
}
