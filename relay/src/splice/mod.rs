//! The copy loop: two connections joined until both directions have ended.
//!
//! A FIN in one direction is passed on as a FIN (half-close) while the other direction keeps
//! flowing; an error on either side ends the pair (both sockets are dropped by the caller).
//!
//! Each direction's buffer is allocated on its first read, starts small and doubles (up to
//! [`BUFFER_SIZE`]) only when a read fills it: a short exchange (a request and an answer)
//! costs two small allocations, not two zeroed 32 KiB buffers, while bulk transfers reach the
//! full size after a few reads and keep it for the pair's life.
//!
//! Zero copy: on Linux, a direction between two plain TCP sockets that has moved
//! [`KERNEL_THRESHOLD`] bytes goes on with splice(2) through a pipe of its own ([`zero_copy`]),
//! driven by the same readiness: the bytes stay in the kernel. The pipe is made only then and
//! closed with the direction; where the kernel refuses splice(2), the direction stays on the
//! copy. [`SpliceMode`] chooses (`--splice`, `TAAS_SPLICE`).

pub mod zero_copy;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use zero_copy::Pipe;

/// Largest per-direction buffer. Large enough for full-speed loopback bulk transfer, small
/// enough that thousands of pairs fit in little memory.
pub const BUFFER_SIZE: usize = 32 * 1024;
/// A direction's first buffer.
pub const INITIAL_BUFFER_SIZE: usize = 2 * 1024;
/// Bytes a direction moves by copying before it switches to splice(2) ([`SpliceMode::Auto`]).
/// Below it a transfer is a request or an answer, which the copy loop's small buffer moves in
/// a few reads; a pipe would cost two more descriptors and three system calls (make, close
/// twice) and save nothing. Past it the transfer is bulk, where copying every byte through
/// user space is what costs (HAProxy switches at a similar size).
pub const KERNEL_THRESHOLD: u64 = 64 * 1024;

/// How a pair's bytes are moved (`--splice`, `TAAS_SPLICE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SpliceMode {
    /// Copy first; each direction switches to splice(2) once it has moved
    /// [`KERNEL_THRESHOLD`] bytes (Linux, plain TCP sockets on both sides).
    #[default]
    Auto,
    /// Copy through user space only.
    Copy,
    /// splice(2) from the first byte where possible (for tests and measurements).
    Kernel,
}

impl SpliceMode {
    /// Whether a direction that has moved `moved` bytes goes on with splice(2), its ends
    /// permitting.
    pub fn kernel_after(self, moved: u64) -> bool {
        match self {
            Self::Auto => moved >= KERNEL_THRESHOLD,
            Self::Copy => false,
            Self::Kernel => true,
        }
    }
}

/// One end of a pair: a byte stream, and the TCP socket beneath it when splice(2) may move its
/// bytes.
pub trait End: AsyncRead + AsyncWrite + Unpin {
    /// The socket whose bytes are exactly this stream's (no TLS, no framing, nothing
    /// buffered above it); `None` keeps both directions through this end on the copy.
    fn tcp(&self) -> Option<&TcpStream>;

    /// `bytes` were read from this end by splice(2), past `poll_read` (for counting).
    fn spliced_from(&mut self, _bytes: u64) {}
}

impl End for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// Bytes copied in each direction by a finished pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
    /// Of both together, the bytes splice(2) moved (never through user space).
    pub spliced: u64,
}

/// Copies `a` → `b` and `b` → `a` until both have reached EOF, or until either side fails.
/// The first direction to reach EOF is forwarded as a shutdown of the other side's write
/// half; the second is not: the caller drops both streams right after, and their close sends
/// that FIN (nothing is left unread on either socket then, so the close is a FIN, not a
/// reset), which saves a system call per pair.
pub async fn splice<A, B>(a: &mut A, b: &mut B, mode: SpliceMode) -> io::Result<Copied>
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    let mut a_to_b = Direction::new(mode);
    let mut b_to_a = Direction::new(mode);
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
/// compares the byte counts (spliced bytes included) with what it saw last time; the pair
/// ends at the first check that finds them unchanged for `idle` — between `idle` and
/// `1.25 × idle` after the last byte. A timer reset per read would cost every read a
/// timer-wheel update.
pub async fn splice_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
    mode: SpliceMode,
) -> io::Result<Spliced>
where
    A: End + ?Sized,
    B: End + ?Sized,
{
    let Some(idle) = idle else {
        let copied = splice(a, b, mode).await?;
        return Ok(Spliced {
            copied,
            idle: false,
        });
    };
    let period = (idle / 4).max(Duration::from_millis(1));
    let mut a_to_b = Direction::new(mode);
    let mut b_to_a = Direction::new(mode);
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
                    copied: copied(&a_to_b, &b_to_a),
                    idle: true,
                }));
            }
            check.as_mut().reset(now + period);
        }
        Poll::Pending
    })
    .await
}

