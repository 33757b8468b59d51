//! Bounds on the structure of a multipart body, checked on the raw bytes before the parser sees them
//! (R42). The parser (multer) buffers a part's headers, and anything before the first boundary, until
//! their end arrives, so a header that never ends would be buffered without limit. Here every request
//! with a multipart content type is scanned as it streams: the preamble and each part's header block
//! must end within [`MAX_HEAD_BYTES`], and at most [`MAX_PARTS`] parts may start. Part contents are only
//! searched for the next boundary, never copied, so uploads stream at full speed.

use std::fmt;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures_util::StreamExt;
use memchr::memmem::Finder;

use super::multipart::MAX_PARTS;

/// Largest header block of one part (and largest preamble), in bytes.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Why a multipart body was refused while streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitError {
    pub status: StatusCode,
    pub message: &'static str,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message)
    }
}

impl std::error::Error for LimitError {}

const HEAD_TOO_LARGE: LimitError = LimitError {
    status: StatusCode::PAYLOAD_TOO_LARGE,
    message: "Multipart part headers too large",
};
const TOO_MANY_PARTS: LimitError = LimitError {
    status: StatusCode::BAD_REQUEST,
    message: "Too many multipart parts",
};

/// The [`LimitError`] somewhere in an error's chain of causes, if any.
pub fn limit_error(error: &(dyn std::error::Error + 'static)) -> Option<LimitError> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(limit) = error.downcast_ref::<LimitError>() {
            return Some(*limit);
        }
        current = error.source();
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (the preamble) or inside a part's content.
    Searching { preamble: bool },
    /// Just after a delimiter: `--` closes the body, anything else starts a part's headers.
    AfterDelimiter,
    /// Inside a part's header block, `seen` bytes so far.
    Headers { seen: usize },
    /// After the close delimiter: nothing more to check.
    Done,
}

/// Incremental checker of one multipart body.
pub struct Scanner {
    delimiter: Finder<'static>,
    delimiter_len: usize,
    head_end: Finder<'static>,
    state: State,
    preamble_seen: usize,
    parts: usize,
    /// Bytes kept from the previous chunk (a delimiter or header end may span chunks).
    carry: Vec<u8>,
}

impl Scanner {
    pub fn new(boundary: &str) -> Self {
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        Self {
            delimiter_len: delimiter.len(),
            delimiter: Finder::new(&delimiter).into_owned(),
            head_end: Finder::new(b"\r\n\r\n").into_owned(),
            state: State::Searching { preamble: true },
            preamble_seen: 0,
            parts: 0,
            // The body may open with the delimiter without its leading CRLF.
            carry: b"\r\n".to_vec(),
        }
    }

    /// Checks the next chunk of the body.
    pub fn check(&mut self, chunk: &[u8]) -> Result<(), LimitError> {
        if self.state == State::Done {
            return Ok(());
        }
        if self.carry.is_empty() {
            return self.scan(chunk);
        }
        let reach = self.delimiter_len - 1;
        if let State::Searching { preamble } = self.state
            && chunk.len() >= reach
        {
            // Inside a part's content (the bulk of an upload), avoid copying the chunk: a delimiter
            // that spans the two chunks starts in the carried tail and ends within `reach` bytes.
            let carried = self.carry.len();
            let mut junction = std::mem::take(&mut self.carry);
            junction.extend_from_slice(&chunk[..reach]);
            return match self.delimiter.find(&junction) {
                Some(at) if at < carried => {
                    if preamble {
                        self.grow_preamble(at)?;
                    }
                    self.state = State::AfterDelimiter;
                    self.scan(&chunk[at + self.delimiter_len - carried..])
                }
                _ => {
                    if preamble {
                        self.grow_preamble(carried)?;
                    }
                    self.scan(chunk)
                }
            };
        }
        let mut buffer = std::mem::take(&mut self.carry);
        buffer.extend_from_slice(chunk);
        self.scan(&buffer)
    }

    /// Runs the state machine over `buffer` (the carried tail already prepended), leaving in
    /// `carry` what the next chunk must be read with.
    fn scan(&mut self, buffer: &[u8]) -> Result<(), LimitError> {
        let mut pos = 0;
        loop {
            let rest = &buffer[pos..];
            match self.state {
                State::Done => return Ok(()),
                State::Searching { preamble } => match self.delimiter.find(rest) {
                    Some(at) => {
                        if preamble {
                            self.grow_preamble(at)?;
                        }
                        pos += at + self.delimiter_len;
                        self.state = State::AfterDelimiter;
                    }
                    None => {
                        let keep = rest.len().min(self.delimiter_len - 1);
                        if preamble {
                            self.grow_preamble(rest.len() - keep)?;
                        }
                        self.carry = rest[rest.len() - keep..].to_vec();
                        return Ok(());
                    }
                },
                State::AfterDelimiter => {
                    if rest.len() < 2 {
                        self.carry = rest.to_vec();
                        return Ok(());
                    }
                    if rest.starts_with(b"--") {
                        // The close delimiter: this request's parts are over.
                        self.state = State::Done;
                        return Ok(());
                    }
                    self.parts += 1;
                    if self.parts > MAX_PARTS {
                        return Err(TOO_MANY_PARTS);
                    }
                    self.state = State::Headers { seen: 0 };
                }
                State::Headers { seen } => match self.head_end.find(rest) {
                    Some(at) => {
                        if seen + at > MAX_HEAD_BYTES {
                            return Err(HEAD_TOO_LARGE);
                        }
                        pos += at + 4;
                        self.state = State::Searching { preamble: false };
                    }
                    None => {
                        let keep = rest.len().min(3);
                        let seen = seen + rest.len() - keep;
                        if seen > MAX_HEAD_BYTES {
                            return Err(HEAD_TOO_LARGE);
                        }
                        self.state = State::Headers { seen };
                        self.carry = rest[rest.len() - keep..].to_vec();
                        return Ok(());
                    }
                },
            }
        }
    }

