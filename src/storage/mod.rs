//! Artifact storage: sources, encrypted certs bundles and results, in an object store (local
//! filesystem by default). Object keys are derived only from ids that passed [`crate::ids::valid_id`],
//! so no client input ever becomes a path (R8). Writes stream with bounded memory and are published
//! atomically: an aborted or oversized upload leaves nothing behind.

pub mod backend;
pub mod bundle;
pub mod certs;
pub mod copy;
mod keys;
mod read;
mod sweep;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::aws::AmazonS3;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

pub use backend::StorageTarget;
pub use keys::Key;
pub use read::ObjectRead;

/// Bytes buffered before a part is handed to a local store; bounds memory per upload.
const PART_SIZE: usize = 1024 * 1024;
/// Part size on S3 (S3's minimum, 5 MiB, except the last part); with [`S3_PARTS_IN_FLIGHT`] it bounds
/// an upload's memory to about 4 × 5 MiB (the parts in flight and the one filling).
const S3_PART_SIZE: usize = 5 * 1024 * 1024;
/// Most parts of one S3 multipart upload.
const S3_MAX_PARTS: u64 = 10_000;
/// Parts sent concurrently per upload on S3: three keep the store busy while the next part fills (with
/// two 6 MiB parts, a large result moved at 84–89 % of a plain client's speed; P8).
const S3_PARTS_IN_FLIGHT: usize = 3;

/// Where artifacts live.
#[derive(Clone, Debug)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    backend: Arc<Backend>,
}

/// The concrete store behind [`Storage`].
#[derive(Debug)]
enum Backend {
    Local {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: Option<ObjectPath>,
        signer: Arc<AmazonS3>,
    },
}

/// A completed write.
#[derive(Debug, Clone)]
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

/// Why a streamed write did not complete. Nothing is left in storage in any case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("stream exceeded the limit of {0} bytes")]
    TooLarge(u64),
    #[error("request body failed: {0}")]
    Body(String),
    #[error("storage failed: {0}")]
    Store(#[from] object_store::Error),
}

/// Metadata of a stored object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

impl Storage {
    /// Local filesystem storage under `root` (created if missing); `fsync` makes every completed
    /// write durable before it is acknowledged.
    pub fn local(root: &Path, fsync: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        let store = LocalFileSystem::new_with_prefix(root)?
            .with_automatic_cleanup(true)
            .with_fsync(fsync);
        Ok(Self {
            store: Arc::new(store),
            backend: Arc::new(Backend::Local {
                root: root.to_path_buf(),
            }),
        })
    }

    /// A human description (`local:/dir` or `s3://bucket/prefix`), never with credentials.
    pub fn describe(&self) -> String {
        match self.backend.as_ref() {
            Backend::Local { root } => format!("local:{}", root.display()),
            Backend::S3 { bucket, prefix, .. } => match prefix {
                Some(p) => format!("s3://{bucket}/{p}"),
                None => format!("s3://{bucket}"),
            },
        }
    }

