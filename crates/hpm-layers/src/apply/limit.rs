//! A bound on the tar extension headers the `tar` crate reads whole.
//!
//! The crate buffers a GNU long name (`L`), long link (`K`) or PAX header (`x`) in memory,
//! sized by the entry's own header: one crafted header could ask for gigabytes. Go's
//! archive/tar, which wrote nearly every layer, refuses such entries above 1 MiB
//! (`maxSpecialFileSize`); so does [`Limited`], which watches the stream on its way to the
//! crate, follows the entry boundaries as the crate finds them (the header's size, a PAX
//! `size` record's override, GNU sparse extension blocks) and fails the read that would
//! deliver an oversized extension header. Where it cannot follow the stream (a header the
//! crate refuses anyway) it stops watching and passes the bytes on.

use std::io::{self, Read};

/// The largest extension header let through, as Go's `maxSpecialFileSize`.
pub(super) const MAX_EXTENSION: u64 = 1 << 20;

const BLOCK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a header block (`got` bytes of it so far).
    Header { got: usize },
    /// Collecting a GNU sparse extension block.
    Sparse { got: usize },
    /// Passing `left` bytes of entry data (padding included); kept when a PAX header.
    Data { left: u64, keep: bool },
    /// The end-of-archive block: the crate reads no further headers.
    Ended,
    /// A header the crate refuses or reads differently: not watched any more.
    Lost,
}

/// A reader that refuses tar extension headers above [`MAX_EXTENSION`] bytes.
pub(super) struct Limited<R> {
    inner: R,
    state: State,
    block: [u8; BLOCK],
    /// The PAX header being collected, and the `size` record of the last one (it applies to
    /// the entries until the next real one, as in the crate).
    pax: Vec<u8>,
    pax_size: Option<u64>,
    /// The data size of the GNU sparse entry whose extension blocks are being passed.
    sparse_data: u64,
}

impl<R: Read> Limited<R> {
    pub(super) fn new(inner: R) -> Self {
        Self {
            inner,
            state: State::Header { got: 0 },
            block: [0; BLOCK],
            pax: Vec::new(),
            pax_size: None,
            sparse_data: 0,
        }
    }

