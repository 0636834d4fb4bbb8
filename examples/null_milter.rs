//! A milter that checks nothing, for `benches/milter.sh`: the floor any
//! milter pays through Postfix. It agrees the same steps as Portcullis (no
//! reply to CONNECT, HELO, MAIL, DATA, headers and body), answers
//! Continue to RCPT and to the end of the message, and otherwise only
//! reads. A thread per MTA connection with blocking I/O, as libmilter
//! serves them; TCP_QUICKACK as Portcullis sets it (else Postfix's macro
//! packets wait 40 ms for a delayed ACK).
//!
//!     null_milter 127.0.0.1:12553

use portcullis::milter::STEPS;
use portcullis::wire::milter::{Command, Decoder, Response, VERSION};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let at = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:12553".into());
    let listener = TcpListener::bind(&at)?;
    for mta in listener.incoming() {
        let Ok(mta) = mta else { continue };
        std::thread::spawn(move || {
            let _ = serve(mta);
        });
    }
    Ok(())
}

fn serve(mut mta: TcpStream) -> std::io::Result<()> {
    mta.set_nodelay(true)?;
    let mut decoder = Decoder::new(1 << 20);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut unanswered = false;
    loop {
        if unanswered {
            socket2::SockRef::from(&mta).set_tcp_quickack(true)?;
        }
        let n = mta.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        decoder.feed(&chunk[..n]);
        loop {
            if decoder.body().ok().flatten().is_some() {
                continue;
            }
            let Ok(Some(command)) = decoder.command() else {
                break;
            };
            let answer = match command {
                Command::Negotiate { version, steps, .. } => Some(Response::Negotiate {
                    version: VERSION.min(version),
                    actions: 0,
                    steps: STEPS & steps,
                    macros: Vec::new(),
                }),
                Command::Rcpt(_) | Command::EndOfMessage(_) => Some(Response::Continue),
                Command::Quit => return Ok(()),
                _ => None,
            };
            if let Some(r) = answer {
                r.encode(&mut out);
            }
        }
        unanswered = out.is_empty();
        if !out.is_empty() {
            mta.write_all(&out)?;
            out.clear();
        }
    }
}
