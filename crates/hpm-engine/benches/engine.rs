//! In-process benchmark of the hpmapper engine against its peers (BENCHMARKS.md, experiment 6
//! and the engine targets): copy-on-write cost, reads against snapshot depth, 4 KiB random
//! I/O against raw pread/pwrite, snapshot and metadata costs, and open/recovery time.
//!
//! It uses only hpm_engine's public API on real files in a fresh directory under
//! `$HPM_BENCH_DIR` (default /var/tmp), not tmpfs, so I/O goes through the real page cache
//! and filesystem. Every measurement runs its peers in turns (A B A B ...) for `--rounds`
//! rounds (at least 5) and reports the median and min-max over rounds; ratios are the median
//! of the per-round ratios. Reads are page-cache hot: nothing is dropped.
//!
//! Run: `cargo bench -p hpm-engine --bench engine -- [--json] [--json-file PATH] [--rounds N]
//! [--quick] [--only 1,3] [--recovery-gib N] [--dir PATH]`. The markdown report goes to
//! stdout (JSON instead with `--json`), progress to stderr. `scripts/bench/engine` runs it
//! and writes docs/bench/engine.md. Without the `--bench` that cargo bench passes (that is,
//! under `cargo test --benches`) it does nothing.

#[path = "engine/cow.rs"]
mod cow;
#[path = "engine/depth.rs"]
mod depth;
#[path = "engine/metadata.rs"]
mod metadata;
#[path = "engine/recovery.rs"]
mod recovery;
#[path = "engine/report.rs"]
mod report;
#[path = "engine/setup.rs"]
mod setup;
#[path = "engine/throughput.rs"]
mod throughput;

use report::{Report, Section};
use setup::{size_text, Config, GIB, R};
use std::path::{Path, PathBuf};
use std::time::Instant;

const USAGE: &str = "usage: engine [--json] [--json-file PATH] [--rounds N (>= 5)] [--quick] \
[--only LIST] [--recovery-gib N] [--dir PATH]";

struct Args {
    cfg_dir: PathBuf,
    rounds: usize,
    quick: bool,
    only: Vec<u32>,
    recovery_bytes: u64,
    json: bool,
    json_file: Option<PathBuf>,
}

fn parse(args: &[String]) -> R<Args> {
    let mut a = Args {
        cfg_dir: std::env::var_os("HPM_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp")),
        rounds: 7,
        quick: false,
        only: Vec::new(),
        recovery_bytes: 10 * GIB,
        json: false,
        json_file: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value; {USAGE}"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--json" => a.json = true,
            "--quick" => a.quick = true,
            "--json-file" => a.json_file = Some(PathBuf::from(value("--json-file")?)),
            "--dir" => a.cfg_dir = PathBuf::from(value("--dir")?),
            "--rounds" => a.rounds = value("--rounds")?.parse()?,
            "--recovery-gib" => {
                let g: f64 = value("--recovery-gib")?.parse()?;
                a.recovery_bytes = (g * GIB as f64) as u64;
            }
            "--only" => {
                a.only = value("--only")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; {USAGE}").into()),
        }
    }
    if a.rounds < 5 {
        return Err(format!("--rounds must be at least 5 (got {})", a.rounds).into());
    }
    Ok(a)
}

fn experiment(
    report: &mut Report,
    cfg: &Config,
    id: u32,
    title: &str,
    f: impl FnOnce(&Config, &Path, &mut Section, &mut Vec<report::Target>) -> R<()>,
) -> R<()> {
    if !cfg.runs(id) {
        return Ok(());
    }
    let t = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix(&format!("exp{id}-"))
        .tempdir_in(&cfg.dir)?;
    let mut sec = Section::new(id, title);
    f(cfg, dir.path(), &mut sec, &mut report.targets)?;
    sec.note(format!(
        "Experiment time: {:.1} s.",
        t.elapsed().as_secs_f64()
    ));
    report.sections.push(sec);
    // Each experiment's files go before the next one starts, to leave the space free.
    dir.close()?;
    Ok(())
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Child modes of the recovery experiment.
    match args.first().map(String::as_str) {
        Some("--child-build") if args.len() == 3 => {
            return recovery::child_build(Path::new(&args[1]), args[2].parse()?)
        }
        Some("--child-open") if args.len() == 3 => {
            return recovery::child_open(Path::new(&args[1]), &args[2])
        }
        _ => {}
    }
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets) does not, and a
    // test run must not spend a minute writing 10 GiB.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!(
            "engine bench: not run without --bench (cargo test); use `cargo bench -p hpm-engine --bench engine` or scripts/bench/engine"
        );
        return Ok(());
    }
    let a = parse(&args)?;
    if let Some(p) = &a.json_file {
        // Fail now rather than after the whole run.
        std::fs::File::create(p).map_err(|e| format!("--json-file {}: {e}", p.display()))?;
    }
    std::fs::create_dir_all(&a.cfg_dir)?;
    let root = tempfile::Builder::new()
        .prefix("hpm-engine-bench-")
        .tempdir_in(&a.cfg_dir)?;
    let cfg = Config {
        dir: root.path().to_path_buf(),
        rounds: a.rounds,
        quick: a.quick,
        recovery_bytes: if a.quick {
            a.recovery_bytes.min(GIB)
        } else {
            a.recovery_bytes
        },
        only: a.only.clone(),
    };
    let started = Instant::now();
    let mut report = Report {
        meta: vec![
            ("bench directory".into(), cfg.dir.display().to_string()),
            ("rounds".into(), cfg.rounds.to_string()),
            (
                "mode".into(),
                if cfg.quick {
                    "quick (smoke test: fewer ops, small recovery pool)".into()
                } else {
                    "full".into()
                },
            ),
            (
                "build".into(),
                if cfg!(debug_assertions) {
                    "debug (numbers are meaningless)".into()
                } else {
                    "release (bench profile)".into()
                },
            ),
            (
                "cores available".into(),
                std::thread::available_parallelism()
                    .map_or(0, |n| n.get())
                    .to_string(),
            ),
            (
                "page cache".into(),
                "hot: nothing is dropped before timed reads".into(),
            ),
        ],
        ..Report::default()
    };
    experiment(
        &mut report,
        &cfg,
        1,
        "Copy-on-write cost: 4 KiB aligned write into a snapshot, first write vs overwrite",
        cow::run,
    )?;
    experiment(
        &mut report,
        &cfg,
        2,
        "Random 4 KiB reads against snapshot depth",
        depth::run,
    )?;
    experiment(
        &mut report,
        &cfg,
        3,
        "4 KiB random I/O throughput against raw pread/pwrite",
        throughput::run,
    )?;
    experiment(
        &mut report,
        &cfg,
        4,
        "Snapshot creation time and metadata bytes per entry",
        |c, d, s, _| metadata::run(c, d, s),
    )?;
    experiment(
        &mut report,
        &cfg,
        5,
        &format!(
            "Open and recovery time: 100 devices, up to {} mapped",
            size_text(cfg.recovery_bytes)
        ),
        |c, d, s, _| recovery::run(c, d, s),
    )?;
    report.meta.push((
        "total time".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    root.close()?;
    if let Some(p) = &a.json_file {
        std::fs::write(p, report.json())?;
    }
    if a.json {
        print!("{}", report.json());
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}
