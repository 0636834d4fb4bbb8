//! Finding a message's links (issue 23: under 1 ms of CPU for a 100 KB
//! HTML message with 50 links): MIME parse, HTML tokenizer for the link
//! targets, URL finder over the text, URL parsing and the Public Suffix
//! List, as the URL blocklists and the rules run it.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use portcullis::rules::links::Links;
use std::hint::black_box;

/// A newsletter-like HTML message of about `size` octets with `links`
/// distinct link targets spread through it, quoted-printable encoded as
/// mail clients send it.
pub fn html_message(size: usize, links: usize) -> Vec<u8> {
    let mut html = String::from("<html><head><style>p{margin:0}</style></head><body>\n");
    let para = "<p>Dear customer, our quarterly offers are here. Read the terms, \
                compare the prices and choose what suits you best this season.</p>\n";
    let every = (size / links.max(1)).max(1);
    let mut i = 0;
    while html.len() < size {
        html.push_str(para);
        if html.len() / every > i && i < links {
            html.push_str(&format!(
                "<p><a href=\"https://click{i}.news{}.example-shop.com/track?id={i}&amp;u=42\">Offer {i}</a> \
                 <img src=\"https://img.cdn{i}.example.net/p{i}.png\" alt=\"\"></p>\n",
                i % 7
            ));
            i += 1;
        }
    }
    html.push_str("</body></html>\n");
    let mut qp = String::new();
    for line in html.lines() {
        // Soft line breaks at 76 columns, `=` escaped: what QP looks like.
        let escaped = line.replace('=', "=3D");
        let mut rest = escaped.as_str();
        while rest.len() > 75 {
            let mut cut = 75;
            while !rest.is_char_boundary(cut)
                || rest[..cut].ends_with('=')
                || rest[cut - 2..cut].contains('=')
            {
                cut -= 1;
            }
            qp.push_str(&rest[..cut]);
            qp.push_str("=\r\n");
            rest = &rest[cut..];
        }
        qp.push_str(rest);
        qp.push_str("\r\n");
    }
    format!(
        "From: Shop <news@example-shop.com>\r\nTo: bob@example.test\r\nSubject: Offers\r\n\
MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\n{qp}"
    )
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let m = html_message(100 * 1024, 50);
    let found = Links::parse(&m);
    assert!(found.hosts.len() >= 100, "{}", found.hosts.len());
    let mut g = c.benchmark_group("links");
    g.throughput(Throughput::Bytes(m.len() as u64));
    g.bench_function("100KB_html_50_links", |b| {
        b.iter(|| black_box(Links::parse(black_box(&m))))
    });
    let text = {
        let mut t = String::from("Subject: plain\r\n\r\n");
        while t.len() < 20 * 1024 {
            t.push_str("Thanks for the meeting notes, see you next week at the office.\r\n");
        }
        t.into_bytes()
    };
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("20KB_text_no_links", |b| {
        b.iter(|| black_box(Links::parse(black_box(&text))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
