//! What a test reads off a running relay process: `/proc` (fds, RSS, CPU, its limits, the
//! ports listening in this network namespace) and its `/metrics` text.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// The `/metrics` text served on `addr` (one request, read to EOF, bounded).
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8(crate::wait::read_to_end(&mut stream).await).unwrap()
}

/// A metrics text, or an empty one when the endpoint is not there (a process gone, a port
/// not bound yet): for the figures and waits that read metrics across a restart.
pub async fn try_scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = tokio::time::timeout(crate::wait::PATIENCE, stream.read_to_string(&mut text)).await;
    text
}

/// One reading of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    pub fds: usize,
    pub rss_kib: u64,
    /// utime + stime, in clock ticks (1/100 s here).
    pub cpu_ticks: u64,
}

impl ProcStats {
    pub fn read(pid: u32) -> std::io::Result<Self> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            fds,
            rss_kib,
            cpu_ticks: cpu_ticks(pid)?,
        })
    }
}

/// utime + stime of `pid` in clock ticks.
pub fn cpu_ticks(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces: fields count from after its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ")": state is field 3 overall, utime 14 and stime 15 → indices 11 and 12 here.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// The soft and hard "Max open files" of `pid`.
pub fn fd_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = |i: usize| fields.get(i).unwrap_or(&"?").to_string();
    (at(3), at(4))
}

/// Local ports in `lo..=hi` with a listening TCP socket in this network namespace
/// (from `/proc/net/tcp` and `/proc/net/tcp6`).
pub fn listening_ports(lo: u16, hi: u16) -> Vec<u16> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state)) = (fields.get(1), fields.get(3)) else {
                continue;
            };
            if *state != "0A" {
                continue;
            }
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if let Some(port) = port.filter(|p| (lo..=hi).contains(p)) {
                found.push(port);
            }
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// Whether the kernel keeps TCP keepalive on the IPv4 connection from `local` to `remote` in
/// this network namespace: with `SO_KEEPALIVE`, an open connection has its keepalive timer
/// armed (`tr` 2 in `/proc/net/tcp`), which shows that a relayed connection got its socket
/// options. `None` when there is no such connection.
pub fn keepalive_armed(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<bool> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let endpoint = |field: &str| -> Option<std::net::SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        // The address as the kernel holds it in memory, printed as a native-endian number.
        let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes());
        Some((ip, u16::from_str_radix(port, 16).ok()?).into())
    };
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (l, r, timer) = (fields.get(1)?, fields.get(2)?, fields.get(5)?);
        (endpoint(l)? == local && endpoint(r)? == remote)
            .then(|| timer.split(':').next() == Some("02"))
    })
}

/// Ports of `lo..=hi` on `ip` that accept a TCP connection (a connect scan; each connect is
/// closed at once).
pub async fn accepting_ports(ip: std::net::IpAddr, lo: u16, hi: u16) -> Vec<u16> {
    let mut open = Vec::new();
    for port in lo..=hi {
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(SocketAddr::new(ip, port)),
        );
        if let Ok(Ok(_stream)) = attempt.await {
            open.push(port);
        }
    }
    open
}

/// The value of one metric series (`name{labels}` exactly as exposed) in a metrics text; 0
/// when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The series of a label's pairings through one entry (`own_port`, `shared_port`, `direct`).
pub fn paired(label: &str, entry: &str) -> String {
    format!("taas_pairings_total{{label=\"{label}\",entry=\"{entry}\"}}")
}

/// Sum of a metric's series (e.g. `taas_pairings_total`) in a metrics text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reading tells a connection with keepalive from one without, by its two ends.
    #[tokio::test]
    async fn keepalive_armed_tells_a_kept_alive_connection_from_a_plain_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_keepalive(true).unwrap();
        let client = socket.connect(addr).await.unwrap();
        let (_accepted, _) = listener.accept().await.unwrap();
        let client_addr = client.local_addr().unwrap();
        assert_eq!(keepalive_armed(client_addr, addr), Some(true));
        assert_eq!(
            keepalive_armed(addr, client_addr),
            Some(false),
            "the accepting end"
        );
        let elsewhere: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(keepalive_armed(addr, elsewhere), None);
    }
}
