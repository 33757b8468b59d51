//! The one rule for text that clients send (R45): PostgreSQL cannot store U+0000 in `text` or `jsonb`,
//! so every NUL is replaced with U+FFFD before the value goes anywhere. The API applies it where input
//! enters: every JSON body (as raw text, before parsing) and every multipart text field.

use std::borrow::Cow;

/// What a NUL becomes.
pub const REPLACEMENT: char = '\u{FFFD}';

/// `text` with every U+0000 replaced by U+FFFD (borrowed when there is none).
pub fn scrub(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Owned variant of [`scrub`].
pub fn scrub_owned(text: String) -> String {
    match scrub(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(clean) => clean,
    }
}

/// A JSON text with every `\u0000` escape inside strings replaced by `\uFFFD` (same length, so parse
/// errors keep their positions). Raw NUL bytes are invalid JSON anyway and are left for the parser to
/// reject. Borrowed when there is nothing to replace.
pub fn scrub_json(json: &[u8]) -> Cow<'_, [u8]> {
    const NUL_ESCAPE: &[u8] = b"u0000";
    if !json.windows(NUL_ESCAPE.len()).any(|w| w == NUL_ESCAPE) {
        return Cow::Borrowed(json);
    }
    let mut out = json.to_vec();
    let mut in_string = false;
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if out[i + 1..].starts_with(NUL_ESCAPE) {
                    out[i + 2..i + 6].copy_from_slice(b"FFFD");
                }
                // Skip the escaped character (`\\`, `\"`, `\u`…), so `\\u0000` stays literal text.
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_replacement_character() {
        assert_eq!(scrub("a\0b"), "a\u{FFFD}b");
        assert!(matches!(scrub("plain"), Cow::Borrowed(_)));
        assert_eq!(scrub_owned("\0".into()), "\u{FFFD}");
    }

    #[test]
    fn json_escapes_are_replaced_inside_strings_only() {
        let parse = |raw: &str| -> serde_json::Value { serde_json::from_slice(&scrub_json(raw.as_bytes())).unwrap() };
        assert_eq!(parse(r#"{"a":"x\u0000y"}"#)["a"], "x\u{FFFD}y");
        assert_eq!(parse(r#"{"k\u0000":1}"#)["k\u{FFFD}"], 1);
        // An escaped backslash followed by `u0000` is literal text, not a NUL.
        assert_eq!(parse(r#"{"a":"\\u0000"}"#)["a"], "\\u0000");
        assert_eq!(parse(r#"{"a":"\"\u0000"}"#)["a"], "\"\u{FFFD}");
        assert!(matches!(scrub_json(br#"{"a":1}"#), Cow::Borrowed(_)));
    }

    #[test]
    fn scrubbed_json_never_holds_a_nul() {
        use proptest::prelude::*;
        proptest!(|(s in ".*")| {
            let raw = serde_json::to_vec(&serde_json::json!({ "s": s, "nested": [s.clone()] })).unwrap();
            let value: serde_json::Value = serde_json::from_slice(&scrub_json(&raw)).unwrap();
            prop_assert!(!value.to_string().contains("\\u0000"));
            let expected = scrub(&s).into_owned();
            prop_assert_eq!(value["s"].as_str().unwrap(), expected.as_str());
        });
    }
}
