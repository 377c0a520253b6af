//! What real clients never send: out-of-range block status, unknown metadata contexts,
//! malformed requests and options, a client that hangs up in the middle of a reply. A
//! small hand-written client speaks the wire format directly.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::util::*;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE: u32 = 0x6744_6698;
const STRUCTURED: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META: u32 = 9;
const OPT_SET_META: u32 = 10;
const REP_ACK: u32 = 1;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_DF: u16 = 4;
const FLAG_REQ_ONE: u16 = 8;
const TYPE_DATA: u16 = 1;
const TYPE_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_ERROR: u16 = 0x8001;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;

struct Client {
    s: UnixStream,
}

/// One reply chunk (or a simple reply, as type 0xffff with `error` set).
#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    handle: u64,
    payload: Vec<u8>,
    error: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

impl Client {
    /// Connects and reads the greeting; options are up to the test.
    fn open(ex: &Export) -> Client {
        let s = UnixStream::connect(&ex.socket).expect("connect");
        // A guard against a hung server, not a timing assertion.
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut c = Client { s };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        c.s.write_all(&3u32.to_be_bytes()).expect("client flags");
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).expect("send option");
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).expect("option reply");
            assert_eq!(be32(&h, 8), opt, "reply to another option");
            let (kind, len) = (be32(&h, 12), be32(&h, 16) as usize);
            let mut d = vec![0u8; len];
            self.s.read_exact(&mut d).expect("option reply data");
            replies.push((kind, d));
            if kind == REP_ACK || kind & 0x8000_0000 != 0 {
                return replies;
            }
        }
    }

    /// Structured replies, the given metadata queries, then `NBD_OPT_GO`.
    fn connect(ex: &Export, structured: bool, queries: &[&str]) -> Client {
        let mut c = Client::open(ex);
        if structured {
            assert_eq!(
                c.option(OPT_STRUCTURED_REPLY, &[]).last().expect("reply").0,
                REP_ACK
            );
            if !queries.is_empty() {
                let r = c.option(OPT_SET_META, &meta_data("", queries));
                assert_eq!(r.last().expect("reply").0, REP_ACK);
            }
        }
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(c.option(OPT_GO, &go).last().expect("reply").0, REP_ACK);
        c
    }

    fn request(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
        let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&h).expect("send request");
    }

    /// Reads one reply chunk; a simple reply to a read carries `read_len` bytes of data.
    fn chunk(&mut self, read_len: usize) -> Chunk {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).expect("reply magic");
        match u32::from_be_bytes(m) {
            SIMPLE => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).expect("simple reply");
                let error = be32(&h, 0);
                let mut payload = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut payload).expect("simple reply data");
                Chunk {
                    flags: 1,
                    kind: 0xffff,
                    handle: be64(&h, 4),
                    payload,
                    error,
                }
            }
            STRUCTURED => {
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).expect("chunk header");
                let mut payload = vec![0u8; be32(&h, 12) as usize];
                self.s.read_exact(&mut payload).expect("chunk payload");
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let error = if kind & 0x8000 != 0 {
                    be32(&payload, 0)
                } else {
                    0
                };
                Chunk {
                    flags,
                    kind,
                    handle: be64(&h, 4),
                    payload,
                    error,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// All chunks of one structured reply.
    fn reply(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk(0);
            let done = c.flags & 1 != 0;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// A block-status request, answered with one chunk.
    fn block_status(&mut self, flags: u16, offset: u64, len: u32) -> Chunk {
        self.request(flags, CMD_BLOCK_STATUS, 42, offset, len);
        let mut r = self.reply();
        assert_eq!(r.len(), 1, "block status answered with {r:?}");
        let c = r.remove(0);
        assert_eq!(c.handle, 42);
        c
    }

    /// The server closed the connection (EOF or reset), rather than hanging.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn extents(c: &Chunk) -> Vec<(u64, u32)> {
    assert_eq!(c.kind, TYPE_BLOCK_STATUS, "{c:?}");
    assert_eq!((c.payload.len() - 4) % 8, 0);
    c.payload[4..]
        .chunks_exact(8)
        .map(|d| (u64::from(be32(d, 0)), be32(d, 4)))
        .collect()
}

fn error_message(c: &Chunk) -> String {
    let n = u16::from_be_bytes([c.payload[4], c.payload[5]]) as usize;
    String::from_utf8_lossy(&c.payload[6..6 + n]).into_owned()
}

#[test]
fn block_status_describes_holes_and_data_exactly() {
    let ex = Export::start();
    let mut c = Client::connect(&ex, true, &["base:allocation"]);
    let size = image_size();
    let got = extents(&c.block_status(0, 0, size as u32));
    let want: Vec<(u64, u32)> = expected_runs()
        .iter()
        .map(|r| (r.1, if r.2 { 3 } else { 0 }))
        .collect();
    assert_eq!(got, want);
    // Unaligned start and end inside runs; REQ_ONE gives one extent no longer than asked.
    let got = extents(&c.block_status(0, CHUNK + 100, 1000));
    assert_eq!(got, vec![(1000, 3)]);
    let got = extents(&c.block_status(FLAG_REQ_ONE, CHUNK, (CHUNK * 10) as u32));
    assert_eq!(got, vec![(3 * CHUNK, 3)]);
    // The last, partial chunk.
    let got = extents(&c.block_status(0, size - 4096, 4096));
    assert_eq!(got, vec![(4096, 0)]);
}

#[test]
fn out_of_range_block_status_is_einval_and_the_connection_survives() {
    let ex = Export::start();
    let mut c = Client::connect(&ex, true, &["base:allocation"]);
    let size = image_size();
    for (off, len) in [
        (size, 4096u32),
        (size - 4096, 8192),
        (size + (1 << 40), 1),
        (u64::MAX - 100, 4096),
        (0, 0),
    ] {
        let e = c.block_status(0, off, len);
        assert_eq!(
            (e.kind, e.error),
            (TYPE_ERROR, EINVAL),
            "{off}+{len}: {e:?}"
        );
        if len > 0 {
            assert!(
                error_message(&e).contains("outside the export"),
                "{}",
                error_message(&e)
            );
        }
    }
    assert_eq!(extents(&c.block_status(0, 0, 4096)), vec![(4096, 0)]);
}

#[test]
fn unknown_meta_contexts_select_nothing_and_block_status_is_then_refused() {
    let ex = Export::start();
    let mut c = Client::open(&ex);
    // Metadata contexts before structured replies: refused, the handshake goes on.
    let r = c.option(OPT_SET_META, &meta_data("", &["base:allocation"]));
    assert_eq!(r.last().expect("reply").0, REP_ERR_INVALID);
    assert_eq!(
        c.option(OPT_STRUCTURED_REPLY, &[]).last().expect("reply").0,
        REP_ACK
    );
    // Listing: unknown namespaces are ignored, `base:` is a wildcard.
    let r = c.option(
        OPT_LIST_META,
        &meta_data("", &["x-unknown:thing", "base:nothing"]),
    );
    assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![REP_ACK]);
    let r = c.option(OPT_LIST_META, &meta_data("", &["base:"]));
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].0, &r[0].1[4..]),
        (REP_META_CONTEXT, &b"base:allocation"[..])
    );
    // A query without a namespace, and a query count beyond the data: invalid.
    let r = c.option(OPT_SET_META, &meta_data("", &["allocation"]));
    assert_eq!(r.last().expect("reply").0, REP_ERR_INVALID);
    let mut lie = meta_data("", &[]);
    lie[4..8].copy_from_slice(&0x4000_0000u32.to_be_bytes());
    assert_eq!(
        c.option(OPT_SET_META, &lie).last().expect("reply").0,
        REP_ERR_INVALID
    );
    // Selecting only unknown contexts selects nothing.
    let r = c.option(OPT_SET_META, &meta_data("", &["x-unknown:thing", "base:"]));
    assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![REP_ACK]);
    let mut go = 0u32.to_be_bytes().to_vec();
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(c.option(OPT_GO, &go).last().expect("reply").0, REP_ACK);
    let e = c.block_status(0, 0, 4096);
    assert_eq!((e.kind, e.error), (TYPE_ERROR, EINVAL));
    assert!(
        error_message(&e).contains("base:allocation"),
        "{}",
        error_message(&e)
    );
    // Reads still work.
    c.request(0, CMD_READ, 5, 0, 4096);
    let r = c.reply();
    assert_eq!(r[0].kind, TYPE_DATA);
    assert_eq!(&r[0].payload[8..], &ex.data[..4096]);
}

