//! Crash tests: a workload runs on crash-simulating backends that lose power after the Nth
//! sync, for every N, with unsynced writes kept, dropped or torn; after reopen every device
//! must hold what the model allows: all flushed data, later writes or not, nothing foreign.

mod common;

use common::*;
use hpm_engine::{Pool, PoolOptions, PoolStorage};
use hpm_io::Backend as _;
use hpm_testkit::crash::{CrashFile, CrashSim, TornPolicy};
use hpm_testkit::model::Model;
use hpm_testkit::workload::pattern;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn files(sim: &Arc<CrashSim>) -> [CrashFile; 4] {
    [
        sim.file("superblock", 512),
        sim.file("meta.0", 512),
        sim.file("meta.1", 512),
        sim.file("data", 4096),
    ]
}

fn storage(f: &[CrashFile; 4]) -> PoolStorage {
    PoolStorage {
        superblock: Box::new(f[0].clone()),
        meta: [Box::new(f[1].clone()), Box::new(f[2].clone())],
        data: Box::new(f[3].clone()),
    }
}

/// A management operation whose outcome a crash left undecided.
enum Undecided {
    None,
    Create(String, u64),
    Snapshot(String, String),
    Remove(String),
}

/// Runs a seeded workload until it ends or the power fails. Returns what a failed step
/// left undecided.
fn workload(
    pool: &mut Option<Pool>,
    f: &[CrashFile; 4],
    model: &mut Model,
    seed: u64,
    steps: usize,
) -> Undecided {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next_name = 0;
    for step in 0..steps {
        let p = pool.as_ref().expect("open");
        let names = model.names();
        let pick = |rng: &mut SmallRng| names[rng.random_range(0..names.len())].clone();
        let roll = if names.is_empty() {
            0
        } else {
            rng.random_range(0..100)
        };
        let trace = std::env::var_os("HPM_CRASH_TRACE").is_some();
        if trace {
            eprintln!("step {step} roll {roll} syncs {}", f[0].sim().syncs());
        }
        match roll {
            0..=5 => {
                let n = format!("d{next_name}");
                next_name += 1;
                let size = rng.random_range(1..48u64) * B;
                if p.create_device(&n, size).is_err() {
                    return Undecided::Create(n, size);
                }
                model.create(&n, size).unwrap();
            }
            6..=11 => {
                let (o, n) = (pick(&mut rng), format!("d{next_name}"));
                next_name += 1;
                if p.snapshot(&o, &n, false).is_err() {
                    return Undecided::Snapshot(o, n);
                }
                model.snapshot(&o, &n, false).unwrap();
            }
            12..=14 if names.len() > 1 => {
                let n = pick(&mut rng);
                if p.remove_device(&n).is_err() {
                    return Undecided::Remove(n);
                }
                model.remove(&n).unwrap();
            }
            15..=27 => {
                if p.flush().is_err() {
                    return Undecided::None;
                }
                model.flush();
            }
            28..=30 => {
                // Close (commit + checkpoint) and reopen.
                let p = pool.take().unwrap();
                if p.close().is_err() {
                    return Undecided::None;
                }
                model.flush();
                match Pool::open_on(storage(f), None) {
                    Ok(p) => *pool = Some(p),
                    Err(_) => return Undecided::None,
                }
            }
            31..=37 => {
                let n = pick(&mut rng);
                let size = model.size(&n).unwrap();
                let off = rng.random_range(0..size);
                let len = rng.random_range(1..=(size - off).min(20_000));
                let r = p.open_device(&n).unwrap().discard(off, len);
                model.discard(&n, off, len).unwrap();
                if r.is_err() {
                    return Undecided::None;
                }
            }
            _ => {
                let n = pick(&mut rng);
                let size = model.size(&n).unwrap();
                let off = rng.random_range(0..size);
                let len = rng.random_range(1..=(size - off).min(30_000));
                let data = pattern(seed * 1000 + step as u64, len as usize);
                let r = p.open_device(&n).unwrap().write_at(&data, off);
                if trace {
                    eprintln!(
                        "  write {n} {off}+{len} -> {r:?} blocks {}..={}",
                        off / B,
                        (off + len - 1) / B
                    );
                }
                // A failed write may have landed anyway: the model allows both.
                model.write(&n, off, &data).unwrap();
                if r.is_err() {
                    return Undecided::None;
                }
            }
        }
    }
    Undecided::None
}

