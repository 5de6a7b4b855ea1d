//! Property tests: random sequences of device operations on the engine and on the reference
//! model, with contents compared after every step.

mod common;

use common::*;
use hpm_engine::{CacheConfig, CacheMode, CowGranularity, ErrorKind, PoolOptions};
use hpm_testkit::model::Model;
use hpm_testkit::workload::pattern;
use proptest::prelude::*;

const NAMES: usize = 6;
const MAX_BLOCKS: u64 = 40;

#[derive(Debug, Clone)]
enum Op {
    Create(usize, u64),
    Snapshot(usize, usize, bool),
    Remove(usize),
    Resize(usize, u64),
    Write(usize, u64, u64, u64),
    Discard(usize, u64, u64),
    WriteZeroes(usize, u64, u64),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES;
    // Offsets and lengths are fractions of the device, aligned or not.
    let frac = 0u64..10_000;
    prop_oneof![
        2 => (n.clone(), 1..MAX_BLOCKS).prop_map(|(a, b)| Op::Create(a, b)),
        2 => (n.clone(), n.clone(), any::<bool>()).prop_map(|(a, b, r)| Op::Snapshot(a, b, r)),
        1 => n.clone().prop_map(Op::Remove),
        1 => (n.clone(), 0..8u64).prop_map(|(a, b)| Op::Resize(a, b)),
        10 => (n.clone(), frac.clone(), 1u64..40_000, any::<u64>()).prop_map(|(a, o, l, s)| Op::Write(a, o, l, s)),
        2 => (n.clone(), frac.clone(), 1u64..60_000).prop_map(|(a, o, l)| Op::Discard(a, o, l)),
        2 => (n.clone(), frac.clone(), 1u64..30_000).prop_map(|(a, o, l)| Op::WriteZeroes(a, o, l)),
        2 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn name(i: usize) -> String {
    format!("dev/{i} x")
}

/// Where an I/O of `len` at fraction `frac` of the device lands, clipped to its size.
fn place(size: u64, frac: u64, len: u64) -> (u64, u64) {
    let off = size * frac / 10_000;
    (off, len.min(size - off).max(1).min(size - off))
}

/// Runs `ops`; compares the touched device after every step and everything after
/// management steps. Returns the pool for further checks.
fn run(ops: &[Op], cow: CowGranularity, capacity_chunks: u64) {
    run_with(ops, cow, capacity_chunks, CacheConfig::default())
}

fn run_with(ops: &[Op], cow: CowGranularity, capacity_chunks: u64, cache: CacheConfig) {
    run_on(Disks::mem(), ops, cow, capacity_chunks, cache)
}

fn run_on(disks: Disks, ops: &[Op], cow: CowGranularity, capacity_chunks: u64, cache: CacheConfig) {
    let opts = PoolOptions {
        chunk_size: 64 << 10,
        cow,
        cache,
        ..Default::default()
    };
    let mut pool = disks.create(&opts, capacity_chunks * (64 << 10));
    let mut model = Model::new();
    pool.create_device(&name(0), 24 * B).unwrap();
    model.create(&name(0), 24 * B).unwrap();
    let mut totals = (0u64, 0u64, 0u64);
    for (step, op) in ops.iter().enumerate() {
        let what = format!("step {step}: {op:?}");
        // Operations on existing devices pick one of them; creations pick a name.
        let existing = model.names();
        let pick = |i: usize| {
            existing
                .get(i % existing.len().max(1))
                .cloned()
                .unwrap_or_else(|| name(i))
        };
        match op {
            Op::Create(i, blocks) => {
                let r = pool.create_device(&name(*i), blocks * B);
                assert_eq!(
                    r.is_ok(),
                    model.create(&name(*i), blocks * B).is_ok(),
                    "{what}: {r:?}"
                );
            }
            Op::Snapshot(o, n, ro) => {
                let r = pool.snapshot(&pick(*o), &name(*n), *ro);
                assert_eq!(
                    r.is_ok(),
                    model.snapshot(&pick(*o), &name(*n), *ro).is_ok(),
                    "{what}: {r:?}"
                );
                assert_same(&pool, &model, &what);
            }
            Op::Remove(i) => {
                let r = pool.remove_device(&pick(*i));
                assert_eq!(r.is_ok(), model.remove(&pick(*i)).is_ok(), "{what}: {r:?}");
                assert_same(&pool, &model, &what);
            }
            Op::Resize(i, more) => {
                if let Ok(size) = model.size(&pick(*i)) {
                    pool.resize_device(&pick(*i), size + more * B).expect(&what);
                    model.resize(&pick(*i), size + more * B).unwrap();
                    assert_same_device(&pool, &model, &pick(*i), &what);
                }
            }
            Op::Write(i, frac, len, _)
            | Op::Discard(i, frac, len)
            | Op::WriteZeroes(i, frac, len) => {
                let n = pick(*i);
                let Ok(size) = model.size(&n) else { continue };
                let (off, len) = place(size, *frac, *len);
                let dev = pool.open_device(&n).expect(&what);
                let (r, m) = match op {
                    Op::Write(.., seed) => {
                        let data = pattern(*seed, len as usize);
                        (dev.write_at(&data, off), model.write(&n, off, &data))
                    }
                    Op::Discard(..) => (dev.discard(off, len), model.discard(&n, off, len)),
                    _ => (dev.write_zeroes(off, len), model.write_zeroes(&n, off, len)),
                };
                match (&r, &m) {
                    (Ok(()), Ok(())) => totals.0 += 1,
                    (Err(e), Err(_)) if e.kind() == ErrorKind::ReadOnly => {}
                    (Err(e), Ok(())) if e.kind() == ErrorKind::NoSpace => {
                        totals.1 += 1;
                        // A write that ran out of space may have landed in part: every block
                        // is old or new. Adopt the engine's bytes.
                        drop(dev);
                        let got = read_all(&pool, &n);
                        let old = model.read(&n, 0, size as usize).unwrap();
                        model.write(&n, 0, &got).unwrap();
                        assert!(got.len() == old.len());
                        continue;
                    }
                    _ => panic!("{what}: engine {r:?}, model {m:?}"),
                }
                drop(dev);
                assert_same_device(&pool, &model, &n, &what);
            }
            Op::Flush => {
                pool.flush().expect(&what);
                model.flush();
            }
            Op::Reopen => {
                pool.close().expect(&what);
                pool = hpm_engine::Pool::open_on_with(disks.storage(), None, cache).expect(&what);
                assert_same(&pool, &model, &what);
                let report = hpm_engine::check_storage(disks.storage()).unwrap();
                assert!(report.is_clean(), "{what}: {:?}", report.problems);
            }
        }
    }
    assert_same(&pool, &model, "the end");
    if std::env::var_os("HPM_TEST_VERBOSE").is_some() {
        eprintln!(
            "STATS ok_io={} nospace={} devices={}",
            totals.0,
            totals.1,
            model.names().len()
        );
    }
    // Usage adds up: no leaked and no double-counted blocks.
    let used = pool.info().unwrap().used_bytes;
    pool.close().unwrap();
    let pool = disks.open().unwrap();
    assert_eq!(pool.info().unwrap().used_bytes, used, "usage after reopen");
    assert_same(&pool, &model, "final reopen");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, CowGranularity::Block, 64);
    }

