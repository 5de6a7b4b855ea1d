//! Little-endian cursor encoding shared by every structure of this crate.

use crate::FormatError;

/// Appends little-endian values to a byte vector.
#[derive(Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Appends a string with a u16 length prefix. Names are limited to 4 KiB by the engine.
    pub fn str16(&mut self, s: &str) {
        let len = u16::try_from(s.len()).expect("names are validated to be short");
        self.u16(len);
        self.bytes(s.as_bytes());
    }
}

/// Reads little-endian values, failing with `Corrupt` (naming `what`) past the end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; errors name `what`.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }
    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// The next `n` raw bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.remaining() < n {
            return Err(FormatError::corrupt(
                self.what,
                format!(
                    "truncated: needed {n} bytes at offset {}, {} left",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    /// A u16.
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A string with a u16 length prefix; must be UTF-8.
    pub fn str16(&mut self) -> Result<String, FormatError> {
        let len = self.u16()? as usize;
        let at = self.pos;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            FormatError::corrupt(self.what, format!("name at offset {at} is not UTF-8"))
        })
    }
    /// A count that must fit in what is left, at `min_item` bytes per item; guards
    /// allocations against corrupt counts.
    pub fn count(&mut self, min_item: usize) -> Result<usize, FormatError> {
        let at = self.pos;
        let n = self.u64()? as usize;
        if n.saturating_mul(min_item.max(1)) > self.remaining() {
            return Err(FormatError::corrupt(
                self.what,
                format!(
                    "count {n} at offset {at} exceeds the remaining {} bytes",
                    self.remaining()
                ),
            ));
        }
        Ok(n)
    }
}