    fn grow_preamble(&mut self, bytes: usize) -> Result<(), LimitError> {
        self.preamble_seen += bytes;
        if self.preamble_seen > MAX_HEAD_BYTES + 2 {
            return Err(HEAD_TOO_LARGE);
        }
        Ok(())
    }
}

/// The body of every multipart request is checked by a [`Scanner`] as it streams (called by the
/// per-route middleware on every API request).
pub fn bound(request: Request) -> Request {
    let boundary = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok());
    let Some(boundary) = boundary else {
        return request;
    };
    let mut scanner = Scanner::new(&boundary);
    request.map(|body| {
        let mut failed: Option<LimitError> = None;
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            if let Some(limit) = failed {
                return Err(axum::BoxError::from(limit));
            }
            let chunk: Bytes = chunk?;
            if let Err(limit) = scanner.check(&chunk) {
                failed = Some(limit);
                return Err(limit.into());
            }
            Ok(chunk)
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> Result<(), LimitError> {
        let mut scanner = Scanner::new("XyZ");
        chunks.iter().try_for_each(|c| scanner.check(c))
    }

    /// Scans a complete form; its two parts and the close delimiter must all be seen.
    fn scan_form(chunks: &[&[u8]]) -> Result<(), LimitError> {
        let mut scanner = Scanner::new("XyZ");
        chunks.iter().try_for_each(|c| scanner.check(c))?;
        assert_eq!((scanner.parts, scanner.state), (2, State::Done));
        Ok(())
    }

    const FORM: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n--XyZ\r\n\
Content-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n\r\n--Xy not yet\r\n--XyZ--\r\n";

    #[test]
    fn a_valid_form_passes_however_it_is_split() {
        assert_eq!(scan_form(&[FORM]), Ok(()));
        for split in 1..FORM.len() {
            let (a, b) = FORM.split_at(split);
            assert_eq!(scan_form(&[a, b]), Ok(()), "split at {split}");
        }
        for size in 1..12 {
            let chunks: Vec<&[u8]> = FORM.chunks(size).collect();
            assert_eq!(scan_form(&chunks), Ok(()), "chunks of {size}");
        }
        for first in 1..FORM.len() {
            for second in first + 1..FORM.len() {
                let chunks = [&FORM[..first], &FORM[first..second], &FORM[second..]];
                assert_eq!(scan_form(&chunks), Ok(()), "split at {first} and {second}");
            }
        }
    }

    #[test]
    fn parts_are_counted_however_the_body_is_split() {
        let mut body = Vec::new();
        for _ in 0..=MAX_PARTS {
            body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n");
        }
        for size in [1, 2, 3, 5, 7, 8, 9, 13, 64, 1000] {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(scan(&chunks), Err(TOO_MANY_PARTS), "chunks of {size}");
        }
    }

    #[test]
    fn a_header_that_never_ends_is_refused_early() {
        let mut scanner = Scanner::new("XyZ");
        scanner
            .check(b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"")
            .unwrap();
        let junk = vec![b'a'; 1024];
        let refused = (0..16).find_map(|_| scanner.check(&junk).err());
        assert_eq!(refused, Some(HEAD_TOO_LARGE));
    }

    #[test]
    fn a_preamble_without_boundary_is_refused() {
        let junk = vec![b'a'; MAX_HEAD_BYTES + 10];
        assert_eq!(scan(&[&junk]), Err(HEAD_TOO_LARGE));
    }

    #[test]
    fn large_part_contents_are_fine() {
        let mut scanner = Scanner::new("XyZ");
        scanner
            .check(b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x\"\r\n\r\n")
            .unwrap();
        let data = vec![b'-'; 1 << 20];
        for _ in 0..8 {
            scanner.check(&data).unwrap();
        }
        scanner.check(b"\r\n--XyZ--\r\n").unwrap();
    }

    #[test]
    fn too_many_parts_are_refused() {
        let mut body = Vec::new();
        for _ in 0..MAX_PARTS {
            body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n");
        }
        let mut closed = body.clone();
        closed.extend_from_slice(b"--XyZ--\r\n");
        assert_eq!(scan(&[&closed]), Ok(()));
        body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nv\r\n");
        assert_eq!(scan(&[&body]), Err(TOO_MANY_PARTS));
    }
}