    #[test]
    fn engine_matches_model_in_a_tiny_pool(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, CowGranularity::Block, 3);
    }

    #[test]
    fn engine_matches_model_with_a_tiny_cache(ops in prop::collection::vec(op(), 1..60)) {
        // 32 blocks for the whole pool: constant eviction.
        let cache = CacheConfig { size: 32 * 4096, ..CacheConfig::default() };
        run_with(&ops, CowGranularity::Block, 64, cache);
    }

    #[test]
    fn engine_matches_model_without_cache(ops in prop::collection::vec(op(), 1..60)) {
        let cache = CacheConfig { mode: CacheMode::Off, ..CacheConfig::default() };
        run_with(&ops, CowGranularity::Block, 64, cache);
    }

    #[test]
    fn engine_matches_model_with_per_device_cache(ops in prop::collection::vec(op(), 1..60)) {
        let cache = CacheConfig { mode: CacheMode::PerDevice, size: 64 * 4096, ..CacheConfig::default() };
        run_with(&ops, CowGranularity::Chunk, 64, cache);
    }

    #[test]
    fn chunk_granularity_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, CowGranularity::Chunk, 64);
    }
}

proptest! {
    // Real files and O_DIRECT: fewer cases, each one slower.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The data store read and written with direct I/O (unaligned writes as read-modify-write
    /// of their blocks), with a small cache so most reads reach the file.
    #[test]
    fn engine_matches_model_with_direct_data_io(ops in prop::collection::vec(op(), 1..60)) {
        let cache = CacheConfig { size: 32 * 4096, ..CacheConfig::default() };
        run_on(Disks::direct_data(), &ops, CowGranularity::Block, 64, cache);
    }
}

