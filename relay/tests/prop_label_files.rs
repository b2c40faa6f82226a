//! Property-based harness for label files (`TaasLabel` + `Secret` manifests): on arbitrary
//! text, YAML-ish documents built from the manifests' own vocabulary, and random mutations of
//! valid label files, `taas_crds::manifest::parse_documents`, `label_source::load_dir`,
//! `reload_dir`, `read_label_file`, `read_mounted_label` and `validate_label` never panic;
//! whatever they accept satisfies the label invariants; and no error message ever quotes a
//! Secret's value (it would reach the relay's log).
//!
//! Cases per property: 2,000 (`TAAS_PROP_CASES=N` for a long run). See docs/robustness.md.

use taas_testkit::property;

use std::path::Path;

use proptest::prelude::*;
use taas_crds::manifest::{parse_documents, Object};
use taas_relay::config::LabelConfig;
use taas_relay::label_source;

fn cases() -> u32 {
    property::cases(property::CASES_ENV, 2_000)
}

/// A secret value that must never show up in an error message.
const MARKER: &str = "MZXW6YTBOJZWC3DUMFZWK4TFOQ4XI33QONSWG4TF";

/// The relay's invariants for every label it accepts.
fn check_config(config: &LabelConfig) -> Result<(), TestCaseError> {
    let normalized = label_source::normalize_label(&config.label);
    prop_assert_eq!(normalized.as_deref(), Ok(config.label.as_str()));
    prop_assert!(label_source::check_id(&config.id).is_ok());
    prop_assert!(config.secret.len() >= 10);
    prop_assert!((1..=300).contains(&config.period));
    prop_assert!((1..=1024).contains(&config.max_parked));
    prop_assert!(config.client_port != Some(0));
    Ok(())
}

/// Runs every reader on `text` as a label file (in `dir`, with a mounted-secret directory),
/// checking invariants, and with `secret_only_as_secret` (the marker appears nowhere but as a
/// Secret's value) that no message quotes `MARKER`. Random edits can move the marker into
/// other fields (a kind, an apiVersion), which errors rightly quote: those runs do not check.
fn exercise(dir: &Path, text: &str, secret_only_as_secret: bool) -> Result<(), TestCaseError> {
    let quiet = |message: String| -> Result<(), TestCaseError> {
        if secret_only_as_secret {
            prop_assert!(!message.contains(MARKER), "{}", message);
        }
        Ok(())
    };
    if let Err(e) = parse_documents(text) {
        quiet(e.to_string())?;
        // Every reader below starts with parse_documents and reports its error as it is:
        // only text that parses goes further (which keeps the default run fast).
        return Ok(());
    }
    let labels = dir.join("labels");
    let file = labels.join("fuzz.yaml");
    std::fs::write(&file, text).unwrap();
    match label_source::load_dir(&labels) {
        Ok(set) => {
            for config in set.labels.values() {
                check_config(config)?;
            }
        }
        Err(e) => quiet(e.to_string())?,
    }
    let previous = label_source::LabelSet::default();
    let (set, problems) = label_source::reload_dir(&labels, &previous);
    for config in set.labels.values() {
        check_config(config)?;
    }
    for problem in problems {
        quiet(problem)?;
    }
    match label_source::read_label_file(&file) {
        Ok(config) => check_config(&config)?,
        Err(e) => quiet(e.to_string())?,
    }
    match label_source::read_mounted_label(&file, &dir.join("secret")) {
        Ok(config) => check_config(&config)?,
        Err(e) => quiet(e.to_string())?,
    }
    Ok(())
}

fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("labels")).unwrap();
    std::fs::create_dir_all(dir.path().join("secret")).unwrap();
    std::fs::write(dir.path().join("secret/secret"), format!("{MARKER}\n")).unwrap();
    dir
}

#[test]
fn arbitrary_text_never_panics() {
    let dir = workdir();
    let strategy = prop_oneof![
        proptest::collection::vec(any::<char>(), 0..600).prop_map(String::from_iter),
        proptest::collection::vec(
            proptest::sample::select(
                ":-{}[],&*!|>'\"#%@`?\n \t\r\\0123456789abcdeFGHIJ.~="
                    .chars()
                    .collect::<Vec<_>>()
            ),
            0..600
        )
        .prop_map(String::from_iter),
    ];
    property::check("label-files/arbitrary", cases(), strategy, |text| {
        exercise(dir.path(), &text, false)
    });
}

