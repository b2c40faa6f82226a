//! The copy loop: two connections joined until both directions have ended.
//!
//! A FIN in one direction is passed on as a FIN (half-close) while the other direction keeps
//! flowing; an error on either side ends the pair (both sockets are dropped by the caller).
//!
//! Each direction's buffer is allocated on its first read, starts small and doubles (up to
//! [`BUFFER_SIZE`]) only when a read fills it: a short exchange (a request and an answer)
//! costs two small allocations, not two zeroed 32 KiB buffers, while bulk transfers reach the
//! full size after a few reads and keep it for the pair's life.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Largest per-direction buffer. Large enough for full-speed loopback bulk transfer, small
/// enough that thousands of pairs fit in little memory.
pub const BUFFER_SIZE: usize = 32 * 1024;
/// A direction's first buffer.
pub const INITIAL_BUFFER_SIZE: usize = 2 * 1024;

/// Bytes copied in each direction by a finished pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies `a` → `b` and `b` → `a` until both have reached EOF, or until either side fails.
/// The first direction to reach EOF is forwarded as a shutdown of the other side's write
/// half; the second is not: the caller drops both streams right after, and their close sends
/// that FIN (nothing is left unread on either socket then, so the close is a FIN, not a
/// reset), which saves a system call per pair.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<Copied>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    poll_fn(|cx| poll_pair(cx, &mut *a, &mut *b, &mut a_to_b, &mut b_to_a)).await
}

/// How a pair spliced by [`splice_until_idle`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spliced {
    pub copied: Copied,
    /// Ended by the idle timeout (not by both sides finishing).
    pub idle: bool,
}

/// [`splice`], ended early (`idle: true`) once no byte has moved either way for `idle`
/// (`None`: never).
///
/// The copy loop is not touched per read: one timer per pair fires every `idle / 4` and
/// compares the byte counts with what it saw last time; the pair ends at the first check
/// that finds them unchanged for `idle` — between `idle` and `1.25 × idle` after the last
/// byte. A timer reset per read would cost every read a timer-wheel update.
pub async fn splice_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(idle) = idle else {
        let copied = splice(a, b).await?;
        return Ok(Spliced {
            copied,
            idle: false,
        });
    };
    let period = (idle / 4).max(Duration::from_millis(1));
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    let check = tokio::time::sleep(period);
    tokio::pin!(check);
    let mut seen = 0u64;
    let mut quiet_since = tokio::time::Instant::now();
    poll_fn(|cx| {
        if let Poll::Ready(copied) = poll_pair(cx, &mut *a, &mut *b, &mut a_to_b, &mut b_to_a)? {
            return Poll::Ready(Ok(Spliced {
                copied,
                idle: false,
            }));
        }
        while check.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let moved = a_to_b.copied + b_to_a.copied;
            if moved != seen {
                seen = moved;
                quiet_since = now;
            } else if now.duration_since(quiet_since) >= idle {
                return Poll::Ready(Ok(Spliced {
                    copied: Copied {
                        a_to_b: a_to_b.copied,
                        b_to_a: b_to_a.copied,
                    },
                    idle: true,
                }));
            }
            check.as_mut().reset(now + period);
        }
        Poll::Pending
    })
    .await
}

/// Both directions of a pair, polled once.
fn poll_pair<A, B>(
    cx: &mut Context<'_>,
    a: &mut A,
    b: &mut B,
    a_to_b: &mut Direction,
    b_to_a: &mut Direction,
) -> Poll<io::Result<Copied>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let other_done = b_to_a.done;
    let ab = a_to_b.poll_copy(cx, &mut *a, &mut *b, !other_done)?;
    let other_done = a_to_b.done;
    let ba = b_to_a.poll_copy(cx, &mut *b, &mut *a, !other_done)?;
    match (ab, ba) {
        (Poll::Ready(a_to_b), Poll::Ready(b_to_a)) => Poll::Ready(Ok(Copied { a_to_b, b_to_a })),
        _ => Poll::Pending,
    }
}

/// One direction of a pair: its buffer and where it stands.
#[derive(Default)]
struct Direction {
    buf: Vec<u8>,
    /// Bytes `pos..filled` of `buf` are read and not yet written.
    pos: usize,
    filled: usize,
    /// The last read filled the buffer: grow it once it is empty.
    grow: bool,
    read_eof: bool,
    /// Written since the last flush.
    need_flush: bool,
    done: bool,
    copied: u64,
}

impl Direction {
    /// Moves bytes from `reader` to `writer` until `reader`'s EOF; then shuts `writer` down if
    /// `shutdown` (the other direction still runs), and is done.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        shutdown: bool,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            if self.pos == self.filled && !self.read_eof {
                if self.buf.is_empty() || self.grow {
                    let size = match self.buf.len() {
                        0 => INITIAL_BUFFER_SIZE,
                        n => (n * 2).min(BUFFER_SIZE),
                    };
                    self.buf = vec![0; size];
                    self.grow = false;
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = read.filled().len();
                if n == 0 {
                    self.read_eof = true;
                } else {
                    self.grow = n == self.buf.len() && n < BUFFER_SIZE;
                    self.pos = 0;
                    self.filled = n;
                }
            }
            while self.pos < self.filled {
                let n = ready!(
                    Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.filled])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_eof {
                if shutdown {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                } else if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                }
                self.need_flush = false;
                self.done = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

/// Socket options for relayed connections: no Nagle delay, and TCP keepalive so that a peer
/// that vanished silently (NAT mapping expired, link down) is noticed within 40 s
/// (20 s idle, then 4 probes 5 s apart).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive());
}

