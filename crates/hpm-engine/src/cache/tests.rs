use super::*;
use hpm_io::MemBackend;
use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;
use std::time::Duration;

/// A memory backend that counts reads and can be slowed down, to make reads overlap.
#[derive(Default)]
struct Slow {
    mem: MemBackend,
    reads: AtomicUsize,
    delay_ms: AtomicU64,
}

impl Backend for Slow {
    fn read_at(&self, b: &mut [u8], o: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Relaxed);
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Relaxed)));
        self.mem.read_at(b, o)
    }
    fn write_at(&self, b: &[u8], o: u64) -> io::Result<()> {
        self.mem.write_at(b, o)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch(&self, o: u64, l: u64) -> io::Result<()> {
        self.mem.punch(o, l)
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, l: u64) -> io::Result<()> {
        self.mem.set_len(l)
    }
}

fn backend(blocks: u64) -> Arc<Slow> {
    let s = Arc::new(Slow::default());
    for p in 0..blocks {
        s.mem
            .write_at(&[(p as u8).wrapping_add(1); B], p * B as u64)
            .unwrap();
    }
    s
}

fn cache(mode: CacheMode, blocks: u64, policy: CachePolicy) -> BlockCache {
    BlockCache::new(CacheConfig {
        mode,
        size: blocks * B as u64,
        policy,
    })
}

