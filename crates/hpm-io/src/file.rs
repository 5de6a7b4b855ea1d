//! Regular files and block devices through pread/pwrite, buffered (through the host page
//! cache) or direct (`O_DIRECT`, as a kernel block driver writes its disk).

use crate::Backend;
use rustix::fs::{fallocate, FallocateFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Reads at least this large get a WILLNEED hint for their whole range first.
const LARGE_READ: usize = 64 << 10;

/// Alignment of offsets, lengths and memory for direct I/O: the largest logical block size
/// a disk has (4 KiB), so any disk or filesystem below takes it.
pub const DIRECT_ALIGN: usize = 4096;

/// The first `len` bytes of `buf` from its first `DIRECT_ALIGN` boundary, growing `buf` (by
/// `DIRECT_ALIGN` more than asked, so the boundary always fits; new bytes are zero) as
/// needed: a reusable buffer that a direct-I/O backend reads into and writes from without a
/// bounce copy.
pub fn aligned_prefix(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    &mut buf[start..start + len]
}

/// How a [`FileBackend`] moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// pread/pwrite through the host page cache: reads may be served from memory, writes
    /// complete once copied there and reach the disk at the next `sync` or writeback.
    #[default]
    Buffered,
    /// `O_DIRECT`: every read and write goes to the disk, as a kernel block driver's bios do;
    /// nothing is cached twice. A range or buffer that is not 4096-aligned goes through an
    /// aligned bounce buffer, a write that covers part of a block as a read-modify-write of
    /// that block: callers must not write the same block from two threads at once (the
    /// engine never does: it serialises writes per chunk, and a block written in place has
    /// one owner).
    Direct,
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoMode::Buffered => "buffered",
            IoMode::Direct => "direct",
        })
    }
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "buffered" => Ok(IoMode::Buffered),
            "direct" => Ok(IoMode::Direct),
            _ => Err(format!(
                "unknown data I/O mode {s:?} (expected buffered or direct)"
            )),
        }
    }
}

/// A regular file (sparse where the filesystem allows) or a block device.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    block_device: bool,
    mode: IoMode,
}

thread_local! {
    /// Each thread's bounce buffer for direct I/O that is not aligned (grown on demand, kept).
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a `DIRECT_ALIGN`-aligned, zeroed-at-growth scratch buffer of `len` bytes.
fn with_bounce<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BOUNCE.with_borrow_mut(|b| f(aligned_prefix(b, len)))
}

fn aligned(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize).is_multiple_of(DIRECT_ALIGN)
        && len.is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
}

