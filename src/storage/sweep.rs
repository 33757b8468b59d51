//! Staging sweep (R44): uploads stream to `staging/<upload>.bin` before their build is known; a crash
//! mid-upload leaves that object (or, on local storage, a partial `…#n` file) behind. The sweep
//! deletes staging leftovers, and partial files anywhere, older than a cut-off.

use std::path::Path;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;

use super::{Backend, Storage};

impl Storage {
    /// Deletes staging objects (and partial uploads) last modified before `cutoff`; returns how many.
    pub async fn sweep_staging(&self, cutoff: DateTime<Utc>) -> object_store::Result<u64> {
        match self.backend.as_ref() {
            Backend::Local { root } => {
                let root = root.clone();
                let cutoff = SystemTime::from(cutoff);
                tokio::task::spawn_blocking(move || sweep_local(&root, cutoff))
                    .await
                    .map_err(|e| object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    })
            }
            Backend::S3 { .. } => {
                let prefix = ObjectPath::from("staging");
                let old: Vec<ObjectPath> = self
                    .store
                    .list(Some(&prefix))
                    .try_filter(|meta| std::future::ready(meta.last_modified < cutoff))
                    .map_ok(|meta| meta.location)
                    .try_collect()
                    .await?;
                let mut removed = 0;
                for location in old {
                    match self.store.delete(&location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                        Err(e) => return Err(e),
                    }
                }
                Ok(removed)
            }
        }
    }
}

/// Local storage: every file under `staging/`, and every partial `name#n` file under `builds/` and
/// `results/`, last
/// modified before `cutoff`; then empty directories under `staging/`.
fn sweep_local(root: &Path, cutoff: SystemTime) -> u64 {
    let mut removed = 0;
    remove_old_files(&root.join("staging"), cutoff, &|_| true, &mut removed);
    remove_old_files(&root.join("builds"), cutoff, &is_partial, &mut removed);
    remove_old_files(&root.join("results"), cutoff, &is_partial, &mut removed);
    remove_empty_dirs(&root.join("staging"));
    removed
}

/// A partial multipart file of the local store: `<name>#<digits>`.
fn is_partial(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once('#'))
        .is_some_and(|(_, suffix)| !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

fn modified_before(path: &Path, cutoff: SystemTime) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|at| at < cutoff)
}

fn remove_old_files(dir: &Path, cutoff: SystemTime, select: &dyn Fn(&Path) -> bool, removed: &mut u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            remove_old_files(&path, cutoff, select, removed);
        } else if select(&path) && modified_before(&path, cutoff) {
            match std::fs::remove_file(&path) {
                Ok(()) => *removed += 1,
                Err(error) => tracing::warn!(path = %path.display(), %error, "could not remove a staging leftover"),
            }
        }
    }
}

/// Removes empty directories below `dir` (not `dir` itself). Staging keys are flat, so only the
/// per-upload directories of earlier versions (and of swept uploads) are found here.
fn remove_empty_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|k| k.is_dir()) {
            remove_empty_dirs(&path);
            // Fails (harmlessly) if not empty.
            let _ = std::fs::remove_dir(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_files_are_recognised() {
        assert!(is_partial(Path::new("builds/a/source.zip#3")));
        assert!(!is_partial(Path::new("builds/a/source.zip")));
        assert!(!is_partial(Path::new("builds/a/source.zip#")));
        assert!(!is_partial(Path::new("builds/a/x#y")));
    }
}