#[test]
fn structured_reads_send_holes_as_hole_chunks_and_df_as_one_chunk() {
    let ex = Export::start();
    let mut c = Client::connect(&ex, true, &["base:allocation"]);
    // Chunks 0..=5: data, 3 holes, data, data; start and end mid-chunk.
    let (off, len) = (1000u64, (6 * CHUNK - 2000) as u32);
    c.request(0, CMD_READ, 9, off, len);
    let chunks = c.reply();
    let kinds: Vec<u16> = chunks.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, vec![TYPE_DATA, TYPE_HOLE, TYPE_DATA]);
    let mut rebuilt = vec![0xeeu8; len as usize];
    for ch in &chunks {
        assert_eq!(ch.handle, 9);
        let at = (be64(&ch.payload, 0) - off) as usize;
        if ch.kind == TYPE_HOLE {
            assert_eq!(ch.payload.len(), 12);
            let n = be32(&ch.payload, 8) as usize;
            rebuilt[at..at + n].fill(0);
        } else {
            let d = &ch.payload[8..];
            rebuilt[at..at + d.len()].copy_from_slice(d);
        }
    }
    assert!(rebuilt == ex.data[off as usize..off as usize + len as usize]);
    assert_eq!(chunks.last().expect("chunks").flags & 1, 1);
    // Don't fragment: one data chunk with the zeros in it.
    c.request(FLAG_DF, CMD_READ, 10, off, len);
    let chunks = c.reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].kind, TYPE_DATA);
    assert!(chunks[0].payload[8..] == ex.data[off as usize..off as usize + len as usize]);
    // A read past the end is an error chunk, not a hang.
    c.request(0, CMD_READ, 11, image_size() - 10, 20);
    let r = c.reply();
    assert_eq!((r[0].kind, r[0].error), (TYPE_ERROR, EINVAL));
}

