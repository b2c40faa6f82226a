//! Fresh-connection load: each iteration connects, writes one byte, reads the echoed byte and
//! closes (the client closes first). With FIRST_BYTES (a file), those bytes are written instead
//! of the one byte and read back whole: a ClientHello for TAAS's shared client port.
//!
//! connbench latency ADDR COUNT MAX_SECS [FIRST_BYTES]   one connection at a time; p50/p99 in µs
//! connbench rate ADDR WORKERS SECS [FIRST_BYTES]        closed loop with WORKERS threads; connections/s
//!
//! Prints one JSON object. Every loop is bounded by count and time; each socket operation
//! times out after 15 s (longer than the relay's 10 s client wait).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

fn one(addr: &SocketAddr, first: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(first)?;
    let mut b = vec![0u8; first.len()];
    s.read_exact(&mut b)?;
    if b != first {
        return Err(std::io::Error::other("wrong bytes echoed"));
    }
    Ok(()) // dropped: close
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
    if args.len() < 5 {
        eprintln!("usage: connbench latency ADDR COUNT MAX_SECS [FIRST_BYTES] | rate ADDR WORKERS SECS [FIRST_BYTES]");
        std::process::exit(2);
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
