//! Runtime pieces every session shares: graceful shutdown, connection
//! limits and the memory budget, file descriptors and accept health, and
//! the byte-stream trait.

pub mod accept;
pub mod deadline;
pub mod descriptors;
pub mod limits;
pub mod scratch;
pub mod shutdown;
pub mod workers;

use tokio::io::{AsyncRead, AsyncWrite};

/// A client or upstream byte stream: TCP, TLS over TCP, or an in-memory
/// pipe in tests.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
