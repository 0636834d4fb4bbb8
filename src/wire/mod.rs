//! The bottom layer: SMTP and its neighbours on the wire, sans-IO. Command
//! lines and paths, replies, the strict DATA reader and dot-stuffing, the
//! PROXY header (in) and XCLIENT / PROXY (out), and the milter packets.
//! Used by the server side and the upstream side alike; imports nothing
//! from the crate above it.

pub mod command;
pub mod data;
pub mod identity;
pub mod milter;
pub mod path;
pub mod proxy;
pub mod reply;
pub mod stage;
