//! Labels as the tests provision them: a `TaasLabel` and its `Secret` in one file, written
//! into a labels directory (standalone) or mounted as the operator mounts them (a pod).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use taas_relay::config::Algorithm;

/// A label as the tests provision it.
#[derive(Clone, Debug)]
pub struct TestLabel {
    pub label: String,
    pub id: String,
    pub secret_b32: String,
    /// Extra spec lines, e.g. `proxyProtocol: v1`.
    pub spec_extra: String,
}

impl TestLabel {
    pub fn new(label: &str) -> Self {
        let secret = taas_relay::provision::generate_secret();
        Self {
            label: label.into(),
            id: format!("id-of-{label}"),
            secret_b32: taas_relay::totp::encode_secret(&secret),
            spec_extra: String::new(),
        }
    }

    pub fn with(mut self, spec_line: &str) -> Self {
        self.spec_extra.push_str(&format!("  {spec_line}\n"));
        self
    }

    pub fn id(mut self, id: &str) -> Self {
        self.id = id.into();
        self
    }

    pub fn secret(&self) -> Vec<u8> {
        taas_relay::totp::decode_secret(&self.secret_b32).unwrap()
    }

    /// The current 6-digit token.
    pub fn token(&self) -> String {
        self.token_at(unix_now())
    }

    pub fn token_at(&self, unix: u64) -> String {
        taas_relay::totp::code(&self.secret(), Algorithm::SHA1, 6, 30, unix)
    }

    pub fn manifest(&self) -> String {
        let secret_name = format!("{}-totp", self.label.replace('.', "-"));
        format!(
            "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata:\n  name: {name}\n\
             spec:\n  id: \"{id}\"\n  label: {label}\n  secretRef: {{name: {secret_name}, key: secret}}\n{extra}\
             ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {secret_name}\nstringData:\n  secret: {secret}\n",
            name = self.label.replace('.', "-"),
            id = self.id,
            label = self.label,
            extra = self.spec_extra,
            secret = self.secret_b32,
        )
    }

    /// The header the steward sends.
    pub fn authorization(&self) -> String {
        format!(
            "TOTP username=\"{}\", response=\"{}\"",
            self.id,
            self.token()
        )
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn write_label(dir: &Path, label: &TestLabel) {
    std::fs::write(dir.join(format!("{}.yaml", label.label)), label.manifest()).unwrap();
}

/// Writes a label's manifest and secret as the operator mounts them in a relay pod (under
/// `dir/LABEL/`); returns the manifest's path and the secret directory.
pub fn mount_label(dir: &Path, label: &TestLabel) -> (PathBuf, PathBuf) {
    let base = dir.join(&label.label);
    std::fs::create_dir_all(base.join("secret")).unwrap();
    std::fs::write(base.join("label.yaml"), label.manifest()).unwrap();
    std::fs::write(
        base.join("secret/secret"),
        format!("{}\n", label.secret_b32),
    )
    .unwrap();
    (base.join("label.yaml"), base.join("secret"))
}
