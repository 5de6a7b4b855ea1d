//! Fault tests: I/O errors and ENOSPC from the backends give clear errors, poison the pool
//! for writes, and leave metadata that reopens cleanly with every flushed write intact.

mod common;

use common::*;
use hpm_engine::ErrorKind;
use hpm_testkit::fault::{Errno, FaultBackend, FaultPlan, Op};
use hpm_testkit::model::Model;
use hpm_testkit::workload::pattern;
use std::sync::Arc;

/// Disks whose data (or metadata) store fails as `plan` says once armed.
fn faulty(on_data: bool) -> (Disks, Arc<FaultPlan>, Disks) {
    let plan = Arc::new(FaultPlan::new());
    let clean = Disks::mem();
    let mut d = clean.clone();
    if on_data {
        d.data = Arc::new(FaultBackend::new(clean.data.clone(), plan.clone()));
    } else {
        d.meta = [
            Arc::new(FaultBackend::new(clean.meta[0].clone(), plan.clone())),
            Arc::new(FaultBackend::new(clean.meta[1].clone(), plan.clone())),
        ];
    }
    (d, plan, clean)
}

/// Writes and flushes some data, then arms `rule`, then runs more I/O until it fails; checks
/// the failure, the poisoning, and recovery on the clean disks.
fn fail_and_recover(on_data: bool, op: Op, errno: Errno, expect: &str) {
    let (disks, plan, clean) = faulty(on_data);
    let pool = disks.create(&small_opts(), 8 << 20);
    let mut model = Model::new();
    pool.create_device("a", 1 << 20).unwrap();
    model.create("a", 1 << 20).unwrap();
    let d = pool.open_device("a").unwrap();
    let first = pattern(1, 300_000);
    d.write_at(&first, 5).unwrap();
    model.write("a", 5, &first).unwrap();
    d.flush().unwrap();
    model.flush();
    plan.add(hpm_testkit::fault::Rule {
        op,
        after: 0,
        errno,
        persistent: false,
    });
    let mut failed = None;
    for k in 0..20u64 {
        let data = pattern(100 + k, 50_000);
        let off = k * 40_000;
        let r = d.write_at(&data, off).and_then(|_| d.flush());
        model.write("a", off, &data).unwrap();
        if let Err(e) = r {
            failed = Some(e);
            break;
        }
        model.flush();
    }
    let e = failed.expect("the armed fault fired");
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains(expect), "error names the cause: {e}");
    assert!(plan.injected() >= 1);
    // Poisoned: the rule fired once, yet later writes and flushes are refused...
    let again = d.write_at(b"x", 0).unwrap_err();
    assert!(again.to_string().contains("reopen"), "{again}");
    assert!(d.flush().is_err());
    assert!(pool.create_device("b", 1 << 20).is_err());
    // ...while reads still work.
    let mut buf = vec![0u8; 100];
    d.read_at(&mut buf, 5).unwrap();
    drop(d);
    assert!(
        pool.close().is_err(),
        "close reports that the pool could not be closed cleanly"
    );
    // Reopen on the same bytes, without faults: clean, and every flushed write is there.
    let pool = clean.open().expect("reopen after the fault");
    verify_crash(&pool, &mut model, "after an I/O fault");
    let report = hpm_engine::check_storage(clean.storage()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    pool.open_device("a")
        .unwrap()
        .write_at(b"works again", 0)
        .unwrap();
    pool.close().unwrap();
}

#[test]
fn data_write_eio_poisons_and_recovers() {
    fail_and_recover(true, Op::Write, Errno::Eio, "Input/output error");
}

#[test]
fn data_write_enospc_poisons_and_recovers() {
    fail_and_recover(true, Op::Write, Errno::Enospc, "No space left");
}

#[test]
fn data_sync_failure_is_never_retried() {
    fail_and_recover(true, Op::Sync, Errno::Eio, "flushing pool data");
}

#[test]
fn journal_write_failure_poisons_and_recovers() {
    fail_and_recover(false, Op::Write, Errno::Eio, "journal");
}

#[test]
fn journal_sync_failure_poisons_and_recovers() {
    fail_and_recover(false, Op::Sync, Errno::Enospc, "journal");
}

