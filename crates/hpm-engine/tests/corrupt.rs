//! Corrupt metadata: flipped bytes, truncated files, a wrong version, logically inconsistent
//! entries. Open fails with a clear message naming what is corrupt, `check` reports it with
//! where, and nothing panics.

mod common;

use common::*;
use hpm_engine::{check_storage, ErrorKind};
use hpm_format::{
    encode_batch, CheckpointState, EntryRecord, MetaHeader, Record, Superblock, SLOT_SIZE,
};
use hpm_io::Backend;
use hpm_testkit::workload::pattern;
use std::sync::Arc;

/// A closed pool with two devices sharing data and some journal after its checkpoint.
fn pool_with_data() -> Disks {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 16 << 20);
    pool.create_device("base", 1 << 20).unwrap();
    pool.open_device("base")
        .unwrap()
        .write_at(&pattern(1, 700_000), 0)
        .unwrap();
    pool.snapshot("base", "snap", false).unwrap();
    pool.open_device("snap")
        .unwrap()
        .write_at(&pattern(2, 5000), 4000)
        .unwrap();
    pool.close().unwrap();
    // Reopen and leave a journal behind (drop without close is a crash after the flush).
    let pool = disks.open().unwrap();
    pool.open_device("snap")
        .unwrap()
        .write_at(&pattern(3, 9000), 100_000)
        .unwrap();
    pool.flush().unwrap();
    std::mem::forget(pool);
    disks
}

fn read(b: &dyn Backend, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    b.read_at(&mut v, off).unwrap();
    v
}

fn current_sb(disks: &Disks) -> Superblock {
    (0..2)
        .filter_map(|s| {
            Superblock::decode(&read(&*disks.sb, s * SLOT_SIZE as u64, SLOT_SIZE), s as u32).ok()
        })
        .max_by_key(|sb| sb.sequence)
        .unwrap()
}

fn open_err(disks: &Disks) -> hpm_engine::Error {
    match disks.open() {
        Ok(_) => panic!("open of a corrupt pool succeeded"),
        Err(e) => e,
    }
}

fn assert_reported(disks: &Disks, words: &[&str]) {
    let r = check_storage(disks.storage()).unwrap();
    assert!(!r.is_clean(), "check finds the damage");
    let all = r.problems.join("\n");
    for w in words {
        assert!(all.contains(w), "check names {w:?}: {all}");
    }
}

#[test]
fn a_healthy_pool_checks_clean_and_recovers_its_journal() {
    let disks = pool_with_data();
    let r = check_storage(disks.storage()).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(
        r.notes.iter().any(|n| n.contains("not closed cleanly")),
        "{:?}",
        r.notes
    );
    assert_eq!(r.devices, 2);
    let pool = disks.open().unwrap();
    let mut buf = vec![0u8; 9000];
    pool.open_device("snap")
        .unwrap()
        .read_at(&mut buf, 100_000)
        .unwrap();
    assert_eq!(buf, pattern(3, 9000));
}

#[test]
fn both_superblock_slots_destroyed() {
    let disks = pool_with_data();
    disks.sb.write_at(&vec![0xA5; 2 * SLOT_SIZE], 0).unwrap();
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("no valid superblock"), "{e}");
    assert_reported(&disks, &["superblock"]);
}

#[test]
fn a_flipped_byte_in_each_superblock_slot_is_caught() {
    for slot in 0..2u64 {
        let disks = pool_with_data();
        let mut b = read(&*disks.sb, slot * SLOT_SIZE as u64, SLOT_SIZE);
        b[200] ^= 0x40;
        disks.sb.write_at(&b, slot * SLOT_SIZE as u64).unwrap();
        // The other slot still holds a consistent (older) pool state: open works, and check
        // says which slot is damaged.
        let r = check_storage(disks.storage()).unwrap();
        assert!(
            r.notes.iter().any(|n| n.contains(&format!("slot {slot}"))),
            "{:?}",
            r.notes
        );
        disks.open().expect("the other slot is used");
    }
}

#[test]
fn wrong_format_version_is_refused_by_name() {
    let disks = pool_with_data();
    let sb = current_sb(&disks);
    let off = u64::from(sb.slot) * SLOT_SIZE as u64;
    let mut b = read(&*disks.sb, off, SLOT_SIZE);
    b[8..12].copy_from_slice(&99u32.to_le_bytes());
    let crc = hpm_format::checksum(&b[..SLOT_SIZE - 4]);
    b[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    disks.sb.write_at(&b, off).unwrap();
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("format version 99"), "{e}");
    assert_reported(&disks, &["format version 99"]);
}

