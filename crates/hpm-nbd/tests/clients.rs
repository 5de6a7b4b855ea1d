//! Real NBD clients nobody here wrote, against the server: qemu-io, qemu-img, nbdinfo,
//! nbdcopy and fio. Under CI=true a missing client fails the test.

mod common;

use common::{have, make_image, qemu_io, run, run_ok, Served, MIB};

#[test]
fn qemu_io_patterns_fua_flush_discard_and_zeroes() {
    if !have("qemu-io") {
        return;
    }
    let mut s = Served::start(&[("disk", 64 * MIB)]);
    let uri = s.uri("disk");
    qemu_io(
        &uri,
        &[],
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // Unaligned, inside and across 4 KiB blocks, and the bytes around it kept.
            "write -P 0xcd 1000 5000",
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 5000",
            "read -P 0xab 6000 1042576",
            "write -P 0x17 4095 2",
            "read -P 0x17 4095 2",
            // FUA, then an explicit flush.
            "write -f -P 0x11 2M 64k",
            "flush",
            "read -P 0x11 2M 64k",
            // Discard of whole blocks reads back as zeros.
            "write -P 0x22 4M 256k",
            "discard 4M 128k",
            "read -P 0 4M 128k",
            "read -P 0x22 4224k 128k",
            // Write-zeroes, aligned and not (qemu sends NO_HOLE unless -u).
            "write -P 0x33 8M 1M",
            "write -z 8M 64k",
            "write -z -u 8256k 64k",
            "write -z 8588608 3000",
            "read -P 0 8M 128k",
            "read -P 0x33 8519680 68928",
            "read -P 0 8588608 3000",
            "read -P 0x33 8591608 845576",
            // Large requests (qemu splits at the advertised 32 MiB maximum).
            "write -P 0x44 16M 40M",
            "read -P 0x44 16M 40M",
            // Many in flight.
            "aio_write -P 0x55 60M 64k",
            "aio_write -P 0x56 61M 64k",
            "aio_write -P 0x57 62M 64k",
            "aio_flush",
            "read -P 0x55 60M 64k",
            "read -P 0x56 61M 64k",
            "read -P 0x57 62M 64k",
            "read -P 0 63M 1M",
        ],
    );
    // A second connection sees everything the first wrote.
    qemu_io(
        &uri,
        &["-r"],
        &[
            "read -P 0xab 0 1000",
            "read -P 0x11 2M 64k",
            "read -P 0x44 16M 40M",
        ],
    );
    let stats = s.stop();
    assert_eq!(stats.connections_open, 0);
    assert!(stats.connections_total >= 2);
    assert!(stats.bytes_written >= 41 * MIB);
    assert_eq!(stats.errors, 0, "{stats:?}");
    // Once serve_unix returned, the server holds no device open.
    s.pool.remove_device("disk").unwrap();
}

#[test]
fn qemu_img_convert_in_and_out_compares_identical() {
    if !have("qemu-img") {
        return;
    }
    let s = Served::start(&[("disk", 16 * MIB)]);
    let (src, out) = (s.path("src.img"), s.path("out.img"));
    make_image(&src, 16 * MIB as usize, 1);
    let uri = s.uri("disk");
    let (src, out) = (src.to_str().unwrap(), out.to_str().unwrap());
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, out],
    );
    let cmp = run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, out]);
    assert!(cmp.contains("identical"), "{cmp}");
    let cmp = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    );
    assert!(cmp.contains("identical"), "{cmp}");
}

