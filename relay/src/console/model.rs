//! The labels table, pure: built from what the relay reports of each running label
//! ([`Serving`], read from `StandaloneBackend`'s state, not scraped from `/metrics`), where
//! each came from (the labels directory's `LabelSet`), and the disabled files. The page and
//! the JSON endpoint render the same rows; no row holds a secret.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One running label, as the relay reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub label: String,
    pub id: String,
    pub parked: u64,
    pub active_pairs: u64,
    pub last_registration: Option<(SystemTime, IpAddr)>,
    pub unauthorized: u64,
    pub rate_limited: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

/// A label file in `disabled/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disabled {
    pub label: String,
    pub id: String,
    /// The file's name (in `disabled/`).
    pub file: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Served from a file of the labels directory.
    Serving,
    /// Its file is in `disabled/`: not served.
    Disabled,
    /// Served, but not from a file (the demo's label): nothing to change here.
    Builtin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Disable,
    Enable,
    Rotate,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Enable => "enable",
            Self::Rotate => "rotate",
            Self::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Disable, Self::Enable, Self::Rotate, Self::Delete]
            .into_iter()
            .find(|a| a.as_str() == s)
    }

    /// What the confirmation asks.
    pub fn question(self) -> &'static str {
        match self {
            Self::Disable => {
                "Disable this label? Its file moves to disabled/; the relay stops serving it \
                 (its parked connections close) until it is enabled again."
            }
            Self::Enable => "Enable this label again? Its file moves back and the relay serves it.",
            Self::Rotate => {
                "Give this label a new secret? The new one is shown once; the hidden server's \
                 agent must get the new label file, the old secret is refused from the next reload."
            }
            Self::Delete => {
                "Delete this label? Its file (and the secret in it) is removed for good; the \
                 relay stops serving it."
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LastRegistration {
    /// Unix seconds.
    pub at: u64,
    /// `Mon, 07 Dec 2026 06:00:00 GMT`.
    pub when: String,
    pub source: String,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    pub label: String,
    pub id: String,
    pub state: State,
    /// The file, relative to the labels directory.
    pub file: Option<String>,
    pub parked: u64,
    pub active_pairs: u64,
    pub last_registration: Option<LastRegistration>,
    /// Registrations refused with 401 / 429 since the label was loaded.
    pub unauthorized: u64,
    pub rate_limited: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub actions: Vec<Action>,
}

/// Where each label may be changed: its file when the file holds that label alone (a file
/// with several labels is left to a text editor).
pub fn own_file<'a>(sources: &'a BTreeMap<String, PathBuf>, label: &str) -> Option<&'a Path> {
    let path = sources.get(label)?;
    let holders = sources.values().filter(|p| *p == path).count();
    (holders == 1).then_some(path.as_path())
}

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

/// The table: running labels, then disabled ones, by LABEL.
pub fn rows(
    serving: &[Serving],
    sources: &BTreeMap<String, PathBuf>,
    disabled: &[Disabled],
    labels_dir: &Path,
) -> Vec<Row> {
    let mut rows: Vec<Row> = serving
        .iter()
        .map(|s| {
            let (state, file, actions) = match (sources.get(&s.label), own_file(sources, &s.label))
            {
                (Some(_), Some(own)) => (
                    State::Serving,
                    Some(relative(labels_dir, own)),
                    vec![Action::Disable, Action::Rotate, Action::Delete],
                ),
                (Some(shared), None) => {
                    (State::Serving, Some(relative(labels_dir, shared)), vec![])
                }
                (None, _) => (State::Builtin, None, vec![]),
            };
            Row {
                label: s.label.clone(),
                id: s.id.clone(),
                state,
                file,
                parked: s.parked,
                active_pairs: s.active_pairs,
                last_registration: s.last_registration.map(|(at, source)| LastRegistration {
                    at: at
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    when: httpdate::fmt_http_date(at),
                    source: source.to_canonical().to_string(),
                }),
                unauthorized: s.unauthorized,
                rate_limited: s.rate_limited,
                bytes_to_server: s.bytes_to_server,
                bytes_to_client: s.bytes_to_client,
                actions,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.label.cmp(&b.label));
    let mut off: Vec<Row> = disabled
        .iter()
        // A label served again from another file is not shown twice.
        .filter(|d| !serving.iter().any(|s| s.label == d.label))
        .map(|d| Row {
            label: d.label.clone(),
            id: d.id.clone(),
            state: State::Disabled,
            file: Some(format!("{}/{}", super::files::DISABLED_DIR, d.file)),
            parked: 0,
            active_pairs: 0,
            last_registration: None,
            unauthorized: 0,
            rate_limited: 0,
            bytes_to_server: 0,
            bytes_to_client: 0,
            actions: vec![Action::Enable, Action::Delete],
        })
        .collect();
    off.sort_by(|a, b| a.label.cmp(&b.label));
    rows.extend(off);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serving(label: &str) -> Serving {
        Serving {
            label: label.into(),
            id: format!("id-{label}"),
            parked: 2,
            active_pairs: 1,
            last_registration: Some((
                UNIX_EPOCH + std::time::Duration::from_secs(60),
                "::ffff:10.0.0.1".parse().unwrap(),
            )),
            unauthorized: 3,
            rate_limited: 4,
            bytes_to_server: 5,
            bytes_to_client: 6,
        }
    }

    #[test]
    fn rows_say_where_each_label_comes_from_and_what_may_be_done() {
        let dir = Path::new("/l");
        let sources: BTreeMap<String, PathBuf> = [
            ("home".to_string(), dir.join("home.yaml")),
            ("a".to_string(), dir.join("both.yaml")),
            ("b".to_string(), dir.join("both.yaml")),
        ]
        .into();
        let disabled = [
            Disabled {
                label: "old".into(),
                id: "x".into(),
                file: "old.yaml".into(),
            },
            Disabled {
                label: "home".into(),
                id: "x".into(),
                file: "home.yaml".into(),
            },
        ];
        let rows = rows(
            &[serving("home"), serving("demo"), serving("b"), serving("a")],
            &sources,
            &disabled,
            dir,
        );
        let summary: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.label.as_str(),
                    r.state,
                    r.file.as_deref(),
                    r.actions.len(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", State::Serving, Some("both.yaml"), 0),
                ("b", State::Serving, Some("both.yaml"), 0),
                ("demo", State::Builtin, None, 0),
                ("home", State::Serving, Some("home.yaml"), 3),
                ("old", State::Disabled, Some("disabled/old.yaml"), 2),
            ]
        );
        let home = &rows[3];
        let last = home.last_registration.as_ref().unwrap();
        assert_eq!((last.at, last.source.as_str()), (60, "10.0.0.1"));
        assert_eq!(last.when, "Thu, 01 Jan 1970 00:01:00 GMT");
        let json = serde_json::to_string(home).unwrap();
        assert!(
            json.contains("\"state\":\"serving\"")
                && json.contains("\"actions\":[\"disable\",\"rotate\",\"delete\"]"),
            "{json}"
        );
    }
}
