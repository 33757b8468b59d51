//! Fuzzes the certs bundle reader (zip parsing with bounds and name checks) and the normaliser.
#![no_main]

use expo_controller::storage::bundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = bundle::read_certs(data) {
        assert!(certs.p12.len() as u64 <= bundle::MAX_UNCOMPRESSED);
    }
    if let Ok(normalised) = bundle::normalise(Some(data), Some(b"profile")) {
        // Whatever was accepted must read back.
        let _ = bundle::read_certs(&normalised);
    }
});
