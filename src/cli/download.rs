//! `builds download`: a build's result (or source) saved to a file through a running controller, with a
//! progress bar on a terminal. The bytes go to `<file>.part` and are renamed into place only once the
//! whole body arrived with the announced length, so a cut download never leaves a file that looks whole.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{Backend, CliResult, Exit, Failure};

/// What to download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Artifact {
    /// The build's result (the .ipa/.apk the worker uploaded).
    Result,
    /// The source the build was submitted with.
    Source,
}

/// Downloads `what` of build `id` to `output` (or the server's file name in the current directory);
/// prints where it went, its size and SHA-256.
pub async fn download(
    backend: &Backend,
    id: &str,
    what: Artifact,
    output: Option<PathBuf>,
    force: bool,
    json: bool,
) -> CliResult<Exit> {
    let Backend::Http(remote) = backend else {
        return Err(Failure::new(
            Exit::Usage,
            "downloads go through a running controller (files live in its storage): pass --server URL and --api-key",
        ));
    };
    let which = match what {
        Artifact::Result => "result",
        Artifact::Source => "source",
    };
    let response = remote.download(&["api", "builds", id, "download", which]).await?;
    let path = output.unwrap_or_else(|| default_name(&response, id, what));
    if path.exists() && !force {
        return Err(Failure::new(
            Exit::Refused,
            format!(
                "{} exists; pass --force to overwrite it or -o to choose another file",
                path.display()
            ),
        ));
    }
    let expected = response.content_length();
    let partial = partial_path(&path);
    let mut file = create_partial(&partial)
        .await
        .map_err(|e| Failure::new(Exit::Refused, format!("cannot write {}: {e}", partial.display())))?;
    let bar = ProgressBar::with_draw_target(expected, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bytes:>10} / {total_bytes} {wide_bar} {bytes_per_sec} {eta}") {
        bar.set_style(style);
    }
    let (mut written, mut hasher) = (0u64, Sha256::new());
    let mut body = response.bytes_stream();
    let outcome: CliResult<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| remote.body_failed(&e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| Failure::new(Exit::Refused, format!("cannot write {}: {e}", partial.display())))?;
            hasher.update(&chunk);
            written += chunk.len() as u64;
            bar.set_position(written);
        }
        if expected.is_some_and(|n| n != written) {
            return Err(Failure::new(
                Exit::Server,
                format!(
                    "the download ended after {written} of {} bytes",
                    expected.unwrap_or_default()
                ),
            ));
        }
        file.sync_all()
            .await
            .map_err(|e| Failure::new(Exit::Refused, format!("cannot write {}: {e}", partial.display())))?;
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(|e| Failure::new(Exit::Refused, format!("cannot write {}: {e}", path.display())))
    }
    .await;
    bar.finish_and_clear();
    if let Err(failure) = outcome {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(failure);
    }
    let sha256 = crate::ids::hex(&hasher.finalize());
    if json {
        super::output::emit(&format!(
            "{}\n",
            json!({ "id": id, "artifact": which, "path": path.display().to_string(), "bytes": written, "sha256": sha256 })
        ));
    } else {
        super::output::emit(&format!("{} ({written} bytes, sha256 {sha256})\n", path.display()));
    }
    Ok(Exit::Ok)
}

/// The file name the server suggests (its last path component only), else `<id>-<artifact>`.
fn default_name(response: &reqwest::Response, id: &str, what: Artifact) -> PathBuf {
    let suggested = response
        .headers()
        .get(reqwest::header::CONTENT_DISPOSITION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("filename=").nth(1))
        .map(|name| name.trim().trim_matches('"'))
        .and_then(|name| Path::new(name).file_name())
        .map(PathBuf::from);
    suggested.unwrap_or_else(|| {
        PathBuf::from(match what {
            Artifact::Result => format!("{id}-result"),
            Artifact::Source => format!("{id}-source.zip"),
        })
    })
}

/// Creates `<file>.part` afresh (T11): never through a symlink or into an existing file someone else
/// planted (`O_CREAT | O_EXCL | O_NOFOLLOW`). A leftover from an interrupted
/// download (or a planted link) is unlinked first — the name, never what it points at.
async fn create_partial(partial: &Path) -> std::io::Result<tokio::fs::File> {
    fn open(partial: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(partial)
    }
    let file = match open(partial) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(partial)?;
            open(partial)?
        }
        other => other?,
    };
    Ok(tokio::fs::File::from_std(file))
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}
