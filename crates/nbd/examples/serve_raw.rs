//! Serves a raw image file through the export exactly as the laptop does (ingested into an
//! encrypted chunk store, read through a cached `ImageReader`), without the `tandem`
//! binary: for profiling the NBD path in isolation.
//!
//! `cargo run --release -p tandem-nbd --example serve_raw -- IMAGE SOCKET [CACHE_MB]`
//! prints `ready` on stdout once the socket listens; stops on SIGTERM or Ctrl-C.

use std::sync::Arc;

use tandem_proto::manifest::{Manifest, DEFAULT_CHUNK_SIZE, MANIFEST_FORMAT};
use tandem_store::ingest::FileSource;
use tandem_store::{ingest, DataKey, ImageReader, IngestOptions, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(image), Some(socket)) = (args.get(1), args.get(2)) else {
        return Err("usage: serve_raw IMAGE SOCKET [CACHE_MB]".into());
    };
    let cache_mb: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1200);
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open_encrypted(dir.path(), DataKey::generate())?);
    let opts = IngestOptions {
        chunk_size: DEFAULT_CHUNK_SIZE,
        ..IngestOptions::default()
    };
    let r = ingest(&store, &FileSource::open(image.as_ref())?, &opts, &|_| {})?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: "raw".into(),
        version: 1,
        size: r.size,
        chunk_size: DEFAULT_CHUNK_SIZE,
        chunks: r.chunks,
    };
    let reader = Arc::new(ImageReader::with_cache(store, manifest, cache_mb << 20)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tandem_nbd::bind(socket.as_ref())?;
        println!("ready");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        tandem_nbd::serve(listener, reader, "raw@1".into(), shutdown).await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
