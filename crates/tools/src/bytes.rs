//! Little- and big-endian field readers for parsers of untrusted bytes (disk images,
//! filesystem metadata, the NBD wire).
//!
//! `le32(buf, at)` reads the 4 bytes at `at`; every reader returns the field at its own
//! width and [`Short`] when the field does not lie wholly inside `buf`, so a hostile
//! length or offset is an error, never a panic. [`Short`] converts into `String` and
//! [`std::io::Error`] (kind `InvalidData`), so `?` works in parsers that report either.

/// A field that does not lie wholly inside the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    /// Offset of the field.
    pub at: usize,
    /// Its width in bytes.
    pub width: usize,
    /// Length of the buffer.
    pub len: usize,
}

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-byte field at offset {} lies past the end of {} bytes (truncated or damaged structure)",
            self.width, self.at, self.len
        )
    }
}

impl std::error::Error for Short {}

impl From<Short> for String {
    fn from(s: Short) -> String {
        s.to_string()
    }
}

impl From<Short> for std::io::Error {
    fn from(s: Short) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, s)
    }
}

/// The `N` bytes at `at`.
fn field<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], Short> {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(Short {
            at,
            width: N,
            len: b.len(),
        })
}

/// The little-endian `u16` at `at`.
pub fn le16(b: &[u8], at: usize) -> Result<u16, Short> {
    field(b, at).map(u16::from_le_bytes)
}

/// The little-endian `u32` at `at`.
pub fn le32(b: &[u8], at: usize) -> Result<u32, Short> {
    field(b, at).map(u32::from_le_bytes)
}

/// The little-endian `u64` at `at`.
pub fn le64(b: &[u8], at: usize) -> Result<u64, Short> {
    field(b, at).map(u64::from_le_bytes)
}

/// The big-endian `u16` at `at`.
pub fn be16(b: &[u8], at: usize) -> Result<u16, Short> {
    field(b, at).map(u16::from_be_bytes)
}

/// The big-endian `u32` at `at`.
pub fn be32(b: &[u8], at: usize) -> Result<u32, Short> {
    field(b, at).map(u32::from_be_bytes)
}

/// The big-endian `u64` at `at`.
pub fn be64(b: &[u8], at: usize) -> Result<u64, Short> {
    field(b, at).map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_width_in_both_orders() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le16(&b, 1), Ok(0x0302));
        assert_eq!(be16(&b, 1), Ok(0x0203));
        assert_eq!(le32(&b, 0), Ok(0x0403_0201));
        assert_eq!(be32(&b, 5), Ok(0x0607_0809));
        assert_eq!(le64(&b, 1), Ok(0x0908_0706_0504_0302));
        assert_eq!(be64(&b, 0), Ok(0x0102_0304_0506_0708));
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        let b = [0u8; 8];
        assert_eq!(
            le32(&b, 5),
            Err(Short {
                at: 5,
                width: 4,
                len: 8
            })
        );
        assert!(be64(&b, 1).is_err());
        assert!(le16(&[], 0).is_err());
        assert!(be16(&b, usize::MAX).is_err(), "offset overflow");
        assert_eq!(le64(&b, 0), Ok(0), "a field ending at the end is inside");
        let s: String = le32(&b, 6).expect_err("short").into();
        assert!(s.contains("offset 6"), "{s}");
        let e: std::io::Error = be32(&b, 7).expect_err("short").into();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