fn copied(a_to_b: &Direction, b_to_a: &Direction) -> Copied {
    Copied {
        a_to_b: a_to_b.copied,
        b_to_a: b_to_a.copied,
        spliced: a_to_b.spliced + b_to_a.spliced,
    }
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
    A: End + ?Sized,
    B: End + ?Sized,
{
    let other_done = b_to_a.done;
    let ab = a_to_b.poll_copy(cx, &mut *a, &mut *b, !other_done)?;
    let other_done = a_to_b.done;
    let ba = b_to_a.poll_copy(cx, &mut *b, &mut *a, !other_done)?;
    match (ab, ba) {
        (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(copied(a_to_b, b_to_a))),
        _ => Poll::Pending,
    }
}

/// One direction of a pair: its buffer and where it stands.
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
    /// Of `copied`, moved by splice(2).
    spliced: u64,
    mode: SpliceMode,
    /// On splice(2) now (it has a pipe).
    kernel: Option<Kernel>,
    /// The copy for good: the mode or an end does not allow splice(2), or the kernel refused.
    copy_only: bool,
}

impl Direction {
    fn new(mode: SpliceMode) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            filled: 0,
            grow: false,
            read_eof: false,
            need_flush: false,
            done: false,
            copied: 0,
            spliced: 0,
            mode,
            kernel: None,
            copy_only: mode == SpliceMode::Copy,
        }
    }

    /// Moves bytes from `reader` to `writer` until `reader`'s EOF; then shuts `writer` down if
    /// `shutdown` (the other direction still runs), and is done.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        shutdown: bool,
    ) -> Poll<io::Result<()>>
    where
        R: End + ?Sized,
        W: End + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(kernel) = &mut self.kernel {
                let moved = kernel.poll_move(cx, reader, writer)?;
                self.copied += kernel.moved;
                self.spliced += kernel.moved;
                kernel.moved = 0;
                match ready!(moved) {
                    Moved::Eof => {
                        self.read_eof = true;
                        self.kernel = None;
                    }
                    Moved::Refused => self.fall_back()?,
                }
            } else if self.pos == self.filled && !self.read_eof {
                if !self.copy_only && self.mode.kernel_after(self.copied) {
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    self.switch(&*reader, &*writer);
                    continue;
                }
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
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Moves on to splice(2) if both ends are plain sockets and a pipe can be made; else stays
    /// on the copy for good. Called with the buffer empty.
    fn switch<R, W>(&mut self, reader: &R, writer: &W)
    where
        R: End + ?Sized,
        W: End + ?Sized,
    {
        self.copy_only = true;
        if reader.tcp().is_none() || writer.tcp().is_none() {
            return;
        }
        match Pipe::new() {
            Ok(pipe) => {
                self.kernel = Some(Kernel {
                    pipe,
                    held: 0,
                    moved: 0,
                });
                self.buf = Vec::new();
                self.grow = false;
            }
            // Out of descriptors, or no splice(2) here: copying still works.
            Err(error) => tracing::debug!(%error, "no pipe for splice(2); copying"),
        }
    }

    /// splice(2) was refused midway: the bytes the pipe holds go to the buffer, for the copy
    /// to write first.
    fn fall_back(&mut self) -> io::Result<()> {
        let Some(kernel) = self.kernel.take() else {
            return Ok(());
        };
        tracing::debug!("splice(2) refused; copying");
        self.buf = vec![0; kernel.held.max(INITIAL_BUFFER_SIZE)];
        let mut filled = 0;
        while filled < kernel.held {
            match kernel.pipe.read_back(&mut self.buf[filled..kernel.held])? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => filled += n,
            }
        }
        self.pos = 0;
        self.filled = filled;
        Ok(())
    }
}

/// A direction on splice(2): its pipe and what the pipe holds.
struct Kernel {
    pipe: Pipe,
    /// Bytes in the pipe, not yet written.
    held: usize,
    /// Written since the caller last took it.
    moved: u64,
}

