//! A minimal read-only NBD client over a unix socket: the view of a disk that only QEMU
//! can open (an encrypted qcow2 whose key lives in the VM spec, an overlay whose backing
//! file is itself an NBD export). `qemu-nbd --read-only` does the decrypting and chain
//! following; our parsers still read the bytes in our own process.
//!
//! Protocol (fixed newstyle): server greeting `NBDMAGIC` + `IHAVEOPT` + flags; client
//! flags (FIXED_NEWSTYLE | NO_ZEROES); `NBD_OPT_EXPORT_NAME`; server answers the export
//! size and transmission flags. Then simple `NBD_CMD_READ` requests, one at a time, at
//! most [`MAX_REQUEST`] bytes each; structured replies are never negotiated.

use std::io::{self, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use tandem_tools::bytes::{be16, be32, be64};

use crate::view::{check_bounds, ReadAt};
use crate::DiskError;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
/// Largest single read request (QEMU accepts 32 MiB).
pub const MAX_REQUEST: usize = 4 << 20;

/// A read-only NBD export as a disk view.
#[derive(Debug)]
pub struct NbdClient {
    sock: Mutex<UnixStream>,
    size: u64,
    handle: Mutex<u64>,
}

fn proto(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("nbd: {msg}"))
}

impl NbdClient {
    /// Connects to the default export on the unix socket `path`.
    pub fn connect(path: &Path) -> Result<Self, DiskError> {
        let err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut s = UnixStream::connect(path).map_err(err)?;
        let size = handshake(&mut s).map_err(err)?;
        Ok(NbdClient {
            sock: Mutex::new(s),
            size,
            handle: Mutex::new(1),
        })
    }
}

fn handshake(s: &mut UnixStream) -> io::Result<u64> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if be64(&g, 0)? != NBDMAGIC || be64(&g, 8)? != IHAVEOPT {
        return Err(proto("not a newstyle NBD server"));
    }
    let server_flags = be16(&g, 16)?;
    let no_zeroes = server_flags & 2 != 0;
    let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
    let mut out = Vec::new();
    out.extend_from_slice(&client_flags.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    out.extend_from_slice(&0u32.to_be_bytes()); // default export ""
    s.write_all(&out)?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok(be64(&r, 0)?)
}

impl ReadAt for NbdClient {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_bounds(self.size, offset, buf.len())?;
        let mut s = self.sock.lock().map_err(|_| proto("connection poisoned"))?;
        for (i, piece) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            let handle = {
                let mut h = self.handle.lock().map_err(|_| proto("handle poisoned"))?;
                *h += 1;
                *h
            };
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
            req.extend_from_slice(&handle.to_be_bytes());
            req.extend_from_slice(&off.to_be_bytes());
            req.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            s.write_all(&req)?;
            let mut rep = [0u8; 16];
            s.read_exact(&mut rep)?;
            let (magic, error, got) = (be32(&rep, 0)?, be32(&rep, 4)?, be64(&rep, 8)?);
            if magic != REPLY_MAGIC || got != handle {
                return Err(proto("unexpected reply"));
            }
            if error != 0 {
                return Err(io::Error::from_raw_os_error(error as i32));
            }
            s.read_exact(piece)?;
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sock.lock() {
            let mut req = Vec::with_capacity(28);
            req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            req.extend_from_slice(&0u16.to_be_bytes());
            req.extend_from_slice(&2u16.to_be_bytes()); // NBD_CMD_DISC
            req.extend_from_slice(&[0u8; 20]);
            let _ = s.write_all(&req);
        }
    }
}
