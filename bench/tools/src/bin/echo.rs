//! `echo ADDR`: a TCP echo server (the backend of the fresh-connection cases and of
//! `connbench stream`). Echoes until the client's EOF, then closes. Runs until killed. Its
//! buffer starts at 4 KiB (a fresh connection's few bytes) and grows to 256 KiB when reads fill
//! it (a stream).
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).expect("usage: echo ADDR");
    let listener = TcpListener::bind(&addr).await.expect("bind");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        if n == buf.len() && buf.len() < 256 * 1024 {
                            buf.resize(buf.len() * 2, 0);
                        }
                    }
                }
            }
        });
    }
}
