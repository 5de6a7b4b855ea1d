//! Tests of the model: its I/O rules, its errors and its crash oracle.

use super::*;
use crate::workload::pattern;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const BS: usize = BLOCK_SIZE as usize;

fn model_with(name: &str, blocks: u64) -> Model {
    let mut m = Model::new();
    m.create(name, blocks * BLOCK_SIZE).unwrap();
    m
}

/// A reader for `verify_after_crash` from flat per-device images.
fn reader(images: &BTreeMap<String, Vec<u8>>) -> impl FnMut(&str, u64) -> Vec<u8> + '_ {
    |name, idx| {
        let img = &images[name];
        let start = (idx as usize * BS).min(img.len());
        img[start..(start + BS).min(img.len())].to_vec()
    }
}

fn image(m: &Model, name: &str) -> Vec<u8> {
    m.read(name, 0, m.size(name).unwrap() as usize).unwrap()
}

#[test]
fn unaligned_writes_read_back() {
    let mut m = model_with("a", 4);
    let data = pattern(1, 5000);
    m.write("a", 3000, &data).unwrap();
    assert_eq!(m.read("a", 3000, 5000).unwrap(), data);
    assert_eq!(m.read("a", 0, 3000).unwrap(), vec![0; 3000]);
    assert_eq!(m.read("a", 2990, 20).unwrap()[10..], data[..10]);
}

#[test]
fn discard_zeroes_whole_blocks_only_and_write_zeroes_is_exact() {
    let mut m = model_with("a", 4);
    let data = pattern(2, 4 * BS);
    m.write("a", 0, &data).unwrap();
    m.discard("a", 100, 2 * BLOCK_SIZE).unwrap();
    let mut want = data.clone();
    want[BS..2 * BS].fill(0);
    assert_eq!(image(&m, "a"), want);
    m.write_zeroes("a", 100, 2 * BLOCK_SIZE).unwrap();
    want[100..100 + 2 * BS].fill(0);
    assert_eq!(image(&m, "a"), want);
}

#[test]
fn snapshots_are_independent_copies() {
    let mut m = model_with("a", 2);
    m.write("a", 0, b"before").unwrap();
    m.snapshot("a", "s", true).unwrap();
    m.snapshot("a", "w", false).unwrap();
    m.write("a", 0, b"after!").unwrap();
    m.write("w", 0, b"mine").unwrap();
    assert_eq!(m.read("s", 0, 6).unwrap(), b"before");
    assert_eq!(m.read("a", 0, 6).unwrap(), b"after!");
    assert_eq!(m.read("w", 0, 6).unwrap(), b"minere");
    assert!(m.read_only("s").unwrap() && !m.read_only("w").unwrap());
    assert_eq!(m.names(), ["a", "s", "w"]);
    m.remove("a").unwrap();
    assert!(!m.exists("a"));
    assert_eq!(m.read("s", 0, 6).unwrap(), b"before");
}

#[test]
fn errors_change_nothing() {
    let mut m = model_with("a", 2);
    m.snapshot("a", "ro", true).unwrap();
    m.write("a", 0, b"x").unwrap();
    let unknown = ModelError::UnknownDevice("nope".into());
    assert_eq!(m.write("nope", 0, b"x"), Err(unknown.clone()));
    assert_eq!(m.snapshot("nope", "b", false), Err(unknown.clone()));
    assert_eq!(m.remove("nope"), Err(unknown.clone()));
    assert_eq!(m.size("nope"), Err(unknown));
    assert_eq!(m.create("a", 10), Err(ModelError::NameExists("a".into())));
    assert_eq!(
        m.snapshot("a", "ro", false),
        Err(ModelError::NameExists("ro".into()))
    );
    assert_eq!(
        m.write("ro", 0, b"x"),
        Err(ModelError::ReadOnly("ro".into()))
    );
    assert_eq!(
        m.discard("ro", 0, 4096),
        Err(ModelError::ReadOnly("ro".into()))
    );
    assert_eq!(
        m.write_zeroes("ro", 0, 1),
        Err(ModelError::ReadOnly("ro".into()))
    );
    let size = 2 * BLOCK_SIZE;
    let oor = |offset, len| ModelError::OutOfRange {
        name: "a".into(),
        offset,
        len,
        size,
    };
    assert_eq!(m.write("a", size - 1, b"xy"), Err(oor(size - 1, 2)));
    assert_eq!(m.read("a", size, 1), Err(oor(size, 1)));
    assert_eq!(m.discard("a", u64::MAX, 2), Err(oor(u64::MAX, 2)));
    assert_eq!(
        m.resize("a", 100),
        Err(ModelError::Shrink {
            name: "a".into(),
            size,
            new_size: 100
        })
    );
    // Writes ending exactly at the end are fine.
    m.write("a", size - 2, b"ok").unwrap();
    // None of the failures flushed: the unflushed write may still be lost.
    assert_eq!(m.allowed_after_crash("a", 0).unwrap().len(), 2);
}

