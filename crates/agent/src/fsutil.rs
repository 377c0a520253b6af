//! Small, careful file helpers: atomic writes, versioned JSON state files, erasure.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not what we wrote (wrong format tag or bad JSON).
    #[error("{path} is damaged or from another version ({why})")]
    Damaged {
        /// Which file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// [`tandem_tools::atomic::write_atomic`], its error naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    tandem_tools::atomic::write_atomic(path, bytes, mode).map_err(|source| FileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A JSON state file: `{"format": FORMAT, ...value}`. The format tag is the file's
/// magic and version; a file with another tag is refused, never guessed at.
pub fn write_state<T: Serialize>(path: &Path, format: &str, value: &T) -> Result<(), FileError> {
    let mut v = serde_json::to_value(value).expect("serializing plain data cannot fail");
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("format".into(), serde_json::Value::String(format.into()));
    }
    let text = serde_json::to_vec_pretty(&v).expect("serializing plain data cannot fail");
    write_atomic(path, &text, 0o600)
}

/// Reads a file written by [`write_state`]; `Ok(None)` when it does not exist.
pub fn read_state<T: DeserializeOwned>(path: &Path, format: &str) -> Result<Option<T>, FileError> {
    const LIMIT: u64 = 4 * 1024 * 1024;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FileError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let damaged = |why: String| FileError::Damaged {
        path: path.to_path_buf(),
        why,
    };
    if bytes.len() as u64 > LIMIT {
        return Err(damaged(format!("larger than {LIMIT} bytes")));
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
    let tag = v
        .as_object_mut()
        .and_then(|m| m.remove("format"))
        .and_then(|f| f.as_str().map(str::to_string));
    if tag.as_deref() != Some(format) {
        return Err(damaged(format!(
            "expected format {format:?}, found {tag:?}"
        )));
    }
    serde_json::from_value(v)
        .map(Some)
        .map_err(|e| damaged(e.to_string()))
}

/// Overwrites a file's bytes with random data, syncs, then deletes it: on a plain disk
/// the old bytes are gone from that block (SSDs may keep copies; the docs say so).
pub fn shred(path: &Path) -> Result<(), FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::symlink_metadata(path).map_err(io)?.len();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut left = len;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut buf[..n]);
            f.write_all(&buf[..n]).map_err(io)?;
            left -= n as u64;
        }
        f.sync_all().map_err(io)?;
    }
    std::fs::remove_file(path).map_err(io)
}

/// Shreds every regular file under `dir` (recursively) and removes the tree. Returns how
/// many files were shredded. A missing `dir` is zero files.
pub fn shred_tree(dir: &Path) -> Result<u64, FileError> {
    let io = |source| FileError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(io(source)),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let ty = entry.file_type().map_err(io)?;
        if ty.is_dir() {
            n += shred_tree(&path)?;
        } else if ty.is_file() {
            shred(&path)?;
            n += 1;
        } else {
            std::fs::remove_file(&path).map_err(|source| FileError::Io { path, source })?;
        }
    }
    std::fs::remove_dir(dir).map_err(io)?;
    Ok(n)
}

/// Removes a tree; a missing tree is fine.
pub fn remove_tree(dir: &Path) -> Result<bool, FileError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(FileError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_files_round_trip_and_refuse_other_formats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.json");
        write_state(&p, "tandem-x-v1", &serde_json::json!({"a": 1})).expect("write");
        let back: serde_json::Value = read_state(&p, "tandem-x-v1").expect("read").expect("some");
        assert_eq!(back, serde_json::json!({"a": 1}));
        assert!(read_state::<serde_json::Value>(&p, "tandem-x-v2").is_err());
        assert!(
            read_state::<serde_json::Value>(&dir.path().join("none"), "f")
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn shred_tree_removes_every_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(keys.join("sub")).expect("mkdir");
        std::fs::write(keys.join("a.key"), b"secret-a").expect("write");
        std::fs::write(keys.join("sub/b.key"), vec![7u8; 100_000]).expect("write");
        assert_eq!(shred_tree(&keys).expect("shred"), 2);
        assert!(!keys.exists());
        assert_eq!(shred_tree(&keys).expect("again"), 0);
    }
}
