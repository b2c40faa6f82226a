//! The README's first command, run as a newcomer would (issue 14: it once failed on a fresh
//! machine). The command is read from README.md's "The two commands" section, not copied
//! here, and run from the repository root through `sh -c`; then the demo page is fetched
//! through the relay, following the 307, as the README's curl line does (with curl when it is
//! installed, as `scripts/install-test-deps.sh` ensures).
//!
//! It builds the release binary, so it is an opt-in tier: `TAAS_TEST_README=1`, which
//! `scripts/test.sh` sets (see `taas_testkit::tiers`). The environment (every `serve` flag has
//! a `TAAS_*` variable) moves what would collide with other tests or with a relay already
//! running: the front end to an OS-chosen port (`127.0.0.1:0`; the demo prints the port it
//! got), the demo label's ports p and q out of the defaults 20000–21999 (the operator's
//! API-server test binds 21000) into a block of their own, metrics (default port 9464) off,
//! and the state and labels directories into a temporary directory.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use taas_testkit::ports::upper_block;
use taas_testkit::prelude::*;
use taas_testkit::tiers;

/// Bound on the release build (fat LTO: minutes on a small machine) plus the relay's start.
const BUILD_AND_START: Duration = Duration::from_secs(30 * 60);
/// What the demo's hidden server answers.
const DEMO_PAGE: &str = "Hello from a hidden server";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// The README's section `## {title}`, up to the next `## ` heading.
fn section<'a>(readme: &'a str, title: &str) -> Option<&'a str> {
    let start = readme.find(&format!("\n## {title}\n"))? + 1;
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 4);
    Some(&rest[..end])
}

/// The lines of a section's ```sh blocks, in order, without their trailing `# comments`.
fn commands(section: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut blocks = section.split("```");
    blocks.next(); // the text before the first block
    while let Some(block) = blocks.next() {
        if let Some(body) = block.strip_prefix("sh\n") {
            for line in body.lines() {
                let command = line.split_once(" #").map_or(line, |(c, _)| c).trim();
                if !command.is_empty() {
                    out.push(command.to_string());
                }
            }
        }
        blocks.next(); // the text between this block and the next
    }
    out
}

/// The first command of "The two commands", and the section's curl line for the demo.
fn readme_commands(readme: &str) -> (String, String) {
    let two = section(readme, "The two commands").expect("README: ## The two commands");
    let commands = commands(two);
    let first = commands
        .first()
        .expect("a command in The two commands")
        .clone();
    let curl = commands
        .iter()
        .find(|c| c.starts_with("curl "))
        .expect("the demo's curl line in The two commands")
        .clone();
    (first, curl)
}

/// The process group of `sh -c COMMAND` (the shell, cargo, its compilers, the relay), ended
/// when dropped: on success and on every failure alike.
struct Group {
    child: Child,
}

impl Group {
    fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Live processes of the group (from /proc; zombies, already dead, are not counted).
    fn members(&self) -> Vec<u32> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return found;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // After the command name's closing parenthesis: state, ppid, pgrp, ...
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or("", |(_, rest)| rest)
                .split_whitespace()
                .collect();
            if fields.get(2) == Some(&self.pgid().to_string().as_str()) && fields[0] != "Z" {
                found.push(pid);
            }
        }
        found
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args(["-s", signal, "--", &format!("-{}", self.pgid())])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM to the group, SIGKILL to what is left after 5 s; returns what is still alive
    /// after that (bounded).
    fn stop(&mut self) -> Vec<u32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.members().is_empty() && Instant::now() < deadline {
            let _ = self.child.try_wait();
            std::thread::sleep(Duration::from_millis(50));
        }
        self.signal("KILL");
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.members().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.members()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log file, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn curl_installed() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The page at `url` with curl, following the 307, trusting `cacert`.
fn fetch_with_curl(cacert: &Path, url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-L", "--max-time", "10", "--cacert"])
        .arg(cacert)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("curl runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The same without curl: the 307 from the front end, then the page from q, both over TLS
/// trusting `cacert` (the demo's page reuses the relay's certificate).
fn fetch_without_curl(cacert: &Path, host: &str, front_port: u16) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let get =
            format!("GET / HTTP/1.1\r\nHost: {host}:{front_port}\r\nConnection: close\r\n\r\n");
        let front = std::net::SocketAddr::from(([127, 0, 0, 1], front_port));
        let mut tls = tls_connect(front, cacert, host).await;
        tokio::io::AsyncWriteExt::write_all(&mut tls, get.as_bytes())
            .await
            .unwrap();
        let redirect = read_response(&mut tls).await;
        let Some(location) = redirect
            .header("location")
            .filter(|_| redirect.status == 307)
        else {
            return format!("no 307: {redirect:?}");
        };
        let q: u16 = location
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.trim_end_matches('/').parse().ok())
            .unwrap_or_else(|| panic!("port in {location}"));
        let mut tls = tls_connect(
            std::net::SocketAddr::from(([127, 0, 0, 1], q)),
            cacert,
            host,
        )
        .await;
        let get = format!("GET / HTTP/1.1\r\nHost: {host}:{q}\r\nConnection: close\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut tls, get.as_bytes())
            .await
            .unwrap();
        let page = read_response(&mut tls).await;
        format!("{} {}", page.status, page.body_str())
    })
}

