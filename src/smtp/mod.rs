//! The server side of SMTP: commands, replies, the DATA reader, EHLO, the
//! incoming PROXY header, and the session state machine.

pub mod command;
pub mod data;
pub mod ehlo;
pub mod path;
pub mod proxy_header;
pub mod reply;
pub mod session;

pub use session::{Peer, Runtime, Session, Shared, Stream};
