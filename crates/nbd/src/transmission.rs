//! The transmission phase: one blocking thread per connection, one request at a time.
//!
//! Each request is read, served and answered before the next is read; the reply buffer is
//! flushed only when no further request is already buffered, so a client that keeps a
//! queue of requests in flight gets its replies in large writes.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;

use tandem_store::ImageReader;

use crate::handshake::Session;
use crate::wire::*;
use crate::MAX_REQUEST;

/// Most extents in one block-status reply (a reply of 128 KiB); the client asks again
/// from where the reply stopped.
const MAX_EXTENTS: usize = 16 << 10;

struct Conn<'a> {
    w: io::BufWriter<UnixStream>,
    reader: &'a ImageReader,
    session: Session,
    buf: Vec<u8>,
}

impl Conn<'_> {
    /// A success with no payload: a simple reply is allowed for every command but reads.
    fn ok(&mut self, handle: u64) -> io::Result<()> {
        self.w.write_all(&simple_reply(0, handle))
    }

    /// An error: structured (with a message for people) when negotiated, else simple.
    fn fail(&mut self, handle: u64, errno: u32, message: &str) -> io::Result<()> {
        if self.session.structured {
            self.w.write_all(&error_chunk(errno, handle, message))
        } else {
            self.w.write_all(&simple_reply(errno, handle))
        }
    }

    /// Fills `out` with the export's bytes at `offset`: from holes and cached chunks
    /// without I/O when possible, else through the store (verified). `false` after
    /// logging when a chunk cannot be served.
    fn fill(reader: &ImageReader, out: &mut [u8], offset: u64) -> bool {
        if reader.read_cached(out, offset) {
            return true;
        }
        match reader.read_at(out, offset) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    offset,
                    bytes = out.len(),
                    "nbd read failed, replying EIO: {e}"
                );
                false
            }
        }
    }

    fn read(&mut self, req: &Request) -> io::Result<()> {
        let size = self.reader.size();
        let (offset, len) = (req.offset, req.length);
        if len == 0
            || len > MAX_REQUEST
            || offset.checked_add(u64::from(len)).is_none_or(|e| e > size)
        {
            tracing::debug!(offset, len, "nbd read out of range");
            let msg = format!(
                "read of {len} bytes at {offset} is outside the export ({size} bytes) or over the {MAX_REQUEST}-byte limit"
            );
            return self.fail(req.handle, EINVAL, &msg);
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len as usize, 0);
        let res = if self.session.structured {
            self.read_structured(req, &mut buf)
        } else if Self::fill(self.reader, &mut buf, offset) {
            self.w.write_all(&simple_reply(0, req.handle))?;
            self.w.write_all(&buf)
        } else {
            self.w.write_all(&simple_reply(EIO, req.handle))
        };
        self.buf = buf;
        res
    }

    /// A structured read: holes as `NBD_REPLY_TYPE_OFFSET_HOLE`, data as
    /// `NBD_REPLY_TYPE_OFFSET_DATA`, the last chunk marked done. All data is read before
    /// the first chunk is sent, so a chunk that fails verification becomes one error chunk
    /// and nothing else.
    fn read_structured(&mut self, req: &Request, buf: &mut [u8]) -> io::Result<()> {
        let (offset, len) = (req.offset, u64::from(req.length));
        let m = self.reader.manifest();
        let parts = if req.flags & CMD_FLAG_DF != 0 {
            // Don't fragment: one data chunk, zeros included.
            vec![Run {
                offset,
                len,
                hole: false,
            }]
        } else {
            let cs = u64::from(m.chunk_size);
            runs(
                |i| m.chunks[i as usize].is_none(),
                cs,
                offset,
                len,
                usize::MAX,
            )
        };
        for p in parts.iter().filter(|p| !p.hole) {
            let at = (p.offset - offset) as usize;
            if !Self::fill(self.reader, &mut buf[at..at + p.len as usize], p.offset) {
                let msg = format!(
                    "the image's data at offset {} failed verification; the store dropped it, pull the version again",
                    p.offset
                );
                return self.fail(req.handle, EIO, &msg);
            }
        }
        let last = parts.len() - 1;
        for (i, p) in parts.iter().enumerate() {
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            if p.hole {
                let mut c = chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, req.handle, 12).to_vec();
                c.extend_from_slice(&p.offset.to_be_bytes());
                c.extend_from_slice(&(p.len as u32).to_be_bytes());
                self.w.write_all(&c)?;
            } else {
                let h = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req.handle, 8 + p.len as u32);
                self.w.write_all(&h)?;
                self.w.write_all(&p.offset.to_be_bytes())?;
                let at = (p.offset - offset) as usize;
                self.w.write_all(&buf[at..at + p.len as usize])?;
            }
        }
        Ok(())
    }

    fn block_status(&mut self, req: &Request) -> io::Result<()> {
        let size = self.reader.size();
        let (offset, len) = (req.offset, u64::from(req.length));
        if !self.session.structured || !self.session.base_allocation {
            return self.fail(
                req.handle,
                EINVAL,
                "no metadata context selected: negotiate structured replies, then select base:allocation with NBD_OPT_SET_META_CONTEXT",
            );
        }
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            tracing::debug!(offset, len, "nbd block status out of range");
            let msg = format!(
                "block status of {len} bytes at {offset} is outside the export ({size} bytes)"
            );
            return self.fail(req.handle, EINVAL, &msg);
        }
        let m = self.reader.manifest();
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let extents = runs(
            |i| m.chunks[i as usize].is_none(),
            u64::from(m.chunk_size),
            offset,
            len,
            max,
        );
        self.w.write_all(&block_status_chunk(req.handle, &extents))
    }
}

/// Serves requests until the client disconnects (`Ok`) or breaks the protocol or the
/// socket fails (`Err`). `pending` holds bytes already read during the handshake.
pub(crate) fn transmission(
    stream: UnixStream,
    pending: Vec<u8>,
    reader: &ImageReader,
    session: Session,
) -> io::Result<()> {
    let input = io::Read::chain(io::Cursor::new(pending), stream.try_clone()?);
    let mut r = io::BufReader::with_capacity(64 << 10, input);
    let mut c = Conn {
        w: io::BufWriter::with_capacity(256 << 10, stream),
        reader,
        session,
        buf: Vec::new(),
    };
    loop {
        let mut h = [0u8; REQUEST_LEN];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let req = parse_request(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match req.command {
            Command::Read => c.read(&req)?,
            Command::BlockStatus => c.block_status(&req)?,
            Command::Write => {
                if req.length > MAX_REQUEST {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "oversized write to a read-only export",
                    ));
                }
                io::copy(&mut (&mut r).take(u64::from(req.length)), &mut io::sink())?;
                c.fail(req.handle, EPERM, "the export is read-only")?;
            }
            Command::Disconnect => {
                c.w.flush()?;
                return Ok(());
            }
            Command::Flush => c.ok(req.handle)?,
            Command::Trim | Command::WriteZeroes => {
                c.fail(req.handle, EPERM, "the export is read-only")?
            }
            Command::Cache | Command::Unknown(_) => {
                c.fail(req.handle, EINVAL, "unsupported command")?
            }
        }
        if r.buffer().is_empty() {
            c.w.flush()?;
        }
    }
}
