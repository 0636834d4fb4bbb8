//! The server side of SMTP: the EHLO offer and the session state machine.

pub mod ehlo;
pub mod session;

pub use session::{Peer, Runtime, Session, Shared};
