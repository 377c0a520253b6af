//! Read-only NBD export of one stored image version over a unix socket.
//!
//! QEMU attaches a qcow2 overlay whose backing file is `nbd+unix:///?socket=PATH`; every
//! read it makes of the base lands here and is served from the chunk store through an
//! [`ImageReader`], which decrypts, decompresses and verifies each chunk (with a small
//! cache). A chunk that fails verification is an `EIO` reply and a log line, never data.
//!
//! # Protocol
//! The subset of <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md> a
//! read-only export needs, in three modules: [`wire`] (pure parsers and encoders),
//! `handshake` (option haggling) and `transmission` (requests).
//!
//! - Handshake: fixed newstyle with `NBD_FLAG_FIXED_NEWSTYLE` and `NBD_FLAG_NO_ZEROES`;
//!   unknown client flags end the connection. Options: `NBD_OPT_EXPORT_NAME`,
//!   `NBD_OPT_LIST`, `NBD_OPT_INFO` / `NBD_OPT_GO` (`NBD_INFO_EXPORT`,
//!   `NBD_INFO_BLOCK_SIZE`: minimum 1, preferred 4096, maximum [`MAX_REQUEST`]),
//!   `NBD_OPT_ABORT`, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and
//!   `NBD_OPT_SET_META_CONTEXT` (after structured replies). Everything else (TLS,
//!   extended headers) gets `NBD_REP_ERR_UNSUP`, and clients fall back.
//! - Metadata: exactly one context, `base:allocation` ([`wire::BASE_ALLOCATION`]). An
//!   all-zero chunk of the manifest (`None`, never stored) is a hole and is reported as
//!   `NBD_STATE_HOLE | NBD_STATE_ZERO`; every stored chunk is data (flags 0). `base:` lists
//!   it; unknown namespaces and leaf names select nothing, as the spec requires.
//! - Transmission: `NBD_CMD_READ` (with structured replies: holes as
//!   `NBD_REPLY_TYPE_OFFSET_HOLE`, data as `NBD_REPLY_TYPE_OFFSET_DATA`, or one data chunk
//!   with `NBD_CMD_FLAG_DF`), `NBD_CMD_BLOCK_STATUS` (one `NBD_REPLY_TYPE_BLOCK_STATUS`
//!   chunk of at most 16384 extents; one with `NBD_CMD_FLAG_REQ_ONE`), `NBD_CMD_DISC`,
//!   `NBD_CMD_FLUSH` (a no-op). Writes, trims and write-zeroes get `EPERM`; unknown
//!   commands, zero-length or out-of-range reads and block-status requests, and block
//!   status without a selected context get `EINVAL` (as an error chunk with a message when
//!   structured replies are on). A bad request magic ends the connection; so does a write
//!   payload over [`MAX_REQUEST`], which cannot be skipped cheaply.
//! - Any number of clients may connect at once (`NBD_FLAG_CAN_MULTI_CONN`: the export
//!   never changes).
//!
//! # Limits
//! Option data is bounded (16 KiB) before it is read, and a metadata query count is
//! checked against the bytes present before anything is allocated: nothing a client sends
//! can make the server allocate more than one maximum read (32 MiB) plus a block-status
//! reply (128 KiB) per connection.
//!
//! # Threads
//! The handshake runs on the async runtime; the transmission phase of each connection
//! runs on its own blocking thread with plain socket I/O (see `transmission`), which was
//! measured cheaper per 4 KiB request than async tasks. After answering everything it has,
//! a connection's thread polls its socket for 50 µs before it sleeps, because sleeping and
//! being woken once per request was where the time went. Shutting the server down closes
//! every socket, which ends those threads.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod handshake;
mod transmission;
pub mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_store::ImageReader;
use tokio::io::{AsyncWriteExt as _, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};

pub use wire::{parse_request, Command, Request, RequestError, REQUEST_LEN};

/// Largest read served in one request.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Serving failed before any client was involved.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the unix socket (replacing a stale socket file left by a crashed server).
pub fn bind(path: &Path) -> Result<UnixListener, NbdError> {
    let err = |source| NbdError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                )));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
    }
    UnixListener::bind(path).map_err(err)
}

/// Serves `reader` as export `name` on `listener` until `shutdown` resolves. Open
/// connections are dropped at shutdown.
pub async fn serve(
    listener: UnixListener,
    reader: Arc<ImageReader>,
    name: String,
    shutdown: impl Future<Output = ()>,
) {
    let name = Arc::new(name);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => match acc {
                Ok((stream, _)) => {
                    let r = reader.clone();
                    let n = name.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle(stream, r, &n).await {
                            tracing::debug!(export = %n, "nbd client ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("nbd accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
}

async fn handle(stream: UnixStream, reader: Arc<ImageReader>, name: &str) -> std::io::Result<()> {
    let (rd, wr) = stream.into_split();
    let mut r = BufReader::with_capacity(64 << 10, rd);
    let mut w = BufWriter::with_capacity(4 << 10, wr);
    let Some(session) = handshake::handshake(&mut r, &mut w, reader.size(), name).await? else {
        return Ok(());
    };
    w.flush().await?;
    // Requests the client sent right behind its last option are already buffered.
    let pending = r.buffer().to_vec();
    // Transmission runs on a plain thread with blocking I/O: one request at a time, read,
    // serve, reply, flushing only when no further request is already buffered. Measured,
    // this is far cheaper per 4 KiB request than hopping between async tasks.
    let stream = r
        .into_inner()
        .reunite(w.into_inner())
        .map_err(std::io::Error::other)?
        .into_std()?;
    stream.set_nonblocking(false)?;
    let guard = CloseOnDrop(stream.try_clone()?);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(transmission::transmission(
            stream, pending, &reader, session,
        ));
    });
    let res = done_rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("nbd connection thread ended")));
    drop(guard);
    res
}

/// Shuts a connection down when the task serving it is dropped (server shutdown), which
/// ends its thread's blocking read.
struct CloseOnDrop(std::os::unix::net::UnixStream);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}
