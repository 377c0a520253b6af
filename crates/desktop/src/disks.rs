//! qcow2 overlays, the LUKS user disk and internal snapshots, through `qemu-img`.
//!
//! Overlays are created with `-u` (the base is not opened) so a volatile overlay can be
//! made before the base's NBD export is up. Snapshot operations open the overlay alone
//! (`backing: null`), so they never touch, or need, the base.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use tandem_tools::atomic::{TempFile, DEFAULT_MODE};

use crate::DesktopError;

fn qemu_img(action: &str, args: &[&str]) -> Result<String, DesktopError> {
    let out = Command::new("qemu-img").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DesktopError::QemuImgMissing
        } else {
            DesktopError::io("qemu-img", e)
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.contains("No space left on device") {
            return Err(DesktopError::DiskFull {
                path: args.last().map(|a| a.into()).unwrap_or_default(),
            });
        }
        return Err(DesktopError::QemuImg {
            action: action.to_string(),
            stderr,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The overlay opened alone, without its backing chain.
fn alone(image: &Path) -> String {
    let v = serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": image.display().to_string() },
        "backing": null,
    });
    format!("json:{v}")
}

/// Points an existing overlay at `backing` when it names another string for the same base
/// (an export socket that moved: a daemon upgrade, confinement turned on). Metadata only
/// (`rebase -u`): the caller has checked that the base's content is the one the overlay
/// was made on.
pub fn retarget_overlay(overlay: &Path, backing: &str) -> Result<(), DesktopError> {
    let current = backing_of(overlay)?;
    if current.as_deref() == Some(backing) {
        return Ok(());
    }
    qemu_img(
        "rebase (overlay)",
        &[
            "rebase",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            backing,
            &overlay.to_string_lossy(),
        ],
    )
    .map(drop)
}

/// Lets `write` (a tool) fill a temp file beside `out`, then moves it over `out`: a
/// failure (disk full included) leaves any previous file at `out` untouched and no temp
/// file behind. Temp files of crashed earlier runs are removed first.
fn write_beside(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<(), DesktopError>,
) -> Result<(), DesktopError> {
    tandem_tools::atomic::remove_stale(out).map_err(|e| DesktopError::io(out, e))?;
    let tmp = TempFile::beside(out, DEFAULT_MODE).map_err(|e| DesktopError::io(out, e))?;
    write(tmp.path()).map_err(|e| match e {
        DesktopError::DiskFull { .. } => DesktopError::DiskFull {
            path: out.to_path_buf(),
        },
        other => other,
    })?;
    tmp.persist().map_err(|e| DesktopError::io(out, e))
}

/// Creates a qcow2 overlay at `out` over `backing` (raw), atomically: a failure (disk
/// full included) leaves any previous file at `out` untouched.
pub fn create_overlay(backing: &str, size: u64, out: &Path) -> Result<(), DesktopError> {
    let size = size.to_string();
    write_beside(out, |tmp| {
        qemu_img(
            "create (overlay)",
            &[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                backing,
                &tmp.to_string_lossy(),
                &size,
            ],
        )
        .map(drop)
    })
}

/// The backing file an overlay's header names (`None`: it has none). Reads the header
/// only (`-U`: also while a VM holds the image).
pub fn backing_of(overlay: &Path) -> Result<Option<String>, DesktopError> {
    let info = qemu_img(
        "info (overlay)",
        &["info", "--output=json", "-U", &alone(overlay)],
    )?;
    let v: serde_json::Value = serde_json::from_str(&info).map_err(|e| DesktopError::QemuImg {
        action: "info (overlay)".into(),
        stderr: e.to_string(),
    })?;
    Ok(v["backing-filename"].as_str().map(str::to_string))
}

/// Creates a qcow2 overlay at `out` over `backing` (raw) whose own clusters are encrypted
/// (LUKS, AES-256-XTS) under the passphrase in `secret_file`; reads of clusters it does
/// not hold go to the plaintext base. For the corporate volatile system overlay: its key
/// is made fresh for each run and never stored, so what the system wrote is ciphertext
/// on the laptop and unreadable once that QEMU is gone. Atomic like [`create_overlay`].
/// The key is random (no stretching needed): the minimum PBKDF time is asked for.
pub fn create_encrypted_overlay(
    backing: &str,
    size: u64,
    out: &Path,
    secret_file: &Path,
) -> Result<(), DesktopError> {
    let size = size.to_string();
    let secret = format!("secret,id=sec0,file={}", secret_file.display());
    write_beside(out, |tmp| {
        qemu_img(
            "create (encrypted overlay)",
            &[
                "create",
                "-q",
                "-u",
                "--object",
                &secret,
                "-f",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                "-F",
                "raw",
                "-b",
                backing,
                &tmp.to_string_lossy(),
                &size,
            ],
        )
        .map(drop)
    })
}

/// Creates the encrypted user disk: an ext4 filesystem inside a LUKS qcow2 whose
/// passphrase is the text in `secret_file`.
pub fn create_luks_user_disk(
    out: &Path,
    size_mib: u64,
    secret_file: &Path,
) -> Result<(), DesktopError> {
    // The plaintext scratch filesystem: a temp file never persisted, removed when dropped.
    let raw_target = out.with_extension("raw");
    tandem_tools::atomic::remove_stale(&raw_target).map_err(|e| DesktopError::io(out, e))?;
    let mut raw = TempFile::beside(&raw_target, DEFAULT_MODE)
        .map_err(|e| DesktopError::io(&raw_target, e))?;
    let raw_path = raw.path().to_path_buf();
    raw.file()
        .set_len(size_mib * 1024 * 1024)
        .map_err(|e| DesktopError::io(&raw_path, e))?;
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tandem-user"])
        .arg(&raw_path)
        .output()
        .map_err(|e| DesktopError::io("mkfs.ext4", e))?;
    if !mkfs.status.success() {
        return Err(DesktopError::QemuImg {
            action: "mkfs.ext4 (user disk)".into(),
            stderr: String::from_utf8_lossy(&mkfs.stderr).trim().to_string(),
        });
    }
    let secret = format!("secret,id=sec0,file={}", secret_file.display());
    write_beside(out, |tmp| {
        qemu_img(
            "convert (encrypt user disk)",
            &[
                "convert",
                "-q",
                "--object",
                &secret,
                "-O",
                "qcow2",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0",
                &raw_path.to_string_lossy(),
                &tmp.to_string_lossy(),
            ],
        )
        .map(drop)
    })
}

/// One internal snapshot (recovery point).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Its name.
    pub name: String,
    /// Unix seconds when it was taken.
    #[serde(rename = "date-sec")]
    pub date_sec: u64,
}

