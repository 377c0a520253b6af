//! The NBD wire format: constants, parsers for what a client sends and encoders for what
//! the server answers.
//!
//! Everything here is a pure function over byte slices, so a fuzzer (or a unit test) can
//! call [`parse_request`], [`parse_meta_context_option`] and [`parse_info_option`] with
//! arbitrary input and no socket. None of them panics or allocates more than a bounded
//! multiple of its input.
//!
//! Request header (28 bytes, big-endian), as in the NBD protocol's "Transmission" section:
//!
//! ```text
//! 0   u32 magic 0x25609513
//! 4   u16 command flags
//! 6   u16 command
//! 8   u64 handle (cookie), echoed in the reply
//! 16  u64 offset
//! 24  u32 length
//! ```

use tandem_tools::bytes::{be16, be32, be64};

pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that opens every request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub(crate) const FLAG_NO_ZEROES: u16 = 2;
pub(crate) const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1;
pub(crate) const CLIENT_FLAG_NO_ZEROES: u32 = 2;

pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
pub(crate) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(crate) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(crate) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

pub(crate) const TFLAG_HAS_FLAGS: u16 = 1;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_DF: u16 = 1 << 7;
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Command flag: don't fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: answer a block-status request with one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

pub(crate) const REPLY_FLAG_DONE: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(crate) const REPLY_TYPE_ERROR: u16 = 0x8001;

/// `base:allocation` flag: the extent is not allocated (an all-zero chunk of the manifest).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;

pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Id under which `base:allocation` is reported (opaque to clients).
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a structured reply chunk header.
pub(crate) const CHUNK_HEADER_LEN: usize = 20;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1): followed by `length` bytes of payload.
    Write,
    /// `NBD_CMD_DISC` (2).
    Disconnect,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other command number.
    Unknown(u16),
}

impl Command {
    fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }
}

/// One decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque handle the reply must echo.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of data to read, of the range to describe, or of a write's payload).
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire: a write's data, else none.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// A request header that cannot be decoded. Either one ends the connection: the client
/// and the server no longer agree where the next message starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than [`REQUEST_LEN`] bytes.
    #[error("truncated request header: {got} bytes, a request header has 28")]
    Truncated {
        /// Bytes available.
        got: usize,
    },
    /// The first four bytes are not [`REQUEST_MAGIC`].
    #[error("bad request magic {magic:#010x} (expected 0x25609513): the client lost framing or is not speaking NBD; reconnect")]
    BadMagic {
        /// What was there instead.
        magic: u32,
    },
}

/// Decodes the request header at the start of `buf` (the first [`REQUEST_LEN`] bytes;
/// anything after them, such as a write's payload or the next request, is not looked at).
///
/// Only framing is checked here: the magic and the length of the header. Whether the
/// command, flags and range make sense for the export is the server's business and is
/// answered with an error reply, not a parse error, so the connection survives it.
pub fn parse_request(buf: &[u8]) -> Result<Request, RequestError> {
    if buf.len() < REQUEST_LEN {
        return Err(RequestError::Truncated { got: buf.len() });
    }
    let truncated = |_| RequestError::Truncated { got: buf.len() };
    let magic = be32(buf, 0).map_err(truncated)?;
    if magic != REQUEST_MAGIC {
        return Err(RequestError::BadMagic { magic });
    }
    Ok(Request {
        flags: be16(buf, 4).map_err(truncated)?,
        command: Command::from_wire(be16(buf, 6).map_err(truncated)?),
        handle: be64(buf, 8).map_err(truncated)?,
        offset: be64(buf, 16).map_err(truncated)?,
        length: be32(buf, 24).map_err(truncated)?,
    })
}