    /// Whether the watch followed the stream to its end-of-archive block.
    #[cfg(test)]
    fn ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Follows `bytes`, the next ones of the stream.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.state {
                State::Ended | State::Lost => return Ok(()),
                State::Header { got } | State::Sparse { got } => {
                    let n = (BLOCK - got).min(bytes.len());
                    self.block[got..got + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    let got = got + n;
                    self.state = match self.state {
                        State::Header { .. } if got == BLOCK => self.header()?,
                        State::Header { .. } => State::Header { got },
                        _ if got < BLOCK => State::Sparse { got },
                        // isextended of an extension block, at byte 504.
                        _ if self.block[504] != 0 => State::Sparse { got: 0 },
                        _ => self.data_state_after_sparse(),
                    };
                }
                State::Data { left, keep } => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    if keep {
                        self.pax.extend_from_slice(&bytes[..n]);
                    }
                    bytes = &bytes[n..];
                    let left = left - n as u64;
                    self.state = if left > 0 {
                        State::Data { left, keep }
                    } else {
                        if keep {
                            self.pax_size = pax_size(&self.pax);
                            self.pax.clear();
                        }
                        State::Header { got: 0 }
                    };
                }
            }
        }
        Ok(())
    }

    /// The sparse entry's data follows its extension blocks.
    fn data_state_after_sparse(&mut self) -> State {
        let left = std::mem::take(&mut self.sparse_data);
        next_data(left, false)
    }

    /// Reads the header in `block` and says what follows it.
    fn header(&mut self) -> io::Result<State> {
        let h = &self.block;
        if h.iter().all(|&b| b == 0) {
            return Ok(State::Ended);
        }
        let sum: u32 = h[..148]
            .iter()
            .chain(&h[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 8 * 32;
        let (Some(stored), Some(size)) = (octal(&h[148..156]), numeric(&h[124..136])) else {
            return Ok(State::Lost);
        };
        if u64::from(sum) != stored {
            return Ok(State::Lost);
        }
        let ustar = &h[257..263] == b"ustar\0" && &h[263..265] == b"00";
        let gnu = &h[257..263] == b"ustar " && &h[263..265] == b" \0";
        let kind = h[156];
        let extension = (ustar || gnu) && matches!(kind, b'L' | b'K' | b'x');
        if extension && size > MAX_EXTENSION {
            return Err(io::Error::other(format!(
                "a tar extension header ({}) of {size} bytes, more than {MAX_EXTENSION} (Go's \
                 archive/tar refuses those too)",
                match kind {
                    b'L' => "GNU long name",
                    b'K' => "GNU long link",
                    _ => "PAX",
                }
            )));
        }
        if extension {
            return Ok(next_data(size, kind == b'x'));
        }
        // A real entry for the crate (a PAX global header, or an extension type without
        // the ustar magic, included): a PAX size applies unless the type is an extension
        // type, and is used up either way.
        let extension_type = matches!(kind, b'L' | b'K' | b'x' | b'g');
        let size = match self.pax_size.take() {
            Some(s) if !extension_type => s,
            _ => size,
        };
        if kind == b'S' && gnu && h[482] != 0 {
            self.sparse_data = size;
            return Ok(State::Sparse { got: 0 });
        }
        Ok(next_data(size, false))
    }
}

/// Data of `size` bytes, padded to whole blocks, then the next header.
fn next_data(size: u64, keep: bool) -> State {
    match size.checked_next_multiple_of(BLOCK as u64) {
        Some(0) => State::Header { got: 0 },
        Some(left) => State::Data { left, keep },
        None => State::Lost,
    }
}

/// An octal field (spaces and NULs around it), as tar writes checksums and sizes.
fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    u64::from_str_radix(s, 8).ok()
}

/// A numeric field: octal, or base-256 when its first byte has the high bit set.
fn numeric(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 == 0 {
        return octal(field);
    }
    let mut v: u64 = u64::from(field[0] & 0x7f);
    for &b in &field[1..] {
        v = v.checked_mul(256)?.checked_add(u64::from(b))?;
    }
    Some(v)
}

