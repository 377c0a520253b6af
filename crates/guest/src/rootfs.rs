//! ext4 root disks for the test and demo guest, made with `mkfs.ext4 -d` from a staged
//! tree: no root privileges, no loop devices.
//!
//! Every image carries `/etc/tandem-release` (printed on the serial console at boot as
//! `tandem-release: <text>`) and may carry `/etc/tandem/boot.sh`, run at boot. Payload
//! files are generated deterministically from a seed so two versions of an image share
//! everything but what the recipe changes — the shape of a real gold-image update.

use std::path::{Path, PathBuf};

use crate::{run_tool, GuestError};

/// Guest init for the root disk (pid 1 after `switch_root`).
pub const ROOT_INIT: &str = include_str!("assets/root-init.sh");

/// One root disk to build.
#[derive(Debug, Clone)]
pub struct RootImageSpec {
    /// Text of `/etc/tandem-release`.
    pub release: String,
    /// Content of `/etc/tandem/boot.sh`, run at every boot.
    pub boot_script: Option<String>,
    /// Size of the image in MiB.
    pub size_mib: u64,
    /// Generated payload files: (path inside the image, seed) — same seed, same bytes.
    pub payload: Vec<(String, u64)>,
}

/// Deterministic, partly compressible content for a payload file: a text header then
/// pseudo-random bytes mixed with runs of text, about 24 KiB.
pub fn payload_bytes(seed: u64) -> Vec<u8> {
    let len = 16 * 1024 + (seed % 16) as usize * 1024;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(format!("tandem payload seed={seed}\n").as_bytes());
    let mut xof = blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof();
    let mut block = [0u8; 512];
    let mut i = 0u64;
    while out.len() < len {
        if i.is_multiple_of(2) {
            xof.fill(&mut block);
            out.extend_from_slice(&block);
        } else {
            for _ in 0..8 {
                out.extend_from_slice(format!("line {i:08} of seed {seed:016x} \n").as_bytes());
            }
        }
        i += 1;
    }
    out.truncate(len);
    out
}

/// Stages the tree for `spec` in `stage` (which is emptied first).
pub fn stage_tree(spec: &RootImageSpec, busybox: &Path, stage: &Path) -> Result<(), GuestError> {
    if stage.exists() {
        std::fs::remove_dir_all(stage).map_err(|e| GuestError::io(stage, e))?;
    }
    for d in [
        "bin",
        "sbin",
        "etc/tandem",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "home/user",
        "usr/bin",
        "root",
    ] {
        let p = stage.join(d);
        std::fs::create_dir_all(&p).map_err(|e| GuestError::io(&p, e))?;
    }
    let write = |rel: &str, data: &[u8], mode: u32| -> Result<(), GuestError> {
        use std::os::unix::fs::PermissionsExt as _;
        let p = stage.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| GuestError::io(parent, e))?;
        }
        std::fs::write(&p, data).map_err(|e| GuestError::io(&p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| GuestError::io(&p, e))
    };
    let bb = std::fs::read(busybox).map_err(|e| GuestError::io(busybox, e))?;
    write("bin/busybox", &bb, 0o755)?;
    std::os::unix::fs::symlink("busybox", stage.join("bin/sh"))
        .map_err(|e| GuestError::io(stage.join("bin/sh"), e))?;
    write("sbin/init", ROOT_INIT.as_bytes(), 0o755)?;
    write(
        "etc/tandem-release",
        format!("{}\n", spec.release).as_bytes(),
        0o644,
    )?;
    write("etc/hostname", b"tandem-guest\n", 0o644)?;
    if let Some(script) = &spec.boot_script {
        write("etc/tandem/boot.sh", script.as_bytes(), 0o755)?;
    }
    for (rel, seed) in &spec.payload {
        write(rel.trim_start_matches('/'), &payload_bytes(*seed), 0o644)?;
    }
    Ok(())
}

/// Builds the ext4 image `out` from `spec`.
pub fn build_root_image(
    spec: &RootImageSpec,
    busybox: &Path,
    work: &Path,
    out: &Path,
) -> Result<PathBuf, GuestError> {
    let stage = work.join(format!(
        "stage-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("root")
    ));
    stage_tree(spec, busybox, &stage)?;
    // Fixed timestamps so versions built from similar trees share their metadata blocks.
    run_tool(
        "find",
        &[
            &stage.to_string_lossy(),
            "-exec",
            "touch",
            "-h",
            "-d",
            "@1700000000",
            "{}",
            "+",
        ],
        None,
    )?;
    tandem_tools::atomic::remove_stale(out).map_err(|e| GuestError::io(out, e))?;
    let tmp = tandem_tools::atomic::TempFile::beside(out, tandem_tools::atomic::DEFAULT_MODE)
        .map_err(|e| GuestError::io(out, e))?;
    run_tool_env(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "tandem-root",
            "-U",
            "5a1d7e3c-0000-4000-8000-00000000cafe",
            "-E",
            "root_owner=0:0,hash_seed=5a1d7e3c-0000-4000-8000-00000000beef",
            "-d",
            &stage.to_string_lossy(),
            &tmp.path().to_string_lossy(),
            &format!("{}M", spec.size_mib),
        ],
        &[("E2FSPROGS_FAKE_TIME", "1700000000")],
    )?;
    tmp.persist().map_err(|e| GuestError::io(out, e))?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(out.to_path_buf())
}

fn run_tool_env(tool: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String, GuestError> {
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    crate::run_command(tool, cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_seed_dependent() {
        assert_eq!(payload_bytes(7), payload_bytes(7));
        assert_ne!(payload_bytes(7), payload_bytes(8));
        assert!(payload_bytes(7).len() >= 16 * 1024);
    }
}
