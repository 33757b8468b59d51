//! Reading objects for downloads. On S3 the object store's stream is used as it is; on the local
//! backend the file is read directly, 1 MiB per blocking read, straight into the buffer that is sent
//! (object_store's local stream reads 8 KiB per blocking-thread hop, which capped downloads at about a
//! quarter of what the disk and loopback can do, issue #13).

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::GetRange;

use super::{Backend, Key, Storage};

/// Bytes read per blocking call on the local backend.
const LOCAL_CHUNK: usize = 1024 * 1024;

/// An open object, or the part of it a `Range` asked for.
pub struct ObjectRead {
    /// Size of the whole object.
    pub size: u64,
    /// The bytes `body` yields.
    pub range: Range<u64>,
    pub body: BoxStream<'static, io::Result<Bytes>>,
}

impl Storage {
    /// Opens `key` (or `range` of it, clamped to the object) for streaming. A missing object is
    /// `object_store::Error::NotFound` on every backend.
    pub async fn read(&self, key: &Key, range: Option<Range<u64>>) -> object_store::Result<ObjectRead> {
        if let Backend::Local { root } = self.backend.as_ref() {
            return read_local(root.join(key.as_str()), key, range).await;
        }
        let object = self.get(key, range.map(GetRange::Bounded)).await?;
        let (size, served) = (object.meta.size, object.range.clone());
        Ok(ObjectRead {
            size,
            range: served,
            body: object.into_stream().map_err(io::Error::other).boxed(),
        })
    }
}

/// Opens the file and reads its first chunk in the same blocking call: a small object (a source, most
/// results) is then served without a second hop to the blocking pool (each hop wakes a pool thread and
/// then a runtime worker: futex calls and context switches that cost more than reading 10 KiB).
async fn read_local(path: PathBuf, key: &Key, range: Option<Range<u64>>) -> object_store::Result<ObjectRead> {
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        let size = file.metadata()?.len();
        let range = range.map_or(0..size, |r| r.start.min(size)..r.end.min(size));
        // An error of this first read is the body's first item, as it would have been read later.
        let first = read_chunk(&file, &range);
        Ok::<_, io::Error>((file, size, range, first))
    })
    .await
    .map_err(|e| generic(io::Error::other(e)))?;
    let (file, size, range, first) = match opened {
        Ok(opened) => opened,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(object_store::Error::NotFound {
                path: key.as_str().to_string(),
                source: Box::new(e),
            });
        }
        Err(e) => return Err(generic(e)),
    };
    let body = match first {
        // An empty range: nothing was read and nothing is sent.
        None => futures_util::stream::empty().boxed(),
        Some(Ok(chunk)) => {
            let rest = range.start + chunk.len() as u64..range.end;
            futures_util::stream::once(async { Ok(chunk) })
                .chain(chunks(file, rest))
                .boxed()
        }
        Some(Err(e)) => futures_util::stream::once(async { Err(e) }).boxed(),
    };
    Ok(ObjectRead { size, range, body })
}

/// One blocking positioned read of up to [`LOCAL_CHUNK`] bytes at the start of `range`; `None` when the
/// range is empty, an error when the file ends before it does.
fn read_chunk(file: &std::fs::File, range: &Range<u64>) -> Option<io::Result<Bytes>> {
    if range.start >= range.end {
        return None;
    }
    let want = (range.end - range.start).min(LOCAL_CHUNK as u64) as usize;
    let offset = range.start;
    let mut buffer = BytesMut::zeroed(want);
    let mut filled = 0;
    while filled < want {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(e)),
        }
    }
    if filled == 0 {
        return Some(Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "object shorter than its size",
        )));
    }
    buffer.truncate(filled);
    Some(Ok(buffer.freeze()))
}

/// The file's bytes in `range`, one blocking positioned read of up to [`LOCAL_CHUNK`] per item (no
/// blocking call at all once the range is empty).
fn chunks(file: std::fs::File, range: Range<u64>) -> impl futures_util::Stream<Item = io::Result<Bytes>> {
    let file = std::sync::Arc::new(file);
    futures_util::stream::try_unfold(range, move |range| {
        let file = file.clone();
        async move {
            if range.start >= range.end {
                return Ok(None);
            }
            let read = range.clone();
            let chunk = tokio::task::spawn_blocking(move || read_chunk(&file, &read))
                .await
                .map_err(io::Error::other)?;
            match chunk {
                Some(Ok(chunk)) => {
                    let next = range.start + chunk.len() as u64..range.end;
                    Ok(Some((chunk, next)))
                }
                Some(Err(e)) => Err(e),
                None => Ok(None),
            }
        }
    })
}

fn generic(e: io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(e),
    }
}
