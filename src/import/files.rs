//! Copying a build's old files into the configured store, through [`Storage`] (so they land wherever
//! `serve` would put uploads), with the size and SHA-256 recorded as uploads record them. Certs bundles are
//! encrypted on the way in. The old folder is only ever read.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

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

/// The old file a reference points at, relative to the storage folder.
fn locate(file: &FileRef) -> Result<Option<String>, String> {
    match file {
        FileRef::None => Ok(None),
        FileRef::Unusable(path) => Err(format!("unusable path {path}")),
        FileRef::At(relative) => Ok(Some(relative.clone())),
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
    let relative = match locate(file) {
        Ok(Some(found)) => found,
        Ok(None) => return Copied::NoFile,
        Err(reason) => return Copied::Missing(reason),
    };
    let Some(key) = key else {
        return Copied::Missing(format!("{relative}: no storage key for this build id"));
    };
    let (file, size) = match open_inside(root, &relative) {
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

/// Opens `relative` under `root` (the canonical `--storage`) without following a symlink anywhere below
/// the root (T2): the root is opened as a directory, each folder of the path is opened from its parent
/// with `O_DIRECTORY | O_NOFOLLOW` (`openat`), and the file from its folder with `O_NOFOLLOW | O_NONBLOCK`
/// (so a FIFO cannot hang the import); the opened file is kept only if `fstat` says it is a regular
/// file. Nothing is resolved by path twice, so a link swapped in meanwhile cannot redirect the read;
/// `..` or an absolute path is refused. What is read afterwards is the opened file itself.
fn open_inside(root: &Path, relative: &str) -> Opened {
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Component;
    let mut names = Vec::new();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            _ => return Opened::Refused,
        }
    }
    let Some((file_name, folders)) = names.split_last() else {
        return Opened::Refused;
    };
    let mut dir: OwnedFd = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)
    {
        Ok(dir) => dir.into(),
        Err(e) => return opened_error(e),
    };
    for folder in folders {
        dir = match open_at(&dir, folder, libc::O_DIRECTORY | libc::O_NOFOLLOW) {
            Ok(fd) => fd,
            Err(e) => return opened_error(e),
        };
    }
    let file = match open_at(&dir, file_name, libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY) {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => return opened_error(e),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => Opened::File(file, meta.len()),
        Ok(_) => Opened::Refused,
        Err(e) => Opened::Failed(e.to_string()),
    }
}

/// `openat(dir, name, O_RDONLY | O_CLOEXEC | flags)`.
fn open_at(dir: &OwnedFd, name: &std::ffi::OsStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(name.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated string, both alive for the call;
    // a non-negative result is a new descriptor that nothing else owns.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | flags) };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: see above; the descriptor is owned from here on.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// An open that failed: missing, refused (a symlink where a folder or the file should be: `ELOOP`,
/// `ENOTDIR`), or another error.
fn opened_error(error: std::io::Error) -> Opened {
    match error.raw_os_error() {
        Some(libc::ENOENT) => Opened::Missing,
        Some(libc::ELOOP | libc::ENOTDIR) => Opened::Refused,
        _ => Opened::Failed(error.to_string()),
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
