//! The copy loop: two connections joined until both directions have ended.
//!
//! A FIN in one direction is passed on as a FIN (half-close) while the other direction keeps
//! flowing; an error on either side ends the pair (both sockets are dropped by the caller).
//! Each direction has one fixed buffer for the pair's whole life: no allocation per read.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Per-direction buffer. Large enough for full-speed loopback bulk transfer, small enough that
/// thousands of pairs fit in little memory.
pub const BUFFER_SIZE: usize = 32 * 1024;

/// Bytes copied in each direction by a finished pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies `a` → `b` and `b` → `a` until both have reached EOF (each EOF is forwarded as a
/// shutdown of the other side's write half), or until either side fails.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<Copied>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (a_to_b, b_to_a) =
        tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER_SIZE, BUFFER_SIZE).await?;
    Ok(Copied { a_to_b, b_to_a })
}

/// Socket options for relayed connections: no Nagle delay, and TCP keepalive so that a peer
/// that vanished silently (NAT mapping expired, link down) is noticed within 40 s
/// (20 s idle, then 4 probes 5 s apart).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(20))
        .with_interval(Duration::from_secs(5))
        .with_retries(4);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
