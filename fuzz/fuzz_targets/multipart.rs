//! Fuzzes multipart parsing as the controller does it (multer behind axum's extractor): arbitrary
//! bodies must end in parts or an error, never a panic or unbounded memory.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let constraints = multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(1 << 20));
    let mut multipart = multer::Multipart::with_constraints(stream, "fuzz-boundary", constraints);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        while let Ok(Some(mut field)) = multipart.next_field().await {
            let _ = field.name();
            while let Ok(Some(_chunk)) = field.chunk().await {}
        }
    });
});