/// The same options on a listening socket, whose accepted connections inherit them on Linux
/// (the kernel clones the listener's socket: `TCP_NODELAY` and the keepalive settings come
/// along), which saves five system calls per accepted connection.
pub fn tune_listener(listener: &TcpListener) {
    let socket = socket2::SockRef::from(listener);
    let _ = socket.set_nodelay(true);
    let _ = socket.set_tcp_keepalive(&keepalive());
}

fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(20))
        .with_interval(Duration::from_secs(5))
        .with_retries(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// Both directions at once, with sizes around every buffer step; each FIN arrives after
    /// all of its direction's bytes, and the half-closed direction keeps flowing.
    #[tokio::test]
    async fn copies_both_directions_intact_through_every_buffer_size() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for size in [0usize, 1, 2047, 2048, 2049, 65_536, 1_000_003] {
            let (mut client, mut a) = connected_pair().await;
            let (mut b, mut server) = connected_pair().await;
            let spliced = tokio::spawn(async move { splice(&mut a, &mut b).await });
            let up: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            let down: Vec<u8> = (0..size / 2).map(|i| (i * 13 + 1) as u8).collect();
            let (up2, down2) = (up.clone(), down.clone());
            let client_side = tokio::spawn(async move {
                client.write_all(&up2).await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            });
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), up.len());
            assert!(got == up, "{size} bytes up");
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            let back = client_side.await.unwrap();
            assert!(back == down, "{size} bytes down");
            let copied = spliced.await.unwrap().unwrap();
            assert_eq!(
                copied,
                Copied {
                    a_to_b: size as u64,
                    b_to_a: (size / 2) as u64
                }
            );
        }
    }

    /// A pair with no byte either way ends by itself between `idle` and `1.25 × idle`; one
    /// that trickles a byte more often than `idle` lives on, far past it.
    #[tokio::test]
    async fn an_idle_pair_ends_and_a_trickling_one_does_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let idle = Duration::from_millis(400);
        let (mut client, mut a) = connected_pair().await;
        let (mut b, mut server) = connected_pair().await;
        let started = std::time::Instant::now();
        let spliced =
            tokio::spawn(async move { splice_until_idle(&mut a, &mut b, Some(idle)).await });
        for _ in 0..8 {
            tokio::time::sleep(idle / 2).await;
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
        }
        assert!(
            !spliced.is_finished(),
            "a trickling pair was closed as idle"
        );
        let last_byte = std::time::Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), spliced)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let quiet = last_byte.elapsed();
        assert!(ended.idle);
        assert_eq!(ended.copied.a_to_b, 8);
        assert!(started.elapsed() >= idle * 4, "lived past the idle timeout");
        assert!(
            quiet >= idle && quiet < idle * 2,
            "closed {quiet:?} after the last byte (idle {idle:?})"
        );
        eprintln!("figure: idle pair closed after {quiet:?} quiet (idle timeout {idle:?})");
        // Both sockets were dropped: the ends see the close.
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    /// The idle watch costs the copy loop nothing measurable: the same bulk transfer with and
    /// without it (best of three each), checked intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_idle_watch_does_not_slow_bulk_transfer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const BYTES: usize = 256 * 1024 * 1024;
        async fn run(idle: Option<Duration>) -> f64 {
            let (mut client, mut a) = connected_pair().await;
            let (mut b, mut server) = connected_pair().await;
            let spliced =
                tokio::spawn(async move { splice_until_idle(&mut a, &mut b, idle).await });
            let started = std::time::Instant::now();
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..BYTES / chunk.len() {
                    client.write_all(&chunk).await.unwrap();
                }
                client.shutdown().await.unwrap();
                client
            });
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                total += n;
            }
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(total, BYTES);
            drop(server);
            drop(writer.await.unwrap());
            let ended = spliced.await.unwrap().unwrap();
            assert!(!ended.idle);
            assert_eq!(ended.copied.a_to_b, BYTES as u64);
            BYTES as f64 / secs / 1e9 * 8.0
        }
        let mut plain = 0f64;
        let mut watched = 0f64;
        for _ in 0..3 {
            plain = plain.max(run(None).await);
            watched = watched.max(run(Some(Duration::from_secs(900))).await);
        }
        eprintln!(
            "figure: splice bulk 256 MiB, best of 3: {plain:.2} Gbit/s without the idle watch, {watched:.2} Gbit/s with it"
        );
    }

    /// What `tune_listener` relies on: a connection accepted on a tuned listener has the
    /// options without setting them again.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_the_listener_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tune_listener(&listener);
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(20));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(sock.keepalive_retries().unwrap(), 4);
        // A plain listener's connections do not have them.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
        assert!(!socket2::SockRef::from(&accepted).keepalive().unwrap());
    }
}
