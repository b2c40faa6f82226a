//! HTTP/1.1 as the tests speak it to the front end: written byte for byte (the steward's
//! exact registration) and read back without an HTTP library, so that what is asserted is
//! what went over the wire.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::relay::REGISTRAR;
use crate::wait::PATIENCE;

/// The registration exactly as the steward sends it: Host with the port, the header format
/// of ORIGINAL.md §1.5.
pub fn steward_request(label: &str, port: u16, authorization: &str) -> String {
    format!(
        "PUT /register/{label} HTTP/1.1\r\nHost: {REGISTRAR}:{port}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    )
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    /// The port of a redirect's `Location` (`https://HOST:PORT/...`): a label's client
    /// port in a 307.
    pub fn location_port(&self) -> u16 {
        let location = self.header("location").unwrap();
        location
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("port in {location}"))
    }
}

/// Reads one HTTP/1.1 response (head, then a Content-Length body).
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Response {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("response within patience")
            .unwrap();
        assert!(
            n == 1,
            "connection closed inside the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 64 * 1024);
    }
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.unwrap();
    Response {
        status,
        headers,
        body,
    }
}

/// Runs curl (`-sS --max-time 10`, `-w` appending `write_out` to the body, `--cacert`
/// `cacert`, any `extra` flags) on `url`, off the async workers; asserts it succeeded and
/// returns what it printed. curl is installed by scripts/install-test-deps.sh.
pub async fn curl(url: &str, cacert: &std::path::Path, extra: &[&str], write_out: &str) -> String {
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "10"])
        .args(extra)
        .arg("-w")
        .arg(write_out)
        .arg("--cacert")
        .arg(cacert)
        .arg(url);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("curl is installed (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
