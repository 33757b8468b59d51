//! Certs bundles: what a submitter uploads (a zip of `*.p12`, `password.txt`, `*.mobileprovision`, or a
//! raw PKCS#12 file, plus an optional separate provisioning profile) normalised into one zip, and read
//! back for `certs-secure`. Unzipping is bounded: 50 MiB uncompressed in total, at most 64 entries, and
//! entry names with `..`, a leading `/` or `\`, or a drive prefix are refused.

use std::io::{Cursor, Read, Write};

use zip::write::SimpleFileOptions;

/// Largest total uncompressed size read from a bundle.
pub const MAX_UNCOMPRESSED: u64 = 50 * 1024 * 1024;
/// Most entries read from a bundle.
pub const MAX_ENTRIES: usize = 64;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("not a readable zip archive")]
    NotZip,
    #[error("unsafe entry name")]
    UnsafeName,
    #[error("bundle too large when uncompressed")]
    TooLarge,
    #[error("too many entries")]
    TooManyEntries,
    #[error("no certificate in bundle")]
    NoCertificate,
}

/// The contents `certs-secure` hands to a build VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certs {
    pub p12: Vec<u8>,
    pub password: String,
    pub profiles: Vec<Vec<u8>>,
}

/// Whether bytes start like a zip archive.
pub fn looks_like_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// Normalises an upload into one bundle zip. A zip is checked and kept with the profile added; anything
/// else is taken as a raw PKCS#12 file and wrapped as `certificate.p12`.
pub fn normalise(certs: Option<&[u8]>, profile: Option<&[u8]>) -> Result<Vec<u8>, BundleError> {
    let mut entries: Vec<(String, Vec<u8>)> = match certs {
        Some(bytes) if looks_like_zip(bytes) => read_entries(bytes)?,
        Some(bytes) => vec![("certificate.p12".to_string(), bytes.to_vec())],
        None => Vec::new(),
    };
    if let Some(profile) = profile {
        entries.push((unique_name(&entries, "profile", "mobileprovision"), profile.to_vec()));
    }
    write_zip(&entries)
}

/// Reads a bundle for `certs-secure`: the first `*.p12`, `password.txt` (trimmed, `""` if absent) and
/// every `*.mobileprovision`.
pub fn read_certs(bundle: &[u8]) -> Result<Certs, BundleError> {
    let entries = read_entries(bundle)?;
    let mut p12 = None;
    let mut password = String::new();
    let mut profiles = Vec::new();
    for (name, data) in entries {
        let file = name.rsplit('/').next().unwrap_or(&name).to_ascii_lowercase();
        if file.ends_with(".p12") && p12.is_none() {
            p12 = Some(data);
        } else if file == "password.txt" {
            password = String::from_utf8_lossy(&data).trim().to_string();
        } else if file.ends_with(".mobileprovision") {
            profiles.push(data);
        }
    }
    Ok(Certs {
        p12: p12.ok_or(BundleError::NoCertificate)?,
        password,
        profiles,
    })
}

/// Whether a zip entry name is safe to use.
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.starts_with('\\')
        && !name.contains('\0')
        && !name.split(['/', '\\']).any(|part| part == "..")
        && name.chars().nth(1).is_none_or(|c| c != ':')
}

/// Every file entry of a zip, with the bounds above.
fn read_entries(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|_| BundleError::NotZip)?;
    if archive.len() > MAX_ENTRIES {
        return Err(BundleError::TooManyEntries);
    }
    let mut budget = MAX_UNCOMPRESSED;
    let mut entries = Vec::new();
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(|_| BundleError::NotZip)?;
        let name = entry.name().map_err(|_| BundleError::UnsafeName)?.to_string();
        if !safe_name(&name) {
            return Err(BundleError::UnsafeName);
        }
        if entry.is_dir() {
            continue;
        }
        // Read at most budget + 1 bytes whatever the header claims, so a lying header cannot blow memory.
        let mut data = Vec::new();
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut data)
            .map_err(|_| BundleError::NotZip)?;
        if data.len() as u64 > budget {
            return Err(BundleError::TooLarge);
        }
        budget -= data.len() as u64;
        entries.push((name, data));
    }
    Ok(entries)
}