fn new_pool(sim: &Arc<CrashSim>) -> (Pool, [CrashFile; 4]) {
    let f = files(sim);
    let opts = PoolOptions {
        chunk_size: 64 << 10,
        ..Default::default()
    };
    let pool = Pool::create_on(storage(&f), &opts, 4 << 20, String::new(), None).unwrap();
    (pool, f)
}

/// Crashes after every sync point of the seeded workload, with the given torn-write policy.
fn crash_everywhere(seed: u64, steps: usize, policy: Option<TornPolicy>) -> usize {
    // A dry run counts the syncs.
    let sim = CrashSim::new(seed);
    let (pool, f) = new_pool(&sim);
    sim.crash_after_syncs(None);
    let base = sim.syncs();
    let mut pool = Some(pool);
    let mut model = Model::new();
    workload(&mut pool, &f, &mut model, seed, steps);
    let total = sim.syncs() - base;
    drop(pool);
    for n in 0..=total {
        let sim = CrashSim::new(seed ^ (n << 20));
        let (pool, f) = new_pool(&sim);
        sim.crash_after_syncs(Some(n));
        let mut pool = Some(pool);
        let mut model = Model::new();
        let undecided = workload(&mut pool, &f, &mut model, seed, steps);
        // The power fails here (if it had not already); nothing more reaches the disks.
        sim.crash_after_syncs(Some(0));
        let _ = pool.as_ref().map(|p| p.flush());
        drop(pool);
        match policy {
            Some(p) => sim.crash_with(p),
            None => {
                sim.crash();
            }
        }
        let pool = Pool::open_on(storage(&f), None)
            .unwrap_or_else(|e| panic!("seed {seed}, crash after sync {n}: reopen failed: {e}"));
        let names: Vec<String> = pool.list_devices().into_iter().map(|d| d.name).collect();
        match undecided {
            Undecided::Create(n, size) if names.contains(&n) => model.create(&n, size).unwrap(),
            Undecided::Snapshot(o, n) if names.contains(&n) => {
                model.snapshot(&o, &n, false).unwrap()
            }
            Undecided::Remove(n) if !names.contains(&n) => model.remove(&n).unwrap(),
            _ => {}
        }
        verify_crash(&pool, &mut model, &format!("seed {seed}, sync {n}"));
        let used = pool.info().unwrap().used_bytes;
        pool.close().unwrap();
        let report = hpm_engine::check_storage(storage(&f)).unwrap();
        assert!(
            report.is_clean(),
            "seed {seed}, sync {n}: {:?}",
            report.problems
        );
        // No leak: usage after recovery equals usage derived from what is mapped.
        let pool = Pool::open_on(storage(&f), None).unwrap();
        assert_eq!(pool.info().unwrap().used_bytes, used);
        assert_same(&pool, &model, "reopen after recovery");
    }
    total as usize
}

#[test]
fn crash_at_every_sync_point_torn_randomly() {
    let mut points = 0;
    for seed in 1..=4 {
        points += crash_everywhere(seed, 80, None);
    }
    assert!(
        points > 100,
        "the workloads sync often enough to test much: {points}"
    );
}

#[test]
fn crash_at_every_sync_point_keeping_all_unsynced_writes() {
    crash_everywhere(11, 60, Some(TornPolicy::KeepAll));
}

#[test]
fn crash_at_every_sync_point_dropping_all_unsynced_writes() {
    crash_everywhere(12, 60, Some(TornPolicy::DropAll));
}