#[test]
fn errors_name_their_device() {
    let errors = [
        ModelError::UnknownDevice("d".into()),
        ModelError::NameExists("d".into()),
        ModelError::ReadOnly("d".into()),
        ModelError::OutOfRange {
            name: "d".into(),
            offset: 1,
            len: 2,
            size: 3,
        },
        ModelError::Shrink {
            name: "d".into(),
            size: 3,
            new_size: 1,
        },
    ];
    for e in errors {
        assert!(e.to_string().contains("'d'"), "{e}");
    }
}

#[test]
fn resize_grows_with_zeros_and_flushes() {
    let mut m = model_with("a", 1);
    m.write("a", 0, &[7; BS]).unwrap();
    m.resize("a", 3 * BLOCK_SIZE).unwrap();
    assert_eq!(m.size("a").unwrap(), 3 * BLOCK_SIZE);
    assert_eq!(m.read("a", 4000, 200).unwrap()[96..], [0; 104]);
    assert_eq!(m.allowed_after_crash("a", 0).unwrap(), vec![vec![7; BS]]);
    m.resize("a", 3 * BLOCK_SIZE).unwrap();
}

#[test]
fn crash_may_keep_the_flushed_or_any_later_value_only() {
    let mut m = model_with("a", 3);
    let (v1, v2, v3) = (pattern(1, BS), pattern(2, BS), pattern(3, BS));
    m.write("a", 0, &v1).unwrap();
    m.flush();
    m.write("a", 0, &v2).unwrap();
    m.write("a", 0, &v3).unwrap();
    for ok in [&v1, &v2, &v3] {
        let mut img = vec![0; 3 * BS];
        img[..BS].copy_from_slice(ok);
        let images = BTreeMap::from([("a".to_string(), img)]);
        m.verify_after_crash(reader(&images)).unwrap();
    }
    // A value the block never had, even one mixing two allowed ones, is caught.
    let mut mixed = v2.clone();
    mixed[2048..].copy_from_slice(&v3[2048..]);
    let mut img = vec![0; 3 * BS];
    img[..BS].copy_from_slice(&mixed);
    let images = BTreeMap::from([("a".to_string(), img)]);
    let e = m.verify_after_crash(reader(&images)).unwrap_err();
    assert!(e.contains("device 'a' block 0"), "{e}");
    assert!(
        e.contains(&format!("{:02x}{:02x}", v1[0], v1[1])),
        "names the flushed value: {e}"
    );
    assert!(!e.contains("more wrong"), "{e}");
}

#[test]
fn every_block_is_checked_including_never_written_ones() {
    let m = model_with("a", 64);
    let mut img = vec![0; 64 * BS];
    img[50 * BS + 17] = 1;
    img[60 * BS] = 1;
    let images = BTreeMap::from([("a".to_string(), img)]);
    let e = m.verify_after_crash(reader(&images)).unwrap_err();
    assert!(e.contains("block 50") && e.contains("flushed zeros"), "{e}");
    assert!(e.contains("and 1 more wrong blocks"), "{e}");
}