/// The `size` record of PAX header `data` ("LEN key=value\n" records, then the block's
/// zero padding), if any.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    let mut found = None;
    while let Some(space) = rest.iter().position(|&b| b == b' ') {
        let len = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|&len| len > space && len <= rest.len());
        let Some(len) = len else { break };
        let record = &rest[space + 1..len];
        if let Some(value) = record.strip_prefix(b"size=") {
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            found = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        }
        rest = &rest[len..];
    }
    found
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Passes `tar` through [`Limited`] in reads of `chunk` bytes; whether the watch saw
    /// the end-of-archive block, and the bytes (which must be `tar`'s).
    fn pass(tar: &[u8], chunk: usize) -> io::Result<bool> {
        let mut l = Limited::new(tar);
        let mut out = Vec::new();
        let mut buf = vec![0; chunk];
        loop {
            let n = l.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert!(out == tar, "bytes changed on the way");
        Ok(l.ended())
    }

    /// A ustar header block of `kind` and `size` (GNU magic when `gnu`), checksummed.
    fn header(name: &str, kind: u8, size: u64, gnu: bool) -> Vec<u8> {
        let mut h = if gnu {
            tar::Header::new_gnu()
        } else {
            tar::Header::new_ustar()
        };
        h.set_path(name).unwrap();
        h.set_mode(0o644);
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut v = data.to_vec();
        v.resize(data.len().next_multiple_of(BLOCK), 0);
        v
    }

    #[test]
    fn real_archives_are_followed_to_their_end() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        let long = "d".repeat(120);
        std::fs::create_dir_all(root.join(&long)).unwrap();
        std::fs::write(root.join(&long).join("f".repeat(140)), b"long name").unwrap();
        std::os::unix::fs::symlink("t".repeat(200), root.join("long-link")).unwrap();
        let sparse = std::fs::File::create(root.join("sparse")).unwrap();
        sparse.set_len(40 << 20).unwrap();
        // More data runs than a GNU header's sparse map holds: extension blocks follow it.
        for k in 0..30u64 {
            std::os::unix::fs::FileExt::write_all_at(&sparse, &[7; 9000], k << 20).unwrap();
        }
        std::fs::write(root.join("small"), vec![1; 1000]).unwrap();
        for format in ["gnu", "oldgnu", "posix"] {
            let out = Command::new("tar")
                .args(["--sparse", "--numeric-owner", "-C"])
                .arg(&root)
                .arg(format!("--format={format}"))
                .args(["-cf", "-", "."])
                .output()
                .expect("running GNU tar");
            assert!(out.status.success(), "{format}: {out:?}");
            for chunk in [1, 7, 512, 4096, 1 << 20] {
                assert!(
                    pass(&out.stdout, chunk).unwrap(),
                    "{format}, reads of {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_pax_size_moves_the_next_header_as_the_tar_crate_reads_it() {
        let record = "13 size=5000\n";
        let mut tar = header("PaxHeaders/f", b'x', record.len() as u64, false);
        tar.extend(padded(record.as_bytes()));
        // The entry's own header says 0: the data is 5000 bytes all the same.
        tar.extend(header("f", b'0', 0, false));
        tar.extend(padded(&[5; 5000]));
        tar.extend(header("g", b'0', 3, false));
        tar.extend(padded(b"abc"));
        tar.extend([0; 2 * BLOCK]);
        assert!(pass(&tar, 100).unwrap());
        let mut archive = tar::Archive::new(&tar[..]);
        let sizes: Vec<u64> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().size())
            .collect();
        assert_eq!(sizes, [5000, 3], "the crate reads it so too");
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_their_data() {
        for (kind, gnu) in [(b'L', true), (b'K', true), (b'x', false)] {
            let mut tar = header("././@LongLink", kind, 8 << 30, gnu);
            tar.extend(vec![b'a'; 1 << 20]);
            let mut l = Limited::new(&tar[..]);
            let mut buf = vec![0; 4096];
            let e = l.read(&mut buf).unwrap_err();
            assert!(e.to_string().contains("more than 1048576"), "{e}");
        }
        // Up to 1 MiB passes (Go writes these).
        let mut tar = header("././@LongLink", b'L', MAX_EXTENSION, true);
        tar.extend(vec![b'a'; MAX_EXTENSION as usize]);
        tar.extend(header("x", b'0', 0, true));
        tar.extend([0; 2 * BLOCK]);
        assert!(pass(&tar, 65536).unwrap());
        // A v7 header of those types is data for the crate, not buffered: not refused.
        let mut v7 = header("big", b'L', 8 << 30, false);
        v7[257..265].fill(0);
        let sum: u32 = v7[..148]
            .iter()
            .chain(&v7[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 256;
        v7[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(!pass(&v7, 512).unwrap());
    }

    #[test]
    fn numeric_fields_read_octal_and_base_256() {
        assert_eq!(octal(b"0000644\0"), Some(0o644));
        assert_eq!(octal(b"   12 \0"), Some(0o12));
        assert_eq!(numeric(b"00000001000\0"), Some(512));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[4..].copy_from_slice(&(9u64 << 30).to_be_bytes());
        assert_eq!(numeric(&big), Some(9 << 30));
        assert_eq!(
            pax_size(b"13 size=5000\n30 mtime=1700000000.123456789\n"),
            Some(5000)
        );
        assert_eq!(pax_size(b"20 path=a/long/name\n"), None);
    }
}
