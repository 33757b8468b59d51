//! Identifiers and secrets.
//!
//! Ids are nanoid-style strings; any id that arrives from outside is validated by [`valid_id`] before it
//! reaches the database or a storage path. Secrets (tokens, OTPs) are 32 CSPRNG bytes in base64url; only
//! their SHA-256 is stored, and comparisons are constant-time.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const ALPHABET: &[u8; 64] = b"ModuleSymbhasOwnPr-0123456789ABCDEFGHNRVfgctiUvz_KqYTJkLxpZXIjQW";
/// Length of generated ids (nanoid's default).
pub const ID_LEN: usize = 21;
/// Longest id accepted from a client.
pub const MAX_ID_LEN: usize = 64;

/// A fresh 21-character id from `A-Za-z0-9_-`.
pub fn new_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LEN)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// `^[A-Za-z0-9_-]{1,64}$`: the only shape of id that may touch the database or the filesystem.
pub fn valid_id(candidate: &str) -> bool {
    !candidate.is_empty()
        && candidate.len() <= MAX_ID_LEN
        && candidate
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A secret for a client: 32 random bytes, base64url without padding.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a secret, the only form in which secrets are stored.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    secret_digest(secret).to_vec()
}

/// SHA-256 of a secret as a fixed array (what [`hash_secret`] stores).
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Constant-time comparison of two secrets' digests.
pub fn digests_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// Constant-time comparison of a presented secret against an expected one, via fixed-length digests.
pub fn secret_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

/// Decodes a base64 (standard or url-safe) 32-byte key.
pub fn decode_key32(encoded: &str) -> Option<[u8; 32]> {
    let trimmed = encoded.trim();
    let bytes = STANDARD
        .decode(trimmed)
        .or_else(|_| URL_SAFE_NO_PAD.decode(trimmed))
        .ok()?;
    bytes.try_into().ok()
}

/// A fresh 32-byte key in standard base64 (`expo-controller gen-key`).
pub fn new_key32() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    STANDARD.encode(bytes)
}

/// Lower-case hex, for digests shown to clients.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = new_id();
        let b = new_id();
        assert_eq!(a.len(), ID_LEN);
        assert!(valid_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn traversal_payloads_are_rejected() {
        for bad in [
            "", "..", "../etc", "%2e%2e", "a/b", "a\\b", "/abs", "a\0b", "é", "a b", "a.b",
        ] {
            assert!(!valid_id(bad), "{bad:?} must be rejected");
        }
        assert!(!valid_id(&"a".repeat(65)));
        assert!(valid_id(&"a".repeat(64)));
    }

    #[test]
    fn secrets_are_long_and_hashed() {
        let s = new_secret();
        assert_eq!(s.len(), 43);
        assert_eq!(hash_secret(&s).len(), 32);
        assert!(secret_matches(&s, &s));
        assert!(!secret_matches(&s, &new_secret()));
    }

    #[test]
    fn keys_round_trip() {
        let key = new_key32();
        assert!(decode_key32(&key).is_some());
        assert!(decode_key32("c2hvcnQ=").is_none());
    }

    proptest! {
        #[test]
        fn valid_id_accepts_exactly_the_syntax(s in "\\PC{0,80}") {
            let expected = !s.is_empty() && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            prop_assert_eq!(valid_id(&s), expected);
        }

        #[test]
        fn valid_ids_never_contain_path_syntax(s in "[A-Za-z0-9_./\\\\%-]{1,70}") {
            if valid_id(&s) {
                prop_assert!(!s.contains('/') && !s.contains('\\') && !s.contains('.') && !s.contains('%'));
            }
        }
    }
}
