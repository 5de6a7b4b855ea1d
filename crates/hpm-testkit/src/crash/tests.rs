//! Tests of the crash simulator: durability per file, the armed power cut, torn writes.

use super::*;

fn read(f: &CrashFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xEE; len];
    f.read_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn crash_keeps_synced_data_and_policy_decides_the_rest() {
    for (policy, want) in [
        (TornPolicy::DropAll, b"synced"),
        (TornPolicy::KeepAll, b"latest"),
    ] {
        let sim = CrashSim::new(1);
        let f = sim.file("meta", 512);
        f.write_at(b"synced", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"latest", 0).unwrap();
        assert_eq!(read(&f, 0, 6), b"latest");
        assert_eq!(f.durable_bytes(), b"synced");
        assert_eq!(f.pending_ops(), 1);
        sim.crash_with(policy);
        assert_eq!(read(&f, 0, 6), want, "{policy:?}");
        assert_eq!(f.durable_bytes(), f.live_bytes());
        assert_eq!(f.pending_ops(), 0);
    }
}

#[test]
fn sync_is_per_file() {
    let sim = CrashSim::new(2);
    let a = sim.file("a", 4096);
    let b = sim.file("b", 4096);
    a.write_at(b"aaaa", 0).unwrap();
    b.write_at(b"bbbb", 0).unwrap();
    a.sync().unwrap();
    sim.crash_with(TornPolicy::DropAll);
    assert_eq!(a.live_bytes(), b"aaaa");
    assert_eq!(b.live_bytes(), b"", "b was never synced");
    assert_eq!(sim.syncs(), 1);
}

#[test]
fn handles_are_shared_and_survive_crashes() {
    let sim = CrashSim::new(3);
    let f = sim.file("data", 512);
    let g = sim.file("data", 4096);
    let h = f.clone();
    f.write_at(b"xyz", 10).unwrap();
    f.sync().unwrap();
    sim.crash();
    assert_eq!(read(&g, 10, 3), b"xyz");
    assert_eq!(read(&h, 10, 3), b"xyz");
    assert_eq!(g.name(), "data");
    assert_eq!(sim.file_names(), vec!["data".to_string()]);
    // Reads past the end are zeros, as the Backend contract demands.
    assert_eq!(read(&f, 11, 6), b"yz\0\0\0\0");
}

#[test]
fn armed_power_cut_fails_the_next_sync_and_everything_after() {
    let sim = CrashSim::new(4);
    let f = sim.file("meta", 512);
    let g = sim.file("data", 512);
    sim.crash_after_syncs(Some(2));
    for i in 0..2u8 {
        f.write_at(&[i + 1; 4], 0).unwrap();
        f.sync().unwrap();
    }
    assert_eq!(sim.syncs(), 2);
    // Writes after the last allowed sync still succeed: they are pending at the power cut.
    f.write_at(&[9; 4], 0).unwrap();
    let e = g.sync().unwrap_err();
    assert!(e.to_string().contains("simulated power loss"), "{e}");
    assert!(sim.is_dead());
    assert_eq!(sim.syncs(), 2);
    for r in [
        f.write_at(b"no", 0),
        f.sync(),
        f.punch(0, 4),
        f.set_len(0),
        g.write_at(b"no", 0),
    ] {
        assert!(r.unwrap_err().to_string().contains("simulated power loss"));
    }
    // The refused mutations changed nothing; reads still work.
    assert_eq!(read(&f, 0, 4), [9; 4]);
    assert_eq!(f.pending_ops(), 1);
    assert_eq!(g.live_bytes(), b"");

    sim.crash_with(TornPolicy::DropAll);
    assert!(!sim.is_dead());
    assert_eq!(read(&f, 0, 4), [2; 4], "the second sync was durable");
    // The cut is disarmed: any number of syncs succeed again.
    for _ in 0..10 {
        f.write_at(b"ok", 0).unwrap();
        f.sync().unwrap();
    }
}

#[test]
fn zero_syncs_allowed_fails_the_first() {
    let sim = CrashSim::new(5);
    let f = sim.file("f", 512);
    f.sync().unwrap();
    sim.crash_after_syncs(Some(0));
    assert_eq!(sim.syncs(), 0, "arming resets the counter");
    f.write_at(b"pending", 0).unwrap();
    assert!(f.sync().is_err());
    sim.crash_with(TornPolicy::KeepAll);
    assert_eq!(f.live_bytes(), b"pending");
}