#[test]
fn the_readme_first_command_serves_the_demo_page_through_the_relay() {
    if !tiers::opted_in(
        tiers::README,
        "the_readme_first_command_serves_the_demo_page_through_the_relay",
        "cargo test -p taas-relay --test readme",
    ) {
        return;
    }
    let root = repo();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let (command, readme_curl) = readme_commands(&readme);
    assert!(
        command.starts_with("cargo run ") && command.contains("--demo"),
        "README's first command is no longer the demo: {command}"
    );

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (p_ports, q_ports) = upper_block(16);
    let stderr_log = dir.path().join("stderr.log");
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(&command).current_dir(&root);
    // A newcomer's environment: none of the relay's variables but the ones moved here.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TAAS_") {
            sh.env_remove(name);
        }
    }
    let child = sh
        .env("TAAS_LISTEN", "127.0.0.1:0")
        .env("TAAS_STATE_DIR", &state)
        .env("TAAS_LABELS", dir.path().join("labels"))
        .env("TAAS_P_PORTS", p_ports.to_string())
        .env("TAAS_Q_PORTS", q_ports.to_string())
        .env("TAAS_METRICS", "off")
        // --demo turns the console on at 127.0.0.1:8893: a port of the OS's choosing here.
        .env("TAAS_CONSOLE", "127.0.0.1:0")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .expect("sh runs");
    let mut group = Group { child };

    // Ready when the demo prints the command to try (after the build; bounded).
    let stdout = group.child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + BUILD_AND_START;
    let printed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.trim_start().starts_with("curl ") => break line.trim().to_string(),
            Ok(_) => {}
            Err(error) => panic!(
                "`{command}` did not print the demo's curl line ({error:?}); its stderr:\n{}",
                tail(&stderr_log)
            ),
        }
    };

    // What it prints is the README's curl line, with this run's state directory and port.
    let url = printed.rsplit(' ').next().unwrap().to_string();
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("port in {url}"));
    let cacert = state.join("relay-cert.pem");
    let expected = readme_curl
        .replace(".taas/", &format!("{}/", state.display()))
        .replace(":8443/", &format!(":{port}/"));
    assert_eq!(printed, expected, "the demo's curl line against README's");
    let host = url
        .trim_start_matches("https://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(host, format!("demo.{DOMAIN}"));

    // The page, through the relay (bounded: the agent may still be parking).
    let with_curl = curl_installed();
    if !with_curl {
        eprintln!(
            "curl is not installed (scripts/install-test-deps.sh installs it): fetching without it"
        );
    }
    let deadline = Instant::now() + PATIENCE;
    let page = loop {
        let page = if with_curl {
            fetch_with_curl(&cacert, &url)
        } else {
            fetch_without_curl(&cacert, &host, port)
        };
        if page.contains(DEMO_PAGE) || Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        page.contains(DEMO_PAGE),
        "{url}: {page}\nthe relay's stderr:\n{}",
        tail(&stderr_log)
    );

    let left = group.stop();
    assert!(left.is_empty(), "processes left in the group: {left:?}");
}

/// The README readers above, on a sample and on the real README (these run in every tier).
mod parsing {
    use super::*;

    const SAMPLE: &str = "# Title\n\nintro\n\n## The two commands\n\nOn a machine:\n\n\
        ```sh\ncargo run -p x -- serve --demo   # run: it\n./scripts/test.sh   # test\n```\n\n\
        Then:\n\n```sh\ncurl -L --cacert .taas/c.pem https://demo.x:8443/\n```\n\n\
        ```rust\nnot a command\n```\n\n## Next\n\n```sh\ncurl elsewhere\n```\n";

    #[test]
    fn the_first_command_and_the_curl_line_come_from_their_own_section() {
        let (first, curl) = readme_commands(SAMPLE);
        assert_eq!(first, "cargo run -p x -- serve --demo");
        assert_eq!(curl, "curl -L --cacert .taas/c.pem https://demo.x:8443/");
        let two = section(SAMPLE, "The two commands").unwrap();
        assert!(!two.contains("curl elsewhere"), "{two}");
        assert_eq!(
            commands(two),
            [
                "cargo run -p x -- serve --demo",
                "./scripts/test.sh",
                "curl -L --cacert .taas/c.pem https://demo.x:8443/"
            ]
        );
    }

    #[test]
    fn the_real_readme_has_both() {
        let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
        let (first, curl) = readme_commands(&readme);
        assert!(first.contains("serve --demo"), "{first}");
        assert!(curl.contains("demo."), "{curl}");
    }
}
