//! Direct labels (`spec.direct: true`): `https://LABEL.<domain>/` on the front end's own
//! HTTPS port reaches the hidden server with TLS end to end, no 307 and no second port.
//!
//! Why here and not in the TLS layer: the relay must not terminate a direct label's TLS (it
//! has no certificate for it and must not see the traffic), so the front end reads the
//! ClientHello's server name before any TLS (`client_hello::read_server_name`, within the
//! handshake deadline and under the front end's connection caps) and then either hands the
//! connection, the bytes read included, to the direct label (`Entry::Direct`, the same
//! `serve_client` as q), or replays those bytes into its own TLS handshake through
//! [`Prefixed`], so the registrar, 307s and other labels see exactly what they saw before.
//! A ClientHello without a server name, with a name that is not a direct label, or bytes that
//! are not a ClientHello all take the front end's TLS path, as before.
//!
//! Two implementations of the same seam ([`DirectLabels`]): the standalone `serve` hands the
//! connection to its own label; a cluster's gateway (issue 15.3) forwards it raw to the
//! label's relay, behind an edge header (`gateway::edge`), when the label's route is direct
//! and in edge mode. Reading the name, and giving the connection back for TLS, is shared.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client_hello::{read_server_name, Deadlines, HelloFailure};
use crate::gateway::edge::Edge;
use crate::label::{ClientConn, Entry, Label};
use crate::relay::StandaloneBackend;

/// The labels the front end may hand a connection to before TLS.
#[derive(Clone)]
pub enum DirectLabels {
    /// The standalone relay's own labels.
    Standalone(Arc<StandaloneBackend>),
    /// A gateway's: forwarded to the label's relay by the edge.
    Gateway(Edge),
}

impl fmt::Debug for DirectLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Standalone(_) => f.write_str("DirectLabels::Standalone"),
            Self::Gateway(_) => f.write_str("DirectLabels::Gateway"),
        }
    }
}

/// What became of a front-end connection once its first bytes were read.
pub enum Routed {
    /// A direct label took it.
    HandedOver,
    /// It closed, failed or timed out before saying which name it wants.
    Gone(HelloFailure),
    /// For the front end's own TLS: the stream, and the bytes already read from it.
    Tls(TcpStream, Vec<u8>),
}

impl DirectLabels {
    pub fn new(relay: Arc<StandaloneBackend>) -> Self {
        Self::Standalone(relay)
    }

    /// The standalone relay's label a server name asks for, when that label is direct.
    pub fn label_for(&self, server_name: &str) -> Option<Arc<Label>> {
        let Self::Standalone(relay) = self else {
            return None;
        };
        let name = crate::shared_port::label_for(server_name, &relay.settings().domain)?;
        let label = relay.label(&name.to_ascii_lowercase())?;
        label.config().direct.then_some(label)
    }

    /// Takes the connection when `server_name` is a direct label (handed over, or forwarded),
    /// or gives it back with the bytes read.
    fn take(
        &self,
        server_name: &str,
        stream: TcpStream,
        peer: SocketAddr,
        hello: Vec<u8>,
    ) -> Result<(), (TcpStream, Vec<u8>)> {
        match self {
            Self::Standalone(_) => {
                let Some(label) = self.label_for(server_name) else {
                    return Err((stream, hello));
                };
                label.hand_over(ClientConn {
                    stream,
                    peer,
                    entry: Entry::Direct,
                    read_ahead: hello,
                    relay_slot: None,
                });
                Ok(())
            }
            Self::Gateway(edge) => edge.take_direct(server_name, stream, peer, hello),
        }
    }

    /// Reads the ClientHello (until `deadline`) and hands the connection to a direct label,
    /// or gives it back for the front end's TLS handshake.
    pub async fn route(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Routed {
        let mut hello = Vec::with_capacity(crate::shared_port::HELLO_BUFFER);
        let deadlines = Deadlines {
            first_byte: deadline,
            complete: deadline,
        };
        match read_server_name(&mut stream, &mut hello, deadlines).await {
            Ok(name) => match self.take(&name, stream, peer, hello) {
                Ok(()) => Routed::HandedOver,
                Err((stream, hello)) => Routed::Tls(stream, hello),
            },
            Err(
                failure @ (HelloFailure::Silent
                | HelloFailure::Deadline
                | HelloFailure::Closed
                | HelloFailure::ReadError),
            ) => Routed::Gone(failure),
            Err(
                HelloFailure::NoServerName | HelloFailure::NotClientHello | HelloFailure::TooLarge,
            ) => Routed::Tls(stream, hello),
        }
    }
}

/// A stream whose first bytes were already read: they are read again first, then the
/// stream's own. Writes go straight to the stream.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    /// How much of `prefix` has been read again.
    consumed: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            consumed: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rest = &this.prefix[this.consumed..];
        if rest.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.consumed += n;
        if this.consumed == this.prefix.len() {
            // Give the memory back: a kept-alive connection lives long.
            this.prefix = Vec::new();
            this.consumed = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_read_first_then_the_stream() {
        let (mut far, near) = tokio::io::duplex(64);
        far.write_all(b" world").await.unwrap();
        drop(far);
        let mut stream = Prefixed::new(b"hello".to_vec(), near);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"hello world");
    }

    #[tokio::test]
    async fn a_small_buffer_reads_the_prefix_in_pieces_and_nothing_twice() {
        let (mut far, near) = tokio::io::duplex(64);
        let mut stream = Prefixed::new(b"abcde".to_vec(), near);
        let mut two = [0u8; 2];
        let mut got = Vec::new();
        for _ in 0..3 {
            let n = stream.read(&mut two).await.unwrap();
            got.extend_from_slice(&two[..n]);
        }
        assert_eq!(got, b"abcde");
        far.write_all(b"f").await.unwrap();
        let n = stream.read(&mut two).await.unwrap();
        assert_eq!(&two[..n], b"f");
    }

    #[tokio::test]
    async fn writes_go_to_the_stream_untouched() {
        let (mut far, near) = tokio::io::duplex(64);
        let mut stream = Prefixed::new(b"unread".to_vec(), near);
        stream.write_all(b"reply").await.unwrap();
        stream.flush().await.unwrap();
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
    }

    #[tokio::test]
    async fn an_empty_prefix_is_the_stream_itself() {
        let (mut far, near) = tokio::io::duplex(64);
        far.write_all(b"x").await.unwrap();
        drop(far);
        let mut stream = Prefixed::new(Vec::new(), near);
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"x");
    }
}
