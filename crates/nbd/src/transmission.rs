//! The transmission phase: one blocking thread per connection, one request at a time.
//!
//! Each request is read, served and answered before the next is read. Replies are
//! buffered and sent when the socket holds no further request, so a client that keeps a
//! queue of requests in flight gets its replies in large writes.
//!
//! Where the time went (measured with `perf` and `strace -c` on `qemu-img bench`, 4 KiB
//! sequential reads, queue depth 16, everything cached): not in serving a request (the
//! chunk-cache lookup and copies are about 1 µs) but in sleeping and being woken. QEMU
//! sends its next request only as it consumes a reply, so a server that blocks in `read`
//! as soon as it has answered sleeps and wakes once per request or two; more than half the
//! server's CPU was in the scheduler's context switch, and each wake-up also costs the
//! client's `sendmsg`. So after sending its replies the thread polls the socket for
//! [`SPIN`] (yielding the CPU between polls) before it blocks: a client that is streaming
//! never finds the server asleep, and an idle connection costs one [`SPIN`] per burst.
//! `bench/images/nbd.py` measures it: sequential 4 KiB reads went from 0.92x to 1.2x a
//! raw file.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;

use tandem_store::ImageReader;

use crate::handshake::Session;
use crate::wire::*;
use crate::MAX_REQUEST;

/// How long a connection that has answered everything polls for the next request before
/// it blocks (see the module doc).
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

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

/// The receiving side of a connection: a buffer over the socket that can look for more
/// requests without blocking.
struct Input {
    s: UnixStream,
    buf: Box<[u8]>,
    lo: usize,
    hi: usize,
}

impl Input {
    fn len(&self) -> usize {
        self.hi - self.lo
    }

    fn make_room(&mut self) {
        if self.lo > 0 {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
    }

    /// Reads what the socket holds without waiting; `None` when it holds nothing.
    fn fill_now(&mut self) -> io::Result<Option<usize>> {
        self.make_room();
        self.s.set_nonblocking(true)?;
        let r = self.s.read(&mut self.buf[self.hi..]);
        self.s.set_nonblocking(false)?;
        match r {
            Ok(n) => {
                self.hi += n;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Polls the socket (yielding the CPU between polls) for up to `spin`; `None` when
    /// nothing arrived.
    fn fill_soon(&mut self, spin: std::time::Duration) -> io::Result<Option<usize>> {
        self.make_room();
        let until = std::time::Instant::now() + spin;
        self.s.set_nonblocking(true)?;
        let res = loop {
            match self.s.read(&mut self.buf[self.hi..]) {
                Ok(n) => break Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= until {
                        break Ok(None);
                    }
                    std::thread::yield_now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        // The write half shares this socket: it must block again before any reply.
        self.s.set_nonblocking(false)?;
        if let Ok(Some(n)) = res {
            self.hi += n;
        }
        res
    }

    fn fill_wait(&mut self) -> io::Result<usize> {
        self.make_room();
        let n = self.s.read(&mut self.buf[self.hi..])?;
        self.hi += n;
        Ok(n)
    }

    /// Skips `n` bytes (a write's payload).
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.len() == 0 && self.fill_wait()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = (self.len() as u64).min(n);
            self.lo += k as usize;
            n -= k;
        }
        Ok(())
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
    let mut buf = vec![0u8; (64 << 10).max(pending.len())].into_boxed_slice();
    buf[..pending.len()].copy_from_slice(&pending);
    let mut inp = Input {
        s: stream.try_clone()?,
        buf,
        lo: 0,
        hi: pending.len(),
    };
    let mut c = Conn {
        w: io::BufWriter::with_capacity(256 << 10, stream),
        reader,
        session,
        buf: Vec::new(),
    };
    loop {
        while inp.len() < REQUEST_LEN {
            let n = match inp.fill_now()? {
                Some(n) => n,
                None => {
                    // Nothing more to do until the client sends: send what is ready, then
                    // wait for the next request, briefly awake and then asleep.
                    c.w.flush()?;
                    match inp.fill_soon(SPIN)? {
                        Some(n) => n,
                        None => inp.fill_wait()?,
                    }
                }
            };
            if n == 0 {
                if inp.len() == 0 {
                    return Ok(());
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a request header",
                ));
            }
        }
        let req = parse_request(&inp.buf[inp.lo..inp.hi])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        inp.lo += REQUEST_LEN;
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
                inp.skip(u64::from(req.length))?;
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
    }
}
