//! Bounded waits: every wait in the tests ends, with a message naming what it waited for,
//! within [`PATIENCE`] (or a multiple of it), so a broken relay fails a test instead of
//! hanging it.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Every wait on a condition in these tests is bounded by this.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Waits (bounded) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(what, PATIENCE, check, String::new).await;
}

/// Waits (bounded by `within`) until `check` holds; a timeout names `what` and adds what
/// `context` says then (a process's log, say), when it says anything. A check that needs
/// `&mut` state answers with `std::future::ready(…)`.
pub async fn eventually_within<F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
    context: impl FnOnce() -> String,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        if tokio::time::Instant::now() >= deadline {
            let context = context();
            let sep = if context.is_empty() { "" } else { "; " };
            panic!("timed out waiting for: {what}{sep}{context}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `data` and reads back exactly as many bytes, checking them.
pub async fn echo_roundtrip<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, data: &[u8]) {
    stream.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
        .await
        .expect("echo within patience")
        .unwrap();
    assert_eq!(back, data);
}

/// Reads until EOF (bounded).
pub async fn read_to_end<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("EOF within patience")
        .unwrap();
    out
}

/// Asserts (bounded) that the peer closed the connection without sending anything: an EOF,
/// or a reset when our own unread bytes were still in its buffer.
pub async fn assert_closed<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
        Ok(Ok(0)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}