    /// True on an S3-compatible store (shared by every instance).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend.as_ref(), Backend::S3 { .. })
    }

    /// Part size and parts in flight for a body of at most `limit` bytes. On S3 a part grows past
    /// [`S3_PART_SIZE`] only when `limit` would need more than S3's 10,000 parts.
    fn part_size(&self, limit: u64) -> (usize, usize) {
        match self.backend.as_ref() {
            Backend::Local { .. } => (PART_SIZE, 1),
            Backend::S3 { .. } => {
                let needed = usize::try_from(limit.div_ceil(S3_MAX_PARTS)).unwrap_or(usize::MAX);
                (S3_PART_SIZE.max(needed), S3_PARTS_IN_FLIGHT)
            }
        }
    }

    /// Checks that the store answers (bucket reachable, credentials accepted) by listing one prefix.
    pub async fn check(&self) -> object_store::Result<()> {
        let probe = ObjectPath::from("staging");
        self.store.list_with_delimiter(Some(&probe)).await.map(|_| ())
    }

    /// Streams `body` to `key`, refusing more than `limit` bytes. The object appears only when
    /// the whole stream arrived; on any error the partial (multipart) upload is aborted.
    ///
    /// On local storage a body that fits in one part (sources and most results) is stored in one
    /// piece once it has arrived: a single blocking call creates a staging file, writes it (fsyncs it
    /// when configured) and renames it into place, instead of a multipart upload's three. Larger
    /// bodies, and every body on S3, stream as multipart uploads of `part_size` parts (an empty body is
    /// stored as an empty object: an empty multipart upload is invalid on S3).
    pub async fn write_stream<S, E>(&self, key: &Key, mut body: S, limit: u64) -> Result<Stored, WriteError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (part_size, in_flight) = self.part_size(limit);
        // On S3 the multipart upload opens with the first bytes, as before (a PUT of up to a whole
        // part would hold 6 MiB per upload before anything reaches the store).
        let one_piece = match self.backend.as_ref() {
            Backend::Local { .. } => part_size,
            Backend::S3 { .. } => 0,
        };
        let mut progress = Progress::default();
        let mut head = Vec::new();
        let mut buffered = 0;
        while buffered <= one_piece {
            let Some(chunk) = body.next().await else {
                self.store.put(key.path(), head.into_iter().collect()).await?;
                metrics::counter!(crate::metrics::UPLOAD_BYTES).increment(progress.size);
                return Ok(progress.stored());
            };
            let chunk = progress.add(chunk, limit)?;
            buffered += chunk.len();
            head.push(chunk);
        }
        let upload = self.store.put_multipart(key.path()).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
        match copy_parts(&mut writer, head, body, limit, in_flight, progress).await {
            Ok(stored) => match writer.finish().await {
                Ok(_) => {
                    metrics::counter!(crate::metrics::UPLOAD_BYTES).increment(stored.size);
                    Ok(stored)
                }
                Err(e) => {
                    let _ = self.store.delete(key.path()).await;
                    Err(e.into())
                }
            },
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(key = key.as_str(), error = %abort, "could not abort a multipart upload");
                }
                Err(e)
            }
        }
    }

    /// Stores a small object in one piece.
    pub async fn put(&self, key: &Key, bytes: Bytes) -> Result<(), WriteError> {
        self.store.put(key.path(), PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Opens an object, optionally a byte range of it, as a stream.
    pub async fn get(&self, key: &Key, range: Option<GetRange>) -> object_store::Result<GetResult> {
        let options = GetOptions {
            range,
            ..Default::default()
        };
        self.store.get_opts(key.path(), options).await
    }

    /// Reads a whole (small) object.
    pub async fn read_all(&self, key: &Key) -> object_store::Result<Bytes> {
        self.store.get(key.path()).await?.bytes().await
    }

    /// Size of an object.
    pub async fn size(&self, key: &Key) -> object_store::Result<u64> {
        Ok(self.store.head(key.path()).await?.size)
    }

    /// Deletes an object; a missing object is not an error.
    pub async fn delete(&self, key: &Key) -> object_store::Result<()> {
        match self.store.delete(key.path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves an object to a new key.
    pub async fn rename(&self, from: &Key, to: &Key) -> object_store::Result<()> {
        self.store.rename(from.path(), to.path()).await
    }

    /// Copies an object (retry of a build reuses its source).
    pub async fn copy(&self, from: &Key, to: &Key) -> object_store::Result<()> {
        self.store.copy(from.path(), to.path()).await
    }

    /// A short-lived presigned GET URL for `key`, on stores that sign (S3); `None` on local storage.
    pub async fn presigned_get(&self, key: &Key, expires_in: Duration) -> object_store::Result<Option<String>> {
        let Backend::S3 { prefix, signer, .. } = self.backend.as_ref() else {
            return Ok(None);
        };
        let path = match prefix {
            Some(prefix) => prefix.parts().chain(key.path().parts()).collect(),
            None => key.path().clone(),
        };
        let url = signer.signed_url(axum::http::Method::GET, &path, expires_in).await?;
        Ok(Some(url.to_string()))
    }

    /// Every artifact object with its size (for `storage copy`): those under `builds/` and the loose
    /// results under `results/`.
    pub fn list_artifacts(&self) -> impl Stream<Item = object_store::Result<ObjectInfo>> + '_ {
        let (builds, results) = (ObjectPath::from("builds"), ObjectPath::from("results"));
        self.store
            .list(Some(&builds))
            .chain(self.store.list(Some(&results)))
            .map(|meta| {
                meta.map(|m| ObjectInfo {
                    key: m.location.to_string(),
                    size: m.size,
                })
            })
    }
}

/// Size and digest of a body so far.
#[derive(Default)]
struct Progress {
    hasher: Sha256,
    size: u64,
}

impl Progress {
    /// Counts and hashes one chunk of the body, refusing it past `limit`.
    fn add<E: std::fmt::Display>(&mut self, chunk: Result<Bytes, E>, limit: u64) -> Result<Bytes, WriteError> {
        let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
        self.size += chunk.len() as u64;
        if self.size > limit {
            return Err(WriteError::TooLarge(limit));
        }
        self.hasher.update(&chunk);
        Ok(chunk)
    }

    fn stored(self) -> Stored {
        Stored {
            size: self.size,
            sha256: crate::ids::hex(&self.hasher.finalize()),
        }
    }
}

/// Hands the chunks already read (`head`) and then the rest of `body` to the multipart writer.
async fn copy_parts<S, E>(
    writer: &mut WriteMultipart,
    head: Vec<Bytes>,
    mut body: S,
    limit: u64,
    in_flight: usize,
    mut progress: Progress,
) -> Result<Stored, WriteError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    for chunk in head {
        writer.wait_for_capacity(in_flight).await?;
        writer.put(chunk);
    }
    while let Some(chunk) = body.next().await {
        let chunk = progress.add(chunk, limit)?;
        writer.wait_for_capacity(in_flight).await?;
        writer.put(chunk);
    }
    Ok(progress.stored())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chunks(data: &[u8], cuts: &[usize]) -> Vec<Result<Bytes, std::io::Error>> {
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            let end = (start + cut).min(data.len());
            out.push(Ok(Bytes::copy_from_slice(&data[start..end])));
            start = end;
        }
        out.push(Ok(Bytes::copy_from_slice(&data[start..])));
        out
    }

    fn files_under(root: &Path) -> usize {
        walk(root)
    }

    fn walk(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 })
                    .sum()
            })
            .unwrap_or(0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A streamed part is stored whole with the right size and digest whatever its chunking, or,
        /// past the limit, refused with nothing left behind.
        #[test]
        fn streamed_parts_are_exact_or_leave_nothing(
            data in proptest::collection::vec(any::<u8>(), 0..(3 * PART_SIZE)),
            cuts in proptest::collection::vec(0usize..(PART_SIZE + 10), 0..6),
            limit in 0u64..(3 * PART_SIZE as u64),
        ) {
            let root = std::env::temp_dir().join(format!("expo-storage-prop-{}", crate::ids::new_id()));
            let storage = Storage::local(&root, false).unwrap();
            let key = Key::source("prop").unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let stream = futures_util::stream::iter(chunks(&data, &cuts));
            let outcome = runtime.block_on(storage.write_stream(&key, stream, limit));
            if data.len() as u64 > limit {
                prop_assert!(matches!(outcome, Err(WriteError::TooLarge(_))));
                prop_assert_eq!(files_under(&root), 0);
            } else {
                let stored = outcome.unwrap();
                prop_assert_eq!(stored.size, data.len() as u64);
                prop_assert_eq!(stored.sha256, crate::ids::hex(&Sha256::digest(&data)));
                let back = runtime.block_on(storage.read_all(&key)).unwrap();
                prop_assert_eq!(back.as_ref(), data.as_slice());
                prop_assert_eq!(files_under(&root), 1);
            }
            let _ = std::fs::remove_dir_all(&root);
        }
    }

    #[test]
    fn a_failing_body_leaves_nothing() {
        let root = std::env::temp_dir().join(format!("expo-storage-fail-{}", crate::ids::new_id()));
        let storage = Storage::local(&root, false).unwrap();
        let key = Key::source("broken").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let body = futures_util::stream::iter(vec![
            Ok(Bytes::from(vec![1u8; PART_SIZE + 5])),
            Err(std::io::Error::other("client went away")),
        ]);
        let outcome = runtime.block_on(storage.write_stream(&key, body, u64::MAX));
        assert!(matches!(outcome, Err(WriteError::Body(_))));
        assert_eq!(files_under(&root), 0);
        let _ = std::fs::remove_dir_all(&root);
    }
}