#[test]
fn flushed_data_survives_crash_exactly() {
    let sim = CrashSim::new(5);
    let (pool, f) = new_pool(&sim);
    pool.create_device("a", 1 << 20).unwrap();
    let d = pool.open_device("a").unwrap();
    let data = pattern(9, 1 << 20);
    d.write_at(&data, 0).unwrap();
    d.flush().unwrap();
    d.write_at(&pattern(10, 5000), 3).unwrap(); // not flushed
    drop(d);
    sim.crash_after_syncs(Some(0));
    drop(pool);
    sim.crash_with(TornPolicy::DropAll);
    let pool = Pool::open_on(storage(&f), None).unwrap();
    assert_eq!(read_all(&pool, "a"), data);
}

#[test]
fn debug_one() {
    if let Ok(s) = std::env::var("HPM_CRASH_SEED") {
        let mut it = s.split(',');
        let seed: u64 = it.next().unwrap().parse().unwrap();
        crash_everywhere(seed, 40, Some(TornPolicy::Random));
    }
}

#[test]
fn random_seeds_with_torn_metadata() {
    let mut rng = SmallRng::seed_from_u64(77);
    for _ in 0..3 {
        let seed = rng.random_range(100..10_000);
        crash_everywhere(seed, 40, Some(TornPolicy::Random));
    }
}

