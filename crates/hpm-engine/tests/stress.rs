//! Concurrency stress: many threads write, read, copy-on-write, discard and flush at once
//! while snapshots are taken; every device ends exactly as its writer's own model says, and
//! the shared image never changes under its readers.

mod common;

use common::*;
use hpm_engine::{CacheConfig, CacheMode, PoolOptions};
use hpm_testkit::model::Model;
use hpm_testkit::workload::pattern;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

const SIZE: u64 = 2 << 20;

#[test]
fn writers_readers_snapshots_and_flushes_race_safely() {
    race(CacheConfig::default());
}

#[test]
fn the_race_with_a_tiny_cache_evicting_all_the_time() {
    race(CacheConfig {
        size: 64 * 4096,
        ..CacheConfig::default()
    });
}

#[test]
fn the_race_without_cache() {
    race(CacheConfig {
        mode: CacheMode::Off,
        ..CacheConfig::default()
    });
}

fn race(cache: CacheConfig) {
    let disks = Disks::mem();
    let pool = disks.create(
        &PoolOptions {
            cache,
            ..small_opts()
        },
        64 << 20,
    );
    pool.create_device("image", SIZE).unwrap();
    let image = pattern(42, SIZE as usize);
    pool.open_device("image")
        .unwrap()
        .write_at(&image, 0)
        .unwrap();
    let writers = 4;
    for w in 0..writers {
        pool.snapshot("image", &format!("c{w}"), false).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..writers {
        let pool = pool.clone();
        let image = image.clone();
        handles.push(thread::spawn(move || {
            let name = format!("c{w}");
            let mut model = Model::new();
            model.create(&name, SIZE).unwrap();
            model.write(&name, 0, &image).unwrap();
            let dev = pool.open_device(&name).unwrap();
            let mut rng = SmallRng::seed_from_u64(w);
            for step in 0..400u64 {
                let off = rng.random_range(0..SIZE - 1);
                let len = rng.random_range(1..=(SIZE - off).min(70_000));
                match rng.random_range(0..10) {
                    0 => {
                        dev.discard(off, len).unwrap();
                        model.discard(&name, off, len).unwrap();
                    }
                    1 => {
                        dev.write_zeroes(off, len).unwrap();
                        model.write_zeroes(&name, off, len).unwrap();
                    }
                    2 => dev.flush().unwrap(),
                    3 => {
                        let mut got = vec![0u8; len as usize];
                        dev.read_at(&mut got, off).unwrap();
                        assert_eq!(
                            got,
                            model.read(&name, off, len as usize).unwrap(),
                            "{name} step {step}"
                        );
                    }
                    _ => {
                        let data = pattern(w * 10_000 + step, len as usize);
                        dev.write_at(&data, off).unwrap();
                        model.write(&name, off, &data).unwrap();
                    }
                }
            }
            (name, model)
        }));
    }
    // Readers of the shared image, racing the copy-on-writes of its blocks.
    let mut readers = Vec::new();
    for r in 0..2u64 {
        let (pool, stop, image) = (pool.clone(), stop.clone(), image.clone());
        readers.push(thread::spawn(move || {
            let dev = pool.open_device("image").unwrap();
            let mut rng = SmallRng::seed_from_u64(1000 + r);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 50 {
                let off = rng.random_range(0..SIZE - 1);
                let len = rng.random_range(1..=(SIZE - off).min(200_000)) as usize;
                let mut got = vec![0u8; len];
                dev.read_at(&mut got, off).unwrap();
                assert!(
                    got == image[off as usize..off as usize + len],
                    "the image changed under a reader"
                );
                n += 1;
            }
        }));
    }
    // Snapshots of the writers' devices while they write.
    let snapper = {
        let (pool, stop) = (pool.clone(), stop.clone());
        thread::spawn(move || {
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("s{k}");
                pool.snapshot(&format!("c{}", k % 4), &name, true).unwrap();
                if k % 2 == 0 {
                    pool.remove_device(&name).unwrap();
                }
                k += 1;
                thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    let results: Vec<(String, Model)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    snapper.join().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    for (name, model) in &results {
        assert_same_device(&pool, model, name, "the race");
    }
    let used = pool.info().unwrap().used_bytes;
    pool.close().unwrap();
    let pool = disks.open().unwrap();
    for (name, model) in &results {
        assert_same_device(&pool, model, name, "reopen after the race");
    }
    assert_eq!(pool.info().unwrap().used_bytes, used);
    let mut image_now = vec![0u8; SIZE as usize];
    pool.open_device("image")
        .unwrap()
        .read_at(&mut image_now, 0)
        .unwrap();
    assert!(image_now == image);
    pool.close().unwrap();
    let report = hpm_engine::check_storage(disks.storage()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
