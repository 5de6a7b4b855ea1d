//! `hpmapper check`: the engine's checker, printed. Problems go to stdout one per line, so
//! scripts can collect them; the verdict is the exit status.

use super::require_dir;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// Checks the pool in `dir`; fails (exit 1) when a problem was found.
pub fn run(dir: &Path, out: &mut dyn Write) -> Result<()> {
    let what = || format!("checking pool {}", dir.display());
    require_dir(dir).with_context(what)?;
    let report = hpm_engine::check(dir).with_context(what)?;
    report_to(dir, report, out)
}

/// Prints a report; fails (exit 1) when it has a problem.
pub fn report(dir: &Path, report: hpm_engine::CheckReport, out: &mut dyn Write) -> Result<()> {
    report_to(dir, report, out)
}

fn report_to(dir: &Path, report: hpm_engine::CheckReport, out: &mut dyn Write) -> Result<()> {
    let mut print = |line: String| writeln!(out, "{line}").context("writing output");
    if report.is_clean() {
        print(format!(
            "pool {} is consistent: {} device{}, {} in use",
            dir.display(),
            report.devices,
            if report.devices == 1 { "" } else { "s" },
            crate::size::human(report.used_blocks * crate::sparse::BLOCK as u64)
        ))?;
    }
    for problem in &report.problems {
        print(problem.replace('\n', " "))?;
    }
    for note in &report.notes {
        print(format!("note: {}", note.replace('\n', " ")))?;
    }
    let n = report.problems.len();
    if n > 0 {
        bail!(
            "pool {} is inconsistent: {n} problem{} (listed on stdout)",
            dir.display(),
            if n == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