#[test]
fn dropped_set_len_and_punch_revert() {
    let sim = CrashSim::new(6);
    let f = sim.file("f", 512);
    f.write_at(&[5; 8192], 0).unwrap();
    f.sync().unwrap();
    f.set_len(100).unwrap();
    f.punch(0, 50).unwrap();
    assert_eq!(f.len().unwrap(), 100);
    sim.crash_with(TornPolicy::DropAll);
    assert_eq!(f.len().unwrap(), 8192);
    assert_eq!(f.live_bytes(), vec![5; 8192]);

    f.set_len(100).unwrap();
    f.punch(0, 50).unwrap();
    sim.crash_with(TornPolicy::KeepAll);
    let mut want = vec![5; 100];
    want[..50].fill(0);
    assert_eq!(f.live_bytes(), want);
}

#[test]
fn kept_operations_apply_in_order() {
    let sim = CrashSim::new(7);
    let f = sim.file("f", 4096);
    f.write_at(b"first", 0).unwrap();
    f.punch(0, 5).unwrap();
    f.write_at(b"third", 0).unwrap();
    sim.crash_with(TornPolicy::KeepAll);
    assert_eq!(f.live_bytes(), b"third");
}

/// A write at an unaligned offset tears at absolute multiples of `tear`; every piece is wholly
/// old or wholly new, and random crashes do produce mixtures.
#[test]
fn random_crashes_tear_writes_at_aligned_pieces() {
    const TEAR: usize = 512;
    const OFFSET: usize = 100;
    const LEN: usize = 8 * TEAR;
    let sim = CrashSim::new(8);
    let f = sim.file("f", TEAR);
    let (mut mixed, mut all_old, mut all_new) = (0, 0, 0);
    for _ in 0..40 {
        f.write_at(&[1; OFFSET + LEN], 0).unwrap();
        f.sync().unwrap();
        f.write_at(&[2; LEN], OFFSET as u64).unwrap();
        sim.crash_with(TornPolicy::Random);
        let v = f.live_bytes();
        assert_eq!(v.len(), OFFSET + LEN);
        assert!(v[..OFFSET].iter().all(|&b| b == 1));
        let mut kinds = Vec::new();
        let mut start = OFFSET;
        while start < OFFSET + LEN {
            let stop = (OFFSET + LEN).min((start / TEAR + 1) * TEAR);
            let piece = &v[start..stop];
            assert!(
                piece.iter().all(|&b| b == piece[0]),
                "piece {start}..{stop} is torn inside"
            );
            kinds.push(piece[0]);
            start = stop;
        }
        assert_eq!(
            kinds.len(),
            9,
            "an unaligned write of 8 pieces spans 9 aligned ones"
        );
        match (kinds.contains(&1), kinds.contains(&2)) {
            (true, true) => mixed += 1,
            (true, false) => all_old += 1,
            _ => all_new += 1,
        }
    }
    assert!(
        mixed > 10,
        "mixed {mixed}, all old {all_old}, all new {all_new}"
    );
}

#[test]
fn a_dropped_extending_write_does_not_extend() {
    let sim = CrashSim::new(9);
    let f = sim.file("f", 512);
    f.write_at(&[3; 1024], 0).unwrap();
    sim.crash_with(TornPolicy::DropAll);
    assert_eq!(f.len().unwrap(), 0);
}

#[test]
fn crash_draws_every_policy_and_is_deterministic() {
    let run = |seed| {
        let sim = CrashSim::new(seed);
        let f = sim.file("f", 512);
        let mut seen = Vec::new();
        let mut images = Vec::new();
        for i in 0..40u8 {
            f.write_at(&[i + 1; 2048], u64::from(i) * 7).unwrap();
            seen.push(sim.crash());
            images.push(f.live_bytes());
        }
        (seen, images)
    };
    let (seen, images) = run(10);
    for p in [TornPolicy::DropAll, TornPolicy::KeepAll, TornPolicy::Random] {
        assert!(seen.contains(&p), "{p:?} never drawn");
    }
    assert_eq!(run(10), (seen, images));
}

#[test]
fn allocated_bytes_follow_punches() {
    let sim = CrashSim::new(11);
    let f = sim.file("f", 512);
    f.set_len(1 << 30).unwrap();
    assert_eq!(
        f.allocated_bytes().unwrap(),
        Some(0),
        "extension allocates nothing"
    );
    f.write_at(&[1; 8192], 4096).unwrap();
    assert_eq!(f.allocated_bytes().unwrap(), Some(8192));
    f.punch(4096, 4096).unwrap();
    assert_eq!(f.allocated_bytes().unwrap(), Some(4096));
}
