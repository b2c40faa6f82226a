//! Labels from a directory of manifests: the `TaasLabel` objects and the `Secret`s they
//! reference, in `*.yaml`/`*.yml` files (the same files one would `kubectl apply`).
//!
//! At start-up every problem is fatal ([`load_dir`]); on reload a bad file is reported and
//! skipped while the labels it served keep their last good configuration ([`reload_dir`]), so
//! one typo never takes other labels (or that label) offline.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use taas_crds::manifest::{parse_documents, LabelObject, Object, SecretObject};
use taas_crds::{SpecError, TaasLabelSpec};

use crate::config::LabelConfig;

/// The labels a relay serves, and the file each came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSet {
    /// By LABEL (lower case).
    pub labels: BTreeMap<String, LabelConfig>,
    /// LABEL → the file holding its `TaasLabel`.
    pub sources: BTreeMap<String, PathBuf>,
}

impl LabelSet {
    /// The file a label was loaded from.
    pub fn source(&self, label: &str) -> Option<&Path> {
        self.sources.get(label).map(PathBuf::as_path)
    }

    fn insert(&mut self, config: LabelConfig, file: &Path) {
        self.sources
            .insert(config.label.clone(), file.to_path_buf());
        self.labels.insert(config.label.clone(), config);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    /// Every problem found, each naming its file (and label) and the reason.
    #[error("invalid label configuration in {}:\n  - {}", place.display(), problems.join("\n  - "))]
    Invalid {
        place: PathBuf,
        problems: Vec<String>,
    },
}

// ---------------------------------------------------------------------------------------------
// Validation of one label (also used by `provision`, so both accept exactly the same things).
// The rules are the CRD's (`TaasLabelSpec::validate`); the relay adds that it reads LABEL
// case-insensitively, and checks the secret's value.

/// The id rule (the CRD's), here beside [`normalize_label`] for the relay's callers.
pub use taas_crds::check_id;

/// LABEL in DNS syntax, lower-cased: the CRD's DNS subdomain rule
/// ([`taas_crds::check_dns_subdomain`]: 1–253 characters, dot-separated parts of 1–63 of
/// `[a-z0-9-]`, none starting or ending with `-`) applied to the lower-cased name.
pub fn normalize_label(label: &str) -> Result<String, String> {
    let lower = label.to_ascii_lowercase();
    match taas_crds::check_dns_subdomain(&lower) {
        Ok(()) => Ok(lower),
        Err(reason) => Err(SpecError::Label {
            label: label.to_string(),
            reason,
        }
        .to_string()),
    }
}

/// Whether the relay refuses a label for this problem of its spec. LABEL it checks itself,
/// case-insensitively ([`normalize_label`]); `secretRef` only names the Secret to look for (a
/// wrong one shows as "no such Secret"); `rendezvousPorts`, `replicas` and `service` shape a
/// cluster's relay pods and Service, which the relay ignores.
fn refused_by_relay(error: &SpecError) -> bool {
    match error {
        SpecError::IdLength
        | SpecError::IdCharacter(_)
        | SpecError::Period(_)
        | SpecError::MaxParked(_)
        | SpecError::ClientPort(_)
        | SpecError::ServerSpeaksFirstWithoutProxyHeader
        | SpecError::DirectServerSpeaksFirst => true,
        SpecError::Label { .. }
        | SpecError::SecretName { .. }
        | SpecError::SecretKey(_)
        | SpecError::RendezvousPorts(_)
        | SpecError::Replicas(_)
        | SpecError::LoadBalancerClassLength
        | SpecError::LoadBalancerClassWithoutLoadBalancer => false,
    }
}

/// Checks a spec and its resolved secret value (base32 text, as stored in the Secret) and
/// builds what the relay serves. Lists every problem found, separated by "; ".
pub fn validate_label(spec: &TaasLabelSpec, secret_b32: &[u8]) -> Result<LabelConfig, String> {
    let mut problems = Vec::new();
    let label = normalize_label(&spec.label).unwrap_or_else(|e| {
        problems.push(e);
        String::new()
    });
    if let Err(errors) = spec.validate() {
        let refused = errors.0.iter().filter(|e| refused_by_relay(e));
        problems.extend(refused.map(ToString::to_string));
    }
    // Tolerate surrounding whitespace: `kubectl create secret --from-file` keeps a newline.
    let secret = match std::str::from_utf8(secret_b32)
        .map_err(|_| "the TOTP secret is not text (expected base32)".to_string())
        .and_then(|s| crate::totp::decode_secret(s.trim()).map_err(|e| e.to_string()))
    {
        Ok(bytes) if bytes.len() < 10 => {
            problems.push(format!(
                "the TOTP secret has {} bits; at least 80 are required (160 recommended)",
                bytes.len() * 8
            ));
            bytes
        }
        Ok(bytes) => {
            if bytes.len() < 16 {
                tracing::warn!(
                    label = %label,
                    bits = bytes.len() * 8,
                    "weak TOTP secret: 128 bits or more are recommended"
                );
            }
            bytes
        }
        Err(e) => {
            problems.push(e);
            Vec::new()
        }
    };
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(LabelConfig {
        label,
        id: spec.id.clone(),
        secret,
        algorithm: spec.algorithm,
        period: u64::from(spec.period),
        max_parked: spec.max_parked as usize,
        source_pinning: spec.source_pinning,
        proxy_protocol: spec.proxy_protocol,
        client_port: spec.client_port,
        client_admission: spec.client_admission,
        server_speaks_first: spec.server_speaks_first,
        direct: spec.direct,
    })
}

// ---------------------------------------------------------------------------------------------
// Reading a directory.

/// The manifest files of `dir`, sorted by name: `*.yaml`/`*.yml`, not dotfiles, regular files
/// or symlinks to them (Kubernetes mounts ConfigMaps and Secrets as symlinks into `..data/`).
fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
        let is_manifest = matches!(ext.as_deref(), Some("yaml" | "yml"));
        if name.starts_with('.') || !is_manifest {
            continue;
        }
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One file's objects, or why it could not be read: one line, naming the file.
type Parsed = (PathBuf, Result<Vec<Object>, String>);

fn parse_file(path: &Path) -> Parsed {
    let result = fs::read_to_string(path)
        .map_err(|e| format!("cannot read: {e}"))
        .and_then(|text| parse_documents(&text).map_err(|e| e.to_string()))
        .map_err(|e| one_line(&format!("{}: {e}", path.display())));
    (path.to_path_buf(), result)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A valid base32 secret (160 zero bits), only used to validate a spec whose Secret is missing.
const STAND_IN_SECRET: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// Resolves and validates every label of every file, and checks them against each other.
/// Per file: its labels, or its problems (a file with any problem contributes no label).
fn analyze(parsed: &[Parsed]) -> Vec<Result<Vec<LabelConfig>, Vec<String>>> {
    let mut problems: Vec<Vec<String>> = vec![Vec::new(); parsed.len()];
    let mut secrets: BTreeMap<(&str, &str), Vec<(usize, &SecretObject)>> = BTreeMap::new();
    let mut labels: Vec<(usize, &LabelObject)> = Vec::new();
    for (i, (_, result)) in parsed.iter().enumerate() {
        match result {
            Err(e) => problems[i].push(e.clone()),
            Ok(objects) => {
                for object in objects {
                    match object {
                        Object::Label(l) => labels.push((i, l)),
                        Object::Secret(s) => secrets
                            .entry((s.namespace.as_str(), s.name.as_str()))
                            .or_default()
                            .push((i, s)),
                        Object::Other { .. } => {}
                    }
                }
            }
        }
    }
    let file = |i: usize| parsed[i].0.display().to_string();
    let problem = |i: usize, l: &LabelObject, why: &str| {
        one_line(&format!("{}: label {:?}: {why}", file(i), l.spec.label))
    };

    let mut configs: Vec<(usize, LabelConfig)> = Vec::new();
    for &(i, l) in &labels {
        let r = &l.spec.secret_ref;
        let what = format!(
            "key {:?} of Secret {:?} (namespace {})",
            r.key, r.name, l.namespace
        );
        let value = match secrets
            .get(&(l.namespace.as_str(), r.name.as_str()))
            .map(Vec::as_slice)
        {
            None | Some([]) => Err(format!("{what}: no such Secret in the labels directory")),
            Some([(_, s)]) => s
                .data
                .get(&r.key)
                .ok_or_else(|| format!("{what}: the Secret has no such key")),
            Some(many) => {
                let files: Vec<_> = many.iter().map(|&(j, _)| file(j)).collect();
                Err(format!(
                    "{what}: the Secret is defined more than once ({})",
                    files.join(", ")
                ))
            }
        };
        let result = match value {
            Ok(v) => validate_label(&l.spec, v),
            // Still report the spec's own problems, checked with a stand-in secret.
            Err(e) => Err(match validate_label(&l.spec, STAND_IN_SECRET.as_bytes()) {
                Ok(_) => e,
                Err(more) => format!("{e}; {more}"),
            }),
        };
        match result {
            Ok(config) => configs.push((i, config)),
            Err(e) => problems[i].push(problem(i, l, &e)),
        }
    }

    // The same LABEL twice, or the same pinned client port twice, is an error for every
    // definition: there is no way to tell which one the user meant.
    let mut by_label: BTreeMap<String, Vec<(usize, &LabelObject)>> = BTreeMap::new();
    let mut by_port: BTreeMap<u16, Vec<(usize, &LabelObject)>> = BTreeMap::new();
    for &(i, l) in &labels {
        if let Ok(name) = normalize_label(&l.spec.label) {
            by_label.entry(name).or_default().push((i, l));
        }
        if let Some(port) = l.spec.client_port.filter(|&p| p != 0) {
            by_port.entry(port).or_default().push((i, l));
        }
    }
    let clashes = by_label
        .values()
        .map(|defs| ("this label".to_string(), defs))
        .chain(
            by_port
                .iter()
                .map(|(p, defs)| (format!("clientPort {p}"), defs)),
        );
    for (what, defs) in clashes.filter(|(_, defs)| defs.len() > 1) {
        let files: Vec<_> = defs.iter().map(|&(j, _)| file(j)).collect();
        for &(i, l) in defs {
            let why = format!(
                "{what} is defined {} times ({})",
                defs.len(),
                files.join(", ")
            );
            problems[i].push(problem(i, l, &why));
        }
    }

    let mut out: Vec<Result<Vec<LabelConfig>, Vec<String>>> = problems
        .into_iter()
        .map(|p| if p.is_empty() { Ok(Vec::new()) } else { Err(p) })
        .collect();
    for (i, config) in configs {
        if let Ok(list) = &mut out[i] {
            list.push(config);
        }
    }
    out
}

/// Creates the labels directory (it holds secrets: owner only).
fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Loads every label of `dir` for start-up: any problem anywhere is fatal, and the error lists
/// them all. A missing directory is created and yields an empty set.
pub fn load_dir(dir: &Path) -> Result<LabelSet, LoadError> {
    let io_err = |error| LoadError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let files = match list_files(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_dir(dir).map_err(io_err)?;
            return Ok(LabelSet::default());
        }
        other => other.map_err(io_err)?,
    };
    let parsed: Vec<Parsed> = files.iter().map(|f| parse_file(f)).collect();
    let mut set = LabelSet::default();
    let mut problems = Vec::new();
    for ((path, _), outcome) in parsed.iter().zip(analyze(&parsed)) {
        match outcome {
            Ok(configs) => configs.into_iter().for_each(|c| set.insert(c, path)),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(LoadError::Invalid {
            place: dir.to_path_buf(),
            problems,
        })
    }
}

/// Reloads `dir` after a change. A file with any problem is skipped, and the labels it served
/// in `previous` are kept as they were (last known good); every valid file is loaded; labels
/// of removed files disappear. Returns the new set and the problems, one line each.
pub fn reload_dir(dir: &Path, previous: &LabelSet) -> (LabelSet, Vec<String>) {
    let files = match list_files(dir) {
        Ok(files) => files,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let msg = format!("{}: the labels directory is gone: no labels", dir.display());
            return (LabelSet::default(), vec![msg]);
        }
        Err(e) => {
            let msg = format!("{}: cannot read ({e}); keeping every label", dir.display());
            return (previous.clone(), vec![msg]);
        }
    };
    let parsed: Vec<Parsed> = files.iter().map(|f| parse_file(f)).collect();
    let outcomes = analyze(&parsed);
    let mut problems: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .flatten()
        .cloned()
        .collect();
    let mut valid: Vec<bool> = outcomes.iter().map(Result::is_ok).collect();
    // A kept label may clash with a new definition elsewhere (e.g. its file no longer parses,
    // so the clash could not be seen above). The kept one wins; the other file then counts as
    // invalid too, which may keep more labels: repeat until stable (each round drops a file).
    loop {
        match assemble(&files, &outcomes, &valid, previous) {
            Ok(set) => {
                for path in files
                    .iter()
                    .zip(&valid)
                    .filter(|(_, v)| !**v)
                    .map(|(f, _)| f)
                {
                    let kept: Vec<&str> = set
                        .sources
                        .iter()
                        .filter(|(_, src)| *src == path)
                        .map(|(label, _)| label.as_str())
                        .collect();
                    if !kept.is_empty() {
                        problems.push(format!(
                            "{}: not loaded; still serving the last good version of: {}",
                            path.display(),
                            kept.join(", ")
                        ));
                    }
                }
                return (set, problems);
            }
            Err((i, problem)) => {
                valid[i] = false;
                problems.push(problem);
            }
        }
    }
}

/// Kept labels of invalid files plus the labels of valid files, or the first valid file whose
/// label or client port clashes with a kept label.
fn assemble(
    files: &[PathBuf],
    outcomes: &[Result<Vec<LabelConfig>, Vec<String>>],
    valid: &[bool],
    previous: &LabelSet,
) -> Result<LabelSet, (usize, String)> {
    let mut set = LabelSet::default();
    for (label, config) in &previous.labels {
        let src = previous.source(label);
        if let Some(i) = files.iter().position(|f| Some(f.as_path()) == src) {
            if !valid[i] {
                set.insert(config.clone(), &files[i]);
            }
        }
    }
    let kept = set.clone();
    for (i, outcome) in outcomes.iter().enumerate().filter(|&(i, _)| valid[i]) {
        for config in outcome.as_ref().into_iter().flatten() {
            let port = config.client_port;
            let clash = kept
                .labels
                .values()
                .find(|k| k.label == config.label || (port.is_some() && k.client_port == port));
            if let Some(k) = clash {
                return Err((
                    i,
                    format!(
                        "{}: label {:?}: its label or clientPort is still held by label {:?} \
                         from {} (last good version; that file is invalid)",
                        files[i].display(),
                        config.label,
                        k.label,
                        kept.source(&k.label).unwrap_or(Path::new("?")).display()
                    ),
                ));
            }
            set.insert(config.clone(), &files[i]);
        }
    }
    Ok(set)
}

/// The single label of an agent's `--label-file`: one `TaasLabel` and its `Secret`.
pub fn read_label_file(path: &Path) -> Result<LabelConfig, LoadError> {
    let invalid = |problems| LoadError::Invalid {
        place: path.to_path_buf(),
        problems,
    };
    let text = fs::read_to_string(path).map_err(|error| LoadError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let parsed = parse_documents(&text).map_err(|e| invalid(vec![e.to_string()]))?;
    let outcome = analyze(&[(path.to_path_buf(), Ok(parsed))]).pop();
    match outcome {
        Some(Ok(mut configs)) if configs.len() == 1 => Ok(configs.remove(0)),
        Some(Ok(configs)) => Err(invalid(vec![format!(
            "expected exactly one TaasLabel, found {}",
            configs.len()
        )])),
        Some(Err(problems)) => Err(invalid(problems)),
        None => unreachable!("one outcome per file"),
    }
}

/// A cheap digest of the directory's manifest files (names and contents; they are small), so
/// a poll loop can skip an unchanged directory. A missing directory has a digest too.
pub fn fingerprint(dir: &Path) -> io::Result<u64> {
    let mut h = DefaultHasher::new();
    match list_files(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => "missing".hash(&mut h),
        Err(e) => return Err(e),
        Ok(files) => {
            for f in files {
                f.hash(&mut h);
                match fs::read(&f) {
                    Ok(bytes) => bytes.hash(&mut h),
                    Err(e) => e.kind().hash(&mut h),
                }
            }
        }
    }
    Ok(h.finish())
}

/// Polls `dir` every `interval`; on a change, reloads it (see [`reload_dir`]), logs each
/// problem, and sends the new set if it differs. Returns when every receiver is gone.
pub async fn watch(
    dir: PathBuf,
    interval: Duration,
    initial: LabelSet,
    tx: tokio::sync::watch::Sender<LabelSet>,
) {
    let mut current = initial;
    // None: the first poll always reloads, so a change between load_dir and now is not missed.
    let mut last: Option<u64> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = ticker.tick() => {}
        }
        // File I/O is blocking: keep it off the async workers.
        let (d, prev, seen) = (dir.clone(), current.clone(), last);
        let job = tokio::task::spawn_blocking(move || {
            // An unreadable directory gets a digest of its error, so it is reported once.
            let fp = fingerprint(&d).unwrap_or_else(|e| {
                let mut h = DefaultHasher::new();
                e.to_string().hash(&mut h);
                h.finish()
            });
            if Some(fp) == seen {
                return (fp, None);
            }
            (fp, Some(reload_dir(&d, &prev)))
        });
        let Ok((fp, reloaded)) = job.await else {
            continue;
        };
        last = Some(fp);
        let Some((set, problems)) = reloaded else {
            continue;
        };
        for problem in &problems {
            tracing::warn!(dir = %dir.display(), "labels: {problem}");
        }
        if set != current {
            tracing::info!(dir = %dir.display(), labels = set.labels.len(), "labels reloaded");
            current = set.clone();
            if tx.send(set).is_err() {
                return;
            }
        }
    }
}