#[test]
fn simple_replies_still_serve_old_clients() {
    let ex = Export::start();
    let mut c = Client::connect(&ex, false, &[]);
    let size = image_size() as usize;
    c.request(0, CMD_READ, 1, 0, size as u32);
    let r = c.chunk(size);
    assert_eq!((r.kind, r.error, r.handle), (0xffff, 0, 1));
    assert!(r.payload == ex.data);
    // Block status without structured replies: EINVAL, and the connection goes on.
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 4096);
    let r = c.chunk(0);
    assert_eq!((r.kind, r.error), (0xffff, EINVAL));
    // A write to the read-only export: its payload is skipped, EPERM.
    c.request(0, CMD_WRITE, 3, 0, 4096);
    c.s.write_all(&[7u8; 4096]).expect("payload");
    assert_eq!(c.chunk(0).error, EPERM);
    // An unknown command.
    c.request(0, 0x55, 4, 0, 0);
    assert_eq!(c.chunk(0).error, EINVAL);
    c.request(0, CMD_READ, 5, 4096, 4096);
    assert!(c.chunk(4096).payload == ex.data[4096..8192]);
}

#[test]
fn malformed_requests_close_the_connection_and_others_carry_on() {
    let ex = Export::start();
    let mut good = Client::connect(&ex, true, &["base:allocation"]);
    // A bad magic: the server hangs up instead of guessing where the next request starts.
    let mut bad = Client::connect(&ex, true, &[]);
    bad.s.write_all(&[0x55u8; 28]).expect("garbage");
    assert!(
        bad.closed(),
        "the server answered a request with a bad magic"
    );
    // A truncated header, then the client goes away.
    let mut short = Client::connect(&ex, false, &[]);
    short
        .s
        .write_all(&REQUEST_MAGIC.to_be_bytes())
        .expect("partial header");
    drop(short);
    // A write whose payload the server will not skip (over the maximum request).
    let mut huge = Client::connect(&ex, false, &[]);
    huge.request(0, CMD_WRITE, 1, 0, u32::MAX);
    assert!(huge.closed(), "the server waited for a 4 GiB write payload");
    // Garbage instead of an option.
    let mut opt = Client::open(&ex);
    opt.s.write_all(&[0u8; 16]).expect("garbage option");
    assert!(opt.closed());
    // The well-behaved client never noticed.
    assert_eq!(extents(&good.block_status(0, 0, 4096)), vec![(4096, 0)]);
}

#[test]
fn a_client_that_hangs_up_mid_reply_does_not_hurt_the_server() {
    let ex = Export::start();
    let size = image_size() as u32;
    for structured in [false, true] {
        for _ in 0..8 {
            let mut c = Client::connect(&ex, structured, &[]);
            // Several whole-image reads queued, far more than the socket buffers hold.
            for h in 0..16 {
                c.request(FLAG_DF * u16::from(structured), CMD_READ, h, 0, size);
            }
            let mut first = [0u8; 100];
            c.s.read_exact(&mut first).expect("start of a reply");
            drop(c);
        }
    }
    // The server still serves, correctly, and shuts down when dropped.
    let mut c = Client::connect(&ex, true, &["base:allocation"]);
    c.request(FLAG_DF, CMD_READ, 1, 0, size);
    let r = c.reply();
    assert!(r[0].payload[8..] == ex.data[..]);
}
