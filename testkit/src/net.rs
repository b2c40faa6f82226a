//! Connections from a chosen loopback address, for tests of source-based decisions.

use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `to` from the loopback address `source` (127.0.0.x), port from the OS.
pub async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}
