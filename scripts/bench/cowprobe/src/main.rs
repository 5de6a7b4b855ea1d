//! cowprobe FILE...: for each pass (1: first write, 2: at once, 3: after 20 ms) and each FILE,
//! after a warm-up write to a new file, time open + 4 KiB pwrite at offset 0 + fsync + close; print "pass file ms" lines.
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    let buf = vec![0x5au8; 4096];
    // Warm-up: create, write and fsync a new file that is not in the image, so the container's
    // first journal commit and allocation are not charged to the first image file measured.
    {
        let w = OpenOptions::new().write(true).create(true).open("/cowprobe-warmup").expect("warmup");
        w.write_all_at(&buf, 0).expect("warmup pwrite");
        w.sync_all().expect("warmup fsync");
    }
    for pass in 1..=3 {
        if pass == 3 {
            std::thread::sleep(Duration::from_millis(20));
        }
        for f in &files {
            if pass == 3 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let t = Instant::now();
            let file = OpenOptions::new().write(true).open(f).expect("open");
            file.write_all_at(&buf, 0).expect("pwrite");
            file.sync_all().expect("fsync");
            drop(file);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            println!("{pass} {f} {ms:.4}");
        }
    }
}
