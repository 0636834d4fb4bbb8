//! Reading for connections that mostly wait: an idle connection keeps no
//! read buffer. A read that has to wait leaves the connection's buffer
//! empty (its memory given back); when bytes arrive they are read into
//! the worker thread's scratch buffer and only what arrived is kept.
//! Both front doors (SMTP sessions, milter connections) read this way
//! between commands.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// The scratch buffer's size: a command line, or a milter command packet.
pub const SCRATCH: usize = 1024;

thread_local! {
    /// One per worker thread, borrowed only within one poll.
    static BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Frees an empty buffer's memory.
pub fn release(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = Vec::new();
    }
}

/// Reads once into `buf` (appended) through the scratch buffer. While it
/// waits, `buf` (if empty) and each of `also` (if empty) are released.
pub async fn read_quiet<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut Vec<u8>,
    also: &mut [&mut Vec<u8>],
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let r = poll_read(io, buf, cx);
        if r.is_pending() {
            release(buf);
            for b in also.iter_mut() {
                release(b);
            }
        }
        r
    })
    .await
}

fn poll_read<R: AsyncRead + Unpin + ?Sized>(
    io: &mut R,
    buf: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    BUF.with(|s| {
        let Ok(mut s) = s.try_borrow_mut() else {
            // Never nested (a read does not call back into us); if it
            // were, a small read on the stack does.
            let mut tmp = [0u8; 256];
            let mut rb = ReadBuf::new(&mut tmp);
            return Pin::new(&mut *io).poll_read(cx, &mut rb).map_ok(|()| {
                buf.extend_from_slice(rb.filled());
                rb.filled().len()
            });
        };
        let mut rb = ReadBuf::new(&mut s[..]);
        Pin::new(&mut *io).poll_read(cx, &mut rb).map_ok(|()| {
            buf.extend_from_slice(rb.filled());
            rb.filled().len()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_waiting_read_gives_the_buffers_back_and_keeps_what_arrived() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut buf = Vec::with_capacity(4096);
        let mut out = Vec::with_capacity(512);
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            b.write_all(b"EHLO x\r\n").await.unwrap();
            b
        });
        let n = read_quiet(&mut a, &mut buf, &mut [&mut out]).await.unwrap();
        assert_eq!(&buf[..n], b"EHLO x\r\n");
        assert!(buf.capacity() < 64, "kept {}", buf.capacity());
        assert_eq!(out.capacity(), 0);
        drop(writer.await.unwrap());
        // Closed: 0.
        assert_eq!(
            read_quiet(&mut a, &mut Vec::new(), &mut []).await.unwrap(),
            0
        );
    }
}
