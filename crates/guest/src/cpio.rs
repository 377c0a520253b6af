//! A writer for the `newc` cpio format the Linux kernel unpacks as an initramfs.
//!
//! Writing the archive ourselves (rather than calling `cpio`) lets the initramfs carry a
//! `/dev/console` device node without root privileges, and makes the output depend only on
//! its inputs: every timestamp is zero and inode numbers are assigned in order.

use std::io::{self, Write};

const MAGIC: &str = "070701";

/// File type and permission bits, as `st_mode`.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// A directory with these permission bits.
    Dir(u32),
    /// A regular file with these permission bits.
    File(u32),
    /// A symbolic link.
    Symlink,
    /// A character device with (major, minor).
    CharDev(u32, u32),
}

/// Streams entries into a newc archive; call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_inode: 1,
            written: 0,
        }
    }

    /// Adds one entry. `name` has no leading slash (`bin/busybox`).
    pub fn entry(&mut self, name: &str, mode: Mode, data: &[u8]) -> io::Result<()> {
        let (st_mode, rdev) = match mode {
            Mode::Dir(p) => (0o040000 | p, (0, 0)),
            Mode::File(p) => (0o100000 | p, (0, 0)),
            Mode::Symlink => (0o120777, (0, 0)),
            Mode::CharDev(maj, min) => (0o020600, (maj, min)),
        };
        let ino = self.next_inode;
        self.next_inode += 1;
        let nlink = if matches!(mode, Mode::Dir(_)) { 2 } else { 1 };
        let name_len = name.len() + 1;
        let header = format!(
            "{MAGIC}{ino:08x}{st_mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{name_len:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            size = data.len(),
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", Mode::File(0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_four_byte_aligned_and_end_with_trailer() {
        let mut w = CpioWriter::new(Vec::new());
        w.entry("init", Mode::File(0o755), b"#!/bin/sh\n")
            .expect("write");
        w.entry("dev/console", Mode::CharDev(5, 1), &[])
            .expect("write");
        let out = w.finish().expect("finish");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("070701"));
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The device entry records rdev 5:1 in the rmajor/rminor fields.
        let dev = text.find("dev/console").expect("entry");
        let header = &text[dev - 110..dev];
        assert_eq!(&header[78..86], "00000005");
        assert_eq!(&header[86..94], "00000001");
    }

    #[test]
    fn gnu_cpio_lists_what_we_wrote() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("cpio not installed; format checked by the unit test above only");
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.entry("bin", Mode::Dir(0o755), &[]).expect("write");
        w.entry("bin/hello", Mode::File(0o644), b"hello\n")
            .expect("write");
        w.entry("bin/sh", Mode::Symlink, b"busybox").expect("write");
        let data = w.finish().expect("finish");
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&data)
            .expect("feed");
        let out = child.wait_with_output().expect("cpio runs");
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "bin\nbin/hello\nbin/sh\n"
        );
    }
}