#[test]
fn full_pool_gives_enospc_without_poisoning_and_recovers_when_freed() {
    let disks = Disks::mem();
    let cap = 8 * (64 << 10);
    let pool = disks.create(&small_opts(), cap);
    pool.create_device("big", 4 * cap).unwrap();
    pool.create_device("other", cap).unwrap();
    let big = pool.open_device("big").unwrap();
    let e = big.write_at(&pattern(3, 2 * cap as usize), 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert_eq!(e.errno(), 28);
    assert!(e.to_string().contains("pool is full"), "{e}");
    assert_eq!(pool.info().unwrap().used_bytes, cap);
    // Not poisoned: overwriting owned blocks and flushing still work.
    big.write_at(&pattern(4, 4096), 0).unwrap();
    big.flush().unwrap();
    let other = pool.open_device("other").unwrap();
    assert_eq!(
        other.write_at(b"y", 0).unwrap_err().kind(),
        ErrorKind::NoSpace
    );
    // Free space: discard half of big, flush, and the other device can write.
    big.discard(0, cap / 2).unwrap();
    big.flush().unwrap();
    other.write_at(&pattern(5, 64 << 10), 0).unwrap();
    other.flush().unwrap();
    drop((big, other));
    pool.close().unwrap();
    let report = hpm_engine::check_storage(disks.storage()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let pool = disks.open().unwrap();
    let mut buf = vec![0u8; 64 << 10];
    pool.open_device("other")
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap();
    assert_eq!(buf, pattern(5, 64 << 10));
}

#[test]
fn read_errors_are_reported_but_do_not_poison() {
    let (disks, plan, _) = faulty(true);
    let pool = disks.create(&small_opts(), 8 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    let d = pool.open_device("a").unwrap();
    d.write_at(&pattern(1, 8192), 0).unwrap();
    plan.add(hpm_testkit::fault::Rule {
        op: Op::Read,
        after: 0,
        errno: Errno::Eio,
        persistent: false,
    });
    let mut buf = vec![0u8; 8192];
    let e = d.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("reading device \"a\""), "{e}");
    d.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(1, 8192));
    d.write_at(b"still writable", 0).unwrap();
}

#[test]
fn a_read_error_through_read_pieces_is_reported_and_caches_nothing() {
    let (disks, plan, _) = faulty(true);
    let pool = disks.create(&small_opts(), 8 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    pool.open_device("a")
        .unwrap()
        .write_at(&pattern(2, 1 << 20), 0)
        .unwrap();
    // The clone's blocks are shared: its reads go through the cache.
    pool.snapshot("a", "c", false).unwrap();
    let c = pool.open_device("c").unwrap();
    plan.add(hpm_testkit::fault::Rule {
        op: Op::Read,
        after: 0,
        errno: Errno::Eio,
        persistent: false,
    });
    let mut buf = vec![0u8; 256 << 10];
    let mut pieces = Vec::new();
    let e = c.read_pieces(&mut buf, 4096, &mut pieces).unwrap_err();
    assert!(e.to_string().contains("reading device \"c\""), "{e}");
    assert_eq!(
        pool.cache_stats().cached_bytes,
        0,
        "a failed read caches nothing"
    );
    c.read_pieces(&mut buf, 4096, &mut pieces).unwrap();
    let got: Vec<u8> = pieces.iter().flat_map(|p| p.bytes(&buf).to_vec()).collect();
    assert!(got[..] == pattern(2, 1 << 20)[4096..4096 + (256 << 10)]);
}

/// A panic while the journal is being written (the store lock held, records taken) may leave
/// the state in memory half committed: the pool stops for good (reads too), close writes no
/// checkpoint, and a reopen on the same bytes holds the last commit, as after a crash.
#[test]
fn a_panic_during_a_commit_stops_the_pool_and_reopen_recovers() {
    use hpm_testkit::fault::PanicBackend;
    let clean = Disks::mem();
    let meta = [
        Arc::new(PanicBackend::new(clean.meta[0].clone())),
        Arc::new(PanicBackend::new(clean.meta[1].clone())),
    ];
    let mut disks = clean.clone();
    disks.meta = [meta[0].clone(), meta[1].clone()];
    let pool = disks.create(&small_opts(), 8 << 20);
    let mut model = Model::new();
    pool.create_device("a", 1 << 20).unwrap();
    model.create("a", 1 << 20).unwrap();
    let a = pool.open_device("a").unwrap();
    let first = pattern(1, 200_000);
    a.write_at(&first, 0).unwrap();
    model.write("a", 0, &first).unwrap();
    a.flush().unwrap();
    model.flush();
    pool.snapshot("a", "s", false).unwrap();
    model.snapshot("a", "s", false).unwrap();
    // Copy-on-write into the snapshot's shared blocks: new mappings, not committed yet.
    let s = pool.open_device("s").unwrap();
    let second = pattern(2, 100_000);
    s.write_at(&second, 4096).unwrap();
    model.write("s", 4096, &second).unwrap();
    for m in &meta {
        m.panic_on_next_write();
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.flush()));
    assert!(r.is_err(), "the journal write panicked inside the flush");
    for m in &meta {
        m.disarm();
    }
    // Stopped: reads, writes, flushes and management operations refuse, saying why.
    let mut buf = vec![0u8; 4096];
    let e = a.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("panic"), "{e}");
    let e = s.write_at(b"x", 0).unwrap_err();
    assert!(e.to_string().contains("reopen"), "{e}");
    assert!(a.flush().is_err());
    assert!(pool.create_device("b", 1 << 20).is_err());
    drop((a, s));
    assert!(
        pool.close().is_err(),
        "close writes no checkpoint after the panic"
    );
    // Reopen on the same bytes: clean, and every flushed write is there.
    let pool = clean.open().expect("reopen after the panic");
    verify_crash(&pool, &mut model, "after a panic in a commit");
    let report = hpm_engine::check_storage(clean.storage()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    pool.open_device("s")
        .unwrap()
        .write_at(b"works", 0)
        .unwrap();
    pool.close().unwrap();
}

/// A panic in the data I/O of a read changes no state: it stops nothing, and a block whose
/// cache fill panicked is not left claimed (the next reader would wait for it for ever).
#[test]
fn a_panic_in_a_read_stops_nothing_and_leaves_no_claim_behind() {
    use hpm_testkit::fault::PanicBackend;
    let clean = Disks::mem();
    let data = Arc::new(PanicBackend::new(clean.data.clone()));
    let mut disks = clean.clone();
    disks.data = data.clone();
    let pool = disks.create(&small_opts(), 8 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    let want = pattern(3, 1 << 20);
    pool.open_device("a").unwrap().write_at(&want, 0).unwrap();
    // The clone's blocks are shared: its reads fill the cache.
    pool.snapshot("a", "c", false).unwrap();
    let c = pool.open_device("c").unwrap();
    data.panic_on_next_read();
    let mut buf = vec![0u8; 64 << 10];
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.read_at(&mut buf, 8192).map(|_| ())
    }));
    assert!(r.is_err(), "the data read panicked");
    // The same blocks again, from another thread, with a deadline: not stuck on the claims.
    let (tx, rx) = std::sync::mpsc::channel();
    let c2 = pool.open_device("c").unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let r = c2.read_at(&mut buf, 8192).map(|()| buf);
        let _ = tx.send(r);
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("a read of the blocks whose fill panicked must not wait for ever")
        .unwrap();
    assert!(got[..] == want[8192..8192 + (64 << 10)]);
    c.write_at(b"still writable", 0).unwrap();
    c.flush().unwrap();
    drop(c);
    pool.close().unwrap();
}

/// A panic elsewhere (here: in code that merely holds a device handle) stops nothing, even
/// though the handle's destructor, run by the unwinding, takes the state lock to count the
/// handle closed.
#[test]
fn a_panic_outside_the_engine_with_a_device_open_stops_nothing() {
    let disks = Disks::mem();
    let pool = disks.create(&small_opts(), 8 << 20);
    pool.create_device("a", 1 << 20).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _a = pool.open_device("a").unwrap();
        panic!("a bug in a caller that holds a device");
    }));
    assert!(r.is_err());
    let a = pool.open_device("a").unwrap();
    a.write_at(b"fine", 0).unwrap();
    a.flush().unwrap();
    drop(a);
    pool.remove_device("a").unwrap();
    pool.close().unwrap();
}
