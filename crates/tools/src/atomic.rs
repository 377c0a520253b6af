//! Whole-file writes that neither a crash nor a concurrent writer can tear.
//!
//! Every write goes through a [`TempFile`] beside the target:
//!
//! 1. a new file `.<name>.<pid>.<counter>.<random>.tmp` in the target's directory,
//!    created with `O_EXCL` (`create_new`) and its final mode, so two writers of one
//!    target — threads or processes — never share a temp file;
//! 2. the bytes, then `fsync` of the file;
//! 3. `rename` over the target ([`TempFile::persist`]), or `link` to it, which fails
//!    when it exists ([`TempFile::persist_new`]);
//! 4. `fsync` of the directory, so the new name survives a crash too.
//!
//! A crash leaves the old file or the new one, never a mix; with concurrent writers the
//! target ends as one write, whole. On every error, and when a [`TempFile`] is dropped
//! unpersisted, the temp file is removed. Missing parent directories are created (and
//! their parents fsynced). A temp file survives only a crash or `kill -9`;
//! [`remove_stale`] clears those of writers that no longer run, and [`temp_files`] lists
//! all of a target's (for erasing every copy of it).
//!
//! Errors are the OS's [`io::Error`], kind and code intact: callers name the target path
//! in their own error types.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The mode `File::create` uses (before the umask): for files that are not secret.
pub const DEFAULT_MODE: u32 = 0o666;

/// How much of the target's name a temp name keeps, so it stays under `NAME_MAX`.
const NAME_PART_MAX: usize = 128;

/// Replaces `path` with `bytes`, atomically and durably (see the module doc). `mode` is
/// the new file's mode at creation (the umask applies, as for `open(2)`).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = TempFile::beside(path, mode)?;
    tmp.file().write_all(bytes)?;
    tmp.persist()
}

/// Creates `path` holding `bytes`, atomically and durably, only if it does not exist:
/// an error of kind [`io::ErrorKind::AlreadyExists`] otherwise, the existing file
/// untouched. For files whose first writer must win (generated keys): read the file
/// again on `AlreadyExists`. Readers never see it empty or half written.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = TempFile::beside(path, mode)?;
    tmp.file().write_all(bytes)?;
    tmp.persist_new()
}

/// `fsync`s directory `dir`, making the names created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(nonempty(dir))?.sync_all()
}

/// A new, uniquely named file beside a target, removed when dropped unless persisted.
///
/// For large files: stream into [`file`](Self::file), or let a tool write to
/// [`path`](Self::path) (it may truncate or even replace the file), then
/// [`persist`](Self::persist).
#[derive(Debug)]
pub struct TempFile {
    file: File,
    path: PathBuf,
    target: PathBuf,
    persisted: bool,
}