#[test]
fn metadata_operations_flush_every_device() {
    type Op = fn(&mut Model);
    let ops: [(&str, Op); 5] = [
        ("create", |m| m.create("new", 4096).unwrap()),
        ("snapshot", |m| m.snapshot("other", "snap", false).unwrap()),
        ("remove", |m| m.remove("other").unwrap()),
        ("resize", |m| m.resize("other", 8192).unwrap()),
        ("flush", Model::flush),
    ];
    for (what, op) in ops {
        let mut m = model_with("a", 1);
        m.create("other", 4096).unwrap();
        m.write("a", 0, &pattern(9, BS)).unwrap();
        op(&mut m);
        // The write to "a" is now durable: the zeros it replaced are no longer allowed.
        assert_eq!(
            m.allowed_after_crash("a", 0).unwrap(),
            vec![pattern(9, BS)],
            "{what}"
        );
    }
}

#[test]
fn partial_last_block_compares_only_bytes_inside_the_device() {
    let mut m = Model::new();
    m.create("odd", BLOCK_SIZE + 10).unwrap();
    m.write("odd", BLOCK_SIZE, &[4; 10]).unwrap();
    assert_eq!(m.blocks("odd").unwrap(), 2);
    m.flush();
    let mut full = vec![4; BS];
    full[10..].fill(0xFF);
    m.verify_after_crash(|_, idx| if idx == 0 { vec![0; BS] } else { full.clone() })
        .unwrap();
    let e = m.verify_after_crash(|_, idx| if idx == 0 { vec![0; BS] } else { vec![4; 5] });
    assert!(e.unwrap_err().contains("returned 5 bytes, expected 10"));
}

#[test]
fn settle_adopts_the_engine_contents() {
    let mut m = model_with("a", 2);
    m.write("a", 0, &pattern(1, 2 * BS)).unwrap();
    // The engine kept block 0's write and lost block 1's.
    let mut img = pattern(1, 2 * BS);
    img[BS..].fill(0);
    let images = BTreeMap::from([("a".to_string(), img.clone())]);
    m.verify_after_crash(reader(&images)).unwrap();
    m.settle(reader(&images));
    assert_eq!(image(&m, "a"), img);
    for b in 0..2 {
        assert_eq!(m.allowed_after_crash("a", b).unwrap().len(), 1);
    }
    assert!(m.allowed_after_crash("a", 2).is_err());
}

/// Random operations on several devices against flat vectors with the same rules.
#[test]
fn matches_flat_images_under_random_operations() {
    let mut rng = SmallRng::seed_from_u64(3);
    let mut m = Model::new();
    let mut flat: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let size = 1 << 20;
    m.create("d0", size).unwrap();
    flat.insert("d0".into(), vec![0; size as usize]);
    for step in 0..600u64 {
        let names: Vec<String> = flat.keys().cloned().collect();
        let name = names[rng.random_range(0..names.len())].clone();
        let offset = rng.random_range(0..size);
        let len = rng.random_range(0..(size - offset).min(3 * BLOCK_SIZE));
        let (o, e) = (offset as usize, (offset + len) as usize);
        match rng.random_range(0..10) {
            0..=4 => {
                let data = pattern(step, len as usize);
                m.write(&name, offset, &data).unwrap();
                flat.get_mut(&name).unwrap()[o..e].copy_from_slice(&data);
            }
            5 => {
                m.discard(&name, offset, len).unwrap();
                let (first, last) = (o.div_ceil(BS), e / BS);
                if first < last {
                    flat.get_mut(&name).unwrap()[first * BS..last * BS].fill(0);
                }
            }
            6 => {
                m.write_zeroes(&name, offset, len).unwrap();
                flat.get_mut(&name).unwrap()[o..e].fill(0);
            }
            7 if names.len() < 4 => {
                let snap = format!("s{step}");
                m.snapshot(&name, &snap, false).unwrap();
                let copy = flat[&name].clone();
                flat.insert(snap, copy);
            }
            8 if names.len() > 1 => {
                m.remove(&name).unwrap();
                flat.remove(&name);
            }
            _ => m.flush(),
        }
        if flat.contains_key(&name) {
            assert_eq!(
                m.read(&name, offset, len as usize).unwrap(),
                flat[&name][o..e],
                "step {step}"
            );
        }
    }
    assert_eq!(m.names(), flat.keys().cloned().collect::<Vec<_>>());
    for (name, img) in &flat {
        assert_eq!(&image(&m, name), img);
    }
    // The current contents are always an allowed post-crash state.
    m.verify_after_crash(reader(&flat)).unwrap();
}
