//! 1,000 header rules and 1,000 body rules against a typical 20 KB message
//! and a 1 MB message: parse (mail-parser) + evaluate, and evaluate alone.
//! And the shipped rules (`rules/`) against a 2 KB message, at MAIL and at
//! DATA: what every message pays with the defaults.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::rules::{Input, LinkFacts, MessageFacts, RuleSet, Stage};
use std::hint::black_box;
use std::path::{Path, PathBuf};

fn rules_yaml() -> String {
    let headers = [
        "X-Mailer",
        "Subject",
        "From",
        "Received",
        "User-Agent",
        "Reply-To",
        "List-Unsubscribe",
        "X-Spam-Source",
    ];
    let mut y = String::from("rules:\n");
    for i in 0..1000 {
        let h = headers[i % headers.len()];
        y.push_str(&format!(
            "  - id: HDR_{i}\n    description: header rule {i}\n    when: {{header: {{name: {h}, regex: 'promo{i}[a-z]+\\d|bulk-?sender-{i}'}}}}\n    action: {{score: 0.1}}\n"
        ));
    }
    for i in 0..1000 {
        y.push_str(&format!(
            "  - id: BODY_{i}\n    description: body rule {i}\n    when: {{body: {{regex: '\\bcheap(er)?-?deal{i}\\b|win {i} prizes'}}}}\n    action: {{score: 0.1}}\n"
        ));
    }
    y
}

fn message(size: usize) -> Vec<u8> {
    let mut m = String::from(
        "Received: from mx.sender.test (mx.sender.test [192.0.2.1]) by gate.test with ESMTP id 1234\r\n\
From: Alice Example <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: Quarterly report and minutes\r\n\
Date: Sun, 29 Nov 2026 00:00:00 +0000\r\nMessage-ID: <abc@sender.test>\r\nX-Mailer: Portcullis Bench 1.0\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
    );
    let words = [
        "meeting", "budget", "report", "quarter", "please", "review", "attached", "numbers",
        "thanks", "regards",
    ];
    let mut i = 0;
    while m.len() < size {
        let mut line = String::new();
        while line.len() < 70 {
            line.push_str(words[i % words.len()]);
            line.push(' ');
            i += 7;
        }
        m.push_str(line.trim_end());
        m.push_str("\r\n");
    }
    m.into_bytes()
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("portcullis-bench-rules");
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = rules_yaml();
    let set = RuleSet::load_texts(&dir, &[(PathBuf::from("bench.yaml"), yaml.as_str())]).unwrap();
    assert_eq!(set.rules().len(), 2000);
    for (name, size) in [("20KB", 20 * 1024), ("1MB", 1 << 20)] {
        let raw = message(size);
        let mut g = c.benchmark_group(format!("rules_2000_{name}"));
        g.throughput(Throughput::Bytes(raw.len() as u64));
        g.bench_function("parse_and_evaluate", |b| {
            b.iter(|| {
                let parsed = MessageFacts::parse(black_box(&raw));
                let facts = Input {
                    message: Some(&parsed),
                    ..Input::default()
                };
                black_box(set.evaluate(Stage::Data, &facts))
            })
        });
        let parsed = MessageFacts::parse(&raw);
        g.bench_function("evaluate", |b| {
            b.iter(|| {
                let facts = Input {
                    message: Some(&parsed),
                    ..Input::default()
                };
                black_box(set.evaluate(Stage::Data, &facts))
            })
        });
        g.finish();
    }

    let shipped = RuleSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")).unwrap();
    let raw = message(2000);
    let parsed = MessageFacts::parse(&raw);
    let mut g = c.benchmark_group("shipped_rules_2KB");
    let client = Input {
        ip: Some("192.0.2.1".parse().unwrap()),
        helo: Some("mx1"),
        mail_from: Some("alice@sender.test"),
        rcpt_count: 1,
        spf: "pass",
        ..Input::default()
    };
    g.bench_function("mail", |b| {
        b.iter(|| {
            for stage in [Stage::Connect, Stage::Helo, Stage::Mail] {
                black_box(shipped.evaluate(stage, black_box(&client)));
            }
        })
    });
    g.bench_function("parse", |b| b.iter(|| MessageFacts::parse(black_box(&raw))));
    g.bench_function("parse_for_these_rules", |b| {
        b.iter(|| {
            let wanted = |h: &str| shipped.reads_header(h);
            MessageFacts::parse_with(black_box(&raw), LinkFacts::NotWanted, &wanted)
        })
    });
    g.bench_function("mime_parse_alone", |b| {
        b.iter(|| {
            mail_parser::MessageParser::default()
                .parse(black_box(&raw[..]))
                .map(|m| m.parts().len())
        })
    });
    g.bench_function("data", |b| {
        b.iter(|| {
            let facts = Input {
                message: Some(&parsed),
                rcpts: vec!["bob@example.test"],
                ..client.clone()
            };
            black_box(shipped.evaluate(Stage::Data, &facts))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
