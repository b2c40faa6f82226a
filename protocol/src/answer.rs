//! The front end's HTTP exchanges as plain data (PROTOCOL.md §2 and §4): the registration and
//! client requests as a label backend sees them, the routing of `PUT /register/LABEL`, and
//! every answer. Nothing here does I/O: a backend decides, the front end writes.
//!
//! (Named for what it holds: "registrar" is the host role that receives registrations.)

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use crate::rendezvous::{self, bracket_v6};
use crate::sync::lock;

/// Header a gateway adds when it forwards a request to a label's relay: the original client's
/// address (trusted only from gateway addresses).
pub const CLIENT_ADDR_HEADER: &str = "taas-client-addr";

/// Extension (PROTOCOL.md §2, "several rendezvous ports at once"): a registration carrying
/// this header with a number N from 1 up asks for up to N rendezvous ports in one request
/// (values above [`MAX_RENDEZVOUS_PER_REQUEST`] count as that maximum). The `200` body then
/// holds one `HOST:PORT` per port granted, one per line, `\n`-separated, no final newline;
/// fewer than N are granted when the label's parked-connection limit or the token's reuse
/// limit leaves fewer (never 0: that is the `503` or `401` of a single request). Every port is
/// a separate one-shot p with all of §3's rules. The original's clients never send the header,
/// and a request without it is answered exactly as before (one `HOST:PORT`); a value that is
/// not a number from 1 up gets `400`.
pub const RENDEZVOUS_COUNT_HEADER: &str = "taas-rendezvous-count";

/// On a label relay's answer to a registration forwarded by a gateway (never passed on to the
/// hidden server): the label's parked connections and pending registrations on this relay,
/// so a gateway spreads registrations over a label's replicas (issue 16).
pub const PARKED_HEADER: &str = "taas-parked";

/// On a label relay's 503 to a registration while it drains (value `1`): a gateway with
/// several replicas of the label tries the next one.
pub const DRAINING_HEADER: &str = "taas-draining";

/// On a label relay's 503 to a mobile GET forwarded by a gateway (value `1`, never passed on
/// to the client): nothing is parked here now, but the label's hidden server registered
/// lately, so one is likely parked somewhere within moments (its agent replacing a connection,
/// or parking again after a replica drained). The gateway then keeps asking the label's
/// replicas for a moment instead of answering 503 at once.
pub const EXPECTED_HEADER: &str = "taas-expected";

/// Most rendezvous ports handed out by one request of the extension.
pub const MAX_RENDEZVOUS_PER_REQUEST: u32 = 16;

/// The number of rendezvous ports a registration asks for: 1 without the extension's header,
/// `None` (answer `400`) for a value that is not a decimal number from 1 up.
pub fn rendezvous_count(value: Option<&[u8]>) -> Option<u32> {
    let Some(value) = value else { return Some(1) };
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match text.parse::<u64>().ok()? {
        0 => None,
        n => Some(n.min(u64::from(MAX_RENDEZVOUS_PER_REQUEST)) as u32),
    }
}

/// An HTTP answer: status, extra headers, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Answer {
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// `200` with `HOST:PORT` as the whole body (no newline).
    pub fn rendezvous(host: &str, port: u16) -> Self {
        Self::rendezvous_many(host, &[port])
    }

    /// `200` with one `HOST:PORT` per line (the several-ports extension); for one port, the
    /// same bytes as [`Answer::rendezvous`]. The body is [`rendezvous::format`]'s.
    pub fn rendezvous_many(host: &str, ports: &[u16]) -> Self {
        let mut answer = Self::empty(200).with("content-type", "text/plain");
        answer.body = rendezvous::format(host, ports);
        answer
    }

    /// `401` with the TOTP challenge: no, unknown or refused credentials.
    pub fn unauthorized() -> Self {
        Self::empty(401).with("www-authenticate", "TOTP realm=\"taas\"")
    }

    pub fn bad_request() -> Self {
        Self::empty(400)
    }

    pub fn not_found() -> Self {
        Self::empty(404)
    }

    pub fn method_not_allowed() -> Self {
        Self::empty(405).with("allow", "PUT")
    }

    pub fn misdirected() -> Self {
        Self::empty(421)
    }

    pub fn too_many(retry_after: Duration) -> Self {
        Self::empty(429).with("retry-after", seconds(retry_after))
    }

    pub fn unavailable(retry_after: Duration) -> Self {
        Self::empty(503).with("retry-after", seconds(retry_after))
    }

    /// `307` to the label's client port, keeping the path and query.
    pub fn redirect(host: &str, port: u16, path_and_query: &str) -> Self {
        let path = if path_and_query.starts_with('/') {
            path_and_query
        } else {
            "/"
        };
        Self::empty(307)
            .with(
                "location",
                format!("https://{}:{port}{path}", bracket_v6(host)),
            )
            .with("cache-control", "no-store")
    }
}

/// Whole seconds for `Retry-After`, at least 1.
fn seconds(duration: Duration) -> String {
    duration.as_secs_f64().ceil().max(1.0).to_string()
}

/// The registrar's routes: `PUT /register/LABEL` and nothing else. Returns the label (lower
/// case) or the answer for a wrong path (404) or method (405).
pub fn route(method: &str, path: &str) -> Result<String, Answer> {
    let label = match path.strip_prefix("/register/") {
        Some(label) if !label.is_empty() && !label.contains('/') => label,
        _ => return Err(Answer::not_found()),
    };
    if method != "PUT" {
        return Err(Answer::method_not_allowed());
    }
    Ok(label.to_ascii_lowercase())
}