/// Option data that does not have the documented layout; answered with
/// `NBD_REP_ERR_INVALID` carrying this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The data ends inside a field.
    #[error("option data ends inside the {field}")]
    Truncated {
        /// Which field.
        field: &'static str,
    },
    /// Bytes left after the last field.
    #[error("{extra} bytes after the end of the option data")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A query that is not `namespace:leaf`.
    #[error("metadata context query without a namespace (expected e.g. base:allocation)")]
    NoNamespace,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextOption<'a> {
    /// Export the contexts are for (empty: the default export).
    pub export: &'a [u8],
    /// Queries, each `namespace:leaf` (checked).
    pub queries: Vec<&'a [u8]>,
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoOption<'a> {
    /// Export asked for (empty: the default export).
    pub export: &'a [u8],
    /// `NBD_INFO_*` items the client asked for.
    pub requests: Vec<u16>,
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], OptionError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or(OptionError::Truncated { field })?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, OptionError> {
        be32(self.take(4, field)?, 0).map_err(|_| OptionError::Truncated { field })
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, OptionError> {
        be16(self.take(2, field)?, 0).map_err(|_| OptionError::Truncated { field })
    }
    fn left(&self) -> usize {
        self.data.len() - self.at
    }
    fn end(&self) -> Result<(), OptionError> {
        match self.left() {
            0 => Ok(()),
            extra => Err(OptionError::Trailing { extra }),
        }
    }
}

/// Decodes the data of a metadata-context option: export name length and name, query
/// count, then each query's length and text. The query count is checked against the
/// data actually present before anything is allocated.
pub fn parse_meta_context_option(data: &[u8]) -> Result<MetaContextOption<'_>, OptionError> {
    let mut c = Cursor { data, at: 0 };
    let nlen = c.u32("export name length")? as usize;
    let export = c.take(nlen, "export name")?;
    let count = c.u32("query count")? as usize;
    if count > c.left() / 4 {
        return Err(OptionError::Truncated {
            field: "query list",
        });
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let qlen = c.u32("query length")? as usize;
        let q = c.take(qlen, "query")?;
        if !q.contains(&b':') {
            return Err(OptionError::NoNamespace);
        }
        queries.push(q);
    }
    c.end()?;
    Ok(MetaContextOption { export, queries })
}

/// Decodes the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name length and name, then a
/// count of information requests and the requests.
pub fn parse_info_option(data: &[u8]) -> Result<InfoOption<'_>, OptionError> {
    let mut c = Cursor { data, at: 0 };
    let nlen = c.u32("export name length")? as usize;
    let export = c.take(nlen, "export name")?;
    let count = c.u16("information request count")? as usize;
    let field = "information requests";
    let list = c.take(count * 2, field)?;
    c.end()?;
    Ok(InfoOption {
        export,
        requests: list
            .chunks_exact(2)
            .map(|p| be16(p, 0))
            .collect::<Result<_, _>>()
            .map_err(|_| OptionError::Truncated { field })?,
    })
}

/// Which contexts a list of queries names. `list` is true for
/// `NBD_OPT_LIST_META_CONTEXT`, where `base:` is a wildcard and no query means all;
/// for `NBD_OPT_SET_META_CONTEXT` only the exact name selects. Unknown namespaces and
/// leaf names are ignored, as the protocol requires.
pub(crate) fn selects_base_allocation(queries: &[&[u8]], list: bool) -> bool {
    if list && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| *q == BASE_ALLOCATION.as_bytes() || (list && *q == b"base:"))
}

/// A stretch of the export that is all data or all hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub offset: u64,
    pub len: u64,
    pub hole: bool,
}

/// Splits `[offset, offset + len)` into maximal runs of data and of holes, where chunk
/// `i` (of `chunk_size` bytes) is a hole when `is_hole(i)`. Stops after `max_runs` runs
/// (the last one then ends early). The caller has checked the range against the export.
pub(crate) fn runs(
    is_hole: impl Fn(u64) -> bool,
    chunk_size: u64,
    offset: u64,
    len: u64,
    max_runs: usize,
) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let index = pos / chunk_size;
        let next = ((index + 1) * chunk_size).min(end);
        let hole = is_hole(index);
        match out.last_mut() {
            Some(r) if r.hole == hole => r.len += next - pos,
            _ => {
                if out.len() == max_runs {
                    break;
                }
                out.push(Run {
                    offset: pos,
                    len: next - pos,
                    hole,
                });
            }
        }
        pos = next;
    }
    out
}

