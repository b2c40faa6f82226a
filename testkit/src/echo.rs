//! Echo traffic through the relay: the forwarded local service (an echo server) and
//! checksummed echo clients, whose every byte must come back in order.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::property::fnv1a;
use crate::wait::PATIENCE;

/// An echo server on loopback (a forwarded local service).
pub async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// The bytes connection `n` sends (and must get back): a deterministic pseudo-random stream.
/// Mostly small (1 B – 4 KiB), every 97th 64 KiB, every 1009th 1 MiB.
pub fn payload(seed: u64, n: u64) -> Vec<u8> {
    let mut x = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = if n % 1009 == 1008 {
        1 << 20
    } else if n % 97 == 96 {
        64 * 1024
    } else {
        1 + (next() % 4096) as usize
    };
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// How one echo exchange through the relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exchange {
    /// Every byte came back, in order (checksums equal).
    Ok { checksum: u64 },
    /// Closed (or reset, or refused) before a single byte came back: retry.
    Refused,
    /// Some bytes came back but not all, or different ones.
    Corrupt { sent: usize, got: usize },
}

/// Sends `data` on a new connection to `addr`, half-closes, and reads until EOF (all bounded).
pub async fn echo_exchange(addr: SocketAddr, data: &[u8]) -> Exchange {
    let Ok(Ok(mut stream)) = tokio::time::timeout(PATIENCE, TcpStream::connect(addr)).await else {
        return Exchange::Refused;
    };
    let (mut reader, mut writer) = stream.split();
    let write = async {
        let _ = writer.write_all(data).await;
        let _ = writer.shutdown().await;
    };
    let read = async {
        let mut got = Vec::with_capacity(data.len());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let exchange = async { tokio::join!(write, read).1 };
    let Ok(got) = tokio::time::timeout(PATIENCE * 3, exchange).await else {
        return Exchange::Corrupt {
            sent: data.len(),
            got: usize::MAX,
        };
    };
    if got.is_empty() && !data.is_empty() {
        Exchange::Refused
    } else if got == data {
        Exchange::Ok {
            checksum: fnv1a(&got),
        }
    } else {
        Exchange::Corrupt {
            sent: data.len(),
            got: got.len(),
        }
    }
}

/// Sends `data` to an echo behind `addr` while reading the echo back (more than every buffer
/// on the way holds, so both run at once), then half-closes: what came back, within three
/// patiences. Panics on a connection or I/O error.
pub async fn echo_whole(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let sent = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(PATIENCE * 3, r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    back
}