#[test]
fn nbdinfo_lists_and_reports_what_each_export_can_do() {
    if !have("nbdinfo") {
        return;
    }
    let s = Served::start(&[("disk", 32 * MIB)]);
    s.pool.snapshot("disk", "layer", true).unwrap();
    let (rw, ro) = (s.uri("disk"), s.uri("layer"));
    let list = run_ok("nbdinfo", &["--list", &rw]);
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("export=\"layer\""), "{list}");
    assert_eq!(
        run_ok("nbdinfo", &["--size", &rw]).trim(),
        (32 * MIB).to_string()
    );
    assert_eq!(
        run_ok("nbdinfo", &["--size", &ro]).trim(),
        (32 * MIB).to_string()
    );
    // nbdinfo --can/--is exit with 0 for true and 2 for false.
    let answer = |what: &str, q: &str, uri: &str| run("nbdinfo", &[what, q, uri]).code;
    for q in ["flush", "fua", "trim", "zero", "multi-conn", "cache"] {
        assert_eq!(answer("--can", q, &rw), Some(0), "writable --can {q}");
    }
    assert_eq!(answer("--is", "read-only", &rw), Some(2));
    assert_eq!(answer("--is", "read-only", &ro), Some(0));
    for (q, want) in [
        ("flush", 0),
        ("multi-conn", 0),
        ("cache", 0),
        ("trim", 2),
        ("zero", 2),
        ("fua", 2),
    ] {
        assert_eq!(answer("--can", q, &ro), Some(want), "read-only --can {q}");
    }
    let missing = run("nbdinfo", &[&s.uri("nope")]);
    assert_ne!(missing.code, Some(0));
}

#[test]
fn nbdcopy_with_four_connections_in_and_out() {
    if !have("nbdcopy") {
        return;
    }
    let mut s = Served::start(&[("disk", 32 * MIB)]);
    let (src, out) = (s.path("src.img"), s.path("out.img"));
    let data = make_image(&src, 32 * MIB as usize, 2);
    let uri = s.uri("disk");
    let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
    run_ok("nbdcopy", &["-C", "4", "-T", "4", "--flush", src_s, &uri]);
    let before = s.server.stats().connections_total;
    run_ok("nbdcopy", &["-C", "4", "-T", "4", &uri, out_s]);
    let after = s.server.stats().connections_total;
    assert!(
        after - before >= 4,
        "nbdcopy used {} connections",
        after - before
    );
    let copied = std::fs::read(&out).unwrap();
    assert!(copied == data, "data changed on the way through NBD");
    let stats = s.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
}

#[test]
fn fio_random_writes_verify_at_iodepth_16() {
    if !have("fio") {
        return;
    }
    let s = Served::start(&[("disk", 32 * MIB)]);
    let uri = format!("--uri={}", s.uri("disk"));
    let out = run_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
            "--verify_state_save=0",
        ],
    );
    assert!(!out.contains("verify: bad"), "{out}");
    assert!(out.contains("err= 0"), "{out}");
}

