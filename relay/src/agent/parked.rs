//! One rendezvous: connect to p, wait parked, and once the relay pairs it, forward it.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::metrics::AgentMetrics;
use crate::splice::{End, SpliceMode};

/// Connecting to p (it waits 30 s for us at most) or to `--forward`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed forward: how long the relay side may take to close after our FIN.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
/// Bytes read and dropped while waiting for that close.
const CLOSE_DRAIN_MAX: usize = 256 * 1024;
/// A forward failure with the same reason is logged at most this often.
const FORWARD_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What a rendezvous task tells the supervisor, in this order: `Parked` or `ConnectFailed`;
/// then `Lost`, or `Paired` followed by `PairEnded`.
#[derive(Debug)]
pub enum Event {
    /// Connected to p; now waiting to be paired.
    Parked,
    /// Could not connect to p.
    ConnectFailed { endpoint: String, error: io::Error },
    /// The relay closed the parked connection (EOF or error) before pairing it.
    Lost {
        lived: Duration,
        error: Option<io::Error>,
    },
    /// The first bytes arrived: a client is paired; register a replacement now.
    Paired,
    /// The pair is over (both directions done, an error, or the forward failed).
    PairEnded,
}

/// What every pair needs: where to forward, and the counters.
pub struct PairContext {
    /// `host:port`, resolved for each connection.
    pub forward: String,
    pub metrics: AgentMetrics,
    /// How pairs move their bytes.
    pub splice: SpliceMode,
    last_forward_error: Mutex<Option<(String, Instant)>>,
}

impl PairContext {
    pub fn new(forward: String, metrics: AgentMetrics) -> Self {
        Self {
            forward,
            metrics,
            splice: SpliceMode::default(),
            last_forward_error: Mutex::new(None),
        }
    }

    /// Logs a forward failure at warn once per distinct reason (and once a minute), else debug.
    fn forward_failed(&self, error: &io::Error) {
        self.metrics.forward_failures.inc();
        let reason = error.to_string();
        let loud = {
            let mut last = self
                .last_forward_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let loud = match &*last {
                Some((r, at)) => *r != reason || at.elapsed() >= FORWARD_LOG_INTERVAL,
                None => true,
            };
            if loud {
                *last = Some((reason, Instant::now()));
            }
            loud
        };
        if loud {
            tracing::warn!(forward = %self.forward, %error,
                "a client was paired but the forward target cannot be reached; its connection was closed");
        } else {
            tracing::debug!(forward = %self.forward, %error, "forward failed");
        }
    }
}

/// The whole life of one rendezvous: connect to `endpoint` (p), report `Parked`, wait for the
/// first readable event without consuming anything, then either report `Lost` or pair.
/// `cancel` turning true (or its sender going away) abandons a connection that is not yet
/// paired; a running pair is not affected by it.
pub async fn rendezvous(
    endpoint: String,
    ctx: std::sync::Arc<PairContext>,
    events: mpsc::UnboundedSender<Event>,
    mut cancel: watch::Receiver<bool>,
) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint.as_str()));
    let connected = tokio::select! {
        r = connect => r,
        _ = cancel.wait_for(|c| *c) => return,
    };
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            let _ = events.send(Event::ConnectFailed { endpoint, error });
            return;
        }
        Err(_) => {
            let error = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
            let _ = events.send(Event::ConnectFailed { endpoint, error });
            return;
        }
    };
    if let Err(error) = tune(&stream) {
        tracing::debug!(%error, "cannot set socket options on the parked connection");
    }
    let parked_at = Instant::now();
    let _ = events.send(Event::Parked);
    tracing::debug!(%endpoint, "parked");

    // The first readable event, without reading: the bytes stay in the socket for the splice.
    let mut probe = [0u8; 1];
    let first = tokio::select! {
        r = stream.peek(&mut probe) => r,
        _ = cancel.wait_for(|c| *c) => return,
    };
    match first {
        Ok(0) => {
            let _ = events.send(Event::Lost {
                lived: parked_at.elapsed(),
                error: None,
            });
        }
        Err(error) => {
            let _ = events.send(Event::Lost {
                lived: parked_at.elapsed(),
                error: Some(error),
            });
        }
        Ok(_) => {
            let _ = events.send(Event::Paired);
            ctx.metrics.pairings.inc();
            ctx.metrics.pairs_active.inc();
            pair(stream, &ctx).await;
            ctx.metrics.pairs_active.dec();
            let _ = events.send(Event::PairEnded);
        }
    }
}

/// The relay's socket options (no Nagle delay; keepalive noticing a dead path within 40 s).
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    crate::splice::tune(stream);
    Ok(())
}