/// A simple reply header.
pub(crate) fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..].copy_from_slice(&handle.to_be_bytes());
    h
}

/// A structured reply chunk header for `len` bytes of payload.
pub(crate) fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..].copy_from_slice(&len.to_be_bytes());
    h
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk (final) with a message for people.
pub(crate) fn error_chunk(error: u32, handle: u64, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        (6 + msg.len()) as u32,
    )
    .to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (final) for `base:allocation`.
pub(crate) fn block_status_chunk(handle: u64, extents: &[Run]) -> Vec<u8> {
    let mut out = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        (4 + 8 * extents.len()) as u32,
    )
    .to_vec();
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for e in extents {
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        out.extend_from_slice(&(e.len as u32).to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u32, flags: u16, cmd: u16, handle: u64, off: u64, len: u32) -> Vec<u8> {
        let mut h = magic.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn parse_request_decodes_every_field() {
        let h = header(
            REQUEST_MAGIC,
            CMD_FLAG_REQ_ONE,
            7,
            0xdead_beef,
            1 << 40,
            4096,
        );
        let r = parse_request(&h).expect("valid header");
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_REQ_ONE,
                command: Command::BlockStatus,
                handle: 0xdead_beef,
                offset: 1 << 40,
                length: 4096,
            }
        );
        assert_eq!(r.payload_len(), 0);
        let w = parse_request(&header(REQUEST_MAGIC, 0, 1, 1, 0, 512)).expect("write");
        assert_eq!((w.command, w.payload_len()), (Command::Write, 512));
        let u = parse_request(&header(REQUEST_MAGIC, 0, 0x99, 1, 0, 0)).expect("unknown");
        assert_eq!(u.command, Command::Unknown(0x99));
    }

    #[test]
    fn parse_request_rejects_short_and_bad_magic_headers() {
        let h = header(REQUEST_MAGIC, 0, 0, 1, 0, 1);
        for n in 0..REQUEST_LEN {
            assert_eq!(
                parse_request(&h[..n]),
                Err(RequestError::Truncated { got: n })
            );
        }
        let bad = header(SIMPLE_REPLY_MAGIC, 0, 0, 1, 0, 1);
        assert_eq!(
            parse_request(&bad),
            Err(RequestError::BadMagic {
                magic: SIMPLE_REPLY_MAGIC
            })
        );
        // Trailing bytes (the next request) are not the parser's concern.
        let mut two = h.clone();
        two.extend_from_slice(&h);
        assert!(parse_request(&two).is_ok());
    }

    #[test]
    fn parse_request_never_panics_on_arbitrary_bytes() {
        // A cheap stand-in for a fuzzer: every prefix of a pseudo-random stream.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for start in 0..bytes.len() - REQUEST_LEN {
            let _ = parse_request(&bytes[start..start + REQUEST_LEN]);
            let _ = parse_meta_context_option(&bytes[start..(start + 64).min(bytes.len())]);
            let _ = parse_info_option(&bytes[start..(start + 16).min(bytes.len())]);
        }
    }

    fn meta(export: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn meta_context_option_round_trips_and_rejects_lies() {
        let d = meta(b"gold@1", &[b"base:allocation", b"qemu:dirty-bitmap:x"]);
        let m = parse_meta_context_option(&d).expect("valid");
        assert_eq!(m.export, b"gold@1");
        assert_eq!(
            m.queries,
            vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]
        );
        // A query count far beyond the data: refused before allocating.
        let mut lie = meta(b"", &[]);
        lie[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_meta_context_option(&lie),
            Err(OptionError::Truncated { .. })
        ));
        // A query length past the end.
        let mut d2 = meta(b"", &[b"base:allocation"]);
        d2.truncate(d2.len() - 1);
        assert!(parse_meta_context_option(&d2).is_err());
        // Trailing garbage and a query without a namespace.
        let mut d3 = meta(b"", &[]);
        d3.push(0);
        assert_eq!(
            parse_meta_context_option(&d3),
            Err(OptionError::Trailing { extra: 1 })
        );
        assert_eq!(
            parse_meta_context_option(&meta(b"", &[b"allocation"])),
            Err(OptionError::NoNamespace)
        );
    }

    #[test]
    fn only_base_allocation_is_selected_and_base_is_a_wildcard_only_for_list() {
        let q = |v: &[&'static str]| v.iter().map(|s| s.as_bytes()).collect::<Vec<&[u8]>>();
        assert!(selects_base_allocation(&q(&["base:allocation"]), false));
        assert!(!selects_base_allocation(&q(&["base:"]), false));
        assert!(selects_base_allocation(&q(&["base:"]), true));
        assert!(selects_base_allocation(&q(&[]), true));
        assert!(!selects_base_allocation(&q(&[]), false));
        assert!(!selects_base_allocation(
            &q(&["x-unknown:thing", "base:nothing"]),
            true
        ));
    }

    #[test]
    fn info_option_parses_requests() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"gold");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let i = parse_info_option(&d).expect("valid");
        assert_eq!((i.export, i.requests), (&b"gold"[..], vec![3, 0]));
        d.pop();
        assert!(parse_info_option(&d).is_err());
    }

    #[test]
    fn runs_merge_neighbours_and_clip_to_the_range() {
        // chunks: D H H D D H, 4 KiB each
        let holes = [false, true, true, false, false, true];
        let is_hole = |i: u64| holes[i as usize];
        let r = runs(is_hole, 4096, 1000, 6 * 4096 - 1000 - 10, usize::MAX);
        assert_eq!(
            r,
            vec![
                Run {
                    offset: 1000,
                    len: 4096 - 1000,
                    hole: false
                },
                Run {
                    offset: 4096,
                    len: 8192,
                    hole: true
                },
                Run {
                    offset: 12288,
                    len: 8192,
                    hole: false
                },
                Run {
                    offset: 20480,
                    len: 4096 - 10,
                    hole: true
                },
            ]
        );
        let one = runs(is_hole, 4096, 4096, 3 * 4096, 1);
        assert_eq!(
            one,
            vec![Run {
                offset: 4096,
                len: 8192,
                hole: true
            }]
        );
        assert!(runs(is_hole, 4096, 0, 0, 8).is_empty());
    }

    #[test]
    fn block_status_chunk_has_the_documented_layout() {
        let c = block_status_chunk(
            7,
            &[
                Run {
                    offset: 0,
                    len: 4096,
                    hole: false,
                },
                Run {
                    offset: 4096,
                    len: 8192,
                    hole: true,
                },
            ],
        );
        assert_eq!(c.len(), CHUNK_HEADER_LEN + 4 + 16);
        assert_eq!(be32(&c, 0), Ok(STRUCTURED_REPLY_MAGIC));
        assert_eq!(be16(&c, 4), Ok(REPLY_FLAG_DONE));
        assert_eq!(be16(&c, 6), Ok(REPLY_TYPE_BLOCK_STATUS));
        assert_eq!(be64(&c, 8), Ok(7));
        assert_eq!(be32(&c, 16), Ok(20));
        assert_eq!(be32(&c, 20), Ok(BASE_ALLOCATION_ID));
        assert_eq!((be32(&c, 24), be32(&c, 28)), (Ok(4096), Ok(0)));
        assert_eq!(
            (be32(&c, 32), be32(&c, 36)),
            (Ok(8192), Ok(STATE_HOLE | STATE_ZERO))
        );
        let e = error_chunk(EINVAL, 9, "past the end");
        assert_eq!(be16(&e, 6), Ok(REPLY_TYPE_ERROR));
        assert_eq!(be32(&e, 20), Ok(EINVAL));
        assert_eq!(&e[26..], b"past the end");
    }
}