#[test]
fn out_of_range_io_is_refused_not_overflowed() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 4 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    let d = pool.open_device("a").unwrap();
    let mut buf = [0u8; 16];
    for off in [u64::MAX - 10, u64::MAX, (1 << 20) - 8, 1 << 20] {
        assert_eq!(
            d.read_at(&mut buf, off).unwrap_err().kind(),
            ErrorKind::Invalid,
            "read at {off}"
        );
        assert_eq!(
            d.write_at(&buf, off).unwrap_err().kind(),
            ErrorKind::Invalid,
            "write at {off}"
        );
        assert_eq!(
            d.discard(off, 16).unwrap_err().kind(),
            ErrorKind::Invalid,
            "discard at {off}"
        );
        assert_eq!(
            d.write_zeroes(off, 16).unwrap_err().kind(),
            ErrorKind::Invalid,
            "zeroes at {off}"
        );
    }
}

#[test]
fn snapshot_chain_of_depth_64_and_fan_out() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 64 << 20);
    let mut model = Model::new();
    pool.create_device("d0", 256 * B).unwrap();
    model.create("d0", 256 * B).unwrap();
    for depth in 1..=64 {
        let (prev, cur) = (format!("d{}", depth - 1), format!("d{depth}"));
        let data = pattern(depth, 3 * B as usize + 100);
        let off = depth * 3 * B + 17;
        let dev = pool.open_device(&prev).unwrap();
        dev.write_at(&data, off).unwrap();
        model.write(&prev, off, &data).unwrap();
        drop(dev);
        pool.snapshot(&prev, &cur, false).unwrap();
        model.snapshot(&prev, &cur, false).unwrap();
    }
    // Fan-out: 16 snapshots of the deepest one, each changed differently.
    for k in 0..16u64 {
        let n = format!("fan{k}");
        pool.snapshot("d64", &n, false).unwrap();
        model.snapshot("d64", &n, false).unwrap();
        let data = pattern(1000 + k, 5000);
        pool.open_device(&n)
            .unwrap()
            .write_at(&data, k * 7919)
            .unwrap();
        model.write(&n, k * 7919, &data).unwrap();
    }
    assert_same(&pool, &model, "chain and fan-out");
    pool.close().unwrap();
    let pool = disks.open().unwrap();
    assert_same(&pool, &model, "reopen");
}

#[test]
fn removed_devices_space_is_reused_and_reads_zero() {
    // A data store whose punch does nothing, as on a filesystem without hole punching: the
    // old bytes stay on disk, and still no new device may see them.
    struct NoPunch(hpm_io::MemBackend);
    impl hpm_io::Backend for NoPunch {
        fn read_at(&self, b: &mut [u8], o: u64) -> std::io::Result<()> {
            self.0.read_at(b, o)
        }
        fn write_at(&self, b: &[u8], o: u64) -> std::io::Result<()> {
            self.0.write_at(b, o)
        }
        fn sync(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn punch(&self, _: u64, _: u64) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(95))
        }
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, l: u64) -> std::io::Result<()> {
            self.0.set_len(l)
        }
    }
    let mut disks = Disks::mem();
    disks.data = std::sync::Arc::new(NoPunch(hpm_io::MemBackend::new()));
    let cap = 4 * (64 << 10);
    let pool = disks.create(&small_opts(), cap);
    for round in 0..3u64 {
        pool.create_device("secret", cap).unwrap();
        let d = pool.open_device("secret").unwrap();
        d.write_at(&pattern(round, cap as usize), 0).unwrap();
        drop(d);
        assert_eq!(pool.info().unwrap().used_bytes, cap, "the pool is full");
        pool.remove_device("secret").unwrap();
        pool.create_device("fresh", cap).unwrap();
        let d = pool.open_device("fresh").unwrap();
        let mut buf = vec![1u8; cap as usize];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "a new device reads zeros");
        // Partial writes into reused blocks: the rest of each block is zero, not old data.
        for k in 0..(cap / B) {
            d.write_at(b"x", k * B + 100).unwrap();
        }
        d.read_at(&mut buf, 0).unwrap();
        for (i, &b) in buf.iter().enumerate() {
            let want = if i as u64 % B == 100 { b'x' } else { 0 };
            assert_eq!(b, want, "byte {i} of the new device");
        }
        drop(d);
        pool.remove_device("fresh").unwrap();
    }
    assert_eq!(pool.info().unwrap().used_bytes, 0);
}