impl TempFile {
    /// Creates the temp file for `target` in `target`'s directory (created if missing),
    /// opened for reading and writing, with mode `mode` (the umask applies).
    pub fn beside(target: &Path, mode: u32) -> io::Result<TempFile> {
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} does not name a file", target.display()),
            )
        })?;
        let dir = parent_of(target);
        create_dirs(dir)?;
        let mut tries = 0;
        loop {
            let path = dir.join(temp_name(name));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        file,
                        path,
                        target: target.to_path_buf(),
                        persisted: false,
                    })
                }
                // Another writer's name (its counter and random part matched ours):
                // O_EXCL kept us apart; draw again.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The temp file's path (for a tool that writes the file itself).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file this temp file will replace or create.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open temp file, to write (and read back) its contents.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Makes the contents durable, renames the temp file over the target and makes the
    /// rename durable. On error before the rename, the temp file is removed.
    pub fn persist(mut self) -> io::Result<()> {
        self.sync()?;
        std::fs::rename(&self.path, &self.target)?;
        self.persisted = true;
        sync_dir(parent_of(&self.target))
    }

    /// Like [`persist`](Self::persist), but fails with [`io::ErrorKind::AlreadyExists`]
    /// when the target exists (the temp file is then removed and the target untouched).
    /// Uses `link(2)`, which every Linux filesystem Tandem stores state on supports.
    pub fn persist_new(mut self) -> io::Result<()> {
        self.sync()?;
        std::fs::hard_link(&self.path, &self.target)?;
        self.persisted = true;
        std::fs::remove_file(&self.path)?;
        sync_dir(parent_of(&self.target))
    }

    /// `fsync`s what is at the temp path: our file, or the one a tool put there instead.
    fn sync(&self) -> io::Result<()> {
        self.file.sync_all()?;
        if std::fs::metadata(&self.path)?.ino() != self.file.metadata()?.ino() {
            File::open(&self.path)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The temp files of `target` that exist now, each with the pid of its writer: what
/// erasing every copy of a target must remove besides the target itself.
pub fn temp_files(target: &Path) -> io::Result<Vec<(PathBuf, u32)>> {
    let Some(name) = target.file_name() else {
        return Ok(Vec::new());
    };
    let mut prefix = temp_prefix(name).into_vec();
    prefix.push(b'.');
    let entries = match std::fs::read_dir(parent_of(target)) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let pid = entry
            .file_name()
            .as_bytes()
            .strip_prefix(prefix.as_slice())
            .and_then(|rest| rest.strip_suffix(b".tmp"))
            .and_then(writer_pid);
        if let Some(pid) = pid {
            out.push((entry.path(), pid));
        }
    }
    Ok(out)
}

/// Removes the temp files of `target` whose writers no longer run (a crash or `kill -9`
/// ended them before they could clean up); returns how many. Temp files of this process
/// and of running processes are kept. Without `/proc`, nothing is removed. Meant for
/// large targets, before writing them again.
pub fn remove_stale(target: &Path) -> io::Result<u64> {
    if !Path::new("/proc/self").exists() {
        return Ok(0);
    }
    let mut removed = 0;
    for (path, pid) in temp_files(target)? {
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A string no other call, thread or process is handed at the same time:
/// `<pid>.<counter>.<random>`.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}.{}.{:016x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        random_u64()
    )
}

/// The pid in `<pid>.<counter>.<random>`, if `s` is exactly that.
fn writer_pid(s: &[u8]) -> Option<u32> {
    let mut parts = s.split(|&c| c == b'.');
    let (pid, counter, random) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |p: &[u8]| !p.is_empty() && p.iter().all(u8::is_ascii_digit);
    if parts.next().is_some()
        || !digits(counter)
        || random.len() != 16
        || !random.iter().all(u8::is_ascii_hexdigit)
        || !digits(pid)
    {
        return None;
    }
    std::str::from_utf8(pid).ok()?.parse().ok()
}

/// Random bits from the standard library's per-process hash keys (uniqueness does not
/// rest on them: `O_EXCL` does; they keep writers in other pid namespaces apart).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// `.<name>` (the name cut to [`NAME_PART_MAX`] bytes).
fn temp_prefix(name: &OsStr) -> OsString {
    let b = name.as_bytes();
    let mut s = OsString::from(".");
    s.push(OsStr::from_bytes(&b[..b.len().min(NAME_PART_MAX)]));
    s
}

fn temp_name(name: &OsStr) -> OsString {
    let mut s = temp_prefix(name);
    s.push(format!(".{}.tmp", unique_suffix()));
    s
}

fn nonempty(dir: &Path) -> &Path {
    if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    nonempty(path.parent().unwrap_or(Path::new(".")))
}

/// Creates `dir` and its missing parents, fsyncing the directory each one is created in.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut d = dir;
    loop {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(d);
                match d.parent() {
                    Some(p) if !p.as_os_str().is_empty() => d = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => sync_dir(parent_of(d))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("state.json");
        write_atomic(&p, b"one", 0o600).expect("first");
        write_atomic(&p, b"two, longer", 0o600).expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two, longer");
        assert_eq!(names(d.path()), ["state.json"]);
    }

    #[test]
    fn concurrent_writers_never_collide_and_one_write_wins_whole() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("catalog.json");
        const LEN: usize = 64 * 1024;
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..25u8 {
                        let byte = t * 25 + i;
                        write_atomic(p, &vec![byte; LEN], 0o644).expect("no writer fails");
                    }
                });
            }
        });
        let got = std::fs::read(&p).expect("read");
        assert_eq!(got.len(), LEN);
        assert!(got.iter().all(|&b| b == got[0]), "a mix of two writes");
        assert_eq!(names(d.path()), ["catalog.json"]);
    }

    #[test]
    fn failures_leave_no_temp_file() {
        let d = tempfile::tempdir().expect("tempdir");
        // Over a directory: the temp file is written, the rename fails.
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(sub.join("keep"), b"x").expect("write");
        assert!(write_atomic(&sub, b"data", 0o600).is_err());
        assert!(write_new(&sub, b"data", 0o600).is_err());
        assert_eq!(names(d.path()), ["sub"]);
        // Under a regular file: nothing can be created.
        let file = d.path().join("plain");
        std::fs::write(&file, b"x").expect("write");
        assert!(write_atomic(&file.join("x.json"), b"data", 0o600).is_err());
        assert_eq!(names(d.path()), ["plain", "sub"]);
        // No file name at all.
        let e = write_atomic(Path::new("/"), b"", 0o600).expect_err("root");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn mode_is_set_at_creation_and_replaces_the_old_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("secret.key");
        std::fs::write(&p, b"old").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomic(&p, b"new", 0o600).expect("write");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let q = d.path().join("other.key");
        write_new(&q, b"k", 0o400).expect("write_new");
        let mode = std::fs::metadata(&q).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
    }

    #[test]
    fn missing_parents_are_created() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a/b/c.json");
        write_atomic(&p, b"{}", 0o600).expect("write");
        assert_eq!(std::fs::read(&p).expect("read"), b"{}");
    }

    #[test]
    fn write_new_keeps_the_first_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("data.key");
        write_new(&p, b"first", 0o600).expect("first");
        let e = write_new(&p, b"second", 0o600).expect_err("exists");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&p).expect("read"), b"first");
        assert_eq!(names(d.path()), ["data.key"]);
    }

    #[test]
    fn concurrent_write_new_has_exactly_one_winner() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("key");
        let wins: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u8)
                .map(|t| {
                    let p = &p;
                    s.spawn(move || match write_new(p, &[t; 32], 0o600) {
                        Ok(()) => true,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                        Err(e) => panic!("{e}"),
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("join")).collect()
        });
        assert_eq!(wins.iter().filter(|w| **w).count(), 1);
        let winner = wins.iter().position(|w| *w).expect("a winner") as u8;
        assert_eq!(std::fs::read(&p).expect("read"), [winner; 32]);
        assert_eq!(names(d.path()), ["key"]);
    }

    #[test]
    fn temp_file_streams_persists_or_vanishes() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("disk.qcow2");
        let mut t = TempFile::beside(&p, DEFAULT_MODE).expect("temp");
        t.file().write_all(b"streamed").expect("write");
        assert_eq!(t.target(), p);
        t.persist().expect("persist");
        assert_eq!(std::fs::read(&p).expect("read"), b"streamed");
        // Dropped without persist: gone, the target untouched.
        let mut t = TempFile::beside(&p, DEFAULT_MODE).expect("temp");
        t.file().write_all(b"half").expect("write");
        drop(t);
        assert_eq!(std::fs::read(&p).expect("read"), b"streamed");
        assert_eq!(names(d.path()), ["disk.qcow2"]);
        // A tool that replaces the file at the temp path (unlink and create).
        let t = TempFile::beside(&p, DEFAULT_MODE).expect("temp");
        std::fs::remove_file(t.path()).expect("unlink");
        std::fs::write(t.path(), b"from a tool").expect("tool writes");
        t.persist().expect("persist");
        assert_eq!(std::fs::read(&p).expect("read"), b"from a tool");
        assert_eq!(names(d.path()), ["disk.qcow2"]);
    }

    #[test]
    fn long_names_still_fit() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("n".repeat(250));
        write_atomic(&p, b"x", 0o600).expect("write");
        assert_eq!(names(d.path()), ["n".repeat(250)]);
    }

    #[test]
    fn remove_stale_clears_only_dead_writers_of_that_target() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("user.qcow2");
        // Above the largest pid_max (2^22): no such process.
        let dead = d.path().join(".user.qcow2.4999999.3.0123456789abcdef.tmp");
        let mine = TempFile::beside(&p, DEFAULT_MODE).expect("temp");
        let other_target = d
            .path()
            .join(".user.qcow2.x.4999999.3.0123456789abcdef.tmp");
        let not_ours = d.path().join(".user.qcow2.tmp");
        for f in [&dead, &other_target, &not_ours] {
            std::fs::write(f, b"").expect("write");
        }
        assert_eq!(temp_files(&p).expect("list").len(), 2);
        assert_eq!(remove_stale(&p).expect("sweep"), 1);
        assert!(!dead.exists());
        assert_eq!(
            temp_files(&p).expect("list"),
            [(mine.path().to_path_buf(), std::process::id())]
        );
        assert!(mine.path().exists() && other_target.exists() && not_ours.exists());
        assert_eq!(remove_stale(&d.path().join("none/x")).expect("no dir"), 0);
    }
}
