//! Registrations per second on ONE kept-alive TLS connection to the relay's registrar:
//! `PUT /register/LABEL` with a valid TOTP, one request at a time, nothing connects to the
//! rendezvous ports handed out (run the relay with a short --rendezvous-timeout so they recycle).
//!
//! regbench CONNECT_ADDR HOST CA_PEM ID SECRET_B32 LABEL SECS MAX_REQUESTS
//!
//! Prints one JSON object: requests, 200s, other statuses, requests/s and 200s/s.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

fn base32_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u64, 0u32);
    for c in s.trim().trim_end_matches('=').chars() {
        let v = match c.to_ascii_uppercase() {
            c @ 'A'..='Z' => c as u64 - 'A' as u64,
            c @ '2'..='7' => c as u64 - '2' as u64 + 26,
            _ => panic!("bad base32"),
        };
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

fn totp(key: &ring::hmac::Key, period: u64) -> String {
    let step = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / period;
    let tag = ring::hmac::sign(key, &step.to_be_bytes());
    let h = tag.as_ref();
    let o = (h[h.len() - 1] & 0x0f) as usize;
    let bin = ((h[o] as u32 & 0x7f) << 24)
        | ((h[o + 1] as u32) << 16)
        | ((h[o + 2] as u32) << 8)
        | h[o + 3] as u32;
    format!("{:06}", bin % 1_000_000)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 9 {
        eprintln!("usage: regbench CONNECT_ADDR HOST CA_PEM ID SECRET_B32 LABEL SECS MAX_REQUESTS");
        std::process::exit(2);
    }
    let (connect, host, ca, id, secret, label) = (&a[1], &a[2], &a[3], &a[4], &a[5], &a[6]);
    let secs = Duration::from_secs_f64(a[7].parse().expect("SECS"));
    let max: u64 = a[8].parse().expect("MAX_REQUESTS");
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        &base32_decode(secret),
    );

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA cert");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.split(':').next().unwrap().to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(connect).expect("connect to the registrar");
    sock.set_nodelay(true).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, sock));

    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut requests = 0u64;
    let mut ok_at_stop = 0u64;
    let mut error = String::new();
    let start = Instant::now();
    let mut first_ok = None;
    while requests < max && start.elapsed() < secs {
        let req = format!(
            "PUT /register/{label} HTTP/1.1\r\nHost: {host}\r\nAuthorization: TOTP username=\"{id}\", response=\"{}\"\r\nContent-Length: 0\r\n\r\n",
            totp(&key, 30)
        );
        if let Err(e) = tls.get_mut().write_all(req.as_bytes()) {
            error = format!("write: {e}");
            break;
        }
        // Status line, headers, body (Content-Length).
        let mut line = String::new();
        if let Err(e) = tls.read_line(&mut line) {
            error = format!("read: {e}");
            break;
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        let mut close = false;
        loop {
            line.clear();
            if tls.read_line(&mut line).unwrap_or(0) == 0 {
                close = true;
                break;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; length];
        if tls.read_exact(&mut body).is_err() {
            close = true;
        }
        requests += 1;
        *statuses.entry(status).or_default() += 1;
        if status == 200 && first_ok.is_none() {
            first_ok = Some(String::from_utf8_lossy(&body).to_string());
        }
        if status == 200 {
            ok_at_stop += 1;
        }
        if close {
            error = format!("the relay closed the connection after {requests} requests");
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let by_status: Vec<String> = statuses
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    println!(
        "{{\"requests\":{requests},\"ok\":{ok_at_stop},\"secs\":{elapsed:.3},\"per_sec\":{:.1},\"ok_per_sec\":{:.1},\"statuses\":{{{}}},\"first_ok_body\":{:?},\"error\":{:?}}}",
        requests as f64 / elapsed,
        ok_at_stop as f64 / elapsed,
        by_status.join(","),
        first_ok.unwrap_or_default(),
        error
    );
}
