//! The `taas-relay` binary: configuration errors give one clear message and a non-zero exit
//! before anything is served; `label new` provisions files that the relay and the steward use.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use taas_testkit::prelude::*;

fn relay_bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_taas-relay"));
    command.env_remove("RUST_LOG").stdin(Stdio::null());
    command
}

/// Runs `serve` with `args` in `dir`, expecting it to exit by itself (bounded).
fn serve_fails(dir: &Path, args: &[&str]) -> Output {
    let mut command = relay_bin();
    command
        .current_dir(dir)
        .env("TAAS_LISTEN", "127.0.0.1:0")
        .args(["serve", "--metrics", "off"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve {args:?} kept running: expected a configuration error");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "serve {args:?} should fail");
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn overlapping_port_ranges_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve_fails(
        dir.path(),
        &["--p-ports", "30000-30100", "--q-ports", "30100-30200"],
    );
    let err = stderr(&out);
    assert!(
        err.contains("overlap") && err.contains("30000-30100"),
        "{err}"
    );
}

#[test]
fn bad_flag_values_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let err = stderr(&serve_fails(dir.path(), &["--p-ports", "banana"]));
    assert!(err.contains("--p-ports") && err.contains("banana"), "{err}");
    let err = stderr(&serve_fails(dir.path(), &["--q-ports", "900-100"]));
    assert!(err.contains("--q-ports"), "{err}");
    let err = stderr(&serve_fails(dir.path(), &["--no-such-flag"]));
    assert!(err.contains("--no-such-flag"), "{err}");
    let err = stderr(&serve_fails(dir.path(), &["--client-wait", "0"]));
    assert!(err.contains("--client-wait"), "{err}");
    let err = stderr(&serve_fails(dir.path(), &["--listen", "0.0.0.0:0"]));
    assert!(err.contains("--advertise"), "{err}");
    let err = stderr(&serve_fails(dir.path(), &["--data-threads", "0"]));
    assert!(
        err.contains("--data-threads") && err.contains("1..=1024"),
        "{err}"
    );
}

/// The q limits (issue 13): bad values name their flag, on `serve` and `label-relay`, and
/// each flag reads its `TAAS_*` variable.
#[test]
fn q_limit_flags_refuse_bad_values_and_read_their_environment() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--first-byte-timeout", "0"),
        ("--pair-idle-timeout", "-1"),
        ("--max-label-clients-per-source", "0"),
        ("--max-clients-per-source", "0"),
        ("--max-label-pairs", "0"),
    ] {
        let arg = format!("{flag}={value}");
        let err = stderr(&serve_fails(dir.path(), &[&arg]));
        assert!(err.contains(flag), "{arg}: {err}");
        let out = relay_bin()
            .current_dir(dir.path())
            .args([
                "label-relay",
                "--label-file",
                "none.yaml",
                "--secret-dir",
                "none",
            ])
            .arg(&arg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains(flag),
            "label-relay {flag} {value}: {}",
            stderr(&out)
        );
    }
    for (var, flag) in [
        ("TAAS_FIRST_BYTE_TIMEOUT", "--first-byte-timeout"),
        ("TAAS_MAX_LABEL_PAIRS", "--max-label-pairs"),
    ] {
        let out = relay_bin()
            .current_dir(dir.path())
            .env("TAAS_LISTEN", "127.0.0.1:0")
            .env(var, "0")
            .args(["serve", "--metrics", "off"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(stderr(&out).contains(flag), "{var}=0: {}", stderr(&out));
    }
}

#[test]
fn unreadable_certificate_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = stderr(&serve_fails(
        dir.path(),
        &[
            "--tls-cert",
            "missing-cert.pem",
            "--tls-key",
            "missing-key.pem",
        ],
    ));
    assert!(err.contains("missing-cert.pem"), "{err}");
    let err = stderr(&serve_fails(dir.path(), &["--tls-cert", "only-cert.pem"]));
    assert!(err.contains("--tls-key"), "{err}");
}