#[test]
fn a_flipped_byte_in_the_checkpoint_is_caught() {
    let disks = pool_with_data();
    let sb = current_sb(&disks);
    let meta = &disks.meta[sb.active_meta as usize];
    let mut b = read(&**meta, SLOT_SIZE as u64 + 20, 1);
    b[0] ^= 1;
    meta.write_at(&b, SLOT_SIZE as u64 + 20).unwrap();
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let m = e.to_string();
    assert!(
        m.contains(&format!("meta.{}", sb.active_meta)) && m.contains("checksum"),
        "{m}"
    );
    assert_reported(&disks, &["checkpoint", "checksum"]);
}

#[test]
fn a_truncated_metadata_file_is_caught() {
    let disks = pool_with_data();
    let sb = current_sb(&disks);
    disks.meta[sb.active_meta as usize].set_len(100).unwrap();
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string().contains(&format!("meta.{}", sb.active_meta)),
        "{e}"
    );
    assert_reported(&disks, &[&format!("meta.{}", sb.active_meta)]);
}

/// A crashed pool (not closed) whose journal holds five flushed batches; with the active
/// metadata file and where its journal starts.
fn pool_with_a_journal() -> (Disks, Arc<dyn Backend>, u64) {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 16 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    for k in 0..4u64 {
        pool.open_device("a")
            .unwrap()
            .write_at(&pattern(k, 8192), k * 65536)
            .unwrap();
        pool.flush().unwrap();
    }
    std::mem::forget(pool);
    let sb = current_sb(&disks);
    let start = MetaHeader::journal_start(sb.checkpoint_len);
    let meta = disks.meta[sb.active_meta as usize].clone();
    (disks, meta, start)
}

#[test]
fn damage_inside_the_journal_is_not_mistaken_for_a_torn_tail() {
    let (disks, meta, start) = pool_with_a_journal();
    let mut b = read(&*meta, start + 40, 1);
    b[0] ^= 0xff;
    meta.write_at(&b, start + 40).unwrap();
    let e = open_err(&disks);
    assert!(e.to_string().contains("damaged in the middle"), "{e}");
    assert_reported(&disks, &["not a torn tail"]);
}

/// Rewrites the live checkpoint with `edit` applied, with valid checksums everywhere: damage
/// that only the consistency rules can catch.
fn rewrite_checkpoint(disks: &Disks, edit: impl FnOnce(&mut CheckpointState)) {
    let pool = disks.open().unwrap();
    pool.close().unwrap(); // everything in the checkpoint, journal empty
    let sb = current_sb(disks);
    let meta = &disks.meta[sb.active_meta as usize];
    let h = MetaHeader::decode(&read(&**meta, 0, SLOT_SIZE), sb.active_meta).unwrap();
    let body = read(&**meta, SLOT_SIZE as u64, h.checkpoint_len as usize);
    let mut ck = CheckpointState::decode(&body, sb.chunk_blocks).unwrap();
    edit(&mut ck);
    let body = ck.encode(sb.chunk_blocks);
    let crc = hpm_format::checksum(&body);
    let h = MetaHeader {
        checkpoint_len: body.len() as u64,
        checkpoint_crc: crc,
        ..h
    };
    meta.set_len(0).unwrap();
    meta.write_at(&[h.encode(), body.clone()].concat(), 0)
        .unwrap();
    let sb = Superblock {
        checkpoint_len: body.len() as u64,
        checkpoint_crc: crc,
        ..sb
    };
    disks
        .sb
        .write_at(&sb.encode(), u64::from(sb.slot) * SLOT_SIZE as u64)
        .unwrap();
}

#[test]
fn inconsistent_entries_are_each_reported_with_where_they_are() {
    let disks = pool_with_data();
    rewrite_checkpoint(&disks, |ck| {
        let base = ck.devices.iter_mut().find(|d| d.name == "base").unwrap();
        base.entries[0].1 = EntryRecord::Compact {
            pchunk: 9999,
            present: vec![1],
        };
        let snap = ck.devices.iter_mut().find(|d| d.name == "snap").unwrap();
        let blocks = 16;
        snap.entries.push((
            500,
            EntryRecord::Split {
                blocks: vec![u64::MAX; blocks],
            },
        ));
        ck.devices.push(ck.devices[0].clone()); // a duplicate device
    });
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("3 problems"), "{e}");
    assert_reported(
        &disks,
        &[
            "device \"base\" (id 1), virtual chunk 0: physical chunk 9999 is outside the pool",
            "device \"snap\" (id 2), virtual chunk 500: past the end of the device",
            "\"base\" already exists",
        ],
    );
}

#[test]
fn a_zeroed_batch_header_before_intact_batches_is_damage_not_a_torn_tail() {
    let (disks, meta, start) = pool_with_a_journal();
    // The first batch's header zeroed (the batches are smaller than a sector): before, open
    // took it for the clean end of the journal and cut off the flushed batches after it.
    meta.write_at(&[0; 32], start).unwrap();
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("damaged in the middle"), "{e}");
    assert_reported(&disks, &["not a torn tail"]);
}

