//! Certificates at rest: AES-256-GCM with a random 96-bit nonce per object (`nonce || ciphertext`).

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::Rng;

const NONCE_LEN: usize = 12;

/// Encrypts a certs bundle with the configured key.
pub fn encrypt(key: &[u8; 32], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let nonce_bytes: [u8; NONCE_LEN] = rand::rng().random();
    let mut out = nonce_bytes.to_vec();
    // Encryption with a valid key and nonce length cannot fail for in-memory buffers.
    if let Ok(ciphertext) = cipher.encrypt(&Nonce::from(nonce_bytes), plaintext) {
        out.extend_from_slice(&ciphertext);
    }
    out
}

/// Decrypts what [`encrypt`] produced; `None` if the key is wrong or the data was altered.
pub fn decrypt(key: &[u8; 32], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    Aes256Gcm::new(key.into()).decrypt(&Nonce::from(nonce), ciphertext).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let key = [7u8; 32];
        let sealed = encrypt(&key, b"secret p12");
        assert_ne!(&sealed[NONCE_LEN..], b"secret p12");
        assert_eq!(decrypt(&key, &sealed).as_deref(), Some(&b"secret p12"[..]));
        assert!(decrypt(&[8u8; 32], &sealed).is_none());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(decrypt(&key, &altered).is_none());
    }
}