/// Connects to `--forward` and splices; if that fails, closes the relay side cleanly.
async fn pair(relay: TcpStream, ctx: &PairContext) {
    let forward =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(ctx.forward.as_str())).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                ctx.forward_failed(&error);
                close_cleanly(relay).await;
                return;
            }
            Err(_) => {
                ctx.forward_failed(&io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                ));
                close_cleanly(relay).await;
                return;
            }
        };
    let _ = forward.set_nodelay(true);
    let mut relay = Counted {
        inner: relay,
        read: ctx.metrics.bytes_from_relay.clone(),
    };
    let mut forward = Counted {
        inner: forward,
        read: ctx.metrics.bytes_to_relay.clone(),
    };
    match crate::splice::splice(&mut relay, &mut forward, ctx.splice).await {
        Ok(copied) => {
            ctx.metrics.spliced_bytes.inc_by(copied.spliced);
            tracing::debug!(
                from_relay = copied.a_to_b,
                to_relay = copied.b_to_a,
                spliced = copied.spliced,
                "pair finished"
            )
        }
        Err(error) => tracing::debug!(%error, "pair ended with an error"),
    }
}

/// FIN to the relay, then wait (briefly) for its side to end, so that unread bytes do not
/// turn the close into a reset.
async fn close_cleanly(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            total += n;
            if total > CLOSE_DRAIN_MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_DRAIN, drain).await;
}

/// A stream that counts the bytes read from it.
struct Counted<S> {
    inner: S,
    read: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let n = buf.filled().len().saturating_sub(before);
            if n > 0 {
                self.read.inc_by(n as u64);
            }
        }
        result
    }
}