/// One label as a cluster mounts it into its relay pod: `label_file` holds the `TaasLabel`
/// manifest (from a ConfigMap), and the Secret is a mounted directory with one file per key.
pub fn read_mounted_label(label_file: &Path, secret_dir: &Path) -> Result<LabelConfig, LoadError> {
    let invalid = |problems| LoadError::Invalid {
        place: label_file.to_path_buf(),
        problems,
    };
    let text = fs::read_to_string(label_file).map_err(|error| LoadError::Io {
        path: label_file.to_path_buf(),
        error,
    })?;
    let objects = parse_documents(&text).map_err(|e| invalid(vec![e.to_string()]))?;
    let mut labels = objects.into_iter().filter_map(|object| match object {
        Object::Label(label) => Some(label),
        _ => None,
    });
    let (Some(label), None) = (labels.next(), labels.next()) else {
        return Err(invalid(vec!["expected exactly one TaasLabel".into()]));
    };
    let secret_path = secret_dir.join(&label.spec.secret_ref.key);
    let secret = fs::read(&secret_path).map_err(|error| LoadError::Io {
        path: secret_path,
        error,
    })?;
    validate_label(&label.spec, &secret).map_err(|problem| invalid(vec![problem]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const B32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"; // "12345678901234567890"

    fn label_yaml(label: &str, secret: &str, extra: &str) -> String {
        format!(
            "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {{name: {label}}}\n\
             spec:\n  id: id-{label}\n  label: {label}\n  secretRef: {{name: {secret}, key: secret}}\n{extra}"
        )
    }

    fn secret_yaml(name: &str) -> String {
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {{secret: {B32}}}\n")
    }

    fn labelled(label: &str, extra: &str) -> String {
        format!(
            "{}---\n{}",
            label_yaml(label, &format!("{label}-totp"), extra),
            secret_yaml(&format!("{label}-totp"))
        )
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    fn spec() -> TaasLabelSpec {
        let objects = parse_documents(&label_yaml("home", "s", "")).unwrap();
        match &objects[0] {
            Object::Label(l) => l.spec.clone(),
            _ => unreachable!(),
        }
    }

    fn problems(dir: &Path) -> String {
        load_dir(dir).unwrap_err().to_string()
    }

    #[test]
    fn valid_dir_maps_every_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", "  period: 60\n  maxParked: 4\n  sourcePinning: false\n  proxyProtocol: v2\n  clientPort: 21005\n  clientAdmission: Redirected\n  algorithm: SHA256\n"));
        write(dir.path(), "b.yml", &labelled("office.home", ""));
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.labels.len(), 2);
        let home = &set.labels["home"];
        assert_eq!(home.id, "id-home");
        assert_eq!(home.secret, b"12345678901234567890");
        assert_eq!(home.period, 60);
        assert_eq!(home.max_parked, 4);
        assert!(!home.source_pinning);
        assert_eq!(home.proxy_protocol, crate::config::ProxyProtocol::V2);
        assert_eq!(home.client_port, Some(21005));
        assert_eq!(
            home.client_admission,
            crate::config::ClientAdmission::Redirected
        );
        assert_eq!(home.algorithm, crate::config::Algorithm::SHA256);
        assert_eq!(
            set.source("home"),
            Some(dir.path().join("a.yaml").as_path())
        );
        assert_eq!(
            set.source("office.home"),
            Some(dir.path().join("b.yml").as_path())
        );
        assert!(set.labels["office.home"].source_pinning);
    }

    #[test]
    fn ignores_other_files_dotfiles_and_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", ""));
        write(dir.path(), ".hidden.yaml", "not: [valid");
        write(dir.path(), "notes.txt", "not: [valid");
        write(dir.path(), "a.yaml~", "not: [valid");
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        write(&dir.path().join("sub.yaml"), "x.yaml", "not: [valid");
        // A symlinked file counts (Kubernetes volume mounts), its dot-directory target does not.
        fs::create_dir(dir.path().join("..data")).unwrap();
        write(&dir.path().join("..data"), "b.yaml", &labelled("other", ""));
        symlink("..data/b.yaml", dir.path().join("b.yaml")).unwrap();
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.labels.keys().collect::<Vec<_>>(), ["home", "other"]);
    }

    #[test]
    fn server_speaks_first_is_carried_and_needs_a_proxy_header() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &labelled("ssh", "  serverSpeaksFirst: true\n  proxyProtocol: v1\n"),
        );
        write(dir.path(), "b.yaml", &labelled("web", ""));
        let set = load_dir(dir.path()).unwrap();
        assert!(set.labels["ssh"].server_speaks_first);
        assert!(!set.labels["web"].server_speaks_first);
        write(
            dir.path(),
            "a.yaml",
            &labelled("ssh", "  serverSpeaksFirst: true\n"),
        );
        let msg = problems(dir.path());
        assert!(
            msg.contains("serverSpeaksFirst needs proxyProtocol v1 or v2"),
            "{msg}"
        );
    }

    #[test]
    fn direct_is_carried_and_refused_with_a_server_that_speaks_first() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("web", "  direct: true\n"));
        write(dir.path(), "b.yaml", &labelled("other", ""));
        let set = load_dir(dir.path()).unwrap();
        assert!(set.labels["web"].direct);
        assert!(!set.labels["other"].direct);
        write(
            dir.path(),
            "a.yaml",
            &labelled(
                "web",
                "  direct: true\n  serverSpeaksFirst: true\n  proxyProtocol: v1\n",
            ),
        );
        let msg = problems(dir.path());
        assert!(
            msg.contains("direct cannot be combined with serverSpeaksFirst"),
            "{msg}"
        );
    }

    #[test]
    fn missing_dir_is_created_empty() {
        let dir = tempfile::tempdir().unwrap();
        let labels = dir.path().join("x/labels");
        assert_eq!(load_dir(&labels).unwrap(), LabelSet::default());
        assert!(labels.is_dir());
    }

    #[test]
    fn secret_in_another_file_same_namespace_only() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &label_yaml("home", "shared", ""));
        write(dir.path(), "z.yaml", &secret_yaml("shared"));
        assert_eq!(
            load_dir(dir.path()).unwrap().labels["home"].secret.len(),
            20
        );
        let other_ns =
            secret_yaml("shared").replace("{name: shared}", "{name: shared, namespace: x}");
        write(dir.path(), "z.yaml", &other_ns);
        let msg = problems(dir.path());
        assert!(msg.contains("no such Secret"), "{msg}");
    }

    #[test]
    fn missing_secret_or_key_names_label_file_secret_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &label_yaml("home", "nowhere", "  period: 0\n"),
        );
        let msg = problems(dir.path());
        assert!(msg.contains("period 0 must be"), "{msg}");
        let file = dir.path().join("a.yaml").display().to_string();
        assert!(msg.contains(&format!("{file}: label \"home\": key \"secret\" of Secret \"nowhere\" (namespace default): no such Secret")), "{msg}");
        let wrong_key = label_yaml("home", "home-totp", "").replace("key: secret", "key: other");
        write(
            dir.path(),
            "a.yaml",
            &format!("{wrong_key}---\n{}", secret_yaml("home-totp")),
        );
        let msg = problems(dir.path());
        assert!(msg.contains("key \"other\" of Secret \"home-totp\" (namespace default): the Secret has no such key"), "{msg}");
    }

    #[test]
    fn duplicate_label_and_port_are_errors_for_both() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", ""));
        write(dir.path(), "b.yaml", &labelled("HOME", ""));
        let msg = problems(dir.path());
        assert_eq!(
            msg.matches("this label is defined 2 times").count(),
            2,
            "{msg}"
        );
        // (Both also define the Secret home-totp: reported too.)
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &labelled("one", "  clientPort: 21000\n"),
        );
        write(
            dir.path(),
            "b.yaml",
            &labelled("two", "  clientPort: 21000\n"),
        );
        write(
            dir.path(),
            "c.yaml",
            &labelled("three", "  clientPort: 21001\n"),
        );
        let msg = problems(dir.path());
        assert_eq!(
            msg.matches("clientPort 21000 is defined 2 times").count(),
            2,
            "{msg}"
        );
        assert!(
            msg.contains("label \"one\"") && msg.contains("label \"two\""),
            "{msg}"
        );
        assert!(!msg.contains("three"), "{msg}");
    }

    #[test]
    fn bad_yaml_at_start_is_fatal_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", ""));
        write(dir.path(), "b.yaml", "apiVersion: v1\nkind: [oops\n");
        let err = load_dir(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("invalid label configuration in "), "{msg}");
        assert!(
            msg.contains(&format!(
                "{}: document 1",
                dir.path().join("b.yaml").display()
            )),
            "{msg}"
        );
        assert!(msg.contains("line"), "{msg}");
    }

    #[test]
    fn reload_keeps_last_good_labels_of_an_invalid_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", ""));
        write(dir.path(), "b.yaml", &labelled("work", ""));
        write(dir.path(), "c.yaml", &labelled("gone", ""));
        let before = load_dir(dir.path()).unwrap();
        // a: now unparsable; b: changed; c: removed; d: new.
        write(dir.path(), "a.yaml", "kind: [");
        write(dir.path(), "b.yaml", &labelled("work", "  period: 60\n"));
        fs::remove_file(dir.path().join("c.yaml")).unwrap();
        write(dir.path(), "d.yaml", &labelled("new", ""));
        let (after, problems) = reload_dir(dir.path(), &before);
        assert_eq!(
            after.labels.keys().collect::<Vec<_>>(),
            ["home", "new", "work"]
        );
        assert_eq!(after.labels["home"], before.labels["home"]);
        assert_eq!(after.labels["work"].period, 60);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("a.yaml: document 1"), "{problems:?}");
        assert!(
            problems[1]
                .contains("a.yaml: not loaded; still serving the last good version of: home"),
            "{problems:?}"
        );
        assert!(problems.iter().all(|p| !p.contains('\n')));

        // An invalid label (not YAML) in a file is handled the same way.
        write(dir.path(), "a.yaml", &labelled("home", "  period: 0\n"));
        let (again, problems) = reload_dir(dir.path(), &after);
        assert_eq!(again.labels["home"], before.labels["home"]);
        assert!(
            problems[0].contains("period 0 must be 1 to 300"),
            "{problems:?}"
        );
        // Fixed: the new definition is loaded.
        write(dir.path(), "a.yaml", &labelled("home", "  period: 10\n"));
        let (fixed, problems) = reload_dir(dir.path(), &again);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(fixed.labels["home"].period, 10);
    }

    #[test]
    fn reload_kept_label_wins_over_a_new_clashing_definition() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &labelled("home", "  clientPort: 21000\n"),
        );
        write(dir.path(), "b.yaml", &labelled("work", ""));
        let before = load_dir(dir.path()).unwrap();
        write(dir.path(), "a.yaml", "{");
        // b now also wants home's port: b is refused, and its old "work" is kept.
        write(
            dir.path(),
            "b.yaml",
            &labelled("work", "  clientPort: 21000\n"),
        );
        let (after, problems) = reload_dir(dir.path(), &before);
        assert_eq!(after, before);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("still held by label \"home\"")),
            "{problems:?}"
        );
    }

    #[test]
    fn removal_and_missing_directory_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", ""));
        let before = load_dir(dir.path()).unwrap();
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let (after, problems) = reload_dir(dir.path(), &before);
        assert!(after.labels.is_empty() && problems.is_empty());
        let (after, problems) = reload_dir(&dir.path().join("nope"), &before);
        assert!(after.labels.is_empty());
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn upper_case_label_is_normalised() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("Home.Office", ""));
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.labels["home.office"].label, "home.office");
    }

    #[test]
    fn prototype_names_are_ordinary_labels_but_proto_is_not_dns() {
        let dir = tempfile::tempdir().unwrap();
        for l in ["constructor", "tostring", "hasownproperty"] {
            write(dir.path(), &format!("{l}.yaml"), &labelled(l, ""));
        }
        let set = load_dir(dir.path()).unwrap();
        assert_eq!(set.labels.len(), 3);
        assert!(normalize_label("__proto__").is_err());
        write(dir.path(), "p.yaml", &labelled("__proto__", ""));
        assert!(problems(dir.path()).contains("not a valid DNS name"));
    }

    #[test]
    fn label_syntax() {
        let ok = [
            "a",
            "home",
            "a-b.c9",
            "0",
            &"a".repeat(63),
            &["x"; 127].join("."),
        ];
        for l in ok {
            assert!(normalize_label(l).is_ok(), "{l}");
        }
        let long = vec!["a".repeat(63); 4].join("."); // 255 characters
        let bad = [
            "",
            ".",
            "a.",
            ".a",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            "é",
            &"a".repeat(64),
            &long,
        ];
        for l in bad {
            assert!(normalize_label(l).is_err(), "{l:?}");
        }
    }

    #[test]
    fn validation_bounds() {
        let good = spec();
        assert!(validate_label(&good, B32.as_bytes()).is_ok());
        // Surrounding whitespace and lower case are fine.
        assert!(validate_label(&good, format!(" {}\n", B32.to_lowercase()).as_bytes()).is_ok());
        let check = |f: &dyn Fn(&mut TaasLabelSpec), secret: &str, expect: &str| {
            let mut s = good.clone();
            f(&mut s);
            let e = validate_label(&s, secret.as_bytes()).unwrap_err();
            assert!(e.contains(expect), "{e}");
            assert!(!e.contains(secret) || secret.is_empty(), "{e}");
        };
        check(&|s| s.period = 0, B32, "period 0");
        check(&|s| s.period = 301, B32, "period 301");
        check(&|s| s.max_parked = 0, B32, "maxParked 0");
        check(&|s| s.max_parked = 1025, B32, "maxParked 1025");
        check(&|s| s.client_port = Some(0), B32, "clientPort");
        check(&|s| s.id = String::new(), B32, "id must be");
        check(&|s| s.id = "a b".into(), B32, "whitespace");
        check(&|s| s.id = "a\u{7}".into(), B32, "control");
        check(&|s| s.id = "x".repeat(257), B32, "256 bytes");
        check(&|_| {}, "GEZDGNBVGY3TQOI", "72 bits"); // 9 bytes
        check(&|_| {}, "not*base32", "base32");
        assert!(validate_label(&good, "GEZDGNBVGY3TQOJQ".as_bytes()).is_ok()); // 80 bits
                                                                               // Several problems at once are all listed.
        let mut s = good.clone();
        s.period = 0;
        s.max_parked = 0;
        let e = validate_label(&s, B32.as_bytes()).unwrap_err();
        assert!(e.contains("period") && e.contains("maxParked"), "{e}");
        // Limits that are allowed.
        s.period = 300;
        s.max_parked = 1024;
        s.client_port = Some(65535);
        s.id = "x".repeat(256);
        assert!(validate_label(&s, B32.as_bytes()).is_ok());
    }

    #[test]
    fn the_crds_rules_for_a_cluster_and_for_secret_ref_do_not_stop_the_relay() {
        let mut s = spec();
        s.label = "Home".into(); // read case-insensitively
        s.rendezvous_ports = 0;
        s.secret_ref.name = "S_1".into();
        s.service.type_ = Some(taas_crds::ServiceType::NodePort);
        s.service.load_balancer_class = Some(String::new());
        let errors = s.validate().unwrap_err().0;
        assert_eq!(errors.len(), 5, "{errors:?}");
        let config = validate_label(&s, B32.as_bytes()).unwrap();
        assert_eq!(config.label, "home");
        // The rules it applies are the CRD's, with the CRD's messages.
        s.period = 0;
        s.id = String::new();
        let e = validate_label(&s, B32.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            format!(
                "{}; {}",
                taas_crds::SpecError::IdLength,
                taas_crds::SpecError::Period(0)
            )
        );
    }

    #[test]
    fn read_label_file_wants_exactly_one_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        fs::write(&path, labelled("home", "")).unwrap();
        let config = read_label_file(&path).unwrap();
        assert_eq!(
            (config.label.as_str(), config.id.as_str()),
            ("home", "id-home")
        );
        fs::write(
            &path,
            format!("{}---\n{}", labelled("a", ""), labelled("b", "")),
        )
        .unwrap();
        let msg = read_label_file(&path).unwrap_err().to_string();
        assert!(msg.contains("exactly one TaasLabel, found 2"), "{msg}");
        fs::write(&path, label_yaml("home", "nowhere", "")).unwrap();
        assert!(read_label_file(&path)
            .unwrap_err()
            .to_string()
            .contains("no such Secret"));
        let e = read_label_file(&dir.path().join("missing.yaml")).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }), "{e}");
    }

    #[test]
    fn fingerprint_tracks_changes() {
        let dir = tempfile::tempdir().unwrap();
        let empty = fingerprint(dir.path()).unwrap();
        write(dir.path(), "a.yaml", "x: 1\n");
        let one = fingerprint(dir.path()).unwrap();
        assert_ne!(empty, one);
        assert_eq!(one, fingerprint(dir.path()).unwrap());
        write(dir.path(), "a.yaml", "x: 2\n");
        assert_ne!(one, fingerprint(dir.path()).unwrap());
        write(dir.path(), "ignored.txt", "x");
        let two = fingerprint(dir.path()).unwrap();
        write(dir.path(), "ignored.txt", "y");
        assert_eq!(two, fingerprint(dir.path()).unwrap());
        assert!(fingerprint(&dir.path().join("missing")).is_ok());
    }

    #[tokio::test]
    async fn watch_sends_changes_and_stops_when_receivers_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &labelled("home", ""));
        let initial = load_dir(dir.path()).unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(initial.clone());
        let task = tokio::spawn(watch(
            dir.path().to_path_buf(),
            Duration::from_millis(20),
            initial,
            tx,
        ));
        write(dir.path(), "b.yaml", &labelled("work", ""));
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update().labels.len(), 2);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