/// Reads `buf.len()` bytes at `offset`, zeros past the end of the file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                // Past the end of a file: reads as zeros, as the trait promises.
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl FileBackend {
    /// Opens an existing file or block device for reading and writing.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, IoMode::Buffered)
    }

    /// [`FileBackend::open`] with the given I/O mode. Direct I/O on a filesystem that does
    /// not support it (tmpfs) fails here with a message that says so.
    pub fn open_with(path: &Path, mode: IoMode) -> io::Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if mode == IoMode::Direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| {
            if mode == IoMode::Direct && e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{}: its filesystem does not support direct I/O (O_DIRECT); use buffered data I/O",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
        let mut b = Self::from_file(file, path)?;
        b.mode = mode;
        Ok(b)
    }

    /// Creates a new regular file, readable and writable by its owner only (mode 0600: it
    /// holds pool data or metadata); fails if it exists.
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        Self::from_file(file, path)
    }

    /// Opens read-only (for `check` and other inspections).
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).open(path)?;
        Self::from_file(file, path)
    }

    fn from_file(file: File, path: &Path) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            block_device,
            mode: IoMode::Buffered,
        })
    }

    /// How this backend does its I/O.
    pub fn mode(&self) -> IoMode {
        self.mode
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if aligned(buf.as_ptr(), buf.len(), offset) {
            return read_full(&self.file, buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        with_bounce((end - start) as usize, |b| {
            read_full(&self.file, b, start)?;
            let from = (offset - start) as usize;
            buf.copy_from_slice(&b[from..from + buf.len()]);
            Ok(())
        })
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if aligned(buf.as_ptr(), buf.len(), offset) {
            return self.file.write_all_at(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + buf.len() as u64).div_ceil(a) * a;
        let len = (end - start) as usize;
        with_bounce(len, |b| {
            let from = (offset - start) as usize;
            // The blocks the write covers only in part keep their other bytes: read them.
            if from != 0 {
                read_full(&self.file, &mut b[..DIRECT_ALIGN], start)?;
            }
            let to = from + buf.len();
            // (A one-block span whose head was read has its tail too.)
            if !to.is_multiple_of(DIRECT_ALIGN) && (len > DIRECT_ALIGN || from == 0) {
                read_full(&self.file, &mut b[len - DIRECT_ALIGN..], end - a)?;
            }
            b[from..to].copy_from_slice(buf);
            self.file.write_all_at(b, start)
        })
    }

    /// The path this backend was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl Backend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.mode == IoMode::Direct {
            return self.read_direct(buf, offset);
        }
        if buf.len() >= LARGE_READ && !self.block_device {
            // A large buffered read of a cold range would otherwise be served by the kernel's
            // readahead window one piece at a time; asking for the whole range first puts all
            // of it in flight at once. Advice only: an error changes nothing.
            let len = std::num::NonZeroU64::new(buf.len() as u64);
            let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed);
        }
        read_full(&self.file, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.mode == IoMode::Direct {
            return self.write_direct(buf, offset);
        }
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        // fdatasync: sizes and blocks, not timestamps; enough for both data and metadata
        // files because every metadata file's length change is followed by a sync.
        self.file.sync_data()
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // PUNCH_HOLE|KEEP_SIZE frees blocks of a regular file; on a block device the kernel
        // turns it into a discard with zeroing.
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            use std::io::{Seek, SeekFrom};
            let mut f = &self.file;
            return f.seek(SeekFrom::End(0));
        }
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot be resized",
            ));
        }
        self.file.set_len(len)
    }

    fn resizable(&self) -> bool {
        !self.block_device
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        if self.block_device {
            return Ok(None);
        }
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn drop_cached(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = std::num::NonZeroU64::new(len);
        rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::DontNeed)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_round_trip_and_punch() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create_new(&dir.path().join("f")).unwrap();
        b.set_len(1 << 20).unwrap();
        assert_eq!(b.allocated_bytes().unwrap(), Some(0));
        b.write_at(&[7u8; 8192], 4096).unwrap();
        b.sync().unwrap();
        let mut buf = vec![0u8; 4096];
        b.read_at(&mut buf, 8192).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        b.punch(4096, 8192).unwrap();
        b.read_at(&mut buf, 8192).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        assert_eq!(b.allocated_bytes().unwrap(), Some(0));
        // Past the end reads zeros.
        b.read_at(&mut buf, (1 << 20) - 100).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
    }

    /// Direct I/O at every kind of offset, length and buffer alignment (inside one block,
    /// across blocks, past the end, from a misaligned buffer) agrees with a byte model, and
    /// with a buffered backend on the same file.
    #[test]
    fn direct_io_agrees_with_a_model_at_any_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        FileBackend::create_new(&p)
            .unwrap()
            .set_len(64 << 10)
            .unwrap();
        let b = FileBackend::open_with(&p, IoMode::Direct).unwrap();
        assert_eq!(b.mode(), IoMode::Direct);
        let mut model = vec![0u8; 64 << 10];
        // A small deterministic generator: no dependency for one test.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut store = vec![0u8; (20 << 10) + 1];
        for i in 0..400u32 {
            let off = next(60 << 10);
            let len = match i % 4 {
                0 => 4096,
                1 => 1 + next(100) as usize,
                2 => 1 + next(3 << 12) as usize,
                _ => 1 + next(20 << 10) as usize,
            };
            let len = len.min((64 << 10) - off as usize);
            // Start the buffer at 0 or 1 bytes into `store`: aligned and misaligned memory.
            let shift = (i % 2) as usize;
            let buf = &mut store[shift..shift + len];
            if i % 3 == 0 {
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(k, v)| *v = (k as u32 ^ i) as u8 | 1);
                b.write_at(buf, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(buf);
            } else {
                b.read_at(buf, off).unwrap();
                assert_eq!(
                    buf,
                    &model[off as usize..off as usize + len],
                    "op {i} at {off}+{len}"
                );
            }
        }
        // Past the end: zeros, nothing fails.
        let mut tail = vec![1u8; 5000];
        b.read_at(&mut tail, (64 << 10) - 100).unwrap();
        assert_eq!(&tail[..100], &model[(64 << 10) - 100..]);
        assert!(tail[100..].iter().all(|&v| v == 0));
        b.sync().unwrap();
        let mut all = vec![0u8; 64 << 10];
        FileBackend::open(&p).unwrap().read_at(&mut all, 0).unwrap();
        assert!(all == model, "a buffered reader sees what direct I/O wrote");
    }

    #[test]
    fn dropping_cached_pages_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::create_new(&dir.path().join("f")).unwrap();
        b.write_at(&[9u8; 16384], 0).unwrap();
        b.drop_cached(0, 16384).unwrap(); // dirty pages stay until written back
        b.sync().unwrap();
        b.drop_cached(0, 0).unwrap(); // 0 = to the end of the file
        let mut buf = vec![0u8; 16384];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 9));
    }
}
