//! Fresh-connection load: each iteration connects, writes one byte, reads the echoed byte and
//! closes (the client closes first). With FIRST_BYTES (a file), those bytes are written instead
//! of the one byte and read back whole: a ClientHello for TAAS's shared client port.
//!
//! connbench latency ADDR COUNT MAX_SECS [FIRST_BYTES]   one connection at a time; p50/p99 in µs
//! connbench rate ADDR WORKERS SECS [FIRST_BYTES]        closed loop with WORKERS threads; connections/s
//! connbench stream ADDR SECS [FIRST_BYTES]              one connection to an echo server: after the
//!                                                       first bytes' echo, writes for SECS while a
//!                                                       second thread reads the echo; Gbit/s echoed
//!                                                       (each byte crosses the path both ways)
//!
//! Prints one JSON object. Every loop is bounded by count and time; each socket operation
//! times out after 15 s (longer than the relay's 10 s client wait).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection whose `first` bytes have come back echoed; `nodelay` for fresh connections'
/// small writes.
fn echoed_first(addr: &SocketAddr, first: &[u8], nodelay: bool) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(addr, IO_TIMEOUT)?;
    s.set_nodelay(nodelay)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(first)?;
    let mut b = vec![0u8; first.len()];
    s.read_exact(&mut b)?;
    if b != first {
        return Err(std::io::Error::other("wrong bytes echoed"));
    }
    Ok(s)
}

fn one(addr: &SocketAddr, first: &[u8]) -> std::io::Result<()> {
    echoed_first(addr, first, true).map(drop) // dropped: close
}

/// Bytes echoed back within `secs` on one connection (after `first`'s echo), the seconds, and
/// the bytes echoed in all (the writes' tail included).
fn stream(addr: &SocketAddr, first: &[u8], secs: Duration) -> std::io::Result<(u64, f64, u64)> {
    const CHUNK: usize = 128 * 1024;
    let mut s = echoed_first(addr, first, false)?;
    let mut reader = s.try_clone()?;
    let start = Instant::now();
    let counting = std::thread::spawn(move || -> std::io::Result<(u64, f64, u64)> {
        let mut buf = vec![0u8; CHUNK];
        let (mut total, mut in_window) = (0u64, None);
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                let (bytes, secs) = in_window.unwrap_or((total, start.elapsed().as_secs_f64()));
                return Ok((bytes, secs, total));
            }
            total += n as u64;
            if in_window.is_none() && start.elapsed() >= secs {
                in_window = Some((total, start.elapsed().as_secs_f64()));
            }
        }
    });
    let chunk = vec![0x5au8; CHUNK];
    // Bounded by time, and by count (at most 1 TiB).
    for _ in 0..(1u64 << 40) / CHUNK as u64 {
        if start.elapsed() >= secs {
            break;
        }
        s.write_all(&chunk)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    counting
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))?
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 || (args[1] != "stream" && args.len() < 5) {
        eprintln!("usage: connbench latency ADDR COUNT MAX_SECS [FIRST_BYTES] | rate ADDR WORKERS SECS [FIRST_BYTES] | stream ADDR SECS [FIRST_BYTES]");
        std::process::exit(2);
    }
    if args[1] == "stream" {
        let addr: SocketAddr = args[2].parse().expect("ADDR");
        let secs = Duration::from_secs_f64(args[3].parse().expect("SECS"));
        let first = match args.get(4) {
            Some(path) => std::fs::read(path).expect("FIRST_BYTES file"),
            None => b"x".to_vec(),
        };
        match stream(&addr, &first, secs) {
            Ok((bytes, elapsed, total)) => println!(
                "{{\"mode\":\"stream\",\"bytes\":{},\"secs\":{:.3},\"gbit_s\":{:.3},\"bytes_total\":{}}}",
                bytes, elapsed, bytes as f64 * 8.0 / elapsed / 1e9, total
            ),
            Err(e) => println!("{{\"mode\":\"stream\",\"error\":{:?}}}", e.to_string()),
        }
        return;
    }
    let addr: SocketAddr = args[2].parse().expect("ADDR");
    let first: Arc<Vec<u8>> = Arc::new(match args.get(5) {
        Some(path) => std::fs::read(path).expect("FIRST_BYTES file"),
        None => b"x".to_vec(),
    });
    match args[1].as_str() {
        "latency" => {
            let count: usize = args[3].parse().expect("COUNT");
            let max = Duration::from_secs_f64(args[4].parse().expect("MAX_SECS"));
            let start = Instant::now();
            let mut us = Vec::with_capacity(count);
            let mut errors = 0u64;
            let mut first_error = String::new();
            while us.len() < count && start.elapsed() < max && errors < 1000 {
                let t = Instant::now();
                match one(&addr, &first) {
                    Ok(()) => us.push(t.elapsed().as_secs_f64() * 1e6),
                    Err(e) => {
                        errors += 1;
                        if first_error.is_empty() {
                            first_error = e.to_string();
                        }
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            us.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
            println!(
                "{{\"mode\":\"latency\",\"count\":{},\"errors\":{},\"secs\":{:.3},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1},\"first_error\":{:?}}}",
                us.len(), errors, secs, pct(&us, 50.0), pct(&us, 90.0), pct(&us, 99.0),
                us.last().copied().unwrap_or(f64::NAN), mean, first_error
            );
        }
        "rate" => {
            let workers: usize = args[3].parse().expect("WORKERS");
            let secs = Duration::from_secs_f64(args[4].parse().expect("SECS"));
            let ok = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let start = Instant::now();
            let threads: Vec<_> = (0..workers)
                .map(|_| {
                    let (ok, errors, stop) = (ok.clone(), errors.clone(), stop.clone());
                    let first = first.clone();
                    std::thread::spawn(move || {
                        let mut first_error = String::new();
                        // Bounded in time by `stop` (set after SECS) and in count.
                        for _ in 0..50_000_000u64 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            match one(&addr, &first) {
                                Ok(()) => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    if first_error.is_empty() {
                                        first_error = e.to_string();
                                    }
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        }
                        first_error
                    })
                })
                .collect();
            std::thread::sleep(secs);
            let at_stop = ok.load(Ordering::Relaxed);
            let elapsed = start.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let mut first_error = String::new();
            for t in threads {
                let e = t.join().unwrap_or_default();
                if first_error.is_empty() {
                    first_error = e;
                }
            }
            let total = ok.load(Ordering::Relaxed);
            println!(
                "{{\"mode\":\"rate\",\"workers\":{},\"secs\":{:.3},\"conns\":{},\"conns_total\":{},\"errors\":{},\"per_sec\":{:.1},\"first_error\":{:?}}}",
                workers, elapsed, at_stop, total, errors.load(Ordering::Relaxed),
                at_stop as f64 / elapsed, first_error
            );
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
