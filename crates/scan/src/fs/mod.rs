//! One walker per filesystem, same shape: `walk(volume view, ctx)` visits every regular
//! file and hands it to the context; `Err(verdict)` means the volume itself could not be
//! scanned. Limits shared by all walkers are below.

pub(crate) mod ext;
pub(crate) mod ext_view;
pub(crate) mod fat;
pub(crate) mod ntfs;

/// Deepest directory nesting followed (deeper is a hostile loop or nonsense).
pub(crate) const MAX_DEPTH: usize = 256;
/// Most directory entries visited per volume.
pub(crate) const MAX_ENTRIES: u64 = 50_000_000;
