//! A deliberately small NBD client over a blocking Unix socket, with every byte layout
//! written out here from the spec (not from `hpm_nbd::proto`), for malformed-input tests.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_REQ_ONE: u16 = 1 << 3;

pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects and checks the greeting; does not send client flags yet.
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw { s };
        let g = r.bytes(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]) & 1, 1, "fixed newstyle");
        r
    }

    /// Connects and sends client flags: fixed newstyle, and no-zeroes if asked.
    pub fn start(path: &Path, no_zeroes: bool) -> Raw {
        let mut r = Raw::connect(path);
        r.send(&(1u32 | if no_zeroes { 2 } else { 0 }).to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.bytes(20);
        assert_eq!(&h[0..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (opt, kind, self.bytes(len))
    }

    /// LIST_META_CONTEXT / SET_META_CONTEXT data: export `name`, then the `queries`.
    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// INFO/GO data for `name` asking for `infos`.
    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends GO for `name`; returns (size, transmission flags) from NBD_INFO_EXPORT.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_GO, &Raw::info_data(name, &[]));
        let mut export = None;
        loop {
            let (opt, kind, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[0..2] == [0, 0] => {
                    assert_eq!(data.len(), 12);
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                }
                REP_INFO => {}
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!(
                    "GO {name:?} failed: {other:#x} {:?}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    pub fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// A simple reply: (error, handle).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.bytes(16);
        assert_eq!(
            &h[0..4],
            &0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// A structured chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.bytes(20);
        assert_eq!(
            &h[0..4],
            &0x668e_33efu32.to_be_bytes(),
            "structured reply magic"
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.bytes(len),
        )
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        }
    }
}