#[test]
fn concurrent_misses_on_one_block_are_one_backend_read() {
    let be = backend(4);
    be.delay_ms.store(30, Relaxed);
    let c = Arc::new(cache(CacheMode::Shared, 1024, CachePolicy::S3Fifo));
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let hs: Vec<_> = (0..n as u32)
        .map(|dev| {
            let (c, be, barrier) = (c.clone(), be.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut out = vec![0u8; B];
                barrier.wait();
                c.read(dev, 2, &mut out, &[n as u32], &*be).unwrap();
                assert!(out.iter().all(|&x| x == 3));
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(
        be.reads.load(Relaxed),
        1,
        "one backend read for {n} readers"
    );
    let s = c.stats();
    assert_eq!(s.misses, 1);
    assert_eq!(s.hits + s.coalesced, n as u64 - 1);
    assert_eq!(s.cached_bytes, B as u64);
    assert_eq!(
        s.per_device_bytes,
        (n * B) as u64,
        "a cache per device would hold {n} copies"
    );
}

#[test]
fn adjacent_misses_are_one_backend_read() {
    let be = backend(300);
    let c = cache(CacheMode::Shared, 1024, CachePolicy::S3Fifo);
    let mut out = vec![0u8; 256 * B];
    assert_eq!(
        c.read(1, 10, &mut out, &[], &*be).unwrap(),
        (256 * B) as u64
    );
    assert_eq!(be.reads.load(Relaxed), 1);
    assert!(out
        .chunks(B)
        .enumerate()
        .all(|(i, b)| b.iter().all(|&x| x == ((10 + i) as u8).wrapping_add(1))));
    // A partly cached range reads only the gaps, each gap in one call.
    let c = cache(CacheMode::Shared, 1024, CachePolicy::S3Fifo);
    let be = backend(300);
    let mut one = vec![0u8; B];
    c.read(1, 15, &mut one, &[], &*be).unwrap();
    c.read(1, 10, &mut out[..10 * B], &[], &*be).unwrap();
    assert_eq!(
        be.reads.load(Relaxed),
        3,
        "one for block 15, then 10-14 and 16-19"
    );
}

#[test]
fn per_device_mode_holds_a_copy_per_device_and_does_not_intercept() {
    let be = backend(8);
    let c = cache(CacheMode::PerDevice, 1024, CachePolicy::S3Fifo);
    let mut out = vec![0u8; 8 * B];
    for dev in 1..=3 {
        c.read(dev, 0, &mut out, &[3; 8], &*be).unwrap();
    }
    assert_eq!(be.reads.load(Relaxed), 3);
    assert_eq!(c.stats().cached_bytes, 3 * 8 * B as u64);
    // A write by device 1 updates its copy and drops the others'.
    c.written(1, 0, &[9u8; B]);
    assert_eq!(c.stats().cached_bytes, (3 * 8 - 2) * B as u64);
    let mut one = vec![0u8; B];
    c.read(1, 0, &mut one, &[1], &*be).unwrap();
    assert!(one.iter().all(|&x| x == 9));
    // Freeing drops every copy.
    c.invalidate(&[1]);
    assert_eq!(c.stats().cached_bytes, (3 * 8 - 2 - 3) * B as u64);
}

#[test]
fn a_write_during_a_miss_keeps_stale_data_out_of_the_cache() {
    let be = backend(2);
    be.delay_ms.store(50, Relaxed);
    let c = Arc::new(cache(CacheMode::Shared, 64, CachePolicy::S3Fifo));
    let reader = {
        let (c, be) = (c.clone(), be.clone());
        std::thread::spawn(move || {
            let mut out = vec![0u8; B];
            c.read(1, 0, &mut out, &[1], &*be).unwrap();
            out[0]
        })
    };
    std::thread::sleep(Duration::from_millis(10));
    // The read is in flight with the old contents; the block is rewritten meanwhile.
    be.mem.write_at(&[42u8; B], 0).unwrap();
    c.written(1, 0, &[42u8; B]);
    let seen = reader.join().unwrap();
    assert!(seen == 1 || seen == 42, "the racing read sees old or new");
    be.delay_ms.store(0, Relaxed);
    let mut out = vec![0u8; B];
    c.read(1, 0, &mut out, &[1], &*be).unwrap();
    assert!(
        out.iter().all(|&x| x == 42),
        "a read after the write sees it"
    );
}

#[test]
fn a_failed_backend_read_fails_every_waiter_and_caches_nothing() {
    struct Broken;
    impl Backend for Broken {
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(20));
            Err(io::Error::other("medium error"))
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn punch(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(1 << 20)
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
    }
    let c = Arc::new(cache(CacheMode::Shared, 64, CachePolicy::S3Fifo));
    let hs: Vec<_> = (0..4)
        .map(|d| {
            let c = c.clone();
            std::thread::spawn(move || c.read(d, 7, &mut vec![0u8; B], &[1], &Broken).is_err())
        })
        .collect();
    assert!(hs.into_iter().all(|h| h.join().unwrap()));
    assert_eq!(c.stats().cached_bytes, 0);
}

#[test]
fn memory_stays_bounded() {
    let be = backend(5000);
    let c = cache(CacheMode::Shared, 256, CachePolicy::S3Fifo);
    let mut out = vec![0u8; B];
    for p in 0..5000 {
        c.read(1, p, &mut out, &[1], &*be).unwrap();
    }
    let s = c.stats();
    assert!(
        s.cached_bytes <= 256 * B as u64 + (SHARDS * B) as u64,
        "{s:?}"
    );
    assert!(s.evictions > 4000);
}

/// Hit ratio of the hot set under a workload of one long scan mixed with repeated reads of a
/// hot set shared by several devices.
fn hot_hit_ratio(policy: CachePolicy) -> f64 {
    let be = backend(0);
    let c = cache(CacheMode::Shared, 2048, policy);
    let mut out = vec![0u8; B];
    let hot: Vec<u64> = (0..1024).map(|i| 1_000_000 + i * 7).collect();
    for &p in &hot {
        c.read(1, p, &mut out, &[8], &*be).unwrap();
    }
    let (mut hits, mut total) = (0u64, 0u64);
    for round in 0..20u64 {
        for k in 0..2000u64 {
            c.read(9, round * 2000 + k, &mut out, &[1], &*be).unwrap(); // the scan
            if k % 4 == 0 {
                let before = c.stats().hits;
                let p = hot[((round * 2000 + k) / 4 % 1024) as usize];
                c.read((k % 8) as u32, p, &mut out, &[8], &*be).unwrap();
                hits += c.stats().hits - before;
                total += 1;
            }
        }
    }
    hits as f64 / total as f64
}

#[test]
fn s3fifo_keeps_the_shared_hot_set_through_a_scan_better_than_lru() {
    let (s3, lru) = (
        hot_hit_ratio(CachePolicy::S3Fifo),
        hot_hit_ratio(CachePolicy::Lru),
    );
    assert!(s3 > 0.9, "S3-FIFO hot-set hit ratio {s3}");
    assert!(s3 > lru + 0.2, "S3-FIFO {s3} vs LRU {lru}");
}

#[test]
fn clear_empties_every_mode_and_the_next_reads_go_to_the_backend() {
    for mode in [CacheMode::Shared, CacheMode::PerDevice] {
        let be = backend(16);
        let c = cache(mode, 1024, CachePolicy::S3Fifo);
        let mut out = vec![0u8; 4 * B];
        for dev in [1, 2] {
            c.read(dev, 0, &mut out, &[2; 4], &*be).unwrap();
        }
        let held = c.stats().cached_bytes;
        assert!(held > 0, "{mode:?}");
        assert_eq!(c.clear(), held, "{mode:?}");
        let s = c.stats();
        assert_eq!((s.cached_bytes, s.per_device_bytes), (0, 0), "{mode:?}");
        let before = be.reads.load(Relaxed);
        c.read(1, 0, &mut out, &[2; 4], &*be).unwrap();
        assert_eq!(be.reads.load(Relaxed), before + 1, "{mode:?}");
        assert!(out
            .chunks(B)
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == (i as u8) + 1)));
        assert_eq!(
            c.clear(),
            4 * B as u64,
            "{mode:?}: the refill was cached again"
        );
    }
}

#[test]
fn read_cached_serves_part_of_a_cached_block_and_leaves_misses_alone() {
    let be = backend(4);
    for mode in [CacheMode::Shared, CacheMode::PerDevice] {
        let c = cache(mode, 1024, CachePolicy::S3Fifo);
        let mut part = [0u8; 100];
        // Not cached: nothing copied, nothing counted, nothing loaded.
        assert!(!c.read_cached(1, 2, 7, &mut part));
        assert_eq!((c.stats().hits, c.stats().misses), (0, 0));
        assert_eq!(c.stats().cached_bytes, 0);
        let mut blk = vec![0u8; B];
        c.read(1, 2, &mut blk, &[2], &*be).unwrap();
        assert!(c.read_cached(1, 2, B - 100, &mut part));
        assert!(part.iter().all(|&x| x == 3), "block 2 holds 3s");
        assert_eq!(c.stats().hits, 1);
        // Another device: a hit on the shared copy, a miss on its own in per-device mode.
        assert_eq!(c.read_cached(2, 2, 0, &mut part), mode == CacheMode::Shared);
        // A write through the cache is what later hits see.
        c.written(1, 2, &[8u8; B]);
        assert!(c.read_cached(1, 2, 0, &mut part));
        assert!(part.iter().all(|&x| x == 8));
        // A freed block is gone.
        c.invalidate(&[2]);
        assert!(!c.read_cached(1, 2, 0, &mut part));
    }
}
