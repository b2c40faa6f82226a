//! Reading a client's TLS ClientHello off a socket, bounded in bytes and time, to learn the
//! server name it asks for, without decrypting anything. The shared client port and the
//! front end (for direct labels) both route by it; every byte read is kept, so that the
//! connection can go on as if nothing had been read (written unchanged to the hidden server,
//! or replayed into the front end's own TLS handshake).

use taas_protocol::client_hello::{peek, Peek, Reason, MAX_CLIENT_HELLO};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// When a ClientHello must have begun, and when it must be complete.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    pub first_byte: Instant,
    pub complete: Instant,
}

/// Why no server name was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloFailure {
    /// Nothing arrived by the first-byte deadline.
    Silent,
    /// The ClientHello was not complete by its deadline.
    Deadline,
    /// The peer closed before the ClientHello was complete.
    Closed,
    ReadError,
    /// More than `MAX_CLIENT_HELLO` bytes without a decision.
    TooLarge,
    /// A complete ClientHello without a server name.
    NoServerName,
    /// The bytes are not a TLS ClientHello.
    NotClientHello,
}

/// Reads until `peek` decides, keeping every byte read in `hello`; the server name, or why
/// there is none.
pub async fn read_server_name<S: AsyncRead + Unpin>(
    stream: &mut S,
    hello: &mut Vec<u8>,
    deadlines: Deadlines,
) -> Result<String, HelloFailure> {
    loop {
        let room = MAX_CLIENT_HELLO.saturating_sub(hello.len());
        if room == 0 {
            return Err(HelloFailure::TooLarge);
        }
        let deadline = if hello.is_empty() {
            deadlines.first_byte.min(deadlines.complete)
        } else {
            deadlines.complete
        };
        let mut limited = (&mut *stream).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(hello)).await {
            Err(_) if hello.is_empty() => return Err(HelloFailure::Silent),
            Err(_) => return Err(HelloFailure::Deadline),
            Ok(Ok(0)) => return Err(HelloFailure::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(HelloFailure::ReadError),
        }
        match peek(hello) {
            Peek::NeedMore => {}
            Peek::ServerName(name) => return Ok(name),
            Peek::NoServerName => return Err(HelloFailure::NoServerName),
            Peek::NotClientHello(Reason::TooLarge) => return Err(HelloFailure::TooLarge),
            Peek::NotClientHello(_) => return Err(HelloFailure::NotClientHello),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn deadlines(after: Duration) -> Deadlines {
        let at = Instant::now() + after;
        Deadlines {
            first_byte: at,
            complete: at,
        }
    }

    #[tokio::test]
    async fn plain_http_is_not_a_client_hello_and_its_bytes_are_kept() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut hello = Vec::new();
        let read = read_server_name(&mut server, &mut hello, deadlines(Duration::from_secs(5)));
        assert_eq!(read.await, Err(HelloFailure::NotClientHello));
        assert!(b"GET / HTTP/1.1\r\n".starts_with(&hello) && !hello.is_empty());
    }

    #[tokio::test]
    async fn silence_and_a_stall_are_told_apart() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let mut hello = Vec::new();
        let read = read_server_name(
            &mut server,
            &mut hello,
            deadlines(Duration::from_millis(50)),
        );
        assert_eq!(read.await, Err(HelloFailure::Silent));
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[0x16]).await.unwrap();
        let read = read_server_name(
            &mut server,
            &mut hello,
            deadlines(Duration::from_millis(50)),
        );
        assert_eq!(read.await, Err(HelloFailure::Deadline));
        assert_eq!(hello, [0x16]);
        drop(client);
        let mut hello = Vec::new();
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        let read = read_server_name(&mut server, &mut hello, deadlines(Duration::from_secs(5)));
        assert_eq!(read.await, Err(HelloFailure::Closed));
    }
}
