//! The report: each measurement summarized over its rounds (median, min, max), ratios against
//! a named peer, the targets of BENCHMARKS.md, rendered as markdown or JSON.
//!
//! It owns formatting only; it must never time anything.

use std::fmt::Write as _;

/// Median, min and max of one measurement over its rounds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// Summarizes `values` (one per round). The median of an even count is the mean of the
    /// two middle values.
    pub fn of(values: &[f64]) -> Summary {
        assert!(!values.is_empty(), "a measurement needs at least one round");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

/// One line of a table.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub value: Summary,
    pub unit: &'static str,
    /// Median of the per-round ratios against `peer`, with the peer's name.
    pub ratio: Option<(Summary, String)>,
}

/// One experiment.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub id: u32,
    pub title: String,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Section {
    pub fn new(id: u32, title: &str) -> Section {
        Section {
            id,
            title: title.to_string(),
            ..Section::default()
        }
    }

    /// Adds a row summarizing `values`.
    pub fn row(&mut self, what: impl Into<String>, values: &[f64], unit: &'static str) {
        self.rows.push(Row {
            what: what.into(),
            value: Summary::of(values),
            unit,
            ratio: None,
        });
    }

    /// Adds a row with per-round ratios against `peer`.
    pub fn row_vs(
        &mut self,
        what: impl Into<String>,
        values: &[f64],
        unit: &'static str,
        ratios: &[f64],
        peer: impl Into<String>,
    ) {
        self.rows.push(Row {
            what: what.into(),
            value: Summary::of(values),
            unit,
            ratio: Some((Summary::of(ratios), peer.into())),
        });
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
}

/// A target of BENCHMARKS.md and whether this run met it.
#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub measured: String,
    pub target: String,
    pub met: bool,
}

/// The whole run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub meta: Vec<(String, String)>,
    pub targets: Vec<Target>,
    pub sections: Vec<Section>,
}

/// Per-round ratios `a[i] / b[i]`.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// A number with as many digits as its size deserves.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if (v.fract() == 0.0 && a < 1e15) || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Run\n");
        for (k, v) in &self.meta {
            let _ = writeln!(s, "- {k}: {v}");
        }
        let _ = writeln!(s, "\n## Targets\n");
        let _ = writeln!(s, "| target | measured | goal | met |\n|---|---|---|---|");
        for t in &self.targets {
            let met = if t.met { "yes" } else { "**no**" };
            let _ = writeln!(s, "| {} | {} | {} | {met} |", t.what, t.measured, t.target);
        }
        for sec in &self.sections {
            let _ = writeln!(s, "\n## {}. {}\n", sec.id, sec.title);
            let _ = writeln!(
                s,
                "| what | median | min | max | unit | ratio vs peer (median, min-max) |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---|---|");
            for r in &sec.rows {
                let ratio = match &r.ratio {
                    Some((q, peer)) => {
                        format!("{:.3} vs {peer} ({:.3}-{:.3})", q.median, q.min, q.max)
                    }
                    None => String::new(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {ratio} |",
                    r.what,
                    num(r.value.median),
                    num(r.value.min),
                    num(r.value.max),
                    r.unit
                );
            }
            if !sec.notes.is_empty() {
                s.push('\n');
                for n in &sec.notes {
                    let _ = writeln!(s, "- {n}");
                }
            }
        }
        s
    }

    pub fn json(&self) -> String {
        let mut s = String::from("{\n  \"meta\": {");
        for (i, (k, v)) in self.meta.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(s, "{sep}\n    {}: {}", jstr(k), jstr(v));
        }
        s.push_str("\n  },\n  \"targets\": [");
        for (i, t) in self.targets.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                s,
                "{sep}\n    {{\"what\": {}, \"measured\": {}, \"target\": {}, \"met\": {}}}",
                jstr(&t.what),
                jstr(&t.measured),
                jstr(&t.target),
                t.met
            );
        }
        s.push_str("\n  ],\n  \"experiments\": [");
        for (i, sec) in self.sections.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                s,
                "{sep}\n    {{\n      \"id\": {},\n      \"title\": {},\n      \"rows\": [",
                sec.id,
                jstr(&sec.title)
            );
            for (j, r) in sec.rows.iter().enumerate() {
                let sep = if j == 0 { "" } else { "," };
                let ratio = match &r.ratio {
                    Some((q, peer)) => format!(
                        "{{\"peer\": {}, \"median\": {}, \"min\": {}, \"max\": {}}}",
                        jstr(peer),
                        jnum(q.median),
                        jnum(q.min),
                        jnum(q.max)
                    ),
                    None => "null".into(),
                };
                let _ = write!(
                    s,
                    "{sep}\n        {{\"what\": {}, \"median\": {}, \"min\": {}, \"max\": {}, \"rounds\": {}, \"unit\": {}, \"ratio\": {ratio}}}",
                    jstr(&r.what),
                    jnum(r.value.median),
                    jnum(r.value.min),
                    jnum(r.value.max),
                    r.value.n,
                    jstr(r.unit)
                );
            }
            s.push_str("\n      ],\n      \"notes\": [");
            for (j, n) in sec.notes.iter().enumerate() {
                let sep = if j == 0 { "" } else { "," };
                let _ = write!(s, "{sep}\n        {}", jstr(n));
            }
            s.push_str("\n      ]\n    }");
        }
        s.push_str("\n  ]\n}\n");
        s
    }
}

fn jnum(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn jstr(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}