/// Group commit: threads that flush at once may share one commit, and each must still find
/// every write it had flushed after the power fails (unsynced writes all dropped).
#[test]
fn concurrent_flushes_keep_every_flushed_write() {
    const THREADS: usize = 6;
    const SIZE: usize = 1 << 20;
    let sim = CrashSim::new(21);
    let (pool, f) = new_pool(&sim);
    pool.create_device("base", SIZE as u64).unwrap();
    let base = pattern(1, SIZE);
    {
        let d = pool.open_device("base").unwrap();
        d.write_at(&base, 0).unwrap();
        d.flush().unwrap();
    }
    for t in 0..THREADS {
        pool.snapshot("base", &format!("s{t}"), false).unwrap();
    }
    let commits_before = pool.stats().commits;
    let expected: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let pool = pool.clone();
                let mut image = base.clone();
                s.spawn(move || {
                    let d = pool.open_device(&format!("s{t}")).unwrap();
                    let mut rng = SmallRng::seed_from_u64(t as u64);
                    for k in 0..20 {
                        let len = rng.random_range(1..=16 << 10);
                        let off = rng.random_range(0..SIZE - len);
                        let data = pattern((t * 100 + k) as u64, len);
                        d.write_at(&data, off as u64).unwrap();
                        d.flush().unwrap();
                        image[off..off + len].copy_from_slice(&data);
                    }
                    image
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let flushes = (THREADS * 20) as u64;
    let commits = pool.stats().commits - commits_before;
    assert!(
        commits <= flushes,
        "{commits} commits for {flushes} flushes"
    );
    // The power fails now: nothing unsynced survives.
    sim.crash_after_syncs(Some(0));
    drop(pool);
    sim.crash_with(TornPolicy::DropAll);
    let pool = Pool::open_on(storage(&f), None).unwrap();
    for (t, image) in expected.iter().enumerate() {
        assert!(
            read_all(&pool, &format!("s{t}")) == *image,
            "device s{t} lost flushed writes"
        );
    }
    assert_eq!(read_all(&pool, "base"), base);
}

/// A flush with nothing changed since the last commit commits nothing; a flush after any
/// kind of change (a data-only overwrite in place, a discard) commits, and what it flushed
/// survives a power failure that drops every unsynced write.
#[test]
fn flush_commits_only_when_something_changed_and_keeps_every_kind_of_change() {
    const SIZE: usize = 256 << 10;
    let sim = CrashSim::new(22);
    let (pool, f) = new_pool(&sim);
    pool.create_device("d", SIZE as u64).unwrap();
    let d = pool.open_device("d").unwrap();
    let mut image = pattern(3, SIZE);
    d.write_at(&image, 0).unwrap();
    d.flush().unwrap();
    let commits = || pool.stats().commits;
    let c0 = commits();
    d.flush().unwrap();
    pool.flush().unwrap();
    assert_eq!(commits(), c0, "a flush with nothing changed committed");
    // An overwrite of blocks the device owns changes data only, no metadata.
    let over = pattern(4, 8192);
    d.write_at(&over, 4096).unwrap();
    image[4096..4096 + 8192].copy_from_slice(&over);
    d.flush().unwrap();
    assert_eq!(
        commits(),
        c0 + 1,
        "a flush after an overwrite did not commit"
    );
    d.discard(65536, 4096).unwrap();
    image[65536..65536 + 4096].fill(0);
    d.flush().unwrap();
    assert_eq!(commits(), c0 + 2, "a flush after a discard did not commit");
    d.flush().unwrap();
    assert_eq!(commits(), c0 + 2);
    drop(d);
    sim.crash_after_syncs(Some(0));
    drop(pool);
    sim.crash_with(TornPolicy::DropAll);
    let pool = Pool::open_on(storage(&f), None).unwrap();
    assert!(read_all(&pool, "d") == image, "a flushed change was lost");
}

/// The steps of the growing workload: fill a 1 MiB pool, flush, grow it to 2 MiB, write
/// into the new space, flush. Stops at the first failure (a crash); returns whether `grow`
/// returned.
fn grow_workload(pool: &Pool, model: &mut Model) -> bool {
    const MIB: u64 = 1 << 20;
    let mut grown = false;
    let mut steps = || -> hpm_engine::Result<()> {
        // The model first: a failed step may have happened anyway (settled after reopen).
        model.create("a", 2 * MIB).unwrap();
        pool.create_device("a", 2 * MIB)?;
        let d = pool.open_device("a")?;
        let first = pattern(31, MIB as usize);
        model.write("a", 0, &first).unwrap();
        d.write_at(&first, 0)?;
        d.flush()?;
        model.flush();
        pool.grow(2 * MIB)?;
        grown = true;
        let second = pattern(32, MIB as usize);
        model.write("a", MIB, &second).unwrap();
        d.write_at(&second, MIB)?;
        d.flush()?;
        model.flush();
        Ok(())
    };
    let _ = steps();
    grown
}

/// Growing a pool survives a crash at every sync point: after reopen the capacity is the
/// old or the new one (the new one once `grow` returned), every flushed write reads back,
/// nothing foreign appears, `check` is clean, and the new space takes writes.
#[test]
fn grow_survives_a_crash_at_every_sync_point() {
    const MIB: u64 = 1 << 20;
    let new_pool = |sim: &Arc<CrashSim>| {
        let f = files(sim);
        let pool = Pool::create_on(storage(&f), &small_opts(), MIB, String::new(), None).unwrap();
        (pool, f)
    };
    // A dry run counts the syncs and checks the workload itself.
    let sim = CrashSim::new(77);
    let (pool, _f) = new_pool(&sim);
    sim.crash_after_syncs(None);
    let base = sim.syncs();
    assert!(grow_workload(&pool, &mut Model::new()));
    let total = sim.syncs() - base;
    assert!(total >= 4, "{total} syncs");
    drop(pool);
    for n in 0..=total {
        let sim = CrashSim::new(77 ^ (n << 20));
        let (pool, f) = new_pool(&sim);
        sim.crash_after_syncs(Some(n));
        let mut model = Model::new();
        let grown = grow_workload(&pool, &mut model);
        sim.crash_after_syncs(Some(0));
        drop(pool);
        sim.crash_with(TornPolicy::Random);
        let pool = Pool::open_on(storage(&f), None)
            .unwrap_or_else(|e| panic!("crash after sync {n}: reopen failed: {e}"));
        let capacity = pool.space().0;
        assert!(
            capacity == MIB || capacity == 2 * MIB,
            "sync {n}: capacity {capacity}"
        );
        if grown {
            assert_eq!(capacity, 2 * MIB, "sync {n}: grow returned, capacity lost");
        }
        if pool.list_devices().is_empty() {
            // The crash came before the device was made durable.
            let _ = model.remove("a");
        }
        verify_crash(&pool, &mut model, &format!("grow, sync {n}"));
        if capacity == 2 * MIB && !model.names().is_empty() {
            // The new space takes writes now.
            let d = pool.open_device("a").unwrap();
            d.write_at(&pattern(33, MIB as usize), MIB).unwrap();
            d.flush().unwrap();
        }
        pool.close().unwrap();
        let report = hpm_engine::check_storage(storage(&f)).unwrap();
        assert!(report.is_clean(), "sync {n}: {:?}", report.problems);
    }
}

/// A full pool refuses writes with NoSpace until it grows; a smaller capacity is refused,
/// the same one changes nothing, and the new capacity survives a reopen.
#[test]
fn a_full_pool_takes_writes_again_after_growing() {
    const MIB: u64 = 1 << 20;
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), MIB);
    pool.create_device("a", 4 * MIB).unwrap();
    let d = pool.open_device("a").unwrap();
    d.write_at(&pattern(41, MIB as usize), 0).unwrap();
    let e = d.write_at(&pattern(42, 4096), MIB).unwrap_err();
    assert_eq!(e.kind(), hpm_engine::ErrorKind::NoSpace, "{e}");

    let e = pool.grow(MIB / 2).unwrap_err();
    assert_eq!(e.kind(), hpm_engine::ErrorKind::Unsupported, "{e}");
    assert!(
        e.to_string().contains("shrinking a pool is not supported"),
        "{e}"
    );
    assert_eq!(pool.grow(MIB).unwrap(), MIB);
    // Rounded down to whole chunks (64 KiB here).
    assert_eq!(pool.grow(3 * MIB + 1000).unwrap(), 3 * MIB);
    assert_eq!(pool.space(), (3 * MIB, MIB));
    assert!(disks.data.len().unwrap() >= 3 * MIB);
    d.write_at(&pattern(43, 2 * MIB as usize), MIB).unwrap();
    assert_eq!(pool.space(), (3 * MIB, 3 * MIB));
    drop(d);
    pool.close().unwrap();

    let pool = disks.open().unwrap();
    assert_eq!(pool.space(), (3 * MIB, 3 * MIB));
    let all = read_all(&pool, "a");
    assert_eq!(&all[..MIB as usize], &pattern(41, MIB as usize)[..]);
    assert_eq!(
        &all[MIB as usize..3 * MIB as usize],
        &pattern(43, 2 * MIB as usize)[..]
    );
    pool.close().unwrap();
    let report = hpm_engine::check_storage(disks.storage()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// A data store of a fixed size, as a block device.
struct FixedSize(hpm_io::MemBackend);

impl hpm_io::Backend for FixedSize {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.punch(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("a block device cannot be resized"))
    }
    fn resizable(&self) -> bool {
        false
    }
}

/// On a data block device a pool grows up to the device's size; asking for more is refused
/// with the reason and leaves the pool working.
#[test]
fn a_pool_on_a_block_device_grows_only_as_far_as_the_device() {
    const MIB: u64 = 1 << 20;
    let data = hpm_io::MemBackend::new();
    data.set_len(4 * MIB).unwrap();
    let disks = Disks {
        data: Arc::new(FixedSize(data)),
        ..Disks::mem()
    };
    let pool = disks.create(&small_opts(), MIB);
    assert_eq!(pool.grow(4 * MIB).unwrap(), 4 * MIB);
    let e = pool.grow(8 * MIB).unwrap_err();
    assert_eq!(e.kind(), hpm_engine::ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("grow the device first"), "{e}");
    pool.create_device("a", MIB).unwrap();
    pool.open_device("a")
        .unwrap()
        .write_at(&pattern(5, 4096), 0)
        .unwrap();
    pool.flush().unwrap();
    assert_eq!(pool.space(), (4 * MIB, 4096));
}
