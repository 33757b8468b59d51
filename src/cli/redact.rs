//! URLs shown to people never carry their password.

pub use crate::config::redact_url;

/// `text` with every occurrence of `url` replaced by its redacted form (for errors that quote it).
pub fn redact_in(text: &str, url: &str) -> String {
    if url.is_empty() {
        return text.to_string();
    }
    text.replace(url, &redact_url(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_replaced() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db.internal:5432/expo?sslmode=require"),
            "postgres://app:***@db.internal:5432/expo?sslmode=require"
        );
        assert_eq!(
            redact_url("https://ops:pw@ctl.example.com/base"),
            "https://ops:***@ctl.example.com/base"
        );
        assert_eq!(
            redact_url("postgres://p@ss:w@rd@host/db"),
            "postgres://p@ss:***@host/db"
        );
        assert_eq!(redact_url("postgres://app@db/expo"), "postgres://app@db/expo");
        assert_eq!(redact_url("http://127.0.0.1:4000"), "http://127.0.0.1:4000");
        assert_eq!(redact_url("http://h/path?next=a:b@c"), "http://h/path?next=a:b@c");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_in("cannot reach postgres://a:b@h/d: refused", "postgres://a:b@h/d"),
            "cannot reach postgres://a:***@h/d: refused"
        );
    }
}