/// Why [`Kernel::poll_move`] stopped.
enum Moved {
    /// The reader's EOF, with the pipe empty.
    Eof,
    /// splice(2) is refused (or an end has no socket any more); the pipe may hold bytes.
    Refused,
}

impl Kernel {
    /// Fills the pipe from `reader` when it is empty and empties it into `writer`, each on its
    /// socket's readiness, until the reader's EOF. The pipe is filled only when empty and
    /// emptied only when it holds bytes, so a `WouldBlock` is the socket's (not the pipe's),
    /// and clearing the socket's readiness on it is right.
    fn poll_move<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<Moved>>
    where
        R: End + ?Sized,
        W: End + ?Sized,
    {
        loop {
            if self.held > 0 {
                let Some(socket) = writer.tcp() else {
                    return Poll::Ready(Ok(Moved::Refused));
                };
                ready!(socket.poll_write_ready(cx))?;
                let (pipe, held) = (&self.pipe, self.held);
                match socket.try_io(Interest::WRITABLE, || pipe.drain_into(socket, held)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.held -= n;
                        self.moved += n as u64;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) if zero_copy::unsupported(&error) => {
                        return Poll::Ready(Ok(Moved::Refused))
                    }
                    Err(error) => return Poll::Ready(Err(error)),
                }
            } else {
                let Some(socket) = reader.tcp() else {
                    return Poll::Ready(Ok(Moved::Refused));
                };
                ready!(socket.poll_read_ready(cx))?;
                let pipe = &self.pipe;
                match socket.try_io(Interest::READABLE, || pipe.fill_from(socket)) {
                    Ok(0) => return Poll::Ready(Ok(Moved::Eof)),
                    Ok(n) => {
                        self.held = n;
                        reader.spliced_from(n as u64);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) if zero_copy::unsupported(&error) => {
                        return Poll::Ready(Ok(Moved::Refused))
                    }
                    Err(error) => return Poll::Ready(Err(error)),
                }
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

/// The options of a connection accepted on a listener set up by [`tune_listener`]: on Linux
/// it has them already; elsewhere they are set here. Every listener whose connections are
/// relayed is set up so: q, the shared ports, the edge port, the HTTPS port (direct labels),
/// the gateway's rendezvous ports.
pub fn tune_accepted(stream: &TcpStream) {
    if !cfg!(target_os = "linux") {
        tune(stream);
    }
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Every path a direction can take.
    const MODES: [SpliceMode; 3] = [SpliceMode::Copy, SpliceMode::Auto, SpliceMode::Kernel];

    /// Two connected loopback sockets (also the kernel-path unit tests' in `zero_copy`).
    pub(super) async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// A TCP stream that does not offer its socket (as a TLS stream would not): the copy only.
    struct Opaque(TcpStream);

    impl AsyncRead for Opaque {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Opaque {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl End for Opaque {
        fn tcp(&self) -> Option<&TcpStream> {
            None
        }
    }

    /// `up` bytes client → server, then (after the client's FIN reached the server) `down`
    /// bytes back through the half-closed pair; checks both intact, returns what the pair
    /// counted.
    async fn exchange<A, B>(
        mut a: A,
        mut b: B,
        client: TcpStream,
        server: TcpStream,
        up: usize,
        down: usize,
        mode: SpliceMode,
    ) -> Copied
    where
        A: End + Send + 'static,
        B: End + Send + 'static,
    {
        let (mut client, mut server) = (client, server);
        let spliced = tokio::spawn(async move { splice(&mut a, &mut b, mode).await });
        let up_bytes: Vec<u8> = (0..up).map(|i| (i * 7 + 3) as u8).collect();
        let down_bytes: Vec<u8> = (0..down).map(|i| (i * 13 + 1) as u8).collect();
        let (up2, down2) = (up_bytes.clone(), down_bytes.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), up_bytes.len(), "{mode:?}");
        assert!(got == up_bytes, "{up} bytes up, {mode:?}");
        server.write_all(&down2).await.unwrap();
        server.shutdown().await.unwrap();
        let back = client_side.await.unwrap();
        assert!(back == down_bytes, "{down} bytes down, {mode:?}");
        let copied = spliced.await.unwrap().unwrap();
        assert_eq!(
            (copied.a_to_b, copied.b_to_a),
            (up as u64, down as u64),
            "{mode:?}"
        );
        copied
    }

    #[test]
    fn each_mode_switches_to_the_kernel_when_it_says() {
        assert!(!SpliceMode::Copy.kernel_after(0));
        assert!(!SpliceMode::Copy.kernel_after(u64::MAX));
        assert!(SpliceMode::Kernel.kernel_after(0));
        assert!(!SpliceMode::Auto.kernel_after(0));
        assert!(!SpliceMode::Auto.kernel_after(KERNEL_THRESHOLD - 1));
        assert!(SpliceMode::Auto.kernel_after(KERNEL_THRESHOLD));
        assert_eq!(SpliceMode::default(), SpliceMode::Auto);
    }

    /// Both directions at once, with sizes around every buffer step and the switch, on every
    /// path; each FIN arrives after all of its direction's bytes, and the half-closed
    /// direction keeps flowing. The copy never splices; the kernel path splices every byte;
    /// auto splices only past the threshold.
    #[tokio::test]
    async fn copies_both_directions_intact_through_every_buffer_size() {
        for mode in MODES {
            for size in [
                0usize, 1, 2047, 2048, 2049, 65_535, 65_536, 65_537, 200_000, 1_000_003,
            ] {
                let (client, a) = connected_pair().await;
                let (b, server) = connected_pair().await;
                let copied = exchange(a, b, client, server, size, size / 2, mode).await;
                let total = (size + size / 2) as u64;
                let threshold = KERNEL_THRESHOLD as usize;
                match mode {
                    SpliceMode::Copy => assert_eq!(copied.spliced, 0),
                    SpliceMode::Kernel if cfg!(target_os = "linux") => {
                        assert_eq!(copied.spliced, total, "{size}")
                    }
                    SpliceMode::Kernel => assert_eq!(copied.spliced, 0),
                    SpliceMode::Auto => {
                        let most =
                            size.saturating_sub(threshold) + (size / 2).saturating_sub(threshold);
                        assert!(copied.spliced <= most as u64, "{size}: {copied:?}");
                        if cfg!(target_os = "linux") && size / 2 > threshold + BUFFER_SIZE {
                            assert!(copied.spliced > 0, "{size}: {copied:?}");
                        }
                    }
                }
            }
        }
    }

    /// An end that does not offer its socket keeps the pair on the copy, even when the
    /// kernel path is asked for.
    #[tokio::test]
    async fn an_end_without_a_socket_keeps_the_pair_on_the_copy() {
        for opaque_side in [false, true] {
            let (client, a) = connected_pair().await;
            let (b, server) = connected_pair().await;
            let size = 300_000;
            let copied = if opaque_side {
                exchange(Opaque(a), b, client, server, size, size, SpliceMode::Kernel).await
            } else {
                exchange(a, Opaque(b), client, server, size, size, SpliceMode::Kernel).await
            };
            assert_eq!(copied.spliced, 0);
        }
    }

    /// A direction that loses splice(2) midway finds the bytes its pipe held in its buffer,
    /// for the copy to write first.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_direction_falling_back_keeps_the_bytes_its_pipe_held() {
        let (mut client, a) = connected_pair().await;
        client.write_all(b"held in the pipe").await.unwrap();
        let pipe = Pipe::new().unwrap();
        let held = loop {
            a.readable().await.unwrap();
            match a.try_io(Interest::READABLE, || pipe.fill_from(&a)) {
                Ok(n) if n >= 16 => break n,
                Ok(n) => panic!("{n} bytes"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        };
        let mut direction = Direction::new(SpliceMode::Kernel);
        direction.copy_only = true;
        direction.kernel = Some(Kernel {
            pipe,
            held,
            moved: 0,
        });
        direction.fall_back().unwrap();
        assert!(direction.kernel.is_none());
        assert_eq!(
            &direction.buf[direction.pos..direction.filled],
            b"held in the pipe"
        );
    }

    /// A reset on one side ends the pair with an error on every path (the other side is then
    /// dropped by the caller), without a byte of garbage reaching the other side.
    #[tokio::test]
    async fn a_reset_ends_the_pair_with_an_error_on_every_path() {
        for mode in MODES {
            let (client, mut a) = connected_pair().await;
            let (mut b, mut server) = connected_pair().await;
            let spliced = tokio::spawn(async move { splice(&mut a, &mut b, mode).await });
            let mut client = client;
            let chunk = vec![5u8; 100_000];
            client.write_all(&chunk).await.unwrap();
            let mut got = vec![0u8; chunk.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == chunk, "{mode:?}");
            // SO_LINGER 0: the close is a reset.
            socket2::SockRef::from(&client)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(client);
            let ended = tokio::time::timeout(Duration::from_secs(10), spliced)
                .await
                .expect("the pair ends")
                .unwrap();
            assert!(ended.is_err(), "{mode:?}: {ended:?}");
        }
    }

    /// A pair with no byte either way ends by itself between `idle` and `1.25 × idle`; one
    /// that trickles a byte more often than `idle` lives on, far past it; bytes splice(2)
    /// moves count as activity.
    #[tokio::test]
    async fn an_idle_pair_ends_and_a_trickling_one_does_not() {
        for mode in [SpliceMode::Copy, SpliceMode::Kernel] {
            let idle = Duration::from_millis(400);
            let (mut client, mut a) = connected_pair().await;
            let (mut b, mut server) = connected_pair().await;
            let started = std::time::Instant::now();
            let spliced =
                tokio::spawn(
                    async move { splice_until_idle(&mut a, &mut b, Some(idle), mode).await },
                );
            for _ in 0..8 {
                tokio::time::sleep(idle / 2).await;
                client.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                server.read_exact(&mut one).await.unwrap();
            }
            assert!(
                !spliced.is_finished(),
                "a trickling pair was closed as idle ({mode:?})"
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
            if mode == SpliceMode::Copy || !cfg!(target_os = "linux") {
                assert_eq!(ended.copied.spliced, 0);
            } else {
                assert_eq!(ended.copied.spliced, 8);
            }
            assert!(started.elapsed() >= idle * 4, "lived past the idle timeout");
            assert!(
                quiet >= idle && quiet < idle * 2,
                "closed {quiet:?} after the last byte (idle {idle:?}, {mode:?})"
            );
            eprintln!(
                "figure: idle pair closed after {quiet:?} quiet (idle timeout {idle:?}, {mode:?})"
            );
            // Both sockets were dropped: the ends see the close.
            let mut buf = [0u8; 1];
            assert_eq!(client.read(&mut buf).await.unwrap(), 0);
            assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        }
    }

    /// One bulk transfer through a pair, in Gbit/s, checked intact in length.
    async fn bulk(bytes: usize, idle: Option<Duration>, mode: SpliceMode) -> f64 {
        let (mut client, mut a) = connected_pair().await;
        let (mut b, mut server) = connected_pair().await;
        let spliced =
            tokio::spawn(async move { splice_until_idle(&mut a, &mut b, idle, mode).await });
        let started = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..bytes / chunk.len() {
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
        assert_eq!(total, bytes);
        drop(server);
        drop(writer.await.unwrap());
        let ended = spliced.await.unwrap().unwrap();
        assert!(!ended.idle);
        assert_eq!(ended.copied.a_to_b, bytes as u64);
        bytes as f64 / secs / 1e9 * 8.0
    }

    /// The idle watch costs the copy loop nothing measurable: the same bulk transfer with and
    /// without it (best of three each), checked intact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_idle_watch_does_not_slow_bulk_transfer() {
        const BYTES: usize = 256 * 1024 * 1024;
        let mut plain = 0f64;
        let mut watched = 0f64;
        for _ in 0..3 {
            plain = plain.max(bulk(BYTES, None, SpliceMode::Copy).await);
            watched =
                watched.max(bulk(BYTES, Some(Duration::from_secs(900)), SpliceMode::Copy).await);
        }
        eprintln!(
            "figure: splice bulk 256 MiB, best of 3: {plain:.2} Gbit/s without the idle watch, {watched:.2} Gbit/s with it"
        );
    }

    /// The paths side by side on one bulk transfer (best of three each): a figure, not a
    /// bound (the machine's load decides).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_transfer_through_each_path_for_the_record() {
        const BYTES: usize = 256 * 1024 * 1024;
        let mut best = [0f64; 3];
        for _ in 0..3 {
            for (i, mode) in MODES.into_iter().enumerate() {
                best[i] = best[i].max(bulk(BYTES, Some(Duration::from_secs(900)), mode).await);
            }
        }
        eprintln!(
            "figure: splice bulk 256 MiB, best of 3: copy {:.2} Gbit/s, auto {:.2} Gbit/s, kernel {:.2} Gbit/s",
            best[0], best[1], best[2]
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
