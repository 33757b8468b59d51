//! Choosing and opening the store: `CONTROLLER_STORAGE_URL` (`s3://bucket[/prefix]`, `file:///dir`)
//! or, when unset, the local directory `CONTROLLER_STORAGE_DIR`. S3 endpoint, region and credentials
//! come from the standard `AWS_*` variables read by `object_store`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use super::{Backend, Storage};

/// Where the configuration says artifacts live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageTarget {
    Local(PathBuf),
    S3 { bucket: String, prefix: Option<String> },
}

impl StorageTarget {
    /// Parses `CONTROLLER_STORAGE_URL`; `None` means the local directory `dir`.
    pub fn parse(url: Option<&str>, dir: &Path) -> Result<Self, String> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(Self::Local(dir.to_path_buf()));
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(
                    "CONTROLLER_STORAGE_URL: a file:// URL needs an absolute path (file:///var/lib/expo)".into(),
                );
            }
            return Ok(Self::Local(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err("CONTROLLER_STORAGE_URL must be s3://bucket[/prefix] or file:///absolute/dir".into());
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !bucket_ok {
            return Err(format!("CONTROLLER_STORAGE_URL: `{bucket}` is not a valid bucket name"));
        }
        if prefix.contains("..") || prefix.split('/').any(str::is_empty) && !prefix.is_empty() {
            return Err("CONTROLLER_STORAGE_URL: the prefix must be plain path segments".into());
        }
        Ok(Self::S3 {
            bucket: bucket.to_string(),
            prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
        })
    }

    /// A description without credentials.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(dir) => format!("local:{}", dir.display()),
            Self::S3 { bucket, prefix: None } => format!("s3://{bucket}"),
            Self::S3 {
                bucket,
                prefix: Some(p),
            } => format!("s3://{bucket}/{p}"),
        }
    }
}

/// Retries inside a request: a few quick attempts, bounded in time, so an unreachable store becomes a
/// 503 within seconds instead of holding requests for minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(10),
    }
}

/// Whether request bodies go unsigned (`UNSIGNED-PAYLOAD`) when `AWS_UNSIGNED_PAYLOAD` does not say:
/// over HTTPS (AWS's own endpoints when none is set), where TLS already protects the body in
/// transit and hashing every part a second time for the signature would double the hashing of each
/// upload (the result's own SHA-256 is computed anyway); over plain HTTP the body stays signed, as the
/// signature is then its only integrity check.
fn unsigned_payload_by_default(endpoint: Option<&str>) -> bool {
    endpoint.is_none_or(|e| e.get(..8).is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://")))
}

impl Storage {
    /// Opens the configured store (not yet checked: see [`Storage::check`]).
    pub fn open(target: &StorageTarget, fsync: bool) -> anyhow::Result<Self> {
        match target {
            StorageTarget::Local(dir) => Self::local(dir, fsync),
            StorageTarget::S3 { bucket, prefix } => Self::s3(bucket, prefix.as_deref()),
        }
    }

    /// An S3-compatible bucket, configured from the `AWS_*` environment (path-style requests unless
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`).
    pub fn s3(bucket: &str, prefix: Option<&str>) -> anyhow::Result<Self> {
        // Whole-request timeouts would cut long downloads; a stalled read is cut instead.
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(30));
        // Our client options first, then every `AWS_*` variable on top (as `from_env` would), so
        // `AWS_ALLOW_HTTP` and friends are not reset by `with_client_options`.
        let mut builder = AmazonS3Builder::new()
            .with_client_options(client)
            .with_retry(retry_config());
        let mut payload_signing_chosen = false;
        for (name, value) in std::env::vars() {
            if name.starts_with("AWS_")
                && let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            {
                payload_signing_chosen |= key == AmazonS3ConfigKey::UnsignedPayload;
                builder = builder.with_config(key, value);
            }
        }
        if !payload_signing_chosen {
            let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
            builder = builder.with_unsigned_payload(unsigned_payload_by_default(endpoint.as_deref()));
        }
        let signer = Arc::new(
            builder
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| anyhow::anyhow!("S3 storage configuration: {e}"))?,
        );
        let prefix = prefix.map(ObjectPath::from);
        let store: Arc<dyn ObjectStore> = match &prefix {
            Some(p) => Arc::new(PrefixStore::new(signer.clone(), p.clone())),
            None => signer.clone(),
        };
        Ok(Self {
            store,
            backend: Arc::new(Backend::S3 {
                bucket: bucket.to_string(),
                prefix,
                signer,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_go_unsigned_only_over_https() {
        assert!(unsigned_payload_by_default(None));
        assert!(unsigned_payload_by_default(Some("https://s3.eu-west-1.amazonaws.com")));
        assert!(unsigned_payload_by_default(Some("HTTPS://minio.example")));
        assert!(!unsigned_payload_by_default(Some("http://127.0.0.1:9000")));
        assert!(!unsigned_payload_by_default(Some("")));
    }

    #[test]
    fn urls_parse() {
        let dir = Path::new("/d");
        assert_eq!(StorageTarget::parse(None, dir), Ok(StorageTarget::Local("/d".into())));
        assert_eq!(
            StorageTarget::parse(Some(""), dir),
            Ok(StorageTarget::Local("/d".into()))
        );
        assert_eq!(
            StorageTarget::parse(Some("file:///srv/x"), dir),
            Ok(StorageTarget::Local("/srv/x".into()))
        );
        assert_eq!(
            StorageTarget::parse(Some("s3://my-bucket"), dir),
            Ok(StorageTarget::S3 {
                bucket: "my-bucket".into(),
                prefix: None
            })
        );
        assert_eq!(
            StorageTarget::parse(Some("s3://my-bucket/a/b/"), dir),
            Ok(StorageTarget::S3 {
                bucket: "my-bucket".into(),
                prefix: Some("a/b".into())
            })
        );
        for bad in [
            "s3://",
            "s3://Bad_Bucket",
            "s3://ok-bucket/a//b",
            "s3://ok-bucket/../x",
            "http://x",
            "file://rel",
        ] {
            assert!(StorageTarget::parse(Some(bad), dir).is_err(), "{bad}");
        }
    }
}
