//! Regular files and block devices through pread/pwrite.

use crate::Backend;
use rustix::fs::{fallocate, FallocateFlags};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Reads at least this large get a WILLNEED hint for their whole range first.
const LARGE_READ: usize = 64 << 10;

/// A regular file (sparse where the filesystem allows) or a block device.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    block_device: bool,
}

impl FileBackend {
    /// Opens an existing file or block device for reading and writing.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file, path)
    }

    /// Creates a new regular file; fails if it exists.
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
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
        if buf.len() >= LARGE_READ && !self.block_device {
            // A large buffered read of a cold range would otherwise be served by the kernel's
            // readahead window one piece at a time; asking for the whole range first puts all
            // of it in flight at once. Advice only: an error changes nothing.
            let len = std::num::NonZeroU64::new(buf.len() as u64);
            let _ = rustix::fs::fadvise(&self.file, offset, len, rustix::fs::Advice::WillNeed);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
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

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
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