/// A YAML node built from the manifests' vocabulary, rendered in block or flow style.
#[derive(Clone, Debug)]
enum Node {
    Scalar(String),
    Map(Vec<(String, Node)>),
    Seq(Vec<Node>),
}

impl Node {
    fn render(&self, indent: usize, out: &mut String) {
        match self {
            Node::Scalar(s) => {
                out.push(' ');
                out.push_str(s);
                out.push('\n');
            }
            Node::Map(entries) if entries.is_empty() => out.push_str(" {}\n"),
            Node::Seq(items) if items.is_empty() => out.push_str(" []\n"),
            Node::Map(entries) => {
                out.push('\n');
                for (key, value) in entries {
                    out.push_str(&" ".repeat(indent));
                    out.push_str(key);
                    out.push(':');
                    value.render(indent + 2, out);
                }
            }
            Node::Seq(items) => {
                out.push('\n');
                for item in items {
                    out.push_str(&" ".repeat(indent));
                    out.push('-');
                    item.render(indent + 2, out);
                }
            }
        }
    }

    fn flow(&self) -> String {
        match self {
            Node::Scalar(s) => s.clone(),
            Node::Map(entries) => {
                let inner: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("{k}: {}", v.flow()))
                    .collect();
                format!("{{{}}}", inner.join(", "))
            }
            Node::Seq(items) => {
                let inner: Vec<String> = items.iter().map(Node::flow).collect();
                format!("[{}]", inner.join(", "))
            }
        }
    }
}

fn key() -> impl Strategy<Value = String> {
    proptest::sample::select(vec![
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "namespace",
        "spec",
        "id",
        "label",
        "secretRef",
        "key",
        "algorithm",
        "period",
        "maxParked",
        "sourcePinning",
        "proxyProtocol",
        "clientPort",
        "clientAdmission",
        "service",
        "type",
        "annotations",
        "rendezvousPorts",
        "data",
        "stringData",
        "secret",
        "status",
        "? complex",
        "\"quoted\"",
        "'single'",
        "<<",
        "x",
        "",
    ])
    .prop_map(str::to_string)
}

fn scalar() -> impl Strategy<Value = String> {
    let fixed = proptest::sample::select(vec![
        "taas.dev/v1alpha1",
        "TaasLabel",
        "v1",
        "Secret",
        "home",
        "Home.Office",
        "-bad-",
        "a..b",
        "SHA1",
        "SHA256",
        "SHA512",
        "sha1",
        "v1",
        "v2",
        "none",
        "V2",
        "Open",
        "Redirected",
        "0",
        "1",
        "30",
        "300",
        "301",
        "1024",
        "1025",
        "65535",
        "65536",
        "-1",
        "4294967296",
        "18446744073709551616",
        "1e400",
        "0x10",
        "0o17",
        ".inf",
        "-.nan",
        "~",
        "null",
        "true",
        "false",
        "yes",
        "on",
        "\"\"",
        "''",
        "\"\\u0000\"",
        "\"\\xff\"",
        "&a x",
        "*a",
        "*undefined",
        "!!binary aGVsbG8=",
        "!!str 5",
        "!!int x",
        "!custom x",
        "|\n  x",
        ">-\n  y",
        "\"a\\\"b\"",
        "'it''s'",
        "secret",
        "home-totp",
        MARKER,
        "JBSWY3DPEHPK3PXP",
        "AAAAAAAAAAAAAAAA",
        "not base32!",
        "====",
        "bWFya2Vy",
        "@reserved",
        "`tick",
        "%percent",
        "x: y",
        "[unclosed",
        "{unclosed",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        6 => fixed,
        1 => "[a-zA-Z0-9 ._-]{0,40}",
        1 => any::<i64>().prop_map(|n| n.to_string()),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    scalar()
        .prop_map(Node::Scalar)
        .prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec((key(), inner.clone()), 0..6).prop_map(Node::Map),
                proptest::collection::vec(inner, 0..4).prop_map(Node::Seq),
            ]
        })
}

