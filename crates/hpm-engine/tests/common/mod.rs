//! Shared helpers for the engine's integration tests: pools on memory, crash and fault
//! backends, and comparison with the reference model.
#![allow(dead_code, missing_docs)]

use hpm_engine::{Pool, PoolOptions, PoolStorage};
use hpm_io::{Backend, MemBackend};
use hpm_testkit::model::Model;
use std::sync::Arc;

pub const B: u64 = 4096;

/// The four stores of a pool, kept so the pool can be reopened on them.
#[derive(Clone)]
pub struct Disks {
    pub sb: Arc<dyn Backend>,
    pub meta: [Arc<dyn Backend>; 2],
    pub data: Arc<dyn Backend>,
    /// Where a file-backed store lives, kept as long as the stores.
    pub dir: Option<Arc<tempfile::TempDir>>,
}

impl Disks {
    pub fn mem() -> Self {
        Disks {
            sb: Arc::new(MemBackend::new()),
            meta: [Arc::new(MemBackend::new()), Arc::new(MemBackend::new())],
            data: Arc::new(MemBackend::new()),
            dir: None,
        }
    }

    /// Metadata in memory, data in a real file read and written with O_DIRECT (the
    /// daemon's `--data-io direct`).
    pub fn direct_data() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("data");
        hpm_io::FileBackend::create_new(&path).expect("create data file");
        let data = hpm_io::FileBackend::open_with(&path, hpm_io::IoMode::Direct)
            .expect("open the data file for direct I/O");
        Disks {
            data: Arc::new(data),
            dir: Some(Arc::new(dir)),
            ..Disks::mem()
        }
    }

    pub fn storage(&self) -> PoolStorage {
        PoolStorage {
            superblock: Box::new(self.sb.clone()),
            meta: [
                Box::new(self.meta[0].clone()),
                Box::new(self.meta[1].clone()),
            ],
            data: Box::new(self.data.clone()),
        }
    }

    pub fn create(&self, opts: &PoolOptions, capacity: u64) -> Pool {
        Pool::create_on(self.storage(), opts, capacity, String::new(), None).expect("create pool")
    }

    pub fn open(&self) -> hpm_engine::Result<Pool> {
        Pool::open_on(self.storage(), None)
    }
}

pub fn small_opts() -> PoolOptions {
    PoolOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    }
}

/// Reads a whole device from the engine.
pub fn read_all(pool: &Pool, name: &str) -> Vec<u8> {
    let d = pool.open_device(name).expect("open device");
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).expect("read device");
    buf
}

/// Asserts the engine's device set and every device's bytes equal the model's.
pub fn assert_same(pool: &Pool, model: &Model, step: &str) {
    let names: Vec<String> = pool.list_devices().into_iter().map(|d| d.name).collect();
    assert_eq!(names, model.names(), "device set after {step}");
    for n in &names {
        assert_same_device(pool, model, n, step);
    }
}

pub fn assert_same_device(pool: &Pool, model: &Model, name: &str, step: &str) {
    let got = read_all(pool, name);
    let want = model
        .read(name, 0, model.size(name).unwrap() as usize)
        .unwrap();
    if got != want {
        let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "device {name:?} differs from the model at byte {i} (block {}) after {step}",
            i as u64 / B
        );
    }
    assert_allocation(pool, name, &want, step);
}

/// `Device::allocation` against the contents: its extents cover the device exactly, and
/// every unmapped one reads as zeros; asked for one extent, or for a range that starts and
/// ends inside blocks, it answers the same states.
pub fn assert_allocation(pool: &Pool, name: &str, contents: &[u8], step: &str) {
    let d = pool.open_device(name).unwrap();
    let size = d.size();
    let all = d.allocation(0, size, usize::MAX).unwrap();
    assert_eq!(
        all.iter().map(|e| e.0).sum::<u64>(),
        size,
        "allocation of {name:?} covers the device after {step}"
    );
    let mut at = 0usize;
    for (i, &(len, mapped)) in all.iter().enumerate() {
        assert!(
            len > 0 && len % B == 0,
            "extent {i} of {name:?}: {len} bytes after {step}"
        );
        if i > 0 {
            assert_ne!(
                all[i - 1].1,
                mapped,
                "extents {i} of {name:?} not merged after {step}"
            );
        }
        if !mapped {
            assert!(
                contents[at..at + len as usize].iter().all(|&b| b == 0),
                "{name:?} reports bytes {at}+{len} unmapped but they are not zeros after {step}"
            );
        }
        at += len as usize;
    }
    let one = d.allocation(0, size, 1).unwrap();
    assert_eq!(
        one,
        all[..1].to_vec(),
        "one extent of {name:?} after {step}"
    );
    if size > 2 * B {
        // From the middle of the first block to the middle of the last one.
        let (off, len) = (B / 2, size - B);
        let part = d.allocation(off, len, usize::MAX).unwrap();
        assert_eq!(part.iter().map(|e| e.0).sum::<u64>(), len);
        let mut at = off;
        for &(n, mapped) in &part {
            let state = |b: u64| {
                let mut x = 0;
                all.iter()
                    .find(|e| {
                        x += e.0;
                        x > b * B
                    })
                    .unwrap()
                    .1
            };
            assert_eq!(
                state(at / B),
                mapped,
                "part of {name:?} at {at} after {step}"
            );
            assert_eq!(
                state((at + n - 1) / B),
                mapped,
                "part of {name:?} at {at}+{n} after {step}"
            );
            at += n;
        }
    }
}

/// Checks the engine against the model's crash rules and adopts what the engine has.
pub fn verify_crash(pool: &Pool, model: &mut Model, step: &str) {
    let names: Vec<String> = pool.list_devices().into_iter().map(|d| d.name).collect();
    assert_eq!(names, model.names(), "device set after crash at {step}");
    let contents: std::collections::HashMap<String, Vec<u8>> = names
        .iter()
        .map(|n| (n.clone(), read_all(pool, n)))
        .collect();
    let block = |n: &str, b: u64| contents[n][(b * B) as usize..((b + 1) * B) as usize].to_vec();
    if let Err(e) = model.verify_after_crash(block) {
        if std::env::var_os("HPM_CRASH_TRACE").is_some() {
            for n in &names {
                for b in 0..model.blocks(n).unwrap() {
                    let got = block(n, b);
                    let allowed = model.allowed_after_crash(n, b).unwrap();
                    if allowed.iter().any(|a| a[..] == got[..]) {
                        continue;
                    }
                    let sectors: Vec<String> = (0..8)
                        .map(|s| {
                            let r = s * 512..(s + 1) * 512;
                            let m: Vec<usize> = (0..allowed.len())
                                .filter(|&k| allowed[k][r.clone()] == got[r.clone()])
                                .collect();
                            format!("{m:?}")
                        })
                        .collect();
                    eprintln!("{n} block {b}: sectors match candidates {sectors:?}");
                }
            }
        }
        panic!("after crash at {step}: {e}");
    }
    model.settle(block);
}