/// `Device::allocation` exactly, on a known layout: written blocks are mapped, discarded
/// and zeroed ones are not, whole unmapped chunks and wholly mapped ones are one extent
/// each, a snapshot answers as its origin until it writes, and `max` cuts the list.
#[test]
fn allocation_reports_exactly_the_mapped_blocks() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 8 << 20); // 64 KiB chunks: 16 blocks
    pool.create_device("a", 2 << 20).unwrap();
    let a = pool.open_device("a").unwrap();
    a.write_at(&[1u8; 4096], 0).unwrap(); // block 0
    a.write_at(&[2u8; 3 * 4096], 3 * B).unwrap(); // blocks 3..6
    a.write_at(&[3u8; 16 * 4096], 32 * B).unwrap(); // chunk 2, whole
    a.write_at(&[4u8; 100], 100 * B + 10).unwrap(); // inside block 100
    a.discard(3 * B, B).unwrap(); // block 3 again unmapped
    a.write_zeroes(5 * B, B).unwrap(); // block 5 too
    let mb = |n: u64| n * B;
    let want = vec![
        (mb(1), true),
        (mb(3), false),
        (mb(1), true), // block 4
        (mb(27), false),
        (mb(16), true), // chunk 2
        (mb(52), false),
        (mb(1), true), // block 100
        (mb(512 - 101), false),
    ];
    assert_eq!(a.allocation(0, 2 << 20, usize::MAX).unwrap(), want);
    assert_eq!(a.allocation(0, 2 << 20, 3).unwrap(), want[..3].to_vec());
    assert_eq!(a.allocation(0, 2 << 20, 0).unwrap(), want[..1].to_vec());
    // Inside blocks: the covered parts take their blocks' states.
    assert_eq!(
        a.allocation(4096 + 512, 3 * 4096, 8).unwrap(),
        vec![(3 * 4096 - 512, false), (512, true)] // blocks 1-3, then into block 4
    );
    assert_eq!(a.allocation(40 * B, 10, 8).unwrap(), vec![(10, true)]);
    assert!(a.allocation(0, (2 << 20) + 1, 8).is_err(), "past the end");
    assert_eq!(a.allocation(7, 0, 8).unwrap(), vec![]);
    pool.snapshot("a", "s", false).unwrap();
    let s = pool.open_device("s").unwrap();
    assert_eq!(s.allocation(0, 2 << 20, usize::MAX).unwrap(), want);
    s.write_at(&[5u8; 4096], 200 * B).unwrap();
    let got = s.allocation(0, 2 << 20, usize::MAX).unwrap();
    assert_eq!(
        got[got.len() - 3..],
        [(mb(99), false), (mb(1), true), (mb(311), false)]
    );
    // A copy-on-write into the shared, wholly mapped chunk 2 splits its entry, and a
    // discard there leaves a hole in it.
    s.write_at(&[6u8; 4096], 40 * B).unwrap();
    s.discard(33 * B, B).unwrap();
    assert_eq!(
        s.allocation(32 * B, 16 * B, usize::MAX).unwrap(),
        vec![(mb(1), true), (mb(1), false), (mb(14), true)]
    );
    // A huge range is answered for a prefix: the walk is bounded.
    pool.create_device("huge", 16 << 30).unwrap();
    let h = pool.open_device("huge").unwrap();
    let got = h.allocation(0, 16 << 30, usize::MAX).unwrap();
    assert_eq!(got.len(), 1);
    assert!(!got[0].1);
    assert!(got[0].0 > 0 && got[0].0 < 16 << 30, "a prefix: {got:?}");
}