#[test]
fn an_invalid_label_file_is_named_with_its_problem() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels");
    std::fs::create_dir_all(&labels).unwrap();
    let mut bad = TestLabel::new("home");
    bad.secret_b32 = "not base32 at all!".into();
    write_label(&labels, &bad);
    let err = stderr(&serve_fails(dir.path(), &[]));
    assert!(err.contains("home.yaml") && err.contains("secret"), "{err}");

    std::fs::write(labels.join("home.yaml"), "apiVersion: [").unwrap();
    let err = stderr(&serve_fails(dir.path(), &[]));
    assert!(err.contains("home.yaml"), "{err}");

    write_label(&labels, &TestLabel::new("home"));
    let twice = TestLabel::new("home");
    std::fs::write(
        labels.join("again.yaml"),
        twice.manifest().replace("home-totp", "other-totp"),
    )
    .unwrap();
    let err = stderr(&serve_fails(dir.path(), &[]));
    assert!(err.contains("home") && err.contains("again.yaml"), "{err}");
}

#[test]
fn a_front_end_port_in_use_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut command = relay_bin();
    let out = command
        .current_dir(dir.path())
        .args(["serve", "--metrics", "off", "--listen", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot listen") && err.contains(&addr),
        "{err}"
    );
}

#[test]
fn label_new_writes_a_manifest_the_relay_loads_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = relay_bin()
        .current_dir(dir.path())
        .args([
            "label",
            "new",
            "--id",
            "2f402f80-da50-11e1-9b23-0123456789ab",
            "--label",
            "Home",
        ])
        .args(["--steward", "steward.js"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("otpauth://totp/"), "{text}");
    assert!(text.contains("digits=6"), "{text}");
    assert!(
        text.contains("taas-agent --relay https://taas-registrar.localhost:8443"),
        "{text}"
    );
    assert!(text.contains('█'), "a QR code is printed");
    let config = taas_relay::label_source::read_label_file(&dir.path().join("labels/home.yaml"))
        .expect("the relay reads what label new wrote");
    assert_eq!(config.label, "home");
    assert_eq!(config.secret.len(), 20, "160-bit secret");

    // The steward's file: exports.params = {...}; with the relay's certificate as bytes.
    let steward = std::fs::read_to_string(dir.path().join("steward.js")).unwrap();
    let json = steward
        .strip_prefix("exports.params = ")
        .and_then(|s| s.strip_suffix(";\n"))
        .expect("exports.params = ...;");
    let params: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(params["uuid"][0], "2f402f80-da50-11e1-9b23-0123456789ab");
    assert_eq!(params["labels"][0], "home");
    assert_eq!(params["name"], "home.taas.localhost");
    assert_eq!(params["server"]["port"], 8443);
    let ca: Vec<u8> = params["server"]["ca"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(
        ca,
        std::fs::read(dir.path().join(".taas/relay-cert.pem")).unwrap()
    );
    let secret = taas_relay::totp::decode_secret(params["base32"].as_str().unwrap()).unwrap();
    assert_eq!(secret, config.secret);

    let again = relay_bin()
        .current_dir(dir.path())
        .args(["label", "new", "--id", "x", "--label", "home"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(stderr(&again).contains("home.yaml"), "{}", stderr(&again));

    let bad = relay_bin()
        .current_dir(dir.path())
        .args(["label", "new", "--id", "x", "--label", "not a label"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("not a label"), "{}", stderr(&bad));
}

/// `--splice` (and `TAAS_SPLICE`) takes auto, copy or kernel, on each command that splices.
#[test]
fn the_splice_flag_names_its_modes_and_reads_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let commands: [&[&str]; 3] = [
        &["serve", "--metrics", "off"],
        &[
            "label-relay",
            "--label-file",
            "none.yaml",
            "--secret-dir",
            "none",
        ],
        &["gateway", "--routes-file", "none.yaml", "--metrics", "off"],
    ];
    for command in commands {
        let flag = relay_bin()
            .current_dir(dir.path())
            .args(command)
            .arg("--splice=zero")
            .output()
            .unwrap();
        let env = relay_bin()
            .current_dir(dir.path())
            .env("TAAS_SPLICE", "zero")
            .args(command)
            .output()
            .unwrap();
        for out in [flag, env] {
            assert!(!out.status.success());
            let err = stderr(&out);
            assert!(err.contains("--splice"), "{command:?}: {err}");
            assert!(err.contains("auto, copy, kernel"), "{command:?}: {err}");
        }
    }
}

#[test]
fn every_flag_reads_its_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = relay_bin();
    let out = command
        .current_dir(dir.path())
        .env("TAAS_P_PORTS", "30000-30100")
        .env("TAAS_Q_PORTS", "30050-30060")
        .env("TAAS_METRICS", "off")
        .env("TAAS_LISTEN", "127.0.0.1:0")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("30050-30060"), "{}", stderr(&out));
}

/// GET `path` on a plain-HTTP endpoint; the status code, or None if nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = String::new();
    stream.read_to_string(&mut head).ok()?;
    head.split(' ').nth(1)?.parse().ok()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_gateway_drains_before_it_stops() {
    // On SIGTERM the gateway turns unready but keeps accepting for --shutdown-delay, so
    // kube-proxy and load balancers move new connections elsewhere before it closes.
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, "{}\n").unwrap();
    let (ports, _) = port_block(2);
    let front = format!("127.0.0.1:{}", ports.lo);
    let metrics = format!("127.0.0.1:{}", ports.lo + 1);
    let mut child = relay_bin()
        .current_dir(dir.path())
        .args([
            "gateway",
            "--listen",
            &front,
            "--metrics",
            &metrics,
            "--shutdown-delay",
            "3",
        ])
        .arg("--routes-file")
        .arg(&routes)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("ready", || http_status(&metrics, "/readyz") == Some(200));
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    wait_until("unready", || http_status(&metrics, "/readyz") == Some(503));
    assert!(
        std::net::TcpStream::connect(&front).is_ok(),
        "still accepting while draining"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before the delay"
    );
    let deadline = Instant::now() + PATIENCE + Duration::from_secs(3);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the gateway did not stop after its shutdown delay");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "stopped after {:?}, before the 3 s delay",
        signalled.elapsed()
    );
}

