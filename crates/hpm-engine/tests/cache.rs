//! The shared cache seen from devices: N snapshots of one image read it with one backend read
//! per block (interception and dedup), the devicemapper-like per-device mode reads it N
//! times, and copy-on-write and discard keep cached contents right.

mod common;

use common::*;
use hpm_engine::{CacheConfig, CacheMode, PoolOptions};
use hpm_testkit::workload::pattern;
use std::thread;

const SIZE: u64 = 4 << 20;

/// Device "image" (SIZE bytes of a pattern) and `n` writable snapshots "c0".."c{n-1}" of
/// it; returns the image's bytes.
fn image_and_clones(pool: &hpm_engine::Pool, n: usize) -> Vec<u8> {
    pool.create_device("image", SIZE).unwrap();
    let image = pattern(7, SIZE as usize);
    pool.open_device("image")
        .unwrap()
        .write_at(&image, 0)
        .unwrap();
    for k in 0..n {
        pool.snapshot("image", &format!("c{k}"), false).unwrap();
    }
    image
}

fn shared_read(mode: CacheMode, n: usize) -> (hpm_engine::CacheStats, hpm_engine::EngineStats) {
    let disks = Disks::mem();
    let cache = CacheConfig {
        mode,
        size: 64 << 20,
        ..CacheConfig::default()
    };
    let pool = disks.create(
        &PoolOptions {
            cache,
            ..small_opts()
        },
        64 << 20,
    );
    let image = image_and_clones(&pool, n);
    let before = (pool.cache_stats(), pool.stats());
    let hs: Vec<_> = (0..n)
        .map(|k| {
            let (pool, image) = (pool.clone(), image.clone());
            thread::spawn(move || {
                let d = pool.open_device(&format!("c{k}")).unwrap();
                let mut buf = vec![0u8; 256 << 10];
                for off in (0..SIZE).step_by(buf.len()) {
                    d.read_at(&mut buf, off).unwrap();
                    assert!(buf[..] == image[off as usize..off as usize + buf.len()]);
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    let (c, e) = (pool.cache_stats(), pool.stats());
    let mut c2 = c;
    c2.backend_read_bytes -= before.0.backend_read_bytes;
    let mut e2 = e;
    e2.backend_read_bytes -= before.1.backend_read_bytes;
    (c2, e2)
}

#[test]
fn n_clones_reading_one_image_read_the_disk_once() {
    for n in [1, 4, 8] {
        let (c, e) = shared_read(CacheMode::Shared, n);
        assert_eq!(
            c.backend_read_bytes, SIZE,
            "N = {n}: backend bytes equal the unique bytes"
        );
        assert_eq!(e.backend_read_bytes, SIZE, "N = {n}");
        assert_eq!(c.cached_bytes, SIZE, "N = {n}: cached once");
        assert_eq!(
            c.per_device_bytes,
            n as u64 * SIZE,
            "N = {n}: per-device caches would hold N copies"
        );
        assert_eq!(c.hits + c.coalesced + c.misses, n as u64 * SIZE / 4096);
    }
}

#[test]
fn per_device_mode_reads_and_caches_n_times() {
    let n = 4;
    let (c, _) = shared_read(CacheMode::PerDevice, n);
    assert_eq!(c.backend_read_bytes, n as u64 * SIZE);
    assert_eq!(c.cached_bytes, n as u64 * SIZE);
}

#[test]
fn cached_blocks_follow_cow_overwrite_discard_and_reuse() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 2 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    let a = pool.open_device("a").unwrap();
    a.write_at(&pattern(1, 1 << 20), 0).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    a.read_at(&mut buf, 0).unwrap(); // all cached
    pool.snapshot("a", "b", false).unwrap();
    let b = pool.open_device("b").unwrap();
    b.write_at(&pattern(2, 10_000), 5000).unwrap(); // copy-on-write of cached blocks
    a.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == pattern(1, 1 << 20),
        "the origin still reads its own data"
    );
    b.read_at(&mut buf[..10_000], 5000).unwrap();
    assert!(buf[..10_000] == pattern(2, 10_000));
    a.write_at(&pattern(3, 4096), 1 << 19).unwrap(); // overwrite in place? (shared: CoW)
    b.discard(0, 1 << 20).unwrap();
    b.flush().unwrap();
    drop(b);
    pool.remove_device("b").unwrap();
    pool.remove_device("a").unwrap_err(); // still open
    drop(a);
    pool.remove_device("a").unwrap();
    pool.flush().unwrap();
    assert_eq!(
        pool.cache_stats().cached_bytes,
        0,
        "freed blocks leave the cache"
    );
    // Every block is free and may be reused; a new device must not see cached old data.
    pool.create_device("c", 2 << 20).unwrap();
    let c = pool.open_device("c").unwrap();
    let mut big = vec![1u8; 2 << 20];
    c.read_at(&mut big, 0).unwrap();
    assert!(big.iter().all(|&x| x == 0));
    c.write_at(&pattern(4, 2 << 20), 0).unwrap();
    c.read_at(&mut big, 0).unwrap();
    assert!(big == pattern(4, 2 << 20));
}

/// A pool with a device `image` of `size` bytes written with `pattern(seed)` and its
/// snapshot `c` (every block shared, so reads of `c` go through the cache): the pool, the
/// image's bytes and `c` open.
fn image_and_clone(seed: u64, size: u64) -> (hpm_engine::Pool, Vec<u8>, hpm_engine::Device) {
    let pool = Disks::mem().create(&small_opts(), 16 << 20);
    pool.create_device("image", size).unwrap();
    let image = pattern(seed, size as usize);
    pool.open_device("image")
        .unwrap()
        .write_at(&image, 0)
        .unwrap();
    pool.snapshot("image", "c", false).unwrap();
    let c = pool.open_device("c").unwrap();
    (pool, image, c)
}

/// What `read_pieces` returns, gathered into one buffer.
fn gathered(d: &hpm_engine::Device, len: usize, off: u64) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len];
    let mut pieces = Vec::new();
    d.read_pieces(&mut buf, off, &mut pieces).unwrap();
    assert_eq!(
        pieces.iter().map(|p| p.len()).sum::<usize>(),
        len,
        "the pieces cover the read"
    );
    pieces.iter().flat_map(|p| p.bytes(&buf).to_vec()).collect()
}

#[test]
fn read_pieces_returns_what_read_at_does_cached_or_not() {
    use rand::{Rng, SeedableRng};
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 16 << 20);
    pool.create_device("image", SIZE).unwrap();
    let img = pool.open_device("image").unwrap();
    // Mapped and unmapped regions: every other 256 KiB.
    for off in (0..SIZE).step_by(512 << 10) {
        img.write_at(&pattern(off, 256 << 10), off).unwrap();
    }
    pool.snapshot("image", "c", false).unwrap();
    let c = pool.open_device("c").unwrap();
    // Private blocks in the clone: copy-on-write, some unaligned.
    c.write_at(&pattern(9, 10_000), 100_000).unwrap();
    c.write_at(&pattern(8, 4096), 1 << 20).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut want = vec![0u8; 1 << 20];
    let mut cached_pieces = 0;
    for round in 0..400 {
        let d = if round % 3 == 0 { &img } else { &c };
        let len = match round % 4 {
            0 => 4096,
            1 => rng.random_range(1..9000),
            _ => rng.random_range(1..=(1 << 20)),
        };
        let off = if round % 2 == 0 {
            rng.random_range(0..(SIZE - len as u64) / 4096) * 4096
        } else {
            rng.random_range(0..=SIZE - len as u64)
        };
        d.read_at(&mut want[..len], off).unwrap();
        assert!(
            gathered(d, len, off) == want[..len],
            "read of {len} bytes at {off} differs (round {round})"
        );
        let mut buf = vec![0u8; len];
        let mut pieces = Vec::new();
        d.read_pieces(&mut buf, off, &mut pieces).unwrap();
        cached_pieces += pieces
            .iter()
            .filter(|p| matches!(p, hpm_engine::ReadPiece::Cached { .. }))
            .count();
    }
    assert!(
        cached_pieces > 0,
        "shared blocks were served from the cache"
    );
}

