//! Copying a build's old files into the configured store, through [`Storage`] (so they land wherever
//! `serve` would put uploads), with the size and SHA-256 recorded as uploads record them. Certs bundles are
//! encrypted on the way in. The old folder is only ever read.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::mapping::FileRef;
use crate::storage::{Key, Storage, Stored, certs};

/// The old storage folder's subfolders (import.md).
pub const FOLDERS: [&str; 3] = ["builds", "certs", "results"];

/// The upload id of an imported result: fixed, so that a re-run after a crash overwrites the same key.
pub const IMPORTED_RESULT: &str = "imported";

/// Files at most this large are read in one piece; larger ones stream.
const WHOLE_FILE_BYTES: u64 = 1024 * 1024;

/// The reason (in the summary) for an old file that is a symlink, a folder, a device or anything that
/// resolves outside `--storage`: it is never opened for reading.
pub const NOT_REGULAR: &str = "not a regular file inside the folder";

/// What became of one of a build's files.
#[derive(Debug, Clone)]
pub enum Copied {
    /// The row names no file.
    NoFile,
    /// The row names a file that is not there (deleted by hand) or a path that cannot be resolved.
    Missing(String),
    /// Not a regular file inside the folder ([`NOT_REGULAR`]): never read.
    Refused(String),
    /// Present but could not be read or stored.
    Failed { file: String, reason: String },
    /// Stored under `key` (in a dry run: found, and would be).
    Stored { file: String, key: Key, stored: Stored },
}

/// The old file a reference points at, under `root`.
fn locate(root: &Path, file: &FileRef) -> Result<Option<(String, PathBuf)>, String> {
    match file {
        FileRef::None => Ok(None),
        FileRef::Unusable(path) => Err(format!("unusable path {path}")),
        FileRef::At(relative) => Ok(Some((relative.clone(), root.join(relative)))),
    }
}

/// Copies (or, with `storage` = `None`, checks) one file. `encrypt` seals certs with the given key;
/// `max_bytes` bounds what is read into memory for sealing.
pub async fn copy(
    root: &Path,
    file: &FileRef,
    key: Option<Key>,
    storage: Option<&Storage>,
    encrypt: Option<(&[u8; 32], u64)>,
) -> Copied {
    let (relative, path) = match locate(root, file) {
        Ok(Some(found)) => found,
        Ok(None) => return Copied::NoFile,
        Err(reason) => return Copied::Missing(reason),
    };
    let Some(key) = key else {
        return Copied::Missing(format!("{relative}: no storage key for this build id"));
    };
    let (file, size) = match open_inside(root, &path) {
        Opened::File(file, size) => (tokio::fs::File::from_std(file), size),
        Opened::Missing => return Copied::Missing(relative),
        Opened::Refused => return Copied::Refused(relative),
        Opened::Failed(reason) => return Copied::Failed { file: relative, reason },
    };
    let outcome = match (storage, encrypt) {
        (None, _) => Ok(Stored {
            size,
            sha256: String::new(),
        }),
        (Some(storage), Some((certs_key, max_bytes))) => seal(storage, &key, file, size, certs_key, max_bytes).await,
        (Some(storage), None) if size <= WHOLE_FILE_BYTES => whole(storage, &key, file).await,
        (Some(storage), None) => stream(storage, &key, file).await,
    };
    match outcome {
        Ok(stored) => Copied::Stored {
            file: relative,
            key,
            stored,
        },
        Err(reason) => Copied::Failed { file: relative, reason },
    }
}

/// An old file opened for reading, or why not.
enum Opened {
    File(std::fs::File, u64),
    Missing,
    Refused,
    Failed(String),
}

/// Opens `path` without following a symlink in its last component (`O_NOFOLLOW`; `O_NONBLOCK` so a FIFO
/// cannot hang the import), then keeps it only if the opened file is a regular file and the path,
/// resolved, lies inside `root` (the canonical `--storage`, so a symlinked `builds/` is refused too).
/// What is read afterwards is the opened file itself, never the path again.
fn open_inside(root: &Path, path: &Path) -> Opened {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Opened::Missing,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Opened::Refused,
        Err(e) => return Opened::Failed(e.to_string()),
    };
    let meta = match file.metadata() {
        Ok(meta) => meta,
        Err(e) => return Opened::Failed(e.to_string()),
    };
    if !meta.is_file() {
        return Opened::Refused;
    }
    match std::fs::canonicalize(path) {
        Ok(real) if real.starts_with(root) && real != root => Opened::File(file, meta.len()),
        _ => Opened::Refused,
    }
}

async fn whole(storage: &Storage, key: &Key, mut file: tokio::fs::File) -> Result<Stored, String> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).await.map_err(|e| e.to_string())?;
    let stored = Stored {
        size: bytes.len() as u64,
        sha256: crate::ids::hex(&Sha256::digest(&bytes)),
    };
    storage.put(key, Bytes::from(bytes)).await.map_err(|e| e.to_string())?;
    Ok(stored)
}

async fn stream(storage: &Storage, key: &Key, file: tokio::fs::File) -> Result<Stored, String> {
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0u8; 256 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok(Bytes::from(buffer)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    storage
        .write_stream(key, Box::pin(chunks), u64::MAX)
        .await
        .map_err(|e| e.to_string())
}

async fn seal(
    storage: &Storage,
    key: &Key,
    file: tokio::fs::File,
    size: u64,
    certs_key: &[u8; 32],
    max_bytes: u64,
) -> Result<Stored, String> {
    if size > max_bytes {
        return Err(format!("larger than CONTROLLER_MAX_CERTS_BYTES ({max_bytes})"));
    }
    let mut plain = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut plain)
        .await
        .map_err(|e| e.to_string())?;
    if plain.len() as u64 > max_bytes {
        return Err(format!("larger than CONTROLLER_MAX_CERTS_BYTES ({max_bytes})"));
    }
    let stored = Stored {
        size: plain.len() as u64,
        sha256: crate::ids::hex(&Sha256::digest(&plain)),
    };
    let sealed = certs::encrypt(certs_key, &plain);
    storage.put(key, Bytes::from(sealed)).await.map_err(|e| e.to_string())?;
    Ok(stored)
}

/// The build id a file of the old folder belongs to (`<id>.<ext>`), if its name has that shape.
pub fn owner_of(name: &str) -> Option<&str> {
    name.split_once('.')
        .map(|(id, _)| id)
        .filter(|id| crate::ids::valid_id(id))
}

/// Every regular file and symlink in the old folder's three subfolders, as `<folder>/<name>` (a symlink
/// is listed so that it is reported; it is never read).
pub fn list(root: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for folder in FOLDERS {
        let entries = match std::fs::read_dir(root.join(folder)) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_file() || kind.is_symlink() {
                out.push(format!("{folder}/{}", entry.file_name().to_string_lossy()));
            }
        }
    }
    Ok(out)
}