/// splice(2) reads past `poll_read`: its bytes are counted here instead.
impl End for Counted<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(&self.inner)
    }
    fn spliced_from(&mut self, bytes: u64) {
        self.read.inc_by(bytes);
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::TcpListener;

    use super::*;

    struct Harness {
        /// Plays the relay's rendezvous port p.
        p: TcpListener,
        ctx: Arc<PairContext>,
        events: mpsc::UnboundedReceiver<Event>,
        cancel: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(forward: String) -> Harness {
        start_with(forward, SpliceMode::default()).await
    }

    async fn start_with(forward: String, splice: SpliceMode) -> Harness {
        let p = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (metrics, _registry) = AgentMetrics::new();
        let mut ctx = PairContext::new(forward, metrics);
        ctx.splice = splice;
        let ctx = Arc::new(ctx);
        let (tx, events) = mpsc::unbounded_channel();
        let (cancel, cancel_rx) = watch::channel(false);
        let task = tokio::spawn(rendezvous(
            p.local_addr().unwrap().to_string(),
            ctx.clone(),
            tx,
            cancel_rx,
        ));
        Harness {
            p,
            ctx,
            events,
            cancel,
            task,
        }
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("event in time")
            .expect("channel open")
    }

    /// Every path a pair can take.
    const MODES: [SpliceMode; 3] = [SpliceMode::Copy, SpliceMode::Auto, SpliceMode::Kernel];

    /// The relay side sends `early` before pairing, then `more` and a FIN; the service answers
    /// `answer` after it (the half-closed direction still flows). Checks every byte and the
    /// counters (spliced bytes included) on the given path.
    async fn forwards_intact(mode: SpliceMode, early: &[u8], more: &[u8], answer: &[u8]) {
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut h = start_with(service.local_addr().unwrap().to_string(), mode).await;
        let (mut relay_side, _) = h.p.accept().await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Parked));

        relay_side.write_all(early).await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Paired));

        let (mut svc, _) = tokio::time::timeout(Duration::from_secs(10), service.accept())
            .await
            .unwrap()
            .unwrap();
        let mut want = early.to_vec();
        want.extend_from_slice(more);
        let more = more.to_vec();
        let writer = tokio::spawn(async move {
            relay_side.write_all(&more).await.unwrap();
            relay_side.shutdown().await.unwrap(); // FIN: passed on as a FIN
            relay_side
        });
        let mut got = Vec::new();
        svc.read_to_end(&mut got).await.unwrap();
        let mut relay_side = writer.await.unwrap();
        assert_eq!(got.len(), want.len(), "{mode:?}");
        assert!(got == want, "{mode:?}: bytes differ");

        // The other direction still flows after the half-close.
        let answer_bytes = answer.to_vec();
        let answering = tokio::spawn(async move {
            svc.write_all(&answer_bytes).await.unwrap();
            svc.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        relay_side.read_to_end(&mut back).await.unwrap();
        answering.await.unwrap();
        assert!(back == answer, "{mode:?}: answer differs");

        assert!(matches!(next(&mut h.events).await, Event::PairEnded));
        h.task.await.unwrap();
        let m = &h.ctx.metrics;
        assert_eq!(m.pairings.get(), 1);
        assert_eq!(m.pairs_active.get(), 0);
        assert_eq!(m.bytes_from_relay.get(), want.len() as u64, "{mode:?}");
        assert_eq!(m.bytes_to_relay.get(), answer.len() as u64, "{mode:?}");
        assert_eq!(m.forward_failures.get(), 0);
        let total = (want.len() + answer.len()) as u64;
        let spliced = m.spliced_bytes.get();
        match mode {
            SpliceMode::Copy => assert_eq!(spliced, 0),
            SpliceMode::Kernel if cfg!(target_os = "linux") => assert_eq!(spliced, total),
            _ => assert!(spliced < total, "{mode:?}: {spliced} of {total}"),
        }
        let bulk = crate::splice::KERNEL_THRESHOLD as usize + crate::splice::BUFFER_SIZE;
        if mode != SpliceMode::Copy && cfg!(target_os = "linux") && want.len() > bulk {
            assert!(spliced > 0, "{mode:?}: nothing spliced");
        }
    }

    #[tokio::test]
    async fn early_bytes_reach_the_forward_target_intact() {
        // The "client's" first bytes arrive before anything else happens (e.g. a TLS
        // ClientHello, or PROXY header + data); they must all reach the service.
        for mode in MODES {
            forwards_intact(
                mode,
                b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nhello, ",
                b"world",
                b"answer",
            )
            .await;
        }
    }

    /// Bulk both ways through the agent on every path: the relay side's bytes are counted
    /// (read by splice(2) or not), and auto splices past its threshold.
    #[tokio::test]
    async fn bulk_reaches_the_forward_target_intact_on_every_path() {
        let up: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + 3) as u8).collect();
        let down: Vec<u8> = (0..700_001u32).map(|i| (i * 13 + 1) as u8).collect();
        for mode in MODES {
            forwards_intact(mode, b"early ", &up, &down).await;
        }
    }

    #[tokio::test]
    async fn eof_before_pairing_is_reported_lost() {
        let mut h = start("127.0.0.1:9".into()).await;
        let (relay_side, _) = h.p.accept().await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Parked));
        drop(relay_side);
        match next(&mut h.events).await {
            Event::Lost { error, .. } => assert!(error.is_none(), "{error:?}"),
            other => panic!("expected Lost, got {other:?}"),
        }
        h.task.await.unwrap();
        assert_eq!(h.ctx.metrics.pairings.get(), 0);
    }

    #[tokio::test]
    async fn reset_before_pairing_is_reported_lost() {
        let mut h = start("127.0.0.1:9".into()).await;
        let (relay_side, _) = h.p.accept().await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Parked));
        // Linger 0: close with RST.
        socket2::SockRef::from(&relay_side)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(relay_side);
        assert!(matches!(next(&mut h.events).await, Event::Lost { .. }));
        h.task.await.unwrap();
    }

    #[tokio::test]
    async fn forward_failure_closes_the_relay_side_cleanly() {
        // A port with nobody listening: bind, note the address, close.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let forward = closed.local_addr().unwrap().to_string();
        drop(closed);
        let mut h = start(forward).await;
        let (mut relay_side, _) = h.p.accept().await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Parked));
        relay_side.write_all(b"client hello").await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Paired));
        // A FIN (read returns 0), not a reset.
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), relay_side.read_to_end(&mut buf))
            .await
            .unwrap()
            .expect("clean close, not a reset");
        assert_eq!(n, 0);
        drop(relay_side);
        assert!(matches!(next(&mut h.events).await, Event::PairEnded));
        h.task.await.unwrap();
        assert_eq!(h.ctx.metrics.forward_failures.get(), 1);
        assert_eq!(h.ctx.metrics.pairs_active.get(), 0);
    }

    #[tokio::test]
    async fn cancel_drops_a_parked_connection() {
        let mut h = start("127.0.0.1:9".into()).await;
        let (mut relay_side, _) = h.p.accept().await.unwrap();
        assert!(matches!(next(&mut h.events).await, Event::Parked));
        h.cancel.send(true).unwrap();
        h.task.await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(relay_side.read(&mut buf).await.unwrap(), 0);
        assert!(h.events.try_recv().is_err());
    }

    #[tokio::test]
    async fn refused_rendezvous_is_reported() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = closed.local_addr().unwrap().to_string();
        drop(closed);
        let (metrics, _) = AgentMetrics::new();
        let ctx = Arc::new(PairContext::new("127.0.0.1:9".into(), metrics));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_cancel, cancel_rx) = watch::channel(false);
        rendezvous(endpoint.clone(), ctx, tx, cancel_rx).await;
        match rx.recv().await.unwrap() {
            Event::ConnectFailed { endpoint: e, error } => {
                assert_eq!(e, endpoint);
                assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
            }
            other => panic!("expected ConnectFailed, got {other:?}"),
        }
    }
}
