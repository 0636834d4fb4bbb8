//! What attachments carry, through both front doors: executables inside
//! ZIP archives, by content whatever their name, double extensions,
//! encrypted archives and zip bombs, as facts the rules refuse on; every
//! archive built here.

use crate::common::{self, Client, FakeMta, Gate, Script, with_attachment};
use common::milter::{Mta, POSTFIX_STEPS};
use portcullis::config::MilterListen;
use portcullis::wire::milter::Response;
use std::io::Write;
use std::time::{Duration, Instant};
use zip::write::SimpleFileOptions;

/// A Windows executable's first octets.
const PE: &[u8] = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00\xb8\x00\x00\x00";

/// The shipped archive rules, applied (their `mode: shadow` lines gone).
fn enforced_rules() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-archrules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/25-archives.yaml"),
    )
    .unwrap();
    let applied = shipped.replace("    mode: shadow\n", "");
    assert_ne!(applied, shipped);
    // The score rule refuses here, so that every fact shows in the reply.
    let applied = applied.replace(
        "action: {score: 4}",
        "action: {reject: {code: 554, enhanced: 5.7.1, text: \"Encrypted archive\"}}",
    );
    std::fs::write(dir.join("25-archives.yaml"), applied).unwrap();
    dir
}

fn zip_of(files: &[(&str, &[u8])], encrypted: bool) -> Vec<u8> {
    use zip::unstable::write::FileOptionsExt;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut w = zip::ZipWriter::new(&mut out);
    for (name, data) in files {
        let mut opts =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        if encrypted {
            opts = opts.with_deprecated_encryption(b"infected").unwrap();
        }
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap();
    out.into_inner()
}

fn tgz_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&b.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// Each shape and the reply text its rule gives (None: delivered).
fn cases() -> Vec<(&'static str, String, Option<&'static str>)> {
    let zeros = vec![0u8; 50 << 20];
    vec![
        (
            "exe in a zip",
            with_attachment(
                "docs.zip",
                "application/zip",
                &zip_of(&[("readme.txt", b"hi"), ("setup.exe", PE)], false),
            ),
            Some("Executables inside archives are not accepted"),
        ),
        (
            "exe in a tar.gz",
            with_attachment(
                "backup.tgz",
                "application/gzip",
                &tgz_of(&[("run/setup.exe", PE)]),
            ),
            Some("Executables inside archives are not accepted"),
        ),
        (
            "exe named as a photo",
            with_attachment("photo.jpg", "image/jpeg", PE),
            Some("Executable attachments are not accepted"),
        ),
        (
            "double extension",
            with_attachment("invoice.pdf.scr", "application/octet-stream", b"not much"),
            Some("Disguised executable attachment"),
        ),
        (
            "encrypted zip",
            with_attachment(
                "secret.zip",
                "application/zip",
                &zip_of(&[("notes.txt", b"hello")], true),
            ),
            Some("Encrypted archive"),
        ),
        (
            "zip bomb",
            with_attachment(
                "zeros.zip",
                "application/zip",
                &zip_of(&[("zeros.bin", &zeros)], false),
            ),
            Some("Archive refused"),
        ),
        (
            "a plain zip",
            with_attachment(
                "report.zip",
                "application/zip",
                &zip_of(&[("report.txt", b"quarterly numbers")], false),
            ),
            None,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn archives_and_disguised_executables_are_refused_through_both_doors() {
    let mta = FakeMta::start(Script::default()).await;
    let mut cfg = common::config::test_config(mta.addr);
    cfg.rules_dir = Some(enforced_rules());
    cfg.milter.listen = vec![MilterListen::Tcp("127.0.0.1:0".parse().unwrap())];
    let g = Gate::start_config(cfg).await;
    let mut delivered = 0;
    for (what, msg, refused) in cases() {
        // The proxy.
        let mut c = Client::hello(g.addr).await;
        let start = Instant::now();
        let r = c
            .send_mail("a@sender.test", &["b@example.test"], msg.as_bytes())
            .await;
        let took = start.elapsed();
        match refused {
            Some(text) => assert!(
                r.starts_with("554 5.7.1") && r.contains(text),
                "{what}: {r}"
            ),
            None => {
                assert!(r.starts_with("250"), "{what}: {r}");
                delivered += 1;
            }
        }
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
        assert_eq!(mta.stored().len(), delivered, "{what}");
        c.cmd("QUIT", "221").await;

        // The milter: the same reply to the MTA.
        let mut m = Mta::connect(g.milter.unwrap(), POSTFIX_STEPS).await;
        m.connect_from("192.0.2.9", "sender.test").await;
        m.helo("sender.test").await;
        m.mail("a@sender.test").await;
        m.rcpt("b@example.test").await;
        let replies = m.message(&msg).await;
        let code = replies.iter().find_map(|r| match r {
            Response::ReplyCode(t) => Some(String::from_utf8_lossy(t).into_owned()),
            _ => None,
        });
        match refused {
            Some(text) => {
                let code = code.unwrap_or_else(|| panic!("{what}: {replies:?}"));
                assert!(
                    code.starts_with("554 5.7.1") && code.contains(text),
                    "{what}: {code}"
                );
            }
            None => assert!(code.is_none(), "{what}: {replies:?}"),
        }
    }
}
