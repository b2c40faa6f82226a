//! Logs and panics of the process under test: the relay's own log set-up, or a debug-level
//! capture that tests search for secrets; a panic counter that sees panics inside relay
//! tasks too (tokio would otherwise swallow them); and the spellings a secret could take in a
//! log line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The relay's own log set-up (text, level from `RUST_LOG`), as its binaries install it.
pub fn init_logs() {
    taas_process::init(taas_process::LogFormat::Text);
}

/// Everything the process logged since [`debug_logs`] installed the capture.
static CAPTURE: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Bound on the capture; later lines are counted, not kept.
const CAPTURE_MAX: usize = 256 * 1024 * 1024;
static CAPTURE_DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
struct CaptureWriter;

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut capture = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
        if capture.len() + buf.len() <= CAPTURE_MAX {
            capture.extend_from_slice(buf);
        } else {
            CAPTURE_DROPPED.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CaptureWriter {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// Installs (once per process) a global subscriber at `debug` for everything (`trace` for
/// nothing), writing into an in-memory capture: every in-process relay and agent of this test
/// binary then logs at debug, so nothing depends on quiet logging, and the logs can be searched
/// for secrets. Must run before anything else installs a subscriber (`TestRelay::start` does:
/// call this first in every test). Returns false if another subscriber was already installed.
pub fn debug_logs() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let level = std::env::var("TAAS_TEST_LOG").unwrap_or_else(|_| "debug".into());
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = level
            .parse::<tracing_subscriber::filter::Targets>()
            .unwrap_or_else(|_| {
                tracing_subscriber::filter::Targets::new().with_default(tracing::Level::DEBUG)
            });
        tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(CaptureWriter),
            )
            .try_init()
            .is_ok()
    })
}

/// A copy of the captured log text.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&CAPTURE.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic in the process from now on (relay tasks included: tokio would otherwise
/// swallow a panicking task), keeping the default report.
pub fn count_panics() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Every way `needle` could show up in a log line besides verbatim: lower case, and with
/// its bytes as hex, base64 and a Rust byte list.
pub fn secret_spellings(b32: &str, secret: &[u8]) -> Vec<String> {
    use base64::Engine as _;
    let mut out = vec![
        b32.to_string(),
        b32.to_ascii_lowercase(),
        b32.trim_end_matches('=').to_string(),
        secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        secret
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<String>(),
        base64::engine::general_purpose::STANDARD.encode(secret),
        format!("{:?}", &secret[..secret.len().min(6)])
            .trim_end_matches(']')
            .to_string(),
    ];
    out.retain(|s| s.len() >= 8);
    out
}

/// `text` without each line's leading timestamp and without ANSI escapes, so that digit runs
/// of timestamps cannot be mistaken for tokens.
pub fn strip_timestamps(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = strip_ansi(line);
        let rest = match line.split_once(' ') {
            Some((first, rest)) if first.len() >= 20 && first.as_bytes()[4] == b'-' => rest,
            _ => line.as_str(),
        };
        out.push_str(rest);
        out.push('\n');
    }
    out
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `token` (digits) occurs in `text` as a whole number: not inside a longer digit run
/// and not as the fraction of a decimal.
pub fn contains_number(text: &str, token: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(found) = text[from..].find(token) {
        let start = from + found;
        let end = start + token.len();
        let before = start.checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(end).copied();
        let digit_or_dot = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit() || b == b'.');
        if !digit_or_dot(before) && !after.is_some_and(|b| b.is_ascii_digit()) {
            return true;
        }
        from = start + 1;
    }
    false
}