/// Runs `gateway` with `args` and a routes file in `dir`, expecting a configuration error.
fn gateway_fails(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    std::fs::write(dir.join("routes.yaml"), "{}\n").unwrap();
    let mut command = relay_bin();
    command
        .current_dir(dir)
        .env("TAAS_LISTEN", "127.0.0.1:0")
        .args([
            "gateway",
            "--metrics",
            "off",
            "--routes-file",
            "routes.yaml",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("gateway {args:?} kept running: expected a configuration error");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "gateway {args:?} should fail");
    stderr(&output)
}

#[test]
fn gateway_secret_and_rate_flags_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let err = gateway_fails(
        dir.path(),
        &["--gateway-secret-file", "no-such-secret"],
        &[],
    );
    assert!(
        err.contains("--gateway-secret-file") && err.contains("no-such-secret"),
        "{err}"
    );
    // A short secret is refused, and never shown.
    std::fs::write(dir.path().join("short"), "tiny-secret\n").unwrap();
    let err = gateway_fails(dir.path(), &[], &[("TAAS_GATEWAY_SECRET_FILE", "short")]);
    assert!(err.contains("too short"), "{err}");
    assert!(!err.contains("tiny-secret"), "{err}");
    let err = gateway_fails(dir.path(), &["--redirect-rate=-1"], &[]);
    assert!(err.contains("--redirect-rate"), "{err}");
    let err = gateway_fails(dir.path(), &[], &[("TAAS_REDIRECT_BURST", "0")]);
    assert!(err.contains("--redirect-burst"), "{err}");
}

#[test]
fn label_new_with_direct_writes_a_direct_label_and_without_it_a_redirected_one() {
    let dir = tempfile::tempdir().unwrap();
    for (label, flags) in [("home", &["--direct"][..]), ("work", &[][..])] {
        let out = relay_bin()
            .current_dir(dir.path())
            .env_remove("TAAS_DIRECT")
            .args([
                "label",
                "new",
                "--id",
                "2f402f80-da50-11e1-9b23-0123456789ab",
            ])
            .args(["--label", label])
            .args(flags)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let read = |label: &str| {
        taas_relay::label_source::read_label_file(&dir.path().join(format!("labels/{label}.yaml")))
            .expect("the relay reads what label new wrote")
    };
    assert!(read("home").direct, "--direct makes a direct label");
    assert!(!read("work").direct, "labels are not direct by default");
    let text = std::fs::read_to_string(dir.path().join("labels/home.yaml")).unwrap();
    assert!(text.contains("direct: true"), "{text}");
}