/// Writes `sb` over the current superblock slot with a valid checksum.
fn write_sb(disks: &Disks, sb: &Superblock) {
    disks
        .sb
        .write_at(&sb.encode(), u64::from(sb.slot) * SLOT_SIZE as u64)
        .unwrap();
}

#[test]
fn a_capacity_beyond_the_data_store_is_refused_before_anything_is_sized_by_it() {
    let disks = pool_with_data();
    let sb = current_sb(&disks);
    // The largest capacity the superblock allows: sized first, it would ask for 2^32 chunk
    // records (about 170 GB) before the data store's size was looked at.
    let huge = Superblock {
        capacity_blocks: u64::from(sb.chunk_blocks) * u64::from(u32::MAX),
        ..sb.clone()
    };
    write_sb(&disks, &huge);
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string().contains("smaller than the pool's capacity"),
        "{e}"
    );
    assert_reported(&disks, &["smaller than the capacity"]);

    // Not a whole number of chunks, or more than 2^32 - 1 of them: the slot is corrupt.
    for capacity_blocks in [
        sb.capacity_blocks + 1,
        u64::from(sb.chunk_blocks) << 32,
        u64::MAX,
    ] {
        let bad = Superblock {
            capacity_blocks,
            ..sb.clone()
        };
        let e = Superblock::decode(&bad.encode(), bad.slot).unwrap_err();
        assert!(e.to_string().contains("capacity"), "{e}");
    }
}

#[test]
fn a_checkpoint_length_past_the_end_of_the_file_is_refused() {
    let disks = pool_with_data();
    let sb = current_sb(&disks);
    let meta = &disks.meta[sb.active_meta as usize];
    let h = MetaHeader::decode(&read(&**meta, 0, SLOT_SIZE), sb.active_meta).unwrap();
    // Wraps to a small number when added to the header's 4096 bytes.
    let len = u64::MAX - SLOT_SIZE as u64 + 1;
    meta.write_at(
        &MetaHeader {
            checkpoint_len: len,
            ..h
        }
        .encode(),
        0,
    )
    .unwrap();
    write_sb(
        &disks,
        &Superblock {
            checkpoint_len: len,
            ..sb
        },
    );
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_reported(&disks, &["truncated"]);
}

/// Closes the pool cleanly (empty journal), then writes `records` as the journal's first
/// batch, with valid checksums: damage only the record rules can catch.
fn journal_batch(disks: &Disks, records: &[Record]) {
    disks.open().unwrap().close().unwrap();
    let sb = current_sb(disks);
    let start = MetaHeader::journal_start(sb.checkpoint_len);
    disks.meta[sb.active_meta as usize]
        .write_at(&encode_batch(sb.meta_gen, 1, records), start)
        .unwrap();
}

#[test]
fn hostile_journal_records_are_refused_without_the_work_they_ask_for() {
    // A device of 8 EiB, then an unmap at its end: the map would grow a page table for it
    // (16 TiB of pointers) before the block turned out to be unmapped.
    let disks = pool_with_data();
    journal_batch(
        &disks,
        &[
            Record::CreateDevice {
                id: 100,
                name: "huge".into(),
                size: 1 << 63,
                read_only: false,
            },
            Record::Unmap {
                dev: 100,
                vblock: (1 << 51) - 1,
                count: 1,
            },
        ],
    );
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("at most"), "{e}");
    assert_reported(&disks, &["\"huge\"", "at most"]);

    // An unmap over blocks that are not mapped (the live path never logs one): refused at
    // the first of them, however many the count says.
    let disks = pool_with_data();
    let base = disks.open().unwrap().device_info("base").unwrap();
    journal_batch(
        &disks,
        &[Record::Unmap {
            dev: base.id,
            vblock: 200,
            count: 56,
        }],
    );
    let e = open_err(&disks);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("which is not mapped"), "{e}");
    assert_reported(
        &disks,
        &["block 200 of device \"base\", which is not mapped"],
    );

    // The last device id, whose successor does not exist.
    let disks = pool_with_data();
    journal_batch(
        &disks,
        &[Record::CreateDevice {
            id: u32::MAX,
            name: "last".into(),
            size: 1 << 20,
            read_only: false,
        }],
    );
    let e = open_err(&disks);
    assert!(e.to_string().contains("out of range"), "{e}");
}

#[test]
fn devices_larger_than_64_tib_are_refused() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 16 << 20);
    let max = hpm_format::MAX_DEVICE_SIZE;
    let e = pool.create_device("big", max + 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.to_string().contains("64 TiB"), "{e}");
    pool.create_device("big", max).unwrap();
    let e = pool.resize_device("big", max + 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    // A write at the very end of the largest device works (and is only a page table).
    let dev = pool.open_device("big").unwrap();
    dev.write_at(&pattern(9, 4096), max - 4096).unwrap();
    dev.flush().unwrap();
    pool.close().unwrap();
}
