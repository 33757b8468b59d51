//! Object keys. Every key is built from a validated id, so traversal payloads cannot reach storage.

use object_store::path::Path as ObjectPath;

use crate::ids::valid_id;

/// A storage key; only constructible from validated ids or from a key this module produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(ObjectPath);

impl Key {
    /// The source archive of a build.
    pub fn source(build_id: &str) -> Option<Key> {
        Self::under_build(build_id, "source.zip")
    }

    /// The encrypted certs bundle of a build.
    pub fn certs(build_id: &str) -> Option<Key> {
        Self::under_build(build_id, "certs.bin")
    }

    /// A result upload of a build; `upload_id` is a fresh id per upload, so a late or stale upload
    /// can never overwrite the stored result.
    pub fn result(build_id: &str, upload_id: &str) -> Option<Key> {
        valid_id(upload_id).then(|| Self::under_build(build_id, &format!("result-{upload_id}.bin")))?
    }

    /// A result upload recorded as a pending write before its build is known (a spare key,
    /// `queue::SpareKeys`): flat, one object per upload id, named by the build's row once the completion
    /// links it. `upload_id` is fresh per upload, as for [`Key::result`].
    pub fn loose_result(upload_id: &str) -> Option<Key> {
        valid_id(upload_id).then(|| Key(ObjectPath::from_iter(["results", &format!("{upload_id}.bin")])))
    }

    /// Whether this key is a [`Key::loose_result`] (under no build).
    pub fn is_loose_result(&self) -> bool {
        self.as_str().starts_with("results/")
    }

    /// Where an upload streams before its build is known; renamed into place afterwards. Flat (no
    /// directory per upload), so nothing is left once the object is moved or deleted (R44).
    pub fn staging(upload_id: &str) -> Option<Key> {
        valid_id(upload_id).then(|| Key(ObjectPath::from_iter(["staging", &format!("{upload_id}.bin")])))
    }

    /// A key read back from the database; accepted only in the shapes above.
    pub fn parse(stored: &str) -> Option<Key> {
        if let Some(upload) = stored.strip_prefix("results/").and_then(|f| f.strip_suffix(".bin")) {
            return Self::loose_result(upload);
        }
        let mut parts = stored.split('/');
        let (Some("builds"), Some(id), Some(file), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let file_ok = file == "source.zip"
            || file == "certs.bin"
            || file
                .strip_prefix("result-")
                .and_then(|rest| rest.strip_suffix(".bin"))
                .is_some_and(valid_id);
        if file_ok { Self::under_build(id, file) } else { None }
    }

    fn under_build(build_id: &str, file: &str) -> Option<Key> {
        valid_id(build_id).then(|| Key(ObjectPath::from_iter(["builds", build_id, file])))
    }

    pub fn path(&self) -> &ObjectPath {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_round_trip() {
        let key = Key::result("abc_DEF-1", "u3").unwrap();
        assert_eq!(key.as_str(), "builds/abc_DEF-1/result-u3.bin");
        assert_eq!(Key::parse(key.as_str()), Some(key.clone()));
        assert_eq!(Key::source("x").unwrap().as_str(), "builds/x/source.zip");
        let loose = Key::loose_result("u4").unwrap();
        assert_eq!(loose.as_str(), "results/u4.bin");
        assert_eq!(Key::parse(loose.as_str()), Some(loose.clone()));
        assert!(loose.is_loose_result() && !key.is_loose_result());
        assert!(Key::parse("results/../x.bin").is_none());
        assert!(Key::parse("results/a/b.bin").is_none());
    }

    #[test]
    fn traversal_is_impossible() {
        for bad in ["..", "../x", "%2e%2e", "/etc/passwd", "a\0b", "ü"] {
            assert!(Key::source(bad).is_none(), "{bad:?}");
        }
        assert!(Key::parse("builds/../source.zip").is_none());
        assert!(Key::parse("builds/a/../../etc").is_none());
        assert!(Key::parse("builds/a/passwd").is_none());
    }

    proptest! {
        #[test]
        fn every_key_stays_under_its_build(id in "\\PC{0,70}", upload in "[a-z0-9]{1,8}") {
            for key in [Key::source(&id), Key::certs(&id), Key::result(&id, &upload)].into_iter().flatten() {
                let s = key.as_str().to_string();
                let parts: Vec<&str> = s.split('/').collect();
                prop_assert_eq!(parts.len(), 3);
                prop_assert_eq!(parts[0], "builds");
                prop_assert_eq!(parts[1], id.as_str());
                prop_assert!(!s.contains(".."));
                prop_assert_eq!(Key::parse(&s), Some(key.clone()));
            }
        }
    }
}