#[test]
fn a_held_cached_block_keeps_its_bytes_through_a_later_write() {
    let (pool, _, c) = image_and_clone(1, 1 << 20);
    let img = pool.open_device("image").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    c.read_at(&mut buf, 0).unwrap(); // cached now
    let mut pieces = Vec::new();
    c.read_pieces(&mut buf, 0, &mut pieces).unwrap();
    assert!(pieces
        .iter()
        .all(|p| matches!(p, hpm_engine::ReadPiece::Cached { .. })));
    let before: Vec<u8> = pieces.iter().flat_map(|p| p.bytes(&buf).to_vec()).collect();
    // The origin's write copies on write; once that is committed, the clone owns the old
    // blocks alone, and its write goes over them in place: through the cache's `written`,
    // which must not rewrite a buffer a reader still holds.
    img.write_at(&pattern(2, 1 << 20), 0).unwrap();
    pool.flush().unwrap();
    let cow_before = pool.stats().cow_blocks;
    c.write_at(&pattern(3, 1 << 20), 0).unwrap();
    assert_eq!(
        pool.stats().cow_blocks,
        cow_before,
        "the clone's write went over its own blocks in place"
    );
    let after: Vec<u8> = pieces.iter().flat_map(|p| p.bytes(&buf).to_vec()).collect();
    assert!(before == after, "a held piece never changes");
    assert!(before == pattern(1, 1 << 20));
    drop(pieces);
    assert!(gathered(&c, 1 << 20, 0) == pattern(3, 1 << 20));
    assert!(gathered(&img, 1 << 20, 0) == pattern(2, 1 << 20));
}