/// A document: usually a plausible `TaasLabel` or `Secret` whose fields are random nodes.
fn document() -> impl Strategy<Value = String> {
    let head = proptest::sample::select(vec![
        ("taas.dev/v1alpha1", "TaasLabel"),
        ("v1", "Secret"),
        ("v1", "ConfigMap"),
        ("taas.dev/v1", "TaasLabel"),
        ("v2", "Secret"),
    ]);
    let body = proptest::collection::vec((key(), node()), 0..7);
    let spec = proptest::collection::vec((key(), node()), 0..10);
    (head, body, spec, any::<bool>(), any::<bool>()).prop_map(
        |((api, kind), body, spec, flow, with_spec)| {
            let mut entries = vec![
                ("apiVersion".to_string(), Node::Scalar(api.into())),
                ("kind".to_string(), Node::Scalar(kind.into())),
                (
                    "metadata".to_string(),
                    Node::Map(vec![("name".into(), Node::Scalar("home-totp".into()))]),
                ),
            ];
            if with_spec {
                entries.push(("spec".into(), Node::Map(spec)));
            }
            entries.extend(body);
            let root = Node::Map(entries);
            if flow {
                root.flow() + "\n"
            } else {
                let mut out = String::new();
                root.render(0, &mut out);
                out.trim_start_matches('\n').to_string()
            }
        },
    )
}

#[test]
fn yaml_like_documents_never_panic() {
    let dir = workdir();
    let separator = proptest::sample::select(vec!["---\n", "--- \n", "...\n---\n", "\n---\n# c\n"]);
    let strategy = (
        proptest::collection::vec(document(), 1..4),
        separator,
        proptest::sample::select(vec!["", "%YAML 1.2\n---\n", "# comment\n", "---\n"]),
    )
        .prop_map(|(docs, sep, prefix)| format!("{prefix}{}", docs.join(sep)));
    property::check("label-files/yaml-like", cases(), strategy, |text| {
        exercise(dir.path(), &text, false)
    });
}