#[test]
fn read_only_exports_refuse_writes() {
    if !have("qemu-io") {
        return;
    }
    let s = Served::start(&[("disk", 16 * MIB)]);
    qemu_io(&s.uri("disk"), &[], &["write -P 0x5a 0 1M", "flush"]);
    s.pool.snapshot("disk", "layer", true).unwrap();
    qemu_io(
        &s.uri("layer"),
        &["-r"],
        &["read -P 0x5a 0 1M", "read -P 0 1M 1M"],
    );
    // qemu refuses to open a read-only export for writing at all.
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &s.uri("layer")],
    );
    assert_ne!(out.code, Some(0), "{}", out.text);
    assert!(
        out.text.contains("Permission denied") || out.text.contains("read-only"),
        "{}",
        out.text
    );
    // Forced through the protocol, every write-type command is EPERM.
    let mut c = common::raw::Raw::start(&s.socket, true);
    let (size, flags) = c.go("layer");
    assert_eq!(size, 16 * MIB);
    assert_eq!(flags & 0b10, 0b10, "READ_ONLY flag");
    use common::raw::*;
    c.request(0, CMD_WRITE, 1, 0, 512);
    c.send(&[0u8; 512]);
    assert_eq!(c.simple_reply(), (1, 1));
    c.request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(c.simple_reply(), (1, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(c.simple_reply(), (1, 3));
    c.request(0, CMD_READ, 4, 0, 4);
    assert_eq!(c.simple_reply(), (0, 4));
    assert_eq!(c.bytes(4), vec![0x5a; 4]);
    c.request(0, CMD_DISC, 5, 0, 0);
    assert!(c.closed());
}

#[test]
fn tcp_listener_serves_qemu_io() {
    if !have("qemu-io") {
        return;
    }
    let s = Served::start(&[("disk", 16 * MIB)]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = hpm_nbd::Shutdown::new();
    let served = rt.spawn({
        let (server, shutdown) = (s.server.clone(), shutdown.clone());
        async move { server.serve_tcp(listener, shutdown).await }
    });
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    qemu_io(&uri, &[], &["write -P 0x61 0 1M", "flush"]);
    // The same data through the Unix socket: both listeners serve one pool.
    qemu_io(&s.uri("disk"), &["-r"], &["read -P 0x61 0 1M"]);
    shutdown.trigger();
    rt.block_on(served).unwrap();
}

/// `base:allocation`: nbdinfo lists the context and maps the export (written extents as
/// data, the rest, discarded and zeroed ranges included, as holes that read as zeros);
/// qemu-img maps it the same way; nbdcopy copies it to a sparse file that holds only the
/// data.
#[test]
fn block_status_maps_the_allocated_extents() {
    if !have("nbdinfo") || !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let s = Served::start(&[("disk", 32 * MIB)]);
    let uri = s.uri("disk");
    {
        let d = s.pool.open_device("disk").unwrap();
        d.write_at(&vec![1u8; MIB as usize], 0).unwrap();
        d.write_at(&[2u8; 4096], 8 * MIB + 4096).unwrap();
        d.write_at(&vec![3u8; 2 * MIB as usize], 20 * MIB).unwrap();
        d.discard(21 * MIB, MIB).unwrap();
        d.write_at(&vec![4u8; MIB as usize], 30 * MIB).unwrap();
        d.write_zeroes(30 * MIB, MIB).unwrap();
        d.flush().unwrap();
    }
    let want = [
        (0, MIB, true),
        (MIB, 7 * MIB + 4096, false),
        (8 * MIB + 4096, 4096, true),
        (8 * MIB + 8192, 12 * MIB - 8192, false),
        (20 * MIB, MIB, true),
        (21 * MIB, 11 * MIB, false),
    ];
    let info = run_ok("nbdinfo", &[&uri]);
    assert!(info.contains("base:allocation"), "{info}");
    // nbdinfo --map: "offset length type description" per extent; type 0 is data,
    // 3 hole+zero. Adjacent extents of one type are merged before comparing.
    let map = run_ok("nbdinfo", &["--map", &uri]);
    let mut got: Vec<(u64, u64, bool)> = Vec::new();
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, kind): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert!(kind == 0 || kind == 3, "type {kind} in {line:?}");
        match got.last_mut() {
            Some(last) if last.2 == (kind == 0) => last.1 += len,
            _ => got.push((off, len, kind == 0)),
        }
    }
    assert_eq!(got, want, "nbdinfo --map:\n{map}");
    // qemu-img map speaks the same context.
    let json = run_ok("qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    let data: Vec<(u64, u64)> = json
        .lines()
        .filter(|l| l.contains("\"data\": true"))
        .map(|l| {
            let num = |key: &str| -> u64 {
                let at = l.find(key).unwrap() + key.len();
                l[at..]
                    .trim_start_matches([':', ' '])
                    .split([',', ' ', '}'])
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            (num("\"start\""), num("\"length\""))
        })
        .collect();
    let want_data: Vec<(u64, u64)> = want.iter().filter(|w| w.2).map(|w| (w.0, w.1)).collect();
    assert_eq!(data, want_data, "qemu-img map:\n{json}");
    // A sparse copy: only the data extents are allocated in the file. `--sparse=0` turns
    // off nbdcopy's own detection of zeros in the data it reads: the holes it leaves are
    // the ones the server reported.
    let out = s.path("copy.raw");
    let out = out.to_str().unwrap();
    std::fs::File::create(out).unwrap();
    run_ok("nbdcopy", &["--sparse=0", &uri, out]);
    let blocks = std::fs::metadata(out)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m))
        .unwrap();
    assert!(
        blocks * 512 <= 3 * MIB,
        "the copy allocates {} bytes",
        blocks * 512
    );
    let cmp = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", out, &uri],
    );
    assert!(cmp.contains("identical"), "{cmp}");
}