#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    snapshots: Vec<Snapshot>,
}

/// Lists the internal snapshots of `image`.
pub fn snapshots(image: &Path) -> Result<Vec<Snapshot>, DesktopError> {
    let out = qemu_img("info", &["info", "--output=json", &alone(image)])?;
    let info: Info = serde_json::from_str(&out).map_err(|e| DesktopError::QemuImg {
        action: "info".into(),
        stderr: e.to_string(),
    })?;
    Ok(info.snapshots)
}

/// Takes an internal snapshot of a powered-off image.
pub fn snapshot_create(image: &Path, name: &str) -> Result<(), DesktopError> {
    qemu_img(
        "snapshot -c",
        &["snapshot", "-q", "-c", name, &alone(image)],
    )
    .map(drop)
}

/// Reverts a powered-off image to an internal snapshot.
pub fn snapshot_apply(image: &Path, name: &str) -> Result<(), DesktopError> {
    qemu_img(
        "snapshot -a",
        &["snapshot", "-q", "-a", name, &alone(image)],
    )
    .map(drop)
}

/// Deletes an internal snapshot.
pub fn snapshot_delete(image: &Path, name: &str) -> Result<(), DesktopError> {
    qemu_img(
        "snapshot -d",
        &["snapshot", "-q", "-d", name, &alone(image)],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_snapshots_round_trip_without_the_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ov = dir.path().join("ov.qcow2");
        // The base does not exist: overlays and snapshots must not need it.
        create_overlay("nbd+unix:///?socket=/nonexistent.sock", 64 << 20, &ov).expect("overlay");
        assert!(snapshots(&ov).expect("list").is_empty());
        snapshot_create(&ov, "before-update").expect("create");
        let list = snapshots(&ov).expect("list");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "before-update");
        snapshot_apply(&ov, "before-update").expect("apply");
        assert!(snapshot_apply(&ov, "missing").is_err());
        snapshot_delete(&ov, "before-update").expect("delete");
        assert!(snapshots(&ov).expect("list").is_empty());
    }

    #[test]
    fn disk_full_while_creating_an_overlay_is_a_clear_error_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("small");
        std::fs::create_dir(&mnt).expect("mkdir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !mounted {
            eprintln!("not run: mounting a 1 MiB tmpfs needs root (CI runs as root)");
            return;
        }
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(mnt.clone());
        let ov = mnt.join("system.qcow2");
        create_overlay("/nonexistent-base.raw", 64 << 20, &ov).expect("first overlay fits");
        let before = std::fs::read(&ov).expect("read overlay");
        // Fill the filesystem.
        let mut filler = std::fs::File::create(mnt.join("filler")).expect("filler");
        let block = vec![1u8; 4096];
        while std::io::Write::write_all(&mut filler, &block).is_ok() {}
        drop(filler);
        let err = create_overlay("/nonexistent-base.raw", 64 << 20, &ov).expect_err("no space");
        assert!(matches!(err, DesktopError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("no space left"), "{err}");
        assert_eq!(
            std::fs::read(&ov).expect("old overlay"),
            before,
            "the old overlay must survive"
        );
        assert!(tandem_tools::atomic::temp_files(&ov)
            .expect("list")
            .is_empty());
    }
}
