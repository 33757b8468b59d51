//! `expo-controller storage copy`: copies every artifact of one store into another (a local directory
//! into a bucket), verifying size and SHA-256 of each copy. Resumable: an object already present at
//! the destination with the same size and digest is skipped.

use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::{Key, Storage, WriteError};

/// What a copy did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub copied: u64,
    pub skipped: u64,
    pub bytes: u64,
    /// Objects whose key is not an artifact key (left alone, reported).
    pub ignored: Vec<String>,
}

/// SHA-256 and size of a stored object, read as a stream.
async fn digest(storage: &Storage, key: &Key) -> object_store::Result<(u64, String)> {
    let mut stream = storage.get(key, None).await?.into_stream();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((size, crate::ids::hex(&hasher.finalize())))
}

/// Copies every artifact of `from` (under `builds/` and `results/`) into `to`; `progress` receives one line per object.
pub async fn copy_all(from: &Storage, to: &Storage, mut progress: impl FnMut(&str)) -> anyhow::Result<CopyReport> {
    let objects: Vec<_> = from.list_artifacts().try_collect().await?;
    let total = objects.len();
    let mut report = CopyReport::default();
    for (n, object) in objects.into_iter().enumerate() {
        let Some(key) = Key::parse(&object.key) else {
            progress(&format!(
                "[{}/{total}] {} ignored (not an artifact key)",
                n + 1,
                object.key
            ));
            report.ignored.push(object.key);
            continue;
        };
        let (size, sha256) = digest(from, &key).await?;
        let present = match to.size(&key).await {
            Ok(existing) if existing == size => Some(digest(to, &key).await?),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if present.as_ref().is_some_and(|(_, d)| *d == sha256) {
            report.skipped += 1;
            progress(&format!(
                "[{}/{total}] {} already present ({size} bytes)",
                n + 1,
                key.as_str()
            ));
            continue;
        }
        let body = from.get(&key, None).await?.into_stream();
        let stored = to.write_stream(&key, body, u64::MAX).await.map_err(|e| match e {
            WriteError::Store(e) => anyhow::Error::from(e),
            other => anyhow::anyhow!("{other}"),
        })?;
        let (copied_size, copied_sha) = digest(to, &key).await?;
        if stored.sha256 != sha256 || copied_sha != sha256 || copied_size != size {
            anyhow::bail!(
                "verification failed for {}: source {size} bytes sha256 {sha256}, copy {copied_size} bytes sha256 {copied_sha}",
                key.as_str()
            );
        }
        report.copied += 1;
        report.bytes += size;
        progress(&format!(
            "[{}/{total}] {} copied and verified ({size} bytes)",
            n + 1,
            key.as_str()
        ));
    }
    Ok(report)
}
