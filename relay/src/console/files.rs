//! What the console's buttons do to the labels directory: the same moves an operator would
//! make by hand, so the relay's reload (`label_source::watch`) applies them like any edit.
//! - disable: the label's file moves to `disabled/` (the reader takes only the directory's
//!   own files, never a subdirectory's), enable moves it back;
//! - delete: the file is removed;
//! - rotate: `provision::rotate_secret` rewrites the file with a new secret.
//!
//! Blocking file I/O: the server runs these on the blocking pool, one at a time.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use taas_crds::manifest::{parse_documents, Object};

use super::model::Disabled;
use crate::label_source::normalize_label;

/// Where disabled label files wait, inside the labels directory.
pub const DISABLED_DIR: &str = "disabled";
/// Largest label file read to list it (they are a few hundred bytes).
const MAX_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Refused(String),
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |error| FileError::Io {
        path: path.to_path_buf(),
        error,
    }
}

fn is_manifest(name: &str) -> bool {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    !name.starts_with('.') && matches!(ext.as_deref(), Some("yaml" | "yml"))
}

/// The labels in `disabled/` (each file's `TaasLabel`s; unreadable files are skipped).
pub fn list_disabled(labels_dir: &Path) -> Vec<Disabled> {
    let dir = labels_dir.join(DISABLED_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten().take(10_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let small_file = entry
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() <= MAX_FILE);
        if !is_manifest(&name) || !small_file {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for object in parse_documents(&text).unwrap_or_default() {
            if let Object::Label(l) = object {
                if let Ok(label) = normalize_label(&l.spec.label) {
                    out.push(Disabled {
                        label,
                        id: l.spec.id.clone(),
                        file: name.clone(),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.label.cmp(&b.label));
    out
}

/// The file in `disabled/` holding `label`, if one holds it alone.
pub fn disabled_file(labels_dir: &Path, label: &str) -> Option<PathBuf> {
    let all = list_disabled(labels_dir);
    let file = &all.iter().find(|d| d.label == label)?.file;
    let holders = all.iter().filter(|d| &d.file == file).count();
    (holders == 1).then(|| labels_dir.join(DISABLED_DIR).join(file))
}

/// Moves a served label's file into `disabled/`.
pub fn disable(labels_dir: &Path, file: &Path) -> Result<(), FileError> {
    let dir = labels_dir.join(DISABLED_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir))?;
    move_into(&dir, file, "remove it first")
}

/// Moves a disabled label's file back into the labels directory.
pub fn enable(labels_dir: &Path, file: &Path) -> Result<(), FileError> {
    move_into(
        labels_dir,
        file,
        "a label file of that name is served; rename one of them",
    )
}

/// Moves `file` into `dir` under its own name, never over a file there (refused, with
/// `advice` on what to do).
fn move_into(dir: &Path, file: &Path, advice: &str) -> Result<(), FileError> {
    let name = file
        .file_name()
        .ok_or_else(|| FileError::Refused("the label's file has no name".into()))?;
    let target = dir.join(name);
    if target.exists() {
        return Err(FileError::Refused(format!(
            "{} already exists: {advice}",
            target.display()
        )));
    }
    fs::rename(file, &target).map_err(io_err(file))
}

/// Removes a label's file (served or disabled).
pub fn delete(file: &Path) -> Result<(), FileError> {
    fs::remove_file(file).map_err(io_err(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "apiVersion: taas.dev/v1alpha1\nkind: TaasLabel\nmetadata: {name: home}\n\
        spec:\n  id: id-home\n  label: Home\n  secretRef: {name: s, key: secret}\n";

    #[test]
    fn disable_enable_and_delete_move_the_file_as_an_operator_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("home.yaml");
        fs::write(&file, FILE).unwrap();
        disable(dir.path(), &file).unwrap();
        assert!(!file.exists());
        let listed = list_disabled(dir.path());
        assert_eq!(
            listed,
            [Disabled {
                label: "home".into(),
                id: "id-home".into(),
                file: "home.yaml".into()
            }]
        );
        // The relay's reader does not see it.
        assert!(crate::label_source::load_dir(dir.path())
            .unwrap()
            .labels
            .is_empty());
        let off = disabled_file(dir.path(), "home").unwrap();
        // A served file of the same name is not overwritten.
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            enable(dir.path(), &off),
            Err(FileError::Refused(_))
        ));
        fs::remove_file(&file).unwrap();
        enable(dir.path(), &off).unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), FILE);
        assert!(list_disabled(dir.path()).is_empty());
        delete(&file).unwrap();
        assert!(!file.exists());
        assert!(delete(&file).is_err());
    }
}
