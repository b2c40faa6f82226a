//! The web console (`serve --console`, issue 17) over real sockets: an in-process relay with
//! its console on loopback, agents parked through the real front end, and requests written
//! by hand so that what is asserted is what went over the wire.

use std::net::SocketAddr;
use std::time::Duration;

use taas_relay::console::ConsoleOptions;
use taas_relay::metrics::Registered;
use taas_relay::run::standalone::ServeOptions;
use taas_testkit::agent::Agent;
use taas_testkit::logs::{captured_logs, debug_logs, secret_spellings};
use taas_testkit::prelude::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

fn console_on(options: &mut ServeOptions) {
    options.console = Some(ConsoleOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        token_file: None,
    });
}

async fn start(labels: &[&TestLabel]) -> TestRelay {
    debug_logs();
    TestRelay::start_with(labels, console_on).await
}

fn console(relay: &TestRelay) -> SocketAddr {
    relay.standalone.console.expect("the console is on")
}

/// One request on a new connection (`Connection: close`), read back whole.
async fn send_on<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, raw: &str) -> Response {
    stream.write_all(raw.as_bytes()).await.unwrap();
    read_response(stream).await
}

/// A visitor of the console: its session cookie and the CSRF token of its pages.
struct Visitor {
    addr: SocketAddr,
    cookie: String,
    csrf: String,
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> String {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in extra {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        raw.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    raw
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> Response {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    send_on(&mut stream, &request(addr, method, path, extra, body)).await
}

/// The text between `start` and the next `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

fn form_encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

impl Visitor {
    async fn arrive(addr: SocketAddr) -> Self {
        let page = http(addr, "GET", "/", &[], "").await;
        assert_eq!(page.status, 200, "{page:?}");
        let set = page
            .header("set-cookie")
            .expect("a session cookie")
            .to_string();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_string();
        let csrf = between(page.body_str(), "name=\"csrf\" value=\"", "\"")
            .expect("a CSRF field")
            .to_string();
        Self { addr, cookie, csrf }
    }

    async fn get(&self, path: &str) -> Response {
        http(self.addr, "GET", path, &[("Cookie", &self.cookie)], "").await
    }

    /// A POST from this console's own page (its cookie, its token, its origin).
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Response {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        let origin = format!("http://{}", self.addr);
        let headers = [
            ("Cookie", self.cookie.as_str()),
            ("Origin", origin.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ];
        http(self.addr, "POST", path, &headers, &form_encode(&all)).await
    }

    async fn rows(&self) -> serde_json::Value {
        let json = self.get("/labels.json").await;
        assert_eq!(json.status, 200);
        serde_json::from_str::<serde_json::Value>(json.body_str()).unwrap()["labels"].clone()
    }

    async fn row(&self, label: &str) -> Option<serde_json::Value> {
        self.rows()
            .await
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["label"] == label)
            .cloned()
    }
}

async fn agent_for(relay: &TestRelay, label: &TestLabel, parked: usize) -> Agent {
    let (echo, _) = echo_server().await;
    Agent::start(relay.addr(), relay.ca(), label, echo, parked, |_| {})
}

fn assert_console_headers(response: &Response) {
    assert_eq!(
        response.header("content-security-policy"),
        Some(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'"
        )
    );
    assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(response.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(response.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn the_table_shows_a_label_and_its_parked_connections_from_a_real_agent() {
    let home = TestLabel::new("home");
    let relay = start(&[&home]).await;
    let _agent = agent_for(&relay, &home, 2).await;
    relay.wait_parked("home", 2).await;
    let visitor = Visitor::arrive(console(&relay)).await;

    let page = visitor.get("/").await;
    assert_console_headers(&page);
    let html = page.body_str();
    let row = between(html, "<tr data-label=\"home\"", "</tr>").expect("a row for home");
    assert!(
        row.contains("<td>id-of-home</td><td>serving</td><td>2</td>"),
        "{row}"
    );
    assert!(row.contains("from 127.0.0.1"), "{row}");
    assert!(html.contains("<script src=\"/console.js\""));
    assert!(!html.contains(&home.secret_b32));

    let json = visitor.row("home").await.unwrap();
    assert_eq!(json["parked"], 2);
    assert_eq!(json["id"], "id-of-home");
    assert_eq!(json["state"], "serving");
    assert_eq!(json["last_registration"]["source"], "127.0.0.1");
    assert_eq!(
        json["actions"],
        serde_json::json!(["disable", "rotate", "delete"])
    );

    // A wrong token is counted in the 401 column.
    let forged = TestLabel::new("home");
    assert_eq!(relay.put("home", &forged.authorization()).await.status, 401);
    eventually("the 401 counted", || async {
        visitor.row("home").await.unwrap()["unauthorized"] == 1
    })
    .await;

    let js = http(console(&relay), "GET", "/console.js", &[], "").await;
    assert_eq!(js.status, 200);
    assert!(js
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert!(js.body_str().contains("/labels.json"));
}

#[tokio::test]
async fn a_label_created_through_the_form_is_served_and_its_secret_is_shown_once() {
    let relay = start(&[]).await;
    let visitor = Visitor::arrive(console(&relay)).await;
    let created = visitor
        .post(
            "/labels",
            &[
                ("id", "srv-created"),
                ("label", "Created"),
                ("algorithm", "SHA1"),
                ("period", "30"),
                ("max_parked", "4"),
                ("source_pinning_shown", "1"),
                ("source_pinning", "on"),
                ("steward", "on"),
            ],
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body_str());
    assert_console_headers(&created);
    let page = created.body_str();
    let b32 = between(page, "<code id=\"secret-b32\">", "</code>")
        .unwrap()
        .to_string();
    assert_eq!(b32.len(), 32, "160 bits in base32: {b32}");
    assert!(page.contains("otpauth://totp/"), "the URI");
    assert!(page.contains("<svg"), "the QR code");
    assert!(page.contains("taas-agent --relay https://taas-registrar.localhost:"));
    assert!(page.contains("download=\"created.yaml\""));
    assert!(
        page.contains("download=\"srv-created.js\""),
        "the steward's file"
    );

    // The same file `label new` writes, which the relay serves.
    let file = relay.labels_dir.join("created.yaml");
    let config = taas_relay::label_source::read_label_file(&file).unwrap();
    assert_eq!(config.id, "srv-created");
    assert_eq!(config.max_parked, 4);
    assert_eq!(
        config.secret,
        taas_relay::totp::decode_secret(&b32).unwrap()
    );
    assert!(relay.standalone.relay.label("created").is_some());
    let label = TestLabel {
        label: "created".into(),
        id: "srv-created".into(),
        secret_b32: b32.clone(),
        spec_extra: String::new(),
    };
    let _agent = agent_for(&relay, &label, 1).await;
    relay.wait_parked("created", 1).await;

    // Never again: not on the page, not in the JSON, not in the logs (at debug).
    let again = visitor.get("/").await.body_str().to_string();
    assert!(again.contains("data-label=\"created\""));
    let json = visitor.get("/labels.json").await.body_str().to_string();
    for spelling in secret_spellings(&b32, &config.secret) {
        assert!(
            !again.contains(&spelling),
            "the page shows the secret again"
        );
        assert!(!json.contains(&spelling), "the JSON shows the secret");
        assert!(
            !captured_logs().contains(&spelling),
            "a log line holds the secret"
        );
    }
    assert!(
        !captured_logs().contains(&visitor.csrf),
        "a log line holds a CSRF token"
    );

    // The same label again: refused inline, nothing overwritten.
    let before = std::fs::read(&file).unwrap();
    let twice = visitor
        .post("/labels", &[("id", "other"), ("label", "created")])
        .await;
    assert_eq!(twice.status, 400);
    assert!(between(twice.body_str(), "id=\"label-error\">", "</p>")
        .unwrap()
        .contains("exists already"));
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

#[tokio::test]
async fn bad_input_gets_400_with_an_inline_error_per_field_and_writes_nothing() {
    let relay = start(&[]).await;
    let visitor = Visitor::arrive(console(&relay)).await;
    let bad = visitor
        .post(
            "/labels",
            &[
                ("id", "has space"),
                ("label", "bad..label<script>"),
                ("algorithm", "MD5"),
                ("period", "0"),
                ("max_parked", "lots"),
            ],
        )
        .await;
    assert_eq!(bad.status, 400);
    let page = bad.body_str();
    for field in ["id", "label", "algorithm", "period", "max_parked"] {
        assert!(
            page.contains(&format!("id=\"{field}-error\"")),
            "no error for {field}: {page}"
        );
    }
    assert!(
        page.contains("value=\"bad..label&lt;script&gt;\""),
        "typed values kept, escaped"
    );
    assert!(!page.contains("<script>"));
    assert_eq!(std::fs::read_dir(&relay.labels_dir).unwrap().count(), 0);
}

#[tokio::test]
async fn forged_requests_get_403_and_change_nothing() {
    let home = TestLabel::new("home");
    let relay = start(&[&home]).await;
    let addr = console(&relay);
    let visitor = Visitor::arrive(addr).await;
    let create = form_encode(&[("id", "x"), ("label", "forged")]);
    let with_token = format!("csrf={}&{create}", visitor.csrf);
    let origin = format!("http://{addr}");
    let cookie = visitor.cookie.as_str();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String);
    let cases: Vec<Case> = vec![
        ("no cookie, no token", vec![], create.clone()),
        ("no cookie", vec![], with_token.clone()),
        ("no token", vec![("Cookie", cookie)], create.clone()),
        (
            "a wrong token",
            vec![("Cookie", cookie)],
            format!("csrf={}&{create}", "ab".repeat(32)),
        ),
        (
            "a foreign Origin",
            vec![("Cookie", cookie), ("Origin", "https://evil.example")],
            with_token.clone(),
        ),
        (
            "a cross-site fetch",
            vec![
                ("Cookie", cookie),
                ("Sec-Fetch-Site", "cross-site"),
                ("Origin", &origin),
            ],
            with_token.clone(),
        ),
    ];
    for (what, headers, body) in cases {
        let answer = http(addr, "POST", "/labels", &headers, &body).await;
        assert_eq!(answer.status, 403, "{what}: {}", answer.body_str());
        assert!(answer.body_str().contains("Nothing was changed"), "{what}");
        assert_console_headers(&answer);
    }
    // The same for a change to an existing label.
    let delete = http(
        addr,
        "POST",
        "/labels/home/delete",
        &[("Cookie", cookie)],
        "csrf=00",
    )
    .await;
    assert_eq!(delete.status, 403);
    // A page whose name was re-pointed at the console (DNS rebinding) is not answered.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let rebound = send_on(
        &mut stream,
        "GET /labels.json HTTP/1.1\r\nHost: evil.example:8893\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(rebound.status, 421);

    assert_eq!(std::fs::read_dir(&relay.labels_dir).unwrap().count(), 1);
    assert!(relay.standalone.relay.label("home").is_some());
    assert!(relay.standalone.relay.label("forged").is_none());
    // The genuine request still works.
    let ok = visitor
        .post("/labels", &[("id", "x"), ("label", "genuine")])
        .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn disable_enable_rotate_and_delete_take_effect_without_a_restart_and_leave_other_labels_alone(
) {
    let (home, other) = (TestLabel::new("home"), TestLabel::new("other"));
    let relay = start(&[&home, &other]).await;
    let _home_agent = agent_for(&relay, &home, 1).await;
    let _other_agent = agent_for(&relay, &other, 2).await;
    relay.wait_parked("home", 1).await;
    relay.wait_parked("other", 2).await;
    let other_label = relay.standalone.relay.label("other").unwrap();
    let other_registrations = other_label.metrics().registrations(Registered::Ok);
    let visitor = Visitor::arrive(console(&relay)).await;

    // Every action is confirmed first, on a page of its own.
    let confirm = visitor.get("/labels/home/confirm?action=disable").await;
    assert_eq!(confirm.status, 200);
    assert!(confirm
        .body_str()
        .contains("action=\"/labels/home/disable\""));

    let disabled = visitor.post("/labels/home/disable", &[]).await;
    assert_eq!(disabled.status, 303, "{}", disabled.body_str());
    assert_eq!(
        disabled.header("location"),
        Some("/?notice=disabled&label=home")
    );
    assert!(
        relay.standalone.relay.label("home").is_none(),
        "applied before the answer"
    );
    assert!(relay.labels_dir.join("disabled/home.yaml").exists());
    assert_eq!(visitor.row("home").await.unwrap()["state"], "disabled");
    let notice = visitor.get("/?notice=disabled&label=home").await;
    assert!(notice.body_str().contains("Label home disabled"));

    let enabled = visitor.post("/labels/home/enable", &[]).await;
    assert_eq!(enabled.status, 303);
    assert!(relay.standalone.relay.label("home").is_some());
    relay.wait_parked("home", 1).await;

    let rotated = visitor.post("/labels/home/rotate", &[]).await;
    assert_eq!(rotated.status, 200, "{}", rotated.body_str());
    let b32 = between(rotated.body_str(), "<code id=\"secret-b32\">", "</code>").unwrap();
    assert_ne!(b32, home.secret_b32);
    assert_eq!(rotated.header("cache-control"), Some("no-store"));
    assert!(
        !captured_logs().contains(b32),
        "a log line holds the new secret"
    );
    // The old secret is refused from now on, the new one accepted; what the old agent had
    // parked is closed, and its registrations with the old secret are refused.
    assert_eq!(relay.parked("home"), 0);
    let home_label = relay.standalone.relay.label("home").unwrap();
    eventually("the old agent refused", || async {
        home_label.metrics().registrations(Registered::Unauthorized) > 0
    })
    .await;
    assert_eq!(relay.parked("home"), 0);
    assert_eq!(relay.put("home", &home.authorization()).await.status, 401);
    let renewed = TestLabel {
        secret_b32: b32.to_string(),
        ..home.clone()
    };
    assert_eq!(
        relay.put("home", &renewed.authorization()).await.status,
        200
    );

    let deleted = visitor.post("/labels/home/delete", &[]).await;
    assert_eq!(deleted.status, 303);
    assert!(relay.standalone.relay.label("home").is_none());
    assert!(!relay.labels_dir.join("home.yaml").exists());
    assert!(visitor.row("home").await.is_none());

    // The other label's parked connections were never touched: the same label object, its
    // two connections, no new registration needed.
    let still = relay.standalone.relay.label("other").unwrap();
    assert!(std::sync::Arc::ptr_eq(&still, &other_label));
    assert_eq!(relay.parked("other"), 2);
    assert_eq!(
        still.metrics().registrations(Registered::Ok),
        other_registrations
    );
}

#[tokio::test]
async fn a_non_loopback_console_needs_a_token_and_then_serves_tls_behind_a_login() {
    debug_logs();
    let dir = tempfile::tempdir().unwrap();
    let refused = TestRelay::start_with_result(&[], |options| {
        options.console = Some(ConsoleOptions {
            addr: "0.0.0.0:0".parse().unwrap(),
            token_file: None,
        });
    })
    .await;
    let error = refused.err().expect("refused at start").to_string();
    assert!(error.contains("--console-token-file"), "{error}");

    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "a-long-enough-console-token\n").unwrap();
    let relay = TestRelay::start_with(&[], |options| {
        options.console = Some(ConsoleOptions {
            addr: "0.0.0.0:0".parse().unwrap(),
            token_file: Some(token_file.clone()),
        });
    })
    .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], console(&relay).port()));
    let tls = || tls_connect(addr, relay.ca(), REGISTRAR);
    let host = format!("{REGISTRAR}:{}", addr.port());
    let get = |path: &str, cookie: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        )
    };
    let page = send_on(&mut tls().await, &get("/", "")).await;
    assert_eq!(page.status, 303);
    assert_eq!(page.header("location"), Some("/login"));
    let json = send_on(&mut tls().await, &get("/labels.json", "")).await;
    assert_eq!(json.status, 401);

    let login = send_on(&mut tls().await, &get("/login", "")).await;
    let set = login.header("set-cookie").unwrap();
    assert!(set.contains("Secure") && set.contains("HttpOnly") && set.contains("SameSite=Strict"));
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = between(login.body_str(), "name=\"csrf\" value=\"", "\"")
        .unwrap()
        .to_string();
    let post = |token: &str| {
        let body = format!("csrf={csrf}&token={token}");
        format!(
            "POST /login HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let wrong = send_on(&mut tls().await, &post("a-long-enough-console-tokeN")).await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body_str().contains("Wrong token"));
    // Unauthenticated, a change is refused even with the session's token.
    let change = format!(
        "POST /labels HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nContent-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\ncsrf={csrf}&id=x&label=y",
        format!("csrf={csrf}&id=x&label=y").len()
    );
    assert_eq!(send_on(&mut tls().await, &change).await.status, 403);

    let right = send_on(&mut tls().await, &post("a-long-enough-console-token")).await;
    assert_eq!(right.status, 303, "{}", right.body_str());
    let session = right
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let table = send_on(&mut tls().await, &get("/", &session)).await;
    assert_eq!(table.status, 200);
    assert!(table.body_str().contains("action=\"/logout\""));
    assert!(!captured_logs().contains("a-long-enough-console-token"));
    // Plain HTTP is not spoken there.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain.write_all(get("/", "").as_bytes()).await.unwrap();
    let mut buf = [0u8; 5];
    let n = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read(&mut plain, &mut buf),
    )
    .await
    .unwrap()
    .unwrap_or(0);
    assert!(!buf[..n].starts_with(b"HTTP/"));
}

#[tokio::test]
async fn strangers_are_cut_at_their_deadlines_and_limits_while_others_are_served() {
    debug_logs();
    let relay = TestRelay::start_with(&[], |options| {
        console_on(options);
        options.timeouts.keep_alive = Duration::from_millis(800);
        options.timeouts.request_body = Duration::from_millis(800);
    })
    .await;
    let addr = console(&relay);

    // A silent connection and one that drips a head are closed at the head deadline.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: ").await.unwrap();
    // A body that never comes gets 408 at the body deadline.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST /labels HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nid=x"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Meanwhile another visitor is served.
    let visitor = Visitor::arrive(addr).await;
    assert_eq!(visitor.get("/labels.json").await.status, 200);

    assert_eq!(read_response(&mut stalled).await.status, 408);
    let started = std::time::Instant::now();
    for stream in [&mut silent, &mut slow] {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_end(stream, &mut rest),
        )
        .await
        .expect("closed at the head deadline");
        assert!(
            !rest.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(started.elapsed() < PATIENCE);

    // An announced body over the bound is refused at once.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let too_large = send_on(
        &mut big,
        &format!("POST /labels HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 10000000\r\n\r\n"),
    )
    .await;
    assert_eq!(too_large.status, 413);

    // One source may hold only so many connections (a source with no other traffic here, so
    // that no earlier connection's slot is still being given back); another is still served.
    let mut held = Vec::new();
    for _ in 0..taas_relay::console::MAX_CONNECTIONS_PER_SOURCE {
        held.push(connect_from("127.0.0.3", addr).await);
    }
    let mut over = connect_from("127.0.0.3", addr).await;
    let _ = over
        .write_all(request(addr, "GET", "/labels.json", &[], "").as_bytes())
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut over, &mut answer),
    )
    .await
    .expect("closed");
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    let mut elsewhere = connect_from("127.0.0.2", addr).await;
    let answer = send_on(
        &mut elsewhere,
        &request(addr, "GET", "/labels.json", &[], ""),
    )
    .await;
    assert_eq!(answer.status, 200);
    drop(held);
    assert_eq!(relay.standalone.relay.labels().len(), 0);
    assert!(std::fs::read_dir(&relay.labels_dir)
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn the_console_is_off_unless_asked_for() {
    let relay = TestRelay::start(&[]).await;
    assert_eq!(relay.standalone.console, None);
    assert_eq!(ServeOptions::default().console, None);
}
