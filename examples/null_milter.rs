//! A milter that checks nothing, for `benches/milter.sh`: the floor any
//! milter pays through Postfix. It agrees the same steps as Portcullis (no
//! reply to CONNECT, HELO, MAIL, DATA, headers and body), answers
//! Continue to RCPT and to the end of the message, and otherwise only
//! reads. A thread per MTA connection with blocking I/O, as libmilter
//! serves them; TCP_QUICKACK as Portcullis sets it (else Postfix's macro
//! packets wait 40 ms for a delayed ACK).
//!
//! With `--tokio`, the same on one thread with a current-thread tokio
//! runtime, a task per MTA connection, as Portcullis serves them on a
//! machine with 2 or 3 CPUs: the floor for a milter built as Portcullis is.
//!
//!     null_milter 127.0.0.1:12553 [--tokio]

use portcullis::milter::STEPS;
use portcullis::wire::milter::{Command, Decoder, Response, VERSION};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let at = args.next().unwrap_or_else(|| "127.0.0.1:12553".into());
    if args.next().as_deref() == Some("--tokio") {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(serve_tasks(&at));
    }
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
        let quit = answer(&mut decoder, &mut out);
        unanswered = out.is_empty();
        if !out.is_empty() {
            mta.write_all(&out)?;
            out.clear();
        }
        if quit {
            return Ok(());
        }
    }
}

async fn serve_tasks(at: &str) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(at).await?;
    loop {
        let (mta, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = serve_task(mta).await;
        });
    }
}

async fn serve_task(mut mta: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    mta.set_nodelay(true)?;
    let mut decoder = Decoder::new(1 << 20);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut unanswered = false;
    loop {
        if unanswered {
            socket2::SockRef::from(&mta).set_tcp_quickack(true)?;
        }
        let n = mta.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        decoder.feed(&chunk[..n]);
        let quit = answer(&mut decoder, &mut out);
        unanswered = out.is_empty();
        if !out.is_empty() {
            mta.write_all(&out).await?;
            out.clear();
        }
        if quit {
            return Ok(());
        }
    }
}

/// Answers the whole packets read so far into `out`; true at QUIT.
fn answer(decoder: &mut Decoder, out: &mut Vec<u8>) -> bool {
    loop {
        if decoder.body().ok().flatten().is_some() {
            continue;
        }
        let Ok(Some(command)) = decoder.command() else {
            return false;
        };
        let answer = match command {
            Command::Negotiate { version, steps, .. } => Some(Response::Negotiate {
                version: VERSION.min(version),
                actions: 0,
                steps: STEPS & steps,
                macros: Vec::new(),
            }),
            Command::Rcpt(_) | Command::EndOfMessage(_) => Some(Response::Continue),
            Command::Quit => return true,
            _ => None,
        };
        if let Some(r) = answer {
            r.encode(out);
        }
    }
}