/// One edit of a valid file.
#[derive(Clone, Debug)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Reindent(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        scalar(),
        proptest::sample::select(vec![
            "\n",
            ":",
            " ",
            "  ",
            "-",
            "---\n",
            "{",
            "}",
            "[",
            "]",
            ",",
            "\"",
            "'",
            "#",
            "&a ",
            "*a",
            "!!binary ",
            "\t",
            "\u{feff}",
            "\0",
            "é",
            "\n  extra: 1\n",
        ])
        .prop_map(str::to_string),
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(at, len)| Edit::Delete(at, len)),
        (any::<usize>(), snippet).prop_map(|(at, s)| Edit::Insert(at, s)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        (any::<usize>(), 0usize..9).prop_map(|(l, n)| Edit::Reindent(l, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| {
        if chars.is_empty() {
            0
        } else {
            i % (chars.len() + 1)
        }
    };
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let line = |i: usize, lines: &Vec<String>| if lines.is_empty() { 0 } else { i % lines.len() };
    match edit {
        Edit::Delete(i, len) => {
            let start = at(*i);
            let end = (start + len).min(chars.len());
            chars[..start].iter().chain(&chars[end..]).collect()
        }
        Edit::Insert(i, s) => {
            let start = at(*i);
            let mut out: String = chars[..start].iter().collect();
            out.push_str(s);
            out.extend(&chars[start..]);
            out
        }
        Edit::DuplicateLine(i) if !lines.is_empty() => {
            let l = line(*i, &lines);
            lines.insert(l, lines[l].clone());
            lines.join("\n") + "\n"
        }
        Edit::SwapLines(a, b) if !lines.is_empty() => {
            let (a, b) = (line(*a, &lines), line(*b, &lines));
            lines.swap(a, b);
            lines.join("\n") + "\n"
        }
        Edit::Reindent(i, n) if !lines.is_empty() => {
            let l = line(*i, &lines);
            lines[l] = format!("{}{}", " ".repeat(*n), lines[l].trim_start());
            lines.join("\n") + "\n"
        }
        Edit::Truncate(i) => chars[..at(*i)].iter().collect(),
        _ => text.to_string(),
    }
}

/// Valid label files in the forms the project writes: the tests' manifest (stringData) and
/// `render_label_file` (what `label new` writes), with every optional field set.
fn valid_file() -> impl Strategy<Value = String> {
    (any::<bool>(), 0usize..4).prop_map(|(rendered, variant)| {
        let mut label = taas_testkit::label::TestLabel::new("home");
        label.secret_b32 = MARKER.to_string();
        let label = match variant {
            0 => label,
            1 => label.with("period: 60").with("maxParked: 4"),
            2 => label
                .with("clientPort: 21005")
                .with("clientAdmission: Redirected")
                .with("proxyProtocol: v2"),
            _ => label.with("algorithm: SHA512").with("sourcePinning: false"),
        };
        let manifest = label.manifest();
        if !rendered {
            return manifest;
        }
        let objects = parse_documents(&manifest).unwrap();
        let (Object::Label(l), Object::Secret(s)) = (&objects[0], &objects[1]) else {
            unreachable!("label then secret")
        };
        taas_crds::manifest::render_label_file(l, s)
    })
}

#[test]
fn mutated_label_files_never_panic() {
    let dir = workdir();
    let strategy = (valid_file(), proptest::collection::vec(edit(), 1..6))
        .prop_map(|(text, edits)| edits.iter().fold(text, |text, e| apply(&text, e)));
    property::check("label-files/mutated", cases(), strategy, |text| {
        exercise(dir.path(), &text, false)
    });
}

#[test]
fn valid_label_files_load_as_written() {
    let dir = workdir();
    property::check("label-files/valid", cases() / 10, valid_file(), |text| {
        let file = dir.path().join("labels/fuzz.yaml");
        std::fs::write(&file, &text).unwrap();
        let config =
            label_source::read_label_file(&file).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_config(&config)?;
        prop_assert_eq!(&config.label, "home");
        prop_assert_eq!(
            config.secret,
            taas_relay::totp::decode_secret(MARKER).unwrap()
        );
        Ok(())
    });
}

/// A Secret written in the wrong shape (the value where a map belongs, a list, a number...)
/// is refused with a message that names the problem but not the value.
#[test]
fn errors_never_quote_a_secrets_value() {
    let dir = workdir();
    let shape = proptest::sample::select(vec![
        "stringData: {value}",
        "data: {value}",
        "stringData: [{value}]",
        "stringData:\n  secret: [{value}]",
        "stringData:\n  secret: {{x: {value}}}",
        "data:\n  secret: {value}!",
        "metadata: {value}",
        "stringData: \"{value}\"",
        "stringData: '{value}'",
        "stringData: !!binary {value}",
        "stringData:\n  - {value}",
        "kind: {value}",
    ]);
    let value = proptest::sample::select(vec![
        MARKER.to_string(),
        format!("{MARKER}===="),
        format!("\"{MARKER}\""),
    ]);
    property::check(
        "label-files/secret-not-quoted",
        cases() / 10,
        (shape, value),
        |(shape, value)| {
            let body = shape
                .replace("{value}", &value)
                .replace("{{", "{")
                .replace("}}", "}");
            let text = format!(
                "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {{name: home}}\n\
                 spec: {{id: x, label: home, secretRef: {{name: home-totp}}}}\n---\n\
                 apiVersion: v1\nkind: Secret\nmetadata: {{name: home-totp}}\n{body}\n"
            );
            exercise(dir.path(), &text, true)
        },
    );
}

#[test]
fn validate_label_never_panics_and_keeps_its_invariants() {
    let strategy = (
        any::<String>(),
        prop_oneof![any::<String>(), "[a-zA-Z0-9.-]{1,70}"],
        any::<u32>(),
        any::<u32>(),
        any::<Option<u16>>(),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            "[A-Za-z2-7= \n]{0,64}".prop_map(String::into_bytes),
        ],
    );
    property::check(
        "label-files/validate",
        cases(),
        strategy,
        |(id, label, period, max_parked, client_port, secret)| {
            let spec = taas_crds::TaasLabelSpec {
                id,
                label,
                secret_ref: taas_crds::SecretKeyRef {
                    name: "s".into(),
                    key: "secret".into(),
                },
                algorithm: Default::default(),
                period,
                max_parked,
                source_pinning: true,
                proxy_protocol: Default::default(),
                client_port,
                client_admission: Default::default(),
                server_speaks_first: false,
                direct: false,
                service: Default::default(),
                rendezvous_ports: 8,
                replicas: None,
            };
            if let Ok(config) = label_source::validate_label(&spec, &secret) {
                check_config(&config)?;
            }
            Ok(())
        },
    );
}
