//! Moving bytes in large pieces: the piece size of imports, exports and byte-range I/O, and
//! filling a piece from a reader that may return less than asked (pipes, stdin).

use std::io::{ErrorKind, Read};

/// Bytes moved per engine call: large enough that per-call costs vanish, small enough to
/// keep memory flat.
pub const PIECE: usize = 1 << 20;

/// Reads until `buf` is full or the reader ends; returns the bytes read.
pub fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns at most 3 bytes per call, like a slow pipe.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(3).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_reads_are_joined_until_full_or_end() {
        let data: Vec<u8> = (0..20).collect();
        let mut r = Trickle(&data);
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 8);
        assert_eq!(&buf, &data[..8]);
        let mut rest = [0u8; 32];
        assert_eq!(read_full(&mut r, &mut rest).unwrap(), 12);
        assert_eq!(&rest[..12], &data[8..]);
        assert_eq!(read_full(&mut r, &mut rest).unwrap(), 0);
    }
}