/// IDs already authenticated on one kept-alive front-end connection: further registrations
/// of these IDs on it are not limited by token reuse (nobody else can inject into it).
#[derive(Debug, Default)]
pub struct ConnectionAuth {
    ids: Mutex<Vec<String>>,
}

/// A connection rarely carries more than one ID; this bounds what one connection can store.
const MAX_IDS_PER_CONNECTION: usize = 16;

impl ConnectionAuth {
    pub fn has(&self, id: &str) -> bool {
        lock(&self.ids).iter().any(|known| known == id)
    }

    pub fn add(&self, id: &str) {
        let mut ids = lock(&self.ids);
        if !ids.iter().any(|known| known == id) && ids.len() < MAX_IDS_PER_CONNECTION {
            ids.push(id.to_string());
        }
    }
}

/// One registration request, as the front end hands it to a label backend.
#[derive(Debug)]
pub struct Registration<'a> {
    /// LABEL from the path, lower case.
    pub label: &'a str,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<&'a [u8]>,
    /// The registering hidden server's address (for pinning and rate limits).
    pub source: IpAddr,
    /// Rendezvous ports asked for: 1, or more with the extension's
    /// [`RENDEZVOUS_COUNT_HEADER`] (already capped at [`MAX_RENDEZVOUS_PER_REQUEST`]).
    pub count: u32,
}

/// One mobile client's request for `LABEL.<domain>`.
#[derive(Debug)]
pub struct ClientRequest<'a> {
    pub label: &'a str,
    /// The requested host name, without port, lower case.
    pub host: &'a str,
    /// Path and query of the request, kept in the `Location`.
    pub path_and_query: &'a str,
    pub source: IpAddr,
}

/// Which host the 307 `Location` names (`--redirect-host requested|advertise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RedirectHost {
    /// The host name the mobile client asked for (the original's behaviour; needs wildcard DNS).
    #[default]
    Requested,
    /// The relay's advertised address.
    Advertise,
}

impl RedirectHost {
    /// The command-line value (what `--redirect-host` takes).
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Advertise => "advertise",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("PUT", "/register/Home"), Ok("home".into()));
        assert_eq!(route("PUT", "/register/a.b"), Ok("a.b".into()));
        assert_eq!(
            route("GET", "/register/home"),
            Err(Answer::method_not_allowed())
        );
        assert_eq!(route("PUT", "/register/"), Err(Answer::not_found()));
        assert_eq!(route("PUT", "/register/a/b"), Err(Answer::not_found()));
        assert_eq!(route("PUT", "/pairings/home"), Err(Answer::not_found()));
        assert_eq!(route("GET", "/"), Err(Answer::not_found()));
    }

    #[test]
    fn answers_carry_the_contract_headers() {
        let ok = Answer::rendezvous("127.0.0.1", 20001);
        assert_eq!((ok.status, ok.body.as_str()), (200, "127.0.0.1:20001"));
        assert_eq!(Answer::rendezvous("::1", 5).body, "[::1]:5");
        assert_eq!(
            Answer::unauthorized().headers,
            vec![("www-authenticate", "TOTP realm=\"taas\"".to_string())]
        );
        assert_eq!(
            Answer::too_many(Duration::from_millis(1500)).headers[0],
            ("retry-after", "2".to_string())
        );
        let redirect = Answer::redirect("home.taas.localhost", 21000, "/a/b?x=1&y=2");
        assert_eq!(
            redirect.headers[0],
            (
                "location",
                "https://home.taas.localhost:21000/a/b?x=1&y=2".to_string()
            )
        );
        assert_eq!(
            Answer::redirect("::1", 1, "*").headers[0].1,
            "https://[::1]:1/"
        );
    }

    #[test]
    fn several_ports_in_one_answer() {
        let one = Answer::rendezvous_many("127.0.0.1", &[20001]);
        assert_eq!(one, Answer::rendezvous("127.0.0.1", 20001));
        let three = Answer::rendezvous_many("::1", &[1, 2, 3]);
        assert_eq!(three.body, "[::1]:1\n[::1]:2\n[::1]:3");
        assert_eq!(three.headers, one.headers);
    }

    #[test]
    fn rendezvous_count_header_values() {
        assert_eq!(rendezvous_count(None), Some(1));
        assert_eq!(rendezvous_count(Some(b"1")), Some(1));
        assert_eq!(rendezvous_count(Some(b" 8 ")), Some(8));
        assert_eq!(rendezvous_count(Some(b"16")), Some(16));
        assert_eq!(rendezvous_count(Some(b"17")), Some(16));
        assert_eq!(rendezvous_count(Some(b"99999999999999999999")), None);
        for bad in [&b""[..], b"0", b"-1", b"+2", b"2.0", b"x", b"1,2", b"\xff"] {
            assert_eq!(rendezvous_count(Some(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn connection_auth_is_bounded() {
        let auth = ConnectionAuth::default();
        for i in 0..100 {
            auth.add(&format!("id{i}"));
        }
        assert!(auth.has("id0") && auth.has("id15") && !auth.has("id16"));
    }
}