fn write_zip(entries: &[(String, Vec<u8>)]) -> Result<Vec<u8>, BundleError> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        writer
            .start_file(name.as_str(), options)
            .map_err(|_| BundleError::NotZip)?;
        writer.write_all(data).map_err(|_| BundleError::NotZip)?;
    }
    Ok(writer.finish().map_err(|_| BundleError::NotZip)?.into_inner())
}

fn unique_name(entries: &[(String, Vec<u8>)], stem: &str, extension: &str) -> String {
    (0..)
        .map(|n| {
            if n == 0 {
                format!("{stem}.{extension}")
            } else {
                format!("{stem}-{n}.{extension}")
            }
        })
        .find(|candidate| entries.iter().all(|(name, _)| name != candidate))
        .unwrap_or_else(|| format!("{stem}.{extension}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let owned: Vec<(String, Vec<u8>)> = entries.iter().map(|(n, d)| (n.to_string(), d.to_vec())).collect();
        write_zip(&owned).unwrap()
    }

    #[test]
    fn a_zip_bundle_is_read_back() {
        let bundle = zip_of(&[
            ("dist/cert.p12", b"P12"),
            ("password.txt", b" hunter2\n"),
            ("a.mobileprovision", b"PROF"),
        ]);
        let certs = read_certs(&normalise(Some(&bundle), Some(b"EXTRA")).unwrap()).unwrap();
        assert_eq!(certs.p12, b"P12");
        assert_eq!(certs.password, "hunter2");
        assert_eq!(certs.profiles, vec![b"PROF".to_vec(), b"EXTRA".to_vec()]);
    }

    #[test]
    fn a_raw_p12_is_wrapped() {
        let certs = read_certs(&normalise(Some(b"\x30\x82raw-pkcs12"), Some(b"PROF")).unwrap()).unwrap();
        assert_eq!(certs.p12, b"\x30\x82raw-pkcs12");
        assert_eq!(certs.password, "");
        assert_eq!(certs.profiles, vec![b"PROF".to_vec()]);
    }

    #[test]
    fn unsafe_names_are_refused() {
        for name in ["../evil.p12", "/abs.p12", "\\win.p12", "a/../../b.p12", "C:evil.p12"] {
            assert!(!safe_name(name), "{name}");
            assert_eq!(
                read_certs(&zip_of(&[(name, b"x")])),
                Err(BundleError::UnsafeName),
                "{name}"
            );
        }
        assert!(safe_name("dir/cert.p12"));
    }

    #[test]
    fn a_zip_bomb_is_refused() {
        let big = vec![0u8; (MAX_UNCOMPRESSED + 1) as usize];
        let bomb = zip_of(&[("a.p12", &big)]);
        assert!(bomb.len() < 1024 * 1024, "deflate makes it small");
        assert_eq!(read_certs(&bomb), Err(BundleError::TooLarge));
    }

    #[test]
    fn garbage_and_missing_certificates_are_refused() {
        assert_eq!(read_certs(b"PK\x03\x04garbage"), Err(BundleError::NotZip));
        assert_eq!(
            read_certs(&zip_of(&[("readme.txt", b"x")])),
            Err(BundleError::NoCertificate)
        );
        assert_eq!(normalise(Some(b"PK\x03\x04garbage"), None), Err(BundleError::NotZip));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read_certs(&bytes);
            let _ = normalise(Some(&bytes), None);
        }

        #[test]
        fn arbitrary_zip_prefixed_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut bytes = b"PK\x03\x04".to_vec();
            bytes.extend(tail);
            let _ = read_certs(&bytes);
        }

        #[test]
        fn bundles_round_trip(p12 in proptest::collection::vec(any::<u8>(), 1..512),
                              profile in proptest::collection::vec(any::<u8>(), 0..256)) {
            if looks_like_zip(&p12) { return Ok(()); }
            let bundle = normalise(Some(&p12), Some(&profile)).unwrap();
            let certs = read_certs(&bundle).unwrap();
            prop_assert_eq!(certs.p12, p12);
            prop_assert_eq!(certs.profiles, vec![profile]);
        }

        #[test]
        fn names_accepted_are_never_traversals(name in "[a-zA-Z0-9./\\\\:]{1,20}") {
            if safe_name(&name) {
                prop_assert!(!name.starts_with('/') && !name.starts_with('\\'));
                prop_assert!(!name.split(['/', '\\']).any(|p| p == ".."));
            }
        }
    }
}
