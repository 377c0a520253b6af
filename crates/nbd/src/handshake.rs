//! Option haggling (fixed newstyle): from the greeting to the transmission phase.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::wire::*;
use crate::MAX_REQUEST;

/// Option data is bounded before it is read: the longest legitimate option is a
/// metadata-context list with a 4 KiB export name.
const MAX_OPTION_LEN: u32 = 16 << 10;

/// What the client negotiated for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Session {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` is the selected metadata context.
    pub base_allocation: bool,
}

impl Session {
    pub(crate) fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }
}

fn proto_err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).await?;
    w.flush().await
}

fn names_export(asked: &[u8], name: &str) -> bool {
    asked.is_empty() || asked == name.as_bytes()
}

/// Runs the option haggling; `Some(session)` when the client entered transmission,
/// `None` when it aborted.
pub(crate) async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    size: u64,
    name: &str,
) -> std::io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(proto_err(format!(
            "client sent unknown handshake flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    let mut s = Session::default();
    loop {
        if r.read_u64().await? != IHAVEOPT {
            return Err(proto_err("bad option magic"));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(proto_err(format!("option {opt} with {len} bytes of data")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if !names_export(&data, name) {
                    return Err(proto_err("unknown export name"));
                }
                let mut m = size.to_be_bytes().to_vec();
                m.extend_from_slice(&s.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&m).await?;
                w.flush().await?;
                return Ok(Some(s));
            }
            OPT_ABORT => {
                opt_reply(w, opt, REP_ACK, &[]).await?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                opt_reply(w, opt, REP_SERVER, &d).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                    continue;
                }
                s.structured = true;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A set replaces the selection, even when it fails.
                    s.base_allocation = false;
                }
                if !s.structured {
                    opt_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts",
                    )
                    .await?;
                    continue;
                }
                let q = match parse_meta_context_option(&data) {
                    Ok(q) => q,
                    Err(e) => {
                        opt_reply(w, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                if !names_export(q.export, name) {
                    opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                if selects_base_allocation(&q.queries, !set) {
                    // Ids in a list reply are reserved and sent as zero.
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    opt_reply(w, opt, REP_META_CONTEXT, &d).await?;
                    s.base_allocation |= set;
                }
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let i = match parse_info_option(&data) {
                    Ok(i) => i,
                    Err(e) => {
                        opt_reply(w, opt, REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        continue;
                    }
                };
                if !names_export(i.export, name) {
                    opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&s.transmission_flags().to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info).await?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &bs).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(s));
                }
            }
            _ => opt_reply(w, opt, REP_ERR_UNSUP, b"unsupported option").await?,
        }
    }
}
