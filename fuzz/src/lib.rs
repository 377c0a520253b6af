//! Tandem's fuzz targets. Each target is one `pub fn NAME(data: &[u8])` in [`targets`],
//! listed in [`TARGETS`]; `src/bin/NAME.rs` runs it under AFL++ (cargo-afl), and
//! `tests/replay.rs` runs it on every committed regression input (`regressions/NAME/`)
//! and every generated seed ([`seeds`]), so a crash found once stays fixed.
//!
//! What counts as a crash: a panic anywhere in Tandem's code, a panic that escapes a
//! target, an abort (allocation failure, stack overflow) or a broken invariant the target
//! asserts. A panic inside a third-party parser (`fatfs`, `ntfs`, `ext4-view`, …) that the
//! scanner catches by design (the file or volume ends `not_scanned`) is not one: see
//! [`install_panic_policy`].

use std::sync::Arc;

pub mod seeds;
pub mod targets;

/// One fuzz target.
pub struct Target {
    /// Binary, seed and regression directory name.
    pub name: &'static str,
    /// The body: must return normally on any input.
    pub run: fn(&[u8]),
}

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "manifest",
        run: targets::manifest,
    },
    Target {
        name: "manifest_delta",
        run: targets::manifest_delta,
    },
    Target {
        name: "chunk_delta",
        run: targets::chunk_delta,
    },
    Target {
        name: "envelope",
        run: targets::envelope,
    },
    Target {
        name: "backup_manifest",
        run: targets::backup_manifest,
    },
    Target {
        name: "api_request",
        run: targets::api_request,
    },
    Target {
        name: "nbd_request",
        run: targets::nbd_request,
    },
    Target {
        name: "qcow2",
        run: targets::qcow2,
    },
    Target {
        name: "partitions",
        run: targets::partitions,
    },
    Target {
        name: "allocation",
        run: targets::allocation,
    },
    Target {
        name: "scan_ext4",
        run: targets::scan_ext4,
    },
    Target {
        name: "scan_fat",
        run: targets::scan_fat,
    },
    Target {
        name: "scan_ntfs",
        run: targets::scan_ntfs,
    },
];

/// Installs the panic hook every target runs under (once per process): a panic located
/// in a crates.io dependency only unwinds (the scanner's `catch_unwind` turns it into
/// `not_scanned`; one that escapes the target still fails it), any other panic prints
/// and aborts, so AFL++ records it even where the product would have caught it. Under
/// [`replay`] the same panics are recorded instead of aborting.
pub fn install_panic_policy() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let third_party = info.location().is_some_and(|l| {
                let f = l.file();
                f.contains("/registry/src/") || f.contains("/git/checkouts/")
            });
            if third_party {
                LAST_DEPENDENCY_PANIC.with(|l| *l.borrow_mut() = Some(describe(info)));
                return;
            }
            let recorded = RECORD.with(|r| {
                let mut r = r.borrow_mut();
                if let Some(found) = r.as_mut() {
                    found.push(describe(info));
                    true
                } else {
                    false
                }
            });
            if !recorded {
                default(info);
                std::process::abort();
            }
        }));
    });
}

thread_local! {
    /// Panics seen by [`replay`] on this thread (`None`: not replaying, abort instead).
    static RECORD: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
    /// The last panic located in a dependency on this thread.
    static LAST_DEPENDENCY_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

fn describe(info: &std::panic::PanicHookInfo) -> String {
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into());
    match info.location() {
        Some(l) => format!("{msg} at {}:{}", l.file(), l.line()),
        None => msg,
    }
}

/// Runs `f` on `data` as the fuzzer would, but reports instead of aborting: `Err` lists
/// each panic in Tandem's code (even one the product caught) and any panic that escaped.
pub fn replay(f: fn(&[u8]), data: &[u8]) -> Result<(), Vec<String>> {
    install_panic_policy();
    RECORD.with(|r| *r.borrow_mut() = Some(Vec::new()));
    LAST_DEPENDENCY_PANIC.with(|l| l.borrow_mut().take());
    let escaped = std::panic::catch_unwind(|| f(data)).is_err();
    let mut found = RECORD.with(|r| r.borrow_mut().take()).unwrap_or_default();
    let dependency = LAST_DEPENDENCY_PANIC.with(|l| l.borrow_mut().take());
    if escaped && found.is_empty() {
        let what = dependency.unwrap_or_else(|| "a panic".into());
        found.push(format!("escaped the target: {what}"));
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(found)
    }
}

/// An in-memory disk holding the fuzzer's bytes.
pub fn disk(data: &[u8]) -> Arc<dyn tandem_disk::ReadAt> {
    Arc::new(tandem_disk::MemDisk(data.to_vec()))
}

/// An in-memory disk of the fuzzer's bytes followed by zeros up to `min` bytes (AFL++
/// takes inputs up to 1 MiB; an NTFS volume is at least that, but all its metadata sits
/// in the first 830 KiB).
pub fn padded_disk(data: &[u8], min: usize) -> Arc<dyn tandem_disk::ReadAt> {
    let mut v = data.to_vec();
    if v.len() < min {
        v.resize(min, 0);
    }
    Arc::new(tandem_disk::MemDisk(v))
}

/// Reads every byte of `view` in 64 KiB pieces, up to `limit` bytes (a view may claim
/// terabytes; reading a bounded prefix exercises every mapping path).
pub fn read_some(view: &dyn tandem_disk::ReadAt, limit: u64) {
    let end = view.size().min(limit);
    let mut buf = vec![0u8; 65536];
    let mut off = 0u64;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        if view.read_at(&mut buf[..n], off).is_err() {
            return;
        }
        off += n as u64;
    }
}

/// A fixed trusted key (its private half is irrelevant: the fuzzer cannot sign).
pub fn trusted() -> Vec<tandem_proto::PublicKey> {
    static KEY: std::sync::OnceLock<tandem_proto::PublicKey> = std::sync::OnceLock::new();
    vec![KEY
        .get_or_init(|| tandem_proto::SigningKey::generate().public())
        .clone()]
}