#[test]
fn clones_reading_one_image_at_once_through_pieces_read_the_disk_once() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 64 << 20);
    let n = 8;
    let image = image_and_clones(&pool, n);
    let before = pool.cache_stats().backend_read_bytes;
    let hs: Vec<_> = (0..n)
        .map(|k| {
            let (pool, image) = (pool.clone(), image.clone());
            thread::spawn(move || {
                let d = pool.open_device(&format!("c{k}")).unwrap();
                for off in (0..SIZE).step_by(256 << 10) {
                    let got = gathered(&d, 256 << 10, off);
                    assert!(got[..] == image[off as usize..off as usize + got.len()]);
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(pool.cache_stats().backend_read_bytes - before, SIZE);
}

#[test]
fn read_pieces_mixes_cached_blocks_and_blocks_read_now_in_order() {
    let (pool, image, c) = image_and_clone(4, 1 << 20);
    // Every third block cached, the others cold: one read mixes both within a run.
    let mut blk = vec![0u8; 4096];
    for b in (0..256u64).step_by(3) {
        c.read_at(&mut blk, b * 4096).unwrap();
    }
    let stats_before = pool.cache_stats();
    let mut buf = vec![0u8; 1 << 20];
    let mut pieces = Vec::new();
    c.read_pieces(&mut buf, 0, &mut pieces).unwrap();
    let cached = pieces
        .iter()
        .filter(|p| matches!(p, hpm_engine::ReadPiece::Cached { .. }))
        .count();
    assert_eq!(
        cached, 86,
        "the blocks read before are handed out from the cache"
    );
    let got: Vec<u8> = pieces.iter().flat_map(|p| p.bytes(&buf).to_vec()).collect();
    assert!(got == image);
    let after = pool.cache_stats();
    assert_eq!(after.hits - stats_before.hits, 86);
    assert_eq!(after.misses - stats_before.misses, 256 - 86);
}

#[test]
fn an_unaligned_read_of_cached_blocks_is_handed_out_from_the_cache_too() {
    let (_pool, image, c) = image_and_clone(6, 1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    // All cached after this read.
    c.read_at(&mut buf, 0).unwrap();
    // As FUSE splits a read into a user buffer that does not start on a page: 1 MiB less
    // the buffer's offset in its first page, then the rest.
    let (off, len) = (1408u64, (1 << 20) - 1408 - 1000);
    let mut pieces = Vec::new();
    c.read_pieces(&mut buf[..len], off, &mut pieces).unwrap();
    assert!(
        pieces
            .iter()
            .all(|p| matches!(p, hpm_engine::ReadPiece::Cached { .. })),
        "every block, the partly read first and last too, comes from the cache"
    );
    let got: Vec<u8> = pieces.iter().flat_map(|p| p.bytes(&buf).to_vec()).collect();
    assert!(got[..] == image[off as usize..off as usize + len]);
}
